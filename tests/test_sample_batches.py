"""Sharded, resumable sample generation (deco.evaluate.sample_batches): balance, resume, assembly, atomicity,
two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from deco.evaluate.sample_batches import (
    ShardPlan,
    assemble_sample_batch,
    balanced_labels,
    generate_sample_batch,
    generate_shards,
    read_shard,
    shard_indices,
    shard_path,
)


def fake_generate(labels: NDArray[np.int64], seed: int) -> NDArray[np.uint8]:
    """Images that encode (label, seed, position) so that a misplaced one is visible."""
    n = len(labels)
    out = np.zeros((n, 4, 5, 3), np.uint8)
    out[:, 0, 0, 0] = labels % 256
    out[:, 0, 0, 1] = seed % 256
    out[:, 0, 0, 2] = np.arange(n) % 256
    out[:, 1:] = np.random.default_rng(seed).integers(0, 256, (n, 3, 5, 3), dtype=np.uint8)
    return out


class Counting:
    """A generate callable that records the seeds it is called with."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def __call__(self, labels: NDArray[np.int64], seed: int) -> NDArray[np.uint8]:
        self.seeds.append(seed)
        return fake_generate(labels, seed)


@settings(max_examples=25, deadline=None)
@given(count=st.integers(1, 3000), num_classes=st.integers(1, 1000))
def test_balanced_labels_as_even_as_possible(count: int, num_classes: int) -> None:
    labels = balanced_labels(count, num_classes)
    per_class = Counter(labels.tolist())
    counts = [per_class.get(c, 0) for c in range(num_classes)]
    assert len(labels) == count and labels.min() >= 0 and labels.max() < num_classes
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == count


def test_imagenet_protocol_is_50_per_class() -> None:
    counts = Counter(balanced_labels(50_000, 1000).tolist())
    assert set(counts.values()) == {50} and len(counts) == 1000


def test_plan_shards_cover_the_labels_once() -> None:
    plan = ShardPlan(count=2500, num_classes=7, shard_size=1000, seed=5)
    assert plan.num_shards == 3
    joined = np.concatenate([plan.shard_labels(i) for i in range(3)])
    np.testing.assert_array_equal(joined, balanced_labels(2500, 7))
    assert [len(plan.shard_labels(i)) for i in range(3)] == [1000, 1000, 500]
    assert plan.shards_of_rank(0, 2) == [0, 2] and plan.shards_of_rank(1, 2) == [1]
    assert sorted(plan.shards_of_rank(0, 4) + plan.shards_of_rank(1, 4) + plan.shards_of_rank(2, 4)
                  + plan.shards_of_rank(3, 4)) == [0, 1, 2]


@pytest.mark.parametrize(("name", "bad"), [
    ("count", {"count": 0, "num_classes": 3}), ("num_classes", {"count": 5, "num_classes": 0}),
    ("shard_size", {"count": 5, "num_classes": 3, "shard_size": 0}),
    ("count", {"count": 2.5, "num_classes": 3}), ("seed", {"count": 5, "num_classes": 3, "seed": 1.0}),
])
def test_plan_rejects_bad_values(name: str, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=f"^{name}:"):
        ShardPlan(**bad)


def test_resume_skips_finished_shards(tmp_path: Path) -> None:
    plan = ShardPlan(count=23, num_classes=4, shard_size=5, seed=100)
    first = Counting()
    assert generate_shards(first, tmp_path, plan, rank=0, world_size=2, progress=False) == [0, 2, 4]
    assert first.seeds == [100, 102, 104]
    again = Counting()
    assert generate_shards(again, tmp_path, plan, rank=0, world_size=2, progress=False) == []
    assert again.seeds == []
    os.unlink(shard_path(tmp_path, 2))  # a lost shard is made again, the others are not
    rest = Counting()
    assert generate_shards(rest, tmp_path, plan, rank=0, world_size=1, progress=False) == [1, 2, 3]
    assert rest.seeds == [101, 102, 103]
    with pytest.raises(ValueError, match=r"^rank: give both"):
        generate_shards(rest, tmp_path, plan, rank=0, progress=False)
    assert shard_indices(tmp_path) == [0, 1, 2, 3, 4]


def test_assembled_file_is_the_concatenation(tmp_path: Path) -> None:
    plan = ShardPlan(count=23, num_classes=4, shard_size=5, seed=7)
    generate_shards(fake_generate, tmp_path / "s", plan, rank=1, world_size=2, progress=False)
    generate_shards(fake_generate, tmp_path / "s", plan, rank=0, world_size=2, progress=False)
    out = assemble_sample_batch(tmp_path / "s", tmp_path / "batch.npz", plan)
    # the oracle: each shard generated directly, concatenated in memory
    expected = np.concatenate([fake_generate(plan.shard_labels(i), 7 + i) for i in range(plan.num_shards)])
    with np.load(out) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(data["arr_0"], expected)
        np.testing.assert_array_equal(data["arr_1"], balanced_labels(23, 4))
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (23, 4, 5, 3)
    # and `deco fid`'s streaming reader sees the same images
    from deco.evaluate.adm import image_batches

    n, batches = image_batches(out, 10)
    assert n == 23
    np.testing.assert_array_equal(np.concatenate(list(batches)), expected)


def test_assemble_refuses_missing_or_foreign_shards(tmp_path: Path) -> None:
    plan = ShardPlan(count=10, num_classes=3, shard_size=5)
    generate_shards(fake_generate, tmp_path, plan, rank=0, world_size=2, progress=False)
    with pytest.raises(FileNotFoundError, match=r"^folder: 1 of 2 shards missing"):
        assemble_sample_batch(tmp_path, tmp_path / "b.npz", plan)
    assert not (tmp_path / "b.npz").exists()
    with pytest.raises(ValueError, match=r"^folder: .* another plan"):
        generate_shards(fake_generate, tmp_path, ShardPlan(count=10, num_classes=4, shard_size=5),
                        progress=False)


def test_generate_output_is_checked(tmp_path: Path) -> None:
    plan = ShardPlan(count=4, num_classes=2, shard_size=4)

    def float_images(labels: NDArray[np.int64], seed: int) -> NDArray[np.float32]:
        return np.zeros((len(labels), 4, 4, 3), np.float32)

    with pytest.raises(ValueError, match=r"^generate: expected uint8 images \(4, H, W, 3\)"):
        generate_shards(float_images, tmp_path, plan, progress=False)
    assert shard_indices(tmp_path) == []


def test_failed_shard_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = ShardPlan(count=4, num_classes=2, shard_size=2)

    def broken_savez(f: Any, **arrays: Any) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        generate_shards(fake_generate, tmp_path, plan, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_killed_shard_write_leaves_no_partial_shard(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing shard 1: shard 0 is complete, shard 1 absent, and a rerun
    regenerates only shard 1 and ignores the torn temporary file."""
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        import deco.evaluate.sample_batches as sb
        real = np.savez
        calls = []
        def savez(f, **arrays):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"PK\\x03\\x04 torn")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(f, **arrays)
        np.savez = savez
        def gen(labels, seed):
            return np.full((len(labels), 2, 2, 3), seed, np.uint8)
        sb.generate_shards(gen, {str(tmp_path)!r}, sb.ShardPlan(count=6, num_classes=3, shard_size=2),
                           progress=False)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert shard_indices(tmp_path) == [0]
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the torn write, under another name
    images, labels = read_shard(shard_path(tmp_path, 0))
    assert images.shape == (2, 2, 2, 3) and labels.tolist() == [0, 1]
    rerun = Counting()
    assert generate_shards(rerun, tmp_path, ShardPlan(count=6, num_classes=3, shard_size=2),
                           progress=False) == [1, 2]
    assert rerun.seeds == [1, 2]


def _two_process_worker(rank: int, world_size: int, folder: str, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        plan = ShardPlan(count=13, num_classes=5, shard_size=3, seed=11)
        generate_sample_batch(fake_generate, Path(folder) / "shards", Path(folder) / "batch.npz", plan,
                              progress=False)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_with_gloo_match_one(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_two_process_worker, args=(2, str(tmp_path), str(tmp_path / "init")), nprocs=2, join=True)
    plan = ShardPlan(count=13, num_classes=5, shard_size=3, seed=11)
    single = generate_sample_batch(fake_generate, tmp_path / "one", tmp_path / "one.npz", plan,
                                   progress=False)
    assert single is not None
    with np.load(tmp_path / "batch.npz") as two, np.load(single) as one:
        np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
        np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
