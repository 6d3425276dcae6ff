"""Pins for `deco.optimized.sampling` found by mutation testing (tests/MUTATION.md).

- The times a guided velocity passes to the model are (B,) or (2B,) tensors of t in the images'
  dtype and on their device (the "meta" device stands in for a CUDA one on a CPU-only machine),
  on steps without guidance (one batch) and with it ([null; cond], two).
- `SampleSettings`, the validated keyword arguments of `sample`: its defaults are the reference
  `sample`'s (read off its signature), its interval rule is the spec's 0 <= low <= high <= 1 with
  both ends allowed, errors name the field, it is immutable (frozen) and `from_dict` fills what a
  dict leaves out with the defaults.
- `adams` (public, like the reference's) defaults to order 2, the spec's: checked against the
  reference `adams` with its default on a smooth stand-in velocity field, where order 3 differs.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from helpers import cases, rel_err
from torch import Tensor

from deco import reference as R
from deco.errors import FieldError
from deco.optimized.sampling import SampleSettings, adams, guided_velocity, time_grid
from deco.reference import sampling as RS


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


def test_sample_settings_defaults_are_the_reference_samples() -> None:
    defaults = {k: p.default for k, p in inspect.signature(R.sample).parameters.items()}
    settings = SampleSettings()
    for name in ("guidance", "interval", "timeshift", "solver"):
        assert getattr(settings, name) == defaults[name], name


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0, 1), [0.25, 0.25], (0.0, 0.0), (1.0, 1.0)])
def test_sample_settings_accept_every_interval_of_the_rule(interval: Any) -> None:
    settings = SampleSettings(interval=interval)
    assert settings.interval == (float(interval[0]), float(interval[1]))
    assert all(type(v) is float for v in settings.interval)


BAD_SETTINGS: list[tuple[str, dict[str, Any], str]] = [
    ("interval decreasing", {"interval": (0.9, 0.1)}, "interval"),
    ("interval below 0", {"interval": (-0.1, 0.5)}, "interval"),
    ("interval above 1", {"interval": (0.5, 1.5)}, "interval"),
    ("interval of one value", {"interval": (0.1,)}, "interval"),
    ("interval of three values", {"interval": (0.1, 0.2, 0.3)}, "interval"),
    ("interval a string", {"interval": "ab"}, "interval"),
    ("interval of booleans", {"interval": (False, True)}, "interval"),
    ("interval of a string", {"interval": (0.1, "x")}, "interval"),
    ("unknown solver", {"solver": "rk4"}, "solver"),
    ("no steps", {"steps": 0}, "steps"),
    ("zero timeshift", {"timeshift": 0.0}, "timeshift"),
    ("guidance nan", {"guidance": float("nan")}, "guidance"),
]


@pytest.mark.parametrize(("overrides", "field"), cases(BAD_SETTINGS))
def test_sample_settings_refuse_bad_fields(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError, match=rf"^{field}: ") as info:
        SampleSettings(**overrides)
    assert info.value.field == field


def test_sample_settings_are_frozen_and_from_dict_fills_the_defaults() -> None:
    settings = SampleSettings(steps=7, interval=(0.1, 0.9), solver="heun")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.steps = 8  # type: ignore[misc]
    assert SampleSettings.from_dict({}) == SampleSettings()
    again = SampleSettings.from_dict({"steps": 7, "interval": [0.1, 0.9], "solver": "heun"})
    assert again == settings and again.interval == (0.1, 0.9)


class Field:
    """A smooth stand-in velocity field v(x, t) = cos(3 t) + x / 2 for both implementations."""

    config = SimpleNamespace(num_classes=10, is_text=False)

    def __call__(self, x: Any, t: Any, y: Any) -> Any:
        if isinstance(x, Tensor):
            return torch.cos(3 * t)[:, None, None, None] + 0.5 * x
        return np.cos(3 * t)[:, None, None, None] + 0.5 * x

    forward = __call__


def test_adams_defaults_to_order_2_like_the_reference() -> None:
    noise = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    labels, grid = np.array([1, 2]), time_grid(6)
    states = adams(Field(), torch.from_numpy(noise), torch.from_numpy(labels), torch.full((2,), 10),
                   grid, 1.0, (0.0, 1.0))
    expected = RS.adams(Field(), noise, labels, np.array(grid), 1.0, (0.0, 1.0))
    assert rel_err(states[-1].numpy(), expected) <= 1e-12
    third = RS.adams(Field(), noise, labels, np.array(grid), 1.0, (0.0, 1.0), order=3)
    assert rel_err(expected, third) > 1e-6
