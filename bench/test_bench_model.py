"""Our models on their own: forward, a full training iteration (deco.optimized.trainer.Trainer:
forward, flow matching + frequency-aware loss, backward, clipping, AdamW, EMA) and sampling
latency (Euler with classifier-free guidance), for DeCo and the baseline DiT, at the profile's
CPU sizes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from common import Sizes, batch_for, our_model, record

from deco.optimized.sampling import sample
from deco.optimized.trainer import TrainConfig, Trainer

ARCHS = ["deco", "baseline"]


@pytest.mark.parametrize("arch", ARCHS)
def test_forward(benchmark: Any, profile: dict[str, Sizes], arch: str) -> None:
    sizes = profile["forward"]
    config = sizes.config(arch)
    model = our_model(config).eval()
    x, t, y, _ = batch_for(config, sizes.batch, sizes.resolution)
    benchmark.group = f"forward {sizes.resolution}px b{sizes.batch}"
    with torch.no_grad():
        benchmark.pedantic(model, args=(x, t, y), rounds=sizes.rounds, warmup_rounds=1)
    record(benchmark, model=config.to_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_train_iteration(benchmark: Any, profile: dict[str, Sizes], arch: str) -> None:
    sizes = profile["train"]
    config = sizes.config(arch)
    trainer = Trainer(our_model(config), TrainConfig())
    x, _, y, _ = batch_for(config, sizes.batch, sizes.resolution)
    benchmark.group = f"train iteration {sizes.resolution}px b{sizes.batch}"
    logs = benchmark.pedantic(trainer.step, args=(x, y), rounds=sizes.rounds, warmup_rounds=1)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    record(benchmark, model=config.to_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_sampling(benchmark: Any, profile: dict[str, Sizes], arch: str) -> None:
    sizes = profile["sample"]
    config = sizes.config(arch)
    model = our_model(config).eval()
    noise = torch.randn(sizes.batch, config.in_channels, sizes.resolution, sizes.resolution)
    labels = torch.arange(sizes.batch) % config.num_classes
    options = {"steps": sizes.steps, "guidance": 4.0, "interval": (0.1, 1.0), "solver": "euler"}
    benchmark.group = f"sampling {sizes.steps} Euler steps, CFG, {sizes.resolution}px b{sizes.batch}"
    out = benchmark.pedantic(sample, args=(model, noise, labels), kwargs=options,
                             rounds=sizes.rounds, warmup_rounds=1)
    assert torch.isfinite(out).all()
    record(benchmark, model=config.to_dict(), **options)
