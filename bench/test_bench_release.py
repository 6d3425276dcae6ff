"""Ours vs the release's model code, side by side (needs $DECO_RELEASE_SRC): DeCo-S/16 at 256x256,
batch 4, float32 on the CPU, identical weights. One forward pass and one training step (the same
AdamW and the same loss code for both), plus peak memory of each in a fresh process."""

from __future__ import annotations

import copy
from types import ModuleType
from typing import Any

import pytest
import torch
from common import Sizes, adamw, batch_for, our_model, peak_memory, record, release_twin, train_step
from torch import Tensor, nn

IMPLS = ["ours", "release"]


@pytest.fixture(scope="module")
def pair(release: ModuleType,
         profile: dict[str, Sizes]) -> tuple[Sizes, dict[str, nn.Module], tuple[Tensor, ...]]:
    sizes = profile["release"]
    config = sizes.config()
    ours = our_model(config)
    models = {"ours": ours, "release": release_twin(release, ours)}
    data = batch_for(config, sizes.batch, sizes.resolution)
    with torch.no_grad():
        a, b = (models[k].eval()(*data[:3]) for k in IMPLS)
    # Timings of two models mean something only if they compute the same function.
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= 1e-4, f"ours and the release disagree: max rel err {err:.2e}"
    return sizes, models, data


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark: Any, pair: Any, impl: str) -> None:
    sizes, models, data = pair
    benchmark.group = f"release-forward {sizes.preset} {sizes.resolution}px b{sizes.batch}"
    model = models[impl].eval()
    with torch.no_grad():
        benchmark.pedantic(model, args=data[:3], rounds=sizes.rounds, warmup_rounds=1)
    record(benchmark, impl=impl, memory=peak_memory(impl, "forward", sizes))


@pytest.mark.parametrize("impl", IMPLS)
def test_train_step(benchmark: Any, pair: Any, impl: str) -> None:
    sizes, models, data = pair
    benchmark.group = f"release-train {sizes.preset} {sizes.resolution}px b{sizes.batch}"
    model = copy.deepcopy(models[impl]).train()
    optimizer = adamw(model)
    benchmark.pedantic(train_step, args=(model, optimizer, data), rounds=sizes.rounds, warmup_rounds=1)
    record(benchmark, impl=impl, memory=peak_memory(impl, "train", sizes))

