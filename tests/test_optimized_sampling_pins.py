"""Pins for `deco.optimized.sampling` found by mutation testing (tests/MUTATION.md): the times a
guided velocity passes to the model are (B,) or (2B,) tensors of t in the images' dtype and on
their device (the "meta" device stands in for a CUDA one on a CPU-only machine), both on steps
without guidance (one batch) and with it ([null; cond], two)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from deco.optimized.sampling import guided_velocity


class Recorder:
    """A stand-in velocity model: records the times it is given and returns x."""

    config: Any = None

    def __init__(self) -> None:
        self.times: list[Tensor] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.times.append(t)
        return x


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_times_are_t_in_the_images_dtype_and_device(scale: float, device: str) -> None:
    x = torch.ones(3, 2, 4, 4, dtype=torch.float64, device=device)
    cond, null = torch.tensor([1, 2, 3], device=device), torch.full((3,), 10, device=device)
    model = Recorder()
    guided_velocity(model, x, 0.3, cond, null, scale)
    (t,) = model.times
    assert t.device == x.device and t.dtype == torch.float64
    assert tuple(t.shape) == ((3,) if scale == 1.0 else (6,))
    if device == "cpu":
        assert torch.equal(t, torch.full(t.shape, 0.3, dtype=torch.float64))
