"""Training checkpoints: exact round trips, atomic writes, exact resume, surviving SIGKILL, and
stopping cleanly on a non-finite loss.

Oracles: the saved object itself (round trips), an uninterrupted run of the same job (resume and
kill tests), and the file left on disk before a failed write (atomicity).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from deco import checkpoint as ckpt
from deco.checkpoint import CHECKPOINT_NAME, flatten, load_checkpoint, save_checkpoint, unflatten
from deco.cli import main
from deco.data import DigitsDataset
from deco.optimized import TrainConfig
from deco.optimized.sampling import SampleSettings
from deco.train.job import LOG_NAME, RunConfig, TrainingError, train

TINY: dict[str, Any] = dict(model="DiT-tiny/4", batch_size=16, log_every=1, device="cpu",
                            train=TrainConfig(lr=1e-3, ema_decay=0.9, timeshift=2.0),
                            sample=SampleSettings(steps=2))
LOSS_KEYS = ("loss", "fm", "freq", "grad_norm")


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return type(a) is type(b) and a == b


def _optimizer_state() -> dict[str, Any]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(4, 3)).square().sum().backward()
    opt.step()
    return opt.state_dict()


def _state() -> dict[str, Any]:
    return {
        "optimizer": _optimizer_state(),
        "generator": torch.Generator().manual_seed(3).get_state(),
        "weights": {"a": torch.randn(2, 3), "b": torch.arange(5), "h": torch.randn(4).bfloat16()},
        "nested": [1, 2.5, None, True, "x", (3, [4.0])],
        "empty": {},
    }


# ----------------------------------------------------------------------------- round trips
def test_flatten_round_trip_restores_every_type() -> None:
    state = _state()
    tree, tensors = flatten(state)
    json.dumps(tree)  # JSON-able, tensors only in the separate mapping
    assert _equal(unflatten(tree, tensors), state)


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    state = _state()
    save_checkpoint(tmp_path / "c.safetensors", state)
    assert _equal(load_checkpoint(tmp_path / "c.safetensors"), state)


def test_optimizer_resumes_identically(tmp_path: Path) -> None:
    """An AdamW restored from a checkpoint takes the same next step as the original."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "c.safetensors", {"model": model.state_dict(), "opt": opt.state_dict()})
    twin = torch.nn.Linear(3, 2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    state = load_checkpoint(tmp_path / "c.safetensors")
    twin.load_state_dict(state["model"])
    twin_opt.load_state_dict(state["opt"])
    x = torch.randn(4, 3)
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_partial_load_reads_only_the_selected_tensors(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.safetensors", {"trainer": {"ema": {"w": torch.ones(2)},
                                                             "model": {"w": torch.zeros(2)}}, "step": 3})
    state = load_checkpoint(tmp_path / "c.safetensors", only="trainer/ema")
    assert torch.equal(state["trainer"]["ema"]["w"], torch.ones(2))
    assert state["trainer"]["model"]["w"] is None and state["step"] == 3


# ----------------------------------------------------------------------------- atomicity and errors
def test_failed_write_leaves_previous_checkpoint_and_no_temporaries(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def torn_write(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


def test_refuses_to_save_non_finite_values(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="non-finite values in w"):
        save_checkpoint(path, {"w": torch.tensor([1.0, float("nan")])})
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", "model"])
def test_unreadable_or_foreign_files_are_value_errors(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "x.safetensors"
    if content == "model":  # a valid safetensors file, but not a training checkpoint
        safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"x\.safetensors"):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"w": torch.randn(1000)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"c\.safetensors"):
        load_checkpoint(path)


def test_missing_checkpoint_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_checkpoint(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------- resume
def _losses(folder: Path) -> list[tuple[Any, ...]]:
    records = [json.loads(line) for line in (folder / LOG_NAME).read_text().splitlines()]
    return [(r["step"], *(r[k] for k in LOSS_KEYS)) for r in records]


def _final_weights(folder: Path) -> dict[str, Any]:
    state = load_checkpoint(folder / CHECKPOINT_NAME)
    return {"model": state["trainer"]["model"], "ema": state["trainer"]["ema"],
            "optimizer": state["trainer"]["optimizer"], "generator": state["trainer"]["generator"],
            "data": state["data"]}


@pytest.mark.slow
def test_resume_continues_the_exact_trajectory(tmp_path: Path) -> None:
    """12 steps straight vs 6 steps, then --resume to 12: identical losses (bitwise) and state.

    An epoch here is 1797 // 16 = 112 batches, so the data order inside an epoch matters; the
    step-6 checkpoint must carry the position and the generator for this to hold."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(RunConfig(out=straight, steps=12, checkpoint_every=100, grid_columns=2, **TINY))
    train(RunConfig(out=split, steps=6, checkpoint_every=100, grid_columns=2, **TINY))
    first = _losses(split)
    assert [r[0] for r in first] == list(range(1, 7))
    train(RunConfig(out=split, steps=12, resume=True), explicit={"steps"})
    assert _losses(split) == _losses(straight)
    assert _equal(_final_weights(split), _final_weights(straight))


@pytest.mark.slow
def test_resume_refuses_changed_trajectory_settings(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    train(RunConfig(out=out, steps=2, checkpoint_every=100, grid_columns=1, **TINY))
    capsys.readouterr()
    code = main(["train", "--out", str(out), "--resume", "--steps", "4", "--lr", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--lr" in err
    assert main(["train", "--out", str(out), "--steps", "4"]) == 2  # a fresh run would clobber it
    assert "--resume" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_may_change_the_steps_and_the_final_grid_sampler(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(RunConfig(out=out, steps=2, checkpoint_every=100, grid_columns=1, **TINY))
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--guidance", "1.5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["run"]["train"]["lr"] == TINY["train"].lr
    assert metrics["run"]["sample"] == {"steps": 2, "guidance": 1.5, "interval": [0.0, 1.0],
                                        "timeshift": 1.0, "solver": "euler"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deco.cli", "train", "--model", "DiT-tiny/4", "--batch-size", "16",
            "--lr", "1e-3", "--ema-decay", "0.9", "--log-every", "1", "--sample-steps", "2",
            "--device", "cpu", *args]


@pytest.mark.slow
def test_sigkill_then_resume_loses_only_steps_after_the_last_checkpoint(tmp_path: Path) -> None:
    """Kill -9 a CLI run once its first checkpoint exists; --resume finishes it. The checkpoint
    left behind loads, the run restarts right after it, and the final losses and weights equal
    an uninterrupted run's."""
    steps, every = 200, 10
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ("--steps", str(steps), "--checkpoint-every", str(every))
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / CHECKPOINT_NAME).exists():
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        time.sleep(0.3)  # let it train (and perhaps start writing) a little past the checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    saved = load_checkpoint(killed / CHECKPOINT_NAME)
    at = saved["trainer"]["step"]
    assert at % every == 0 and 0 < at < steps
    logged = max(r[0] for r in _losses(killed))
    assert logged - at < every + 1  # lost at most the steps since the last checkpoint

    resumed = subprocess.run(_cli("--steps", str(steps), "--out", str(killed), "--resume"),
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {at}" in resumed.stderr
    subprocess.run(_cli(*args, "--out", str(reference)), env=env, check=True, capture_output=True,
                   timeout=600)
    assert _losses(killed) == _losses(reference)
    assert _equal(_final_weights(killed), _final_weights(reference))
    assert not list(killed.glob(".*.tmp"))


# ----------------------------------------------------------------------------- non-finite loss
class _NaNDigits(DigitsDataset):
    """The digits with every image NaN: the very first step must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.images = torch.full_like(self.images, float("nan"))


def test_nan_data_stops_at_the_first_step_and_saves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 1: non-finite"):
        train(RunConfig(out=out, steps=5, checkpoint_every=1, **TINY), dataset=_NaNDigits())
    assert not (out / CHECKPOINT_NAME).exists()


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_keeps_a_loadable_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e30: the first Adam step moves every weight by ~1e30, the next forward overflows."""
    out = tmp_path / "run"
    code = main(["train", "--out", str(out), "--model", "DiT-tiny/4", "--batch-size", "16", "--lr", "1e30",
                 "--steps", "20", "--checkpoint-every", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("deco train: error: step ") and "non-finite" in err[-1]
    failed_at = int(err[-1].split("step ")[1].split(":")[0])
    state = load_checkpoint(out / CHECKPOINT_NAME)  # loads: finite and complete
    assert state["trainer"]["step"] == failed_at - 1
    assert not (out / "metrics.json").exists()


def test_lora_run_weights_are_checked_under_their_base_names() -> None:
    """A LoRA run's weights (peft's names) validate as the base model's; an adapter pair that
    does not fit its layer (a wrong rank, a swapped side, an unknown module) is refused."""
    from deco.checkpoint import base_of_adapted

    shapes = {"blocks.0.qkv.base_layer.weight": (96, 32), "blocks.0.qkv.base_layer.bias": (96,),
              "blocks.0.qkv.lora_A.default.weight": (4, 32), "blocks.0.qkv.lora_B.default.weight": (96, 4),
              "final.weight": (12, 32), "y_embed.base_layer.weight": (11, 32),
              "y_embed.lora_embedding_A.default": (4, 11), "y_embed.lora_embedding_B.default": (32, 4)}
    assert base_of_adapted(shapes, 4) == {"blocks.0.qkv.weight": (96, 32), "blocks.0.qkv.bias": (96,),
                                          "final.weight": (12, 32), "y_embed.weight": (11, 32)}
    for bad in ({"blocks.0.qkv.lora_A.default.weight": (8, 32)},      # rank 8 in a rank-4 run
                {"blocks.0.qkv.lora_B.default.weight": (4, 96)},      # B transposed
                {"nowhere.lora_A.default.weight": (4, 32)},           # no such layer
                {"y_embed.lora_embedding_A.default": (4, 32)},        # an embedding's A is (rank, rows)
                {"y_embed.lora_embedding_B.default": (11, 4)},        # its B is (width, rank)
                {"y_embed.lora_embedding_A.default.weight": (4, 11)}):  # not peft's name
        with pytest.raises(ValueError, match="does not fit"):
            base_of_adapted({**shapes, **bad}, 4)
    with pytest.raises(ValueError, match="lora_rank"):
        base_of_adapted(shapes, "4")
