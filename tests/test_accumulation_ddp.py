"""Gradient accumulation in the job: one process accumulating k = 2 micro-batches follows the
trajectory of two DDP processes (gloo, CPU) with k = 1 on the same global batch.

Oracle: the two-process run. Micro-batch j of rank r is global rows (r + w j)::(w k), so both
runs compute the same two half-batch gradients and average them; they differ only by the order of
float32 additions (DDP's all-reduce against a running sum): a few ulps (as in test_distributed.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import _job as distributed_job
from test_distributed import _rel

pytestmark = pytest.mark.slow


def _job(tmp: Path, world: int, accumulation: int) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """One step of DiT-tiny/4 on a global batch of 16 (test_distributed.py's job), then rank 0's
    weights and gradients (after one step: Adam's first update is about lr * sign(gradient), so
    later weights would amplify the ulps of near-zero gradients)."""
    return distributed_job(tmp, world, steps=1, accumulation=accumulation)


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
