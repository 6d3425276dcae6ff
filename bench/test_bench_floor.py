"""Smoke checks of the training-step measurement scripts of issue #29 (not benchmarks: cheap, run
in the CI smoke run): bench/gemm_floor_c2i.py's product accounting and bench/train_step_ab.py's
worker, at tiny sizes, our model only (no release needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from common import BENCH_DIR, PHASES, adamw, batch_for, our_model, train_step_phases
from gemm_floor_c2i import floor_seconds, products_of

from deco.config import DeCoConfig
from deco.optimized import cpu_gemm_backend


@pytest.mark.parametrize("backend", ["aten", "onednn"])
def test_products_counted_with_their_flops(backend: str) -> None:
    """Three linear layers' forward and backward: 3 forward products, and per layer one for the
    input's gradient (except the first, whose input needs none) and one for the weight's; the
    FLOP count is the closed form 2 m k n summed over them."""
    if backend == "onednn":
        from deco.optimized.gemm import onednn_available

        if not onednn_available():
            pytest.skip("no oneDNN linear here")
    torch.manual_seed(0)
    layers = [torch.nn.Linear(k, n, bias=False) for k, n in ((8, 16), (16, 24), (24, 4))]
    x = torch.randn(32, 8)

    def step() -> None:
        from deco.optimized.gemm import linear

        h = x
        for layer in layers:
            h = linear(h, layer.weight)
        h.sum().backward()

    with cpu_gemm_backend(backend):
        found = products_of(step)
    _, gflop = floor_seconds(found)
    forward = sum(2 * 32 * k * n for k, n in ((8, 16), (16, 24), (24, 4)))
    weight_grads = forward  # dW = g^T x: (n, 32) x (32, k) per layer
    input_grads = sum(2 * 32 * n * k for k, n in ((16, 24), (24, 4)))
    assert sum(found.values()) == 3 + 3 + 2
    assert gflop * 1e9 == pytest.approx(forward + weight_grads + input_grads, rel=1e-12)


def test_train_step_phases_add_up() -> None:
    config = DeCoConfig.preset("DeCo-tiny/4")
    model = our_model(config).train()
    times = train_step_phases(model, adamw(model), batch_for(config, 2, 16))
    assert set(times) == {*PHASES, "step"}
    assert all(v >= 0 for v in times.values())
    assert sum(times[p] for p in PHASES) == pytest.approx(times["step"], rel=1e-9)


def test_train_step_ab_worker_runs() -> None:
    """bench/train_step_ab.py end to end (driver, one worker, table) at smoke sizes, ours only."""
    env = dict(os.environ, DECO_BENCH_PROFILE="smoke")
    cmd = [sys.executable, str(BENCH_DIR / "train_step_ab.py"), "--impls", "ours", "--rounds", "1",
           "--threads", "1", "--states", "default"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| default | 1 |")]
    assert len(rows) == 1 and "| ours |" in rows[0]
