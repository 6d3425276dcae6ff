"""Data-parallel training (DDP over gloo, CPU, two processes) equals one process on the same
global batch.

Oracle: the single-process run of the same job. The two are not bitwise equal: DDP averages the
two ranks' gradients (an all-reduce: sum of two partial gradients, then / 2), while one process
sums over the whole batch in one reduction, in another order; float32 addition is not
associative, so results differ by a few ulps (~1e-7 relative), which we allow (1e-5 after
several Adam steps, which divide by sqrt of tiny second moments and so amplify ulps a little).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from deco.checkpoint import CHECKPOINT_NAME, load_checkpoint
from deco.optimized import TrainConfig
from deco.train.job import Job, RunConfig, setup_distributed

pytestmark = pytest.mark.slow

MODEL = "DiT-tiny/4"  # the smaller preset; DeCo's decoder is covered by the CLI test below


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(rank: int, world: int, port: int, out: str, steps: int, accumulation: int = 1) -> None:
    """One process of the job: `steps` steps, then rank 0 saves parameters and gradients."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:  # a spawned child: what torchrun would set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                          RANK=str(rank), LOCAL_RANK=str(rank))
    d = setup_distributed("cpu")
    run = RunConfig(out=Path(out), model=MODEL, batch_size=16, steps=steps, checkpoint_every=1000,
                    log_every=1, train=TrainConfig(lr=1e-3, ema_decay=0.9, timeshift=2.0), device="cpu",
                    accumulation=accumulation)
    job = Job(run, d)
    job.fit()
    if d.is_main:
        params = {f"param/{k}": v.detach().clone() for k, v in job.model.named_parameters()}
        grads = {f"grad/{k}": v.grad.detach().clone() for k, v in job.model.named_parameters()
                 if v.grad is not None}
        save_file({**params, **grads}, str(Path(out) / "result.safetensors"))
        (Path(out) / "records.json").write_text(json.dumps(job.records))
    if world > 1:
        dist.destroy_process_group()


def _job(tmp: Path, world: int, steps: int,
         accumulation: int = 1) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tmp.mkdir()
    if world == 1:
        threads = torch.get_num_threads()
        try:
            _run(0, 1, 0, str(tmp), steps, accumulation)
        finally:
            torch.set_num_threads(threads)
    else:
        mp.spawn(_run, args=(world, _free_port(), str(tmp), steps, accumulation), nprocs=world, join=True)
    return load_file(str(tmp / "result.safetensors")), json.loads((tmp / "records.json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def test_two_processes_match_one_on_the_same_global_batch(tmp_path: Path) -> None:
    single, single_log = _job(tmp_path / "one", 1, steps=1)
    ddp, ddp_log = _job(tmp_path / "two", 2, steps=1)
    assert single.keys() == ddp.keys()
    assert any(k.startswith("grad/") for k in single)
    for key in single:
        assert _rel(ddp[key], single[key]) < 1e-6, key
    # The logged loss is the mean over ranks of each shard's loss: the global batch's loss.
    assert ddp_log[0]["loss"] == pytest.approx(single_log[0]["loss"], rel=1e-6)
    assert ddp_log[0]["grad_norm"] == pytest.approx(single_log[0]["grad_norm"], rel=1e-6)


def test_ddp_is_not_a_mere_copy_of_rank_zero(tmp_path: Path) -> None:
    """Guard for the test above: a run on half the batch (what rank 0 alone sees) differs."""
    single, _ = _job(tmp_path / "one", 1, steps=1)
    half_dir = tmp_path / "half"
    half_dir.mkdir()
    run = RunConfig(out=half_dir, model=MODEL, batch_size=8, steps=1, checkpoint_every=1000,
                    log_every=1, train=TrainConfig(lr=1e-3, ema_decay=0.9, timeshift=2.0), device="cpu")
    job = Job(run, setup_distributed("cpu"))
    job.fit()
    grads = {f"grad/{k}": v.grad for k, v in job.model.named_parameters() if v.grad is not None}
    assert max(_rel(g, single[k]) for k, g in grads.items()) > 1e-3


def test_torchrun_cli_matches_single_process(tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 deco train` (gloo) vs `deco train`: same per-step losses and
    the same weights after 3 steps, and only rank 0 writes the run folder's files."""
    args = ["train", "--steps", "3", "--batch-size", "16", "--log-every", "1", "--sample-steps", "2",
            "--lr", "1e-3", "--ema-decay", "0.9", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "deco.cli", *args, "--out", str(one)], check=True, env=env,
                   capture_output=True, timeout=300)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(_free_port()), "-m", "deco.cli", *args, "--out", str(two)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    s1 = load_checkpoint(one / CHECKPOINT_NAME)
    s2 = load_checkpoint(two / CHECKPOINT_NAME)
    assert s2["trainer"]["step"] == 3 and s2["data"] == s1["data"]
    # Elementwise, with an absolute floor: after 3 Adam steps, a weight with an almost-zero
    # gradient moves by lr * g / (sqrt(v) + eps), which magnifies ulp-level gradient differences
    # relative to its own tiny size (seen: 3e-8 absolute on 6e-4).
    for part in ("model", "ema"):
        for key, value in s1["trainer"][part].items():
            torch.testing.assert_close(s2["trainer"][part][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "metrics.json").read_text())["world_size"] == 2
