"""Activation checkpointing of the DiT and text refine blocks (`gradient_checkpointing`, `deco
train --grad-checkpointing`, diffusers' `enable_gradient_checkpointing`, issue 27): float64
gradients and training steps equal the plain ones (~1e-10: the recomputed forward is the same
arithmetic, so in practice they are equal bit for bit), and the blocks really are recomputed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import require_module

from deco import optimized
from deco.optimized.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = {"class": "A.ckpt", "baseline": "A-baseline.ckpt", "text": "T.ckpt"}


def float64_model(fixtures_dir: Path, kind: str) -> Any:
    """The fixture model in float64 with every weight redrawn (zero-initialised outputs too)."""
    model = optimized.load_model(fixtures_dir / KINDS[kind]).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
    return model


def batch(model: Any, b: int = 2) -> tuple[torch.Tensor, ...]:
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 32, 32, generator=gen, dtype=torch.float64)
    t = torch.rand(b, generator=gen, dtype=torch.float64)
    cond = (torch.randn(b, cfg.text_length, cfg.text_dim, generator=gen, dtype=torch.float64)
            if cfg.is_text else torch.arange(b) % cfg.num_classes)
    return x, t, cond


def grads(model: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    out = getattr(out, "sample", out)  # a diffusers Transformer2DModelOutput
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def block_calls(model: Any, run: Any) -> int:
    """How often DiT or text blocks start their forward during `run()` (a pre-hook: torch stops
    a recomputation early, once it has what backward needs, so a forward hook would not fire)."""
    calls = [0]
    blocks = [*model.blocks, *getattr(model, "text_blocks", [])]
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return calls[0]


@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_equal_the_plain_ones_and_blocks_are_recomputed(fixtures_dir: Path, kind: str) -> None:
    model = float64_model(fixtures_dir, kind)
    inputs = batch(model)
    n_blocks = len(model.blocks) + len(getattr(model, "text_blocks", []))
    assert block_calls(model, lambda: grads(model, inputs)) == n_blocks
    out, plain = grads(model, inputs)
    model.set_gradient_checkpointing(True)
    assert block_calls(model, lambda: grads(model, inputs)) == 2 * n_blocks  # recomputed in backward
    out_ckpt, ckpt = grads(model, inputs)
    assert torch.equal(out_ckpt, out)
    for g, h in zip(ckpt, plain, strict=True):
        assert (g - h).abs().max() <= 1e-10 * h.abs().max().clamp_min(1e-300)
    with torch.no_grad():  # nothing to save for: no recomputation at inference
        assert block_calls(model, lambda: model(*inputs)) == n_blocks
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        model.set_gradient_checkpointing("yes")


@pytest.mark.parametrize("kind", ["class", "text"])
def test_training_step_equals_the_plain_step(fixtures_dir: Path, kind: str) -> None:
    """Two float64 Trainers on one batch and one set of draws: same losses, gradient norm and
    weights after the step (AdamW and EMA included)."""
    model = float64_model(fixtures_dir, kind)
    cfg = model.config
    null = torch.zeros(cfg.text_length, cfg.text_dim, dtype=torch.float64) if cfg.is_text else None
    x, _, cond = batch(model, 4)
    results = []
    for on in (False, True):
        m = copy.deepcopy(model)
        m.set_gradient_checkpointing(on)
        trainer = Trainer(m, TrainConfig(seed=3, label_dropout=0.5), null_text=null)
        logs = trainer.step(x, cond)
        results.append((logs, [p.detach().clone() for p in m.parameters()]))
    (logs0, w0), (logs1, w1) = results
    for key in ("loss", "fm", "freq", "grad_norm"):
        assert logs1[key] == pytest.approx(logs0[key], rel=1e-10, abs=0)
    assert all((a - b).abs().max() <= 1e-10 * b.abs().max() for a, b in zip(w1, w0, strict=True))


def test_diffusers_enable_gradient_checkpointing(fixtures_dir: Path) -> None:
    require_module("diffusers")
    from deco.diffusers import DeCoTransformer2DModel

    model = float64_model(fixtures_dir, "class")
    inputs = batch(model)
    _, plain = grads(model, inputs)
    transformer = DeCoTransformer2DModel.from_deco(model, sample_size=32)
    assert not transformer.is_gradient_checkpointing
    transformer.enable_gradient_checkpointing()
    assert transformer.is_gradient_checkpointing and transformer.model.gradient_checkpointing
    n_blocks = len(model.blocks)
    assert block_calls(transformer.model, lambda: grads(transformer, inputs)) == 2 * n_blocks
    _, ckpt = grads(transformer, inputs)
    assert all((g - h).abs().max() <= 1e-10 * h.abs().max() for g, h in zip(ckpt, plain, strict=True))
    transformer.disable_gradient_checkpointing()
    assert not transformer.model.gradient_checkpointing
