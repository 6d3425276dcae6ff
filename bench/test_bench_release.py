"""Ours vs the release's model code, side by side (needs $DECO_RELEASE_SRC): DeCo-S/16 at 256x256,
batch 4, float32 on the CPU, identical weights. One forward pass and one training step (the same
AdamW and the same loss code for both), plus peak memory of each in a fresh process.

Four variants (common.IMPLS): ours and the release's model, each with PyTorch's default float32
CPU matrix products ("ours-aten", "release") and with oneDNN's ("ours", "release-onednn"), so
that the report separates what the backend gives from what our model's layout gives."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest
import torch
from common import (
    BENCH_DIR,
    IMPLS,
    Sizes,
    adamw,
    batch_for,
    our_model,
    peak_memory,
    record,
    train_step,
    variant,
)
from torch import Tensor, nn

from deco.optimized import cpu_gemm_backend


@pytest.fixture(scope="module")
def pair(release: ModuleType, profile: dict[str, Sizes]
         ) -> tuple[Sizes, dict[str, tuple[nn.Module, str]], tuple[Tensor, ...]]:
    sizes = profile["release"]
    config = sizes.config()
    ours = our_model(config)
    models = {impl: variant(impl, release, ours) for impl in IMPLS}
    data = batch_for(config, sizes.batch, sizes.resolution)
    outputs = {}
    with torch.no_grad():
        for impl, (model, backend) in models.items():
            with cpu_gemm_backend(backend):
                outputs[impl] = model.eval()(*data[:3])
    # Timings of two models mean something only if they compute the same function.
    ref = outputs["release"]
    for impl, out in outputs.items():
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err <= 1e-4, f"{impl} and the release disagree: max rel err {err:.2e}"
    return sizes, models, data


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark: Any, pair: Any, impl: str) -> None:
    sizes, models, data = pair
    benchmark.group = f"release-forward {sizes.preset} {sizes.resolution}px b{sizes.batch}"
    model, backend = models[impl]
    with torch.no_grad(), cpu_gemm_backend(backend):
        benchmark.pedantic(model.eval(), args=data[:3], rounds=sizes.rounds, warmup_rounds=1)
    record(benchmark, impl=impl, cpu_gemm=backend, memory=peak_memory(impl, "forward", sizes))


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark: Any, pair: Any, impl: str) -> None:
    sizes, models, data = pair
    benchmark.group = f"release-train {sizes.preset} {sizes.resolution}px b{sizes.batch}"
    model, backend = models[impl]
    model = copy.deepcopy(model).train()
    optimizer = adamw(model)
    with cpu_gemm_backend(backend):
        benchmark.pedantic(train_step, args=(model, optimizer, data), rounds=sizes.rounds,
                           warmup_rounds=1)
    record(benchmark, impl=impl, cpu_gemm=backend, memory=peak_memory(impl, "train", sizes))


@pytest.mark.parametrize("impl", ["ours", "ours-aten"])
def test_fresh_process_script(impl: str) -> None:
    """bench/fresh_process.py (the same step in a fresh process) runs; smoke sizes, our model only,
    so that it needs no release. Not a benchmark: skipped by --benchmark-only."""
    env = dict(os.environ, DECO_BENCH_PROFILE="smoke")
    done = subprocess.run([sys.executable, str(BENCH_DIR / "fresh_process.py"), impl, "1"], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    name, threads, median, minimum = done.stdout.split()
    assert (name, threads) == (impl, "1") and 0 < float(minimum) <= float(median)
