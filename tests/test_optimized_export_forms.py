"""The forms deco.optimized takes while exported to ONNX (bench/RESULTS.md §6: onnxruntime runs them
faster), each against an oracle independent of the eager form: the float64 reference, an explicit
index formula, or NumPy products of the weight's row blocks. The whole exported graphs are
checked against the reference in tests/test_onnx*.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deco.optimized.gemm import Linear
from deco.optimized.layers import (
    image_to_pixels,
    pair_swap,
    pixels_to_image,
    rope_angles,
    rope_as_products,
    split_product,
    widen_rope_tables,
)
from deco.reference import model as R


@pytest.fixture
def exporting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What the model sees inside torch.onnx.export."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    yield


@settings(max_examples=20, deadline=None)
@given(gh=st.integers(1, 4), gw=st.integers(1, 4), heads=st.integers(1, 3), hd=st.sampled_from([4, 8, 64]),
       seed=st.integers(0, 2**31))
def test_rope_as_products_is_the_reference_rotation(gh: int, gw: int, heads: int, hd: int, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((2, gh * gw, heads, hd))
    cos, sin = rope_angles(gh, gw, hd, torch.device("cpu"), torch.float64)
    c, s = widen_rope_tables(cos, sin)
    got = rope_as_products(torch.from_numpy(x), c, s, pair_swap(hd, torch.float64, torch.device("cpu")))
    expected = R.apply_rope(x, R.rope_angles(gh, gw, hd))
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12 * np.abs(x).max())


def test_pair_swap_exchanges_each_pair_exactly() -> None:
    x = torch.randn(3, 8, dtype=torch.float32) * 1e30  # exact whatever the magnitude
    swapped = x @ pair_swap(8, torch.float32, torch.device("cpu"))
    assert torch.equal(swapped, x.view(3, 4, 2).flip(-1).reshape(3, 8))


@pytest.mark.parametrize("shape, p", [((2, 3, 8, 12), 4), ((1, 3, 16, 16), 16), ((3, 1, 2, 6), 2)])
def test_pixel_order_in_the_export_form(shape: tuple[int, int, int, int], p: int, exporting: None) -> None:
    """Row i*p + j of patch n = (b*gh + y)*gw + x holds pixel (y*p + i, x*p + j) of image b."""
    b, c, h, w = shape
    image = torch.randn(shape)
    pixels = image_to_pixels(image, p)
    gh, gw = h // p, w // p
    corners = [(0, 0, 0, 0, 0), (b - 1, gh - 1, gw - 1, p - 1, p - 1), (b // 2, gh // 2, 0, p // 2, 1 % p)]
    for bb, y, xx, i, j in corners:
        n = (bb * gh + y) * gw + xx
        assert torch.equal(pixels[n, i * p + j], image[bb, :, y * p + i, xx * p + j])
    assert torch.equal(pixels_to_image(pixels.reshape(-1, c), b, c, h, w, p), image)


def test_split_product_writes_one_product_per_row_block(exporting: None) -> None:
    layer = Linear(6, 9, bias=False).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    parts = split_product(x, layer, 3)
    weight = layer.weight.detach().numpy()
    for k, part in enumerate(parts):
        np.testing.assert_allclose(part.detach().numpy(), x.numpy() @ weight[3 * k:3 * k + 3].T, rtol=1e-14)
