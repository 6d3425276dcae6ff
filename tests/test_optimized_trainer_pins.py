"""Pins for `deco.optimized.trainer` found by mutation testing (tests/MUTATION.md).

The training defaults are the release's class-to-image recipe as spec/01 §6 states it (AdamW with
PyTorch's default betas and eps, lr 1e-4, weight decay 0; EMA 0.9999; label dropout 0.1;
logit-normal(0, 1) times, no shift; REPA at block 8, weight 0.5, DINOv2-B's 768 features; bf16
mixed precision) and spec/02's frequency-loss defaults (quality 85, gamma 1, weight 1), plus the
one stated deviation (gradient clipping at 1.0). The expected numbers are the spec's, and AdamW's
defaults are read off PyTorch's own signature; the optimizer is checked to receive them. The
REPA encoder is documented as frozen: the Trainer switches off its gradients and dropout. A step's
draws are made on the run's device, not torch's default device (on a CPU-only machine a "meta"
default device stands in for a run on CUDA while the default is the CPU). The bf16 autocast of the
default config is for CUDA only: a float32 step on the CPU computes its losses in float32, within
1e-5 of the float64 reference (bf16 products would be off by ~1e-2). With gradient accumulation
under a DDP-like net, every micro-batch but the last runs inside `no_sync` (the gradients are
all-reduced once, after the last one), and the step's bookkeeping lives on the run's device.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from helpers import random_weights, rel_err, tiny_config
from test_optimized_trainer import STEP_CONFIG, PatchEncoder, batch, reference_step_losses, tiny_model
from torch import Tensor, nn

from deco.optimized import trainer as T

SPEC_DEFAULTS = {
    "lr": 1e-4, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9999, "label_dropout": 0.1,
    "time_sampling": "logit_normal", "time_mean": 0.0, "time_std": 1.0, "timeshift": 1.0,
    "freq_weight": 1.0, "quality": 85, "gamma": 1.0, "repa_weight": 0.5, "repa_layer": 8,
    "repa_encoder_dim": 768, "repa_hidden": None, "bf16": True,
}


def test_train_config_defaults_are_the_spec_recipe() -> None:
    config = T.TrainConfig()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(config, name) == value, name
    adamw = inspect.signature(torch.optim.AdamW).parameters
    assert config.betas == tuple(adamw["betas"].default)
    assert config.eps == adamw["eps"].default


OTHER = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}


@pytest.mark.parametrize("overrides", [{}, OTHER])
def test_optimizer_receives_the_configured_hyper_parameters(overrides: dict[str, object]) -> None:
    config = T.TrainConfig(**overrides)  # type: ignore[arg-type]
    group = T.Trainer(tiny_model(), config).optimizer.param_groups[0]
    assert group["lr"] == config.lr and tuple(group["betas"]) == config.betas
    assert group["eps"] == config.eps and group["weight_decay"] == config.weight_decay


def test_the_repa_encoder_is_frozen_and_in_eval_mode() -> None:
    encoder = PatchEncoder().train()
    assert all(p.requires_grad for p in encoder.parameters())
    T.Trainer(tiny_model(), STEP_CONFIG, encoder=encoder)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


@pytest.mark.parametrize("time_sampling", ["logit_normal", "uniform"])
def test_draws_are_made_on_the_runs_device_not_the_default_device(time_sampling: str) -> None:
    trainer = T.Trainer(tiny_model(), T.TrainConfig(time_sampling=time_sampling))  # type: ignore[arg-type]
    x, _ = batch(0)
    with torch.device("meta"):  # the default device for factories, restored exactly on exit
        draws = trainer.draw(x)
    for tensor in (draws.label_uniform, draws.time, draws.noise):
        assert tensor.device == trainer.device and tensor.dtype == trainer.dtype


def test_float32_cpu_step_is_not_autocast_to_bf16() -> None:
    config = tiny_config()
    weights = {k: v.astype(np.float32).astype(np.float64) for k, v in random_weights(config, seed=3).items()}
    model = tiny_model(torch.float32, weight_seed=3)
    trainer = T.Trainer(model, STEP_CONFIG, encoder=PatchEncoder(dtype=torch.float32))
    assert trainer.config.bf16
    x, y = batch(0)
    generator = torch.Generator().manual_seed(5)
    draws = T.Draws(torch.tensor([0.2, 0.7, 0.4]), torch.randn(3, generator=generator),
                    torch.randn(x.shape, generator=generator))
    x = x.float()
    got = trainer.losses(x, y, draws)
    draws64 = T.Draws(draws.label_uniform.double(), draws.time.double(), draws.noise.double())
    expected = reference_step_losses(trainer, weights, x.double(), y, draws64)
    errors = {k: rel_err(float(got[k].detach()), expected[k]) for k in expected}
    assert max(errors.values()) <= 1e-5, errors


class NoSyncRecorder(nn.Module):
    """A DDP stand-in: forwards to the model and records, per call, whether `no_sync` was active."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.inside = False
        self.calls: list[bool] = []

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls.append(self.inside)
        out: Tensor = self.model(x, t, y)
        return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_only_the_last_micro_batch_synchronises(k: int) -> None:
    model = tiny_model()
    net = NoSyncRecorder(model)
    trainer = T.Trainer(model, T.TrainConfig(), net=net)
    x, y = batch(0, b=6)
    trainer.step(x, y, accumulation=k)
    assert net.calls == [True] * (k - 1) + [False]


def test_step_bookkeeping_is_on_the_runs_device_not_the_default_device() -> None:
    """A step with torch's default device elsewhere ("meta") still runs. The first step, on the
    CPU default, builds the frequency loss's cached operator (its construction reads the default
    device, see tests/MUTATION.md)."""
    trainer = T.Trainer(tiny_model(), T.TrainConfig())
    x, y = batch(0, b=4)
    trainer.step(x, y, accumulation=2)
    draws = trainer.draw(x)
    with torch.device("meta"):  # the default device for factories, restored exactly on exit
        logs = trainer.step(x, y, draws, accumulation=2)
    assert all(np.isfinite(v) for v in logs.values())
    assert all(p.device == trainer.device for p in trainer.model.parameters())
