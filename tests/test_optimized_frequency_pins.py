"""Pins for `deco.optimized.frequency` found by mutation testing (tests/MUTATION.md).

The loss folds the YCbCr matrix and the block DCT into one operator, so the spec's separate steps
`rgb_to_ycbcr` and `block_dct` (public, used by the conformance kit's ports) were exercised by no
test of the optimized package: they are compared here with the float64 reference. The weights and
the cached block operator are pinned to the device they are asked for (the "meta" device: a CPU
machine's stand-in for a CUDA one, where a tensor left on the CPU would mix devices).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rel_err

from deco import reference as R
from deco.optimized import frequency as L

F64_RTOL = 1e-12


@pytest.mark.parametrize("shape", [(2, 3, 8, 16), (1, 3, 13, 21), (2, 3, 5, 8)])
def test_block_dct_matches_reference(shape: tuple[int, ...]) -> None:
    """(B, C, H, W) -> (B, C, Bh, Bw, 8, 8): padding, block layout (row-major blocks, u vertical)
    and the DCT, on multiples of 8 and on sides that need reflection."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape)
    got = L.block_dct(torch.from_numpy(x))
    expected = R.block_dct(x)
    assert tuple(got.shape) == expected.shape
    assert rel_err(got.numpy(), expected) <= F64_RTOL


def test_rgb_to_ycbcr_matches_reference() -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 7))
    assert rel_err(L.rgb_to_ycbcr(torch.from_numpy(x)).numpy(), R.rgb_to_ycbcr(x)) <= F64_RTOL


def test_weights_and_block_operator_are_built_on_the_requested_device() -> None:
    """`frequency_weights(device=...)` and the loss's cached operator live on the device asked for."""
    assert L.frequency_weights(device="meta").device.type == "meta"
    operator = L._block_operator(85, 1.0, torch.device("meta"), torch.float32)
    assert operator.device.type == "meta" and tuple(operator.shape) == (192, 192)
