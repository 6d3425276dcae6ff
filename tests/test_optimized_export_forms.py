"""The forms deco.optimized takes while exported to ONNX (bench/RESULTS.md §6: onnxruntime runs them
faster), each against an oracle independent of the eager form: an explicit index formula, or
NumPy products of the weight's row blocks. The whole exported graphs are checked against the
float64 reference in tests/test_onnx*.py."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from deco.optimized.gemm import Linear
from deco.optimized.layers import (
    image_to_pixels,
    pixels_to_image,
    split_product,
)


@pytest.fixture
def exporting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What the model sees inside torch.onnx.export."""
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    yield


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
