"""Gradient accumulation in the job: one process accumulating k = 2 micro-batches follows the
trajectory of two DDP processes (gloo, CPU) with k = 1 on the same global batch.

Oracle: the two-process run. Micro-batch j of rank r is global rows (r + w j)::(w k), so both
runs compute the same two half-batch gradients and average them; they differ only by the order of
float32 additions (DDP's all-reduce against a running sum): a few ulps (as in test_distributed.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_distributed import _free_port, _rel

from deco.job import Job, RunConfig, setup_distributed
from deco.optimized import TrainConfig

pytestmark = pytest.mark.slow


def _run(rank: int, world: int, port: int, out: str, accumulation: int) -> None:
    """One process: one step of DiT-tiny/4 on a global batch of 16, then rank 0 saves the weights
    and gradients (after one step: Adam's first update is about lr * sign(gradient), so later
    weights would amplify the ulps of near-zero gradients)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                          RANK=str(rank), LOCAL_RANK=str(rank))
    d = setup_distributed("cpu")
    run = RunConfig(out=Path(out), model="DiT-tiny/4", batch_size=16, steps=1, checkpoint_every=1000,
                    log_every=1, accumulation=accumulation, device="cpu",
                    train=TrainConfig(lr=1e-3, ema_decay=0.9, timeshift=2.0))
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


def _job(tmp: Path, world: int, accumulation: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    tmp.mkdir()
    if world == 1:
        threads = torch.get_num_threads()
        try:
            _run(0, 1, 0, str(tmp), accumulation)
        finally:
            torch.set_num_threads(threads)
    else:
        mp.spawn(_run, args=(world, _free_port(), str(tmp), accumulation), nprocs=world, join=True)
    return load_file(str(tmp / "result.safetensors")), json.loads((tmp / "records.json").read_text())


def test_one_process_accumulating_two_matches_two_processes(tmp_path: Path) -> None:
    accumulated, acc_log = _job(tmp_path / "acc", 1, accumulation=2)
    ddp, ddp_log = _job(tmp_path / "ddp", 2, accumulation=1)
    assert accumulated.keys() == ddp.keys() and any(k.startswith("grad/") for k in ddp)
    for key in ddp:
        assert _rel(accumulated[key], ddp[key]) < 1e-6, key
    for a, b in zip(acc_log, ddp_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)


def test_two_processes_accumulating_two_match_one_process_accumulating_four(tmp_path: Path) -> None:
    """w = 2, k = 2 (rank r, micro-batch j: global rows (r + 2 j)::4) against w = 1, k = 4 (rows
    j::4): the same four quarter-batches."""
    ddp, _ = _job(tmp_path / "ddp", 2, accumulation=2)
    single, _ = _job(tmp_path / "single", 1, accumulation=4)
    for key in ddp:
        assert _rel(ddp[key], single[key]) < 1e-6, key
