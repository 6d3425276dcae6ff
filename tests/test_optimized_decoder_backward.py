"""The pixel decoder block's hand-written backward (`layers._DecoderBlockFunction`).

Oracles: float64 central finite differences (`torch.autograd.gradcheck`) of the fused node, and
float64 autograd through the plain ops of `DecoderBlock.forward` for the float32 gradients (to
the spec's float32 bound, 1e-5 relative to the largest entry)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from deco.optimized.layers import DecoderBlock, _DecoderBlockFunction, use_fused_backward

RTOL = 1e-5


def random_block(width: int, seed: int, dtype: torch.dtype) -> DecoderBlock:
    """A DecoderBlock with every parameter random (the real init zeroes the adaln)."""
    block = DecoderBlock(width).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) * 0.5)
    return block


def leaves(rows: int, width: int, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(rows, width, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    u = torch.randn(rows, width, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return z, u


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 9), width=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_fused_node_matches_finite_differences(rows: int, width: int, seed: int) -> None:
    block = random_block(width, seed, torch.float64)
    z, u = leaves(rows, width, seed, torch.float64)
    wm, bm = (t.detach().requires_grad_() for t in block.modulation_weights())
    params = [p.detach().requires_grad_() for p in
              (block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias)]
    assert torch.autograd.gradcheck(_DecoderBlockFunction.apply, (z, u, wm, bm, *params))


def grads(block: DecoderBlock, z: Tensor, u: Tensor, fused: bool) -> list[Tensor]:
    """Gradients of a fixed random projection of the block's output w.r.t. z, u and every
    parameter, through `step` (fused) or through `forward` with plain autograd."""
    mod = block.modulation_weights()
    out = block.step(z, u, mod) if fused else block(z, torch.nn.functional.linear(u, *mod))
    assert (type(out.grad_fn).__name__ == "_DecoderBlockFunctionBackward") == fused
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * weight).sum().backward()
    found = [z.grad, u.grad] + [p.grad for p in block.parameters()]
    assert all(gr is not None for gr in found)
    return [gr.double() for gr in found if gr is not None]


@pytest.mark.parametrize(("rows", "width"), [(300, 32), (37, 8)])
def test_float32_fused_gradients_against_float64_autograd(rows: int, width: int) -> None:
    expected = grads(random_block(width, 0, torch.float64), *leaves(rows, width, 0, torch.float64),
                     fused=False)
    got = grads(random_block(width, 0, torch.float32), *leaves(rows, width, 0, torch.float32),
                fused=True)
    for g32, g64 in zip(got, expected, strict=True):
        assert float((g32 - g64).abs().max() / g64.abs().max()) <= RTOL


def test_forward_values_equal_the_plain_block() -> None:
    block = random_block(16, 3, torch.float64)
    z, u = leaves(50, 16, 3, torch.float64)
    mod = block.modulation_weights()
    fused = block.step(z, u, mod)
    plain = block(z, torch.nn.functional.linear(u, *mod))
    assert torch.allclose(fused, plain, rtol=1e-12, atol=1e-12)


def test_used_only_for_eager_cpu_training() -> None:
    z = torch.zeros(3, 4)
    assert use_fused_backward(z)
    with torch.no_grad():
        assert not use_fused_backward(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_fused_backward(z)
