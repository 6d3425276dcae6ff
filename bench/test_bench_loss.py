"""The frequency-aware loss alone, forward + backward: ours (the difference transformed once by a
single 192x192 operator per 8x8 block, deco.optimized.frequency) vs a two-transform formulation like
the release's (YCbCr and block DCT of prediction and target separately, then the weighted MSE)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from common import Sizes, record
from torch import Tensor

from deco.optimized.frequency import YCBCR_MATRIX, dct_matrix, frequency_aware_loss, frequency_weights


def block_dct_ycbcr(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> (B, 3, H/8, W/8, 8, 8) DCT coefficients of the YCbCr image."""
    ycbcr = torch.einsum("ij,bjhw->bihw", YCBCR_MATRIX.to(x.dtype), x)
    h, w = ycbcr.shape[-2:]
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        ycbcr = F.pad(ycbcr, (0, pw, 0, ph), mode="reflect")
    blocks = ycbcr.unflatten(2, (-1, 8)).unflatten(4, (-1, 8)).transpose(3, 4)  # (B, 3, Bh, Bw, 8, 8)
    m = dct_matrix(8).to(x.dtype)
    coeffs: Tensor = m @ blocks @ m.T
    return coeffs


def two_transform_loss(pred: Tensor, target: Tensor, quality: int = 85) -> Tensor:
    w = frequency_weights(quality, dtype=pred.dtype)[None, :, None, None]
    return (w * (block_dct_ycbcr(pred) - block_dct_ycbcr(target)) ** 2).mean()


LOSSES = {"ours": frequency_aware_loss, "two-transform": two_transform_loss}


@pytest.mark.parametrize("impl", list(LOSSES))
def test_frequency_loss(benchmark: Any, profile: dict[str, Sizes], impl: str) -> None:
    sizes = profile["loss"]
    g = torch.Generator().manual_seed(0)
    shape = (sizes.batch, 3, sizes.resolution, sizes.resolution)
    pred = torch.randn(shape, generator=g).requires_grad_(True)
    target = torch.randn(shape, generator=g)
    with torch.no_grad():
        ours, other = float(frequency_aware_loss(pred, target)), float(two_transform_loss(pred, target))
    assert abs(ours - other) <= 1e-5 * other  # the same quantity

    def forward_backward() -> None:
        pred.grad = None
        LOSSES[impl](pred, target).backward()

    benchmark.group = f"frequency loss fwd+bwd {sizes.resolution}px b{sizes.batch}"
    benchmark.pedantic(forward_backward, rounds=sizes.rounds, warmup_rounds=2)
    record(benchmark, impl=impl, shape=list(shape))
