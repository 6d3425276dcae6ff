"""Samplers (spec/04-sampling.md) for the torch models: time grid, classifier-free guidance,
Euler and Heun, with the semantics of `deco.reference.sampling`.

Guidance evaluates both branches as one batch [null; labels] like the reference and the release.
On steps where the scale in force is 1 the null branch is skipped (half the batch): u + 1 (c - u)
equals c up to one rounding.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Protocol

import torch
from torch import Tensor


class VelocityModel(Protocol):
    """A torch model with a `config` (for num_classes) returning velocities from (x, t, y)."""

    @property
    def config(self) -> Any: ...

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor: ...


def time_grid(steps: int, timeshift: float = 1.0) -> list[float]:
    """steps + 1 times from noise (0) to data (1): shift(i / steps) with shift(t) =
    t / (t + (1 - t) s), computed in float64 like the reference."""
    steps = _as_int("steps", steps)
    s = _as_float("timeshift", timeshift)
    if s <= 0:
        raise ValueError(f"timeshift: expected a finite positive number, got {s}")
    grid = [i / steps for i in range(steps + 1)]
    return [t / (t + (1.0 - t) * s) for t in grid]


def guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at time t: `guidance` where low < t <= high, else 1."""
    return guidance if interval[0] < t <= interval[1] else 1.0


def guided_velocity(model: VelocityModel, x: Tensor, t: float, labels: Tensor, scale: float) -> Tensor:
    """u + scale (c - u): c the velocity for `labels`, u for the null class."""
    b = x.shape[0]
    if scale == 1.0:
        return model(x, torch.full((b,), t, dtype=x.dtype, device=x.device), labels)
    null = torch.full_like(labels, model.config.num_classes)
    times = torch.full((2 * b,), t, dtype=x.dtype, device=x.device)
    uncond, cond = model(torch.cat([x, x]), times, torch.cat([null, labels])).chunk(2)
    return uncond + scale * (cond - uncond)


@torch.inference_mode()
def sample(
    model: VelocityModel, noise: Tensor, labels: Any, *, steps: int, guidance: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0, solver: str = "euler",
    exact_heun: bool = False, return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate dx/dt = v from t = 0 (noise (B, C, H, W)) to t = 1 (images).

    Euler: x_{i+1} = x_i + dt v(x_i, t_i). Heun: predictor x^ = x_i + dt v, corrector
    x_{i+1} = x_i + dt (v + v(x^, t_{i+1})) / 2, a plain Euler last step; the predictor velocity
    is the previous corrector's (the release's default, one model call per step) unless
    `exact_heun`. Both evaluations of a step use the guidance scale in force at its start.
    With `return_trajectory`, also returns every state (steps + 1, B, C, H, W)."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating-point torch.Tensor, got {type(noise).__name__}")
    if noise.ndim != 4:
        raise ValueError(f"noise: expected a 4-D tensor (B, C, H, W), got shape {tuple(noise.shape)}")
    labels = _as_labels(labels, noise.shape[0], model.config.num_classes, noise.device)
    guidance = _as_float("guidance", guidance)
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise TypeError(f"interval: expected a pair (low, high), got {interval!r}")
    low, high = (_as_float("interval", v) for v in interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"interval: expected 0 <= low <= high <= 1, got {tuple(interval)}")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver: expected 'euler' or 'heun', got {solver!r}")
    grid = time_grid(steps, timeshift)

    x = noise
    states = [x]
    v_reuse: Tensor | None = None
    for i in range(len(grid) - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        scale = guidance_at(t_cur, guidance, (low, high))
        dt = t_next - t_cur
        if solver == "euler" or v_reuse is None or exact_heun:
            v = guided_velocity(model, x, t_cur, labels, scale)
        else:
            v = v_reuse
        x_hat = x + dt * v
        if solver == "euler" or i == len(grid) - 2:
            x = x_hat
        else:
            v_reuse = guided_velocity(model, x_hat, t_next, labels, scale)
            x = x + dt * 0.5 * (v + v_reuse)
        states.append(x)
    return (x, torch.stack(states)) if return_trajectory else x


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def _as_labels(labels: Any, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """The labels as a (batch,) int64 tensor on `device`, range-checked once per `sample` call
    (the model's forward checks no values, to stay free of device syncs)."""
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"labels: expected integer class labels, got {type(labels).__name__}") from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"labels: expected integer class labels, got dtype {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"labels: expected shape ({batch},), got {tuple(y.shape)}")
    check_label_range("labels", y, num_classes)
    return y.to(device=device, dtype=torch.long)


def check_label_range(name: str, y: Tensor, num_classes: int) -> None:
    """ValueError naming `name` unless every label lies in 0..num_classes (the null class).

    One host transfer (a device sync for a CUDA tensor): call it once per batch or sampling
    run, never inside a model's forward."""
    if y.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(y.detach())).tolist()  # one transfer, not two
    if low < 0 or high > num_classes:
        raise ValueError(
            f"{name}: labels must lie in 0..{num_classes} ({num_classes} is the null class), "
            f"got values in {low}..{high}"
        )
