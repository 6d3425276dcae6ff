"""Samplers, spec/04-sampling.md: the time grid, classifier-free guidance, Euler and Heun."""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Protocol

import numpy as np

from .checks import Array, as_finite_float, as_float_array, as_int, as_labels
from .flow import time_shift


class VelocityModel(Protocol):
    """Anything with a config (for num_classes) and forward(x, t, y) -> velocity."""

    @property
    def config(self) -> Any: ...

    def forward(self, x: Any, t: Any, y: Any) -> Array: ...


def time_grid(steps: int, timeshift: float = 1.0) -> Array:
    """(steps + 1,) times from noise to data: shift(i / steps), i = 0..steps (§1)."""
    steps = as_int("steps", steps, low=1)
    timeshift = as_finite_float("timeshift", timeshift, positive=True)  # named as the caller knows it
    return time_shift(np.arange(steps + 1) / steps, timeshift)


def guided_velocity(
    model: VelocityModel, x: Array, t: float, labels: Array, guidance: float
) -> Array:
    """u + g (c - u), with c the velocity for the labels and u for the null class (§2).

    The reference evaluates both branches as one batch [null; labels], as the release does."""
    b = x.shape[0]
    null = np.full(b, model.config.num_classes, dtype=np.int64)
    out = model.forward(np.concatenate([x, x]), np.full(2 * b, t), np.concatenate([null, labels]))
    uncond, cond = out[:b], out[b:]
    return uncond + guidance * (cond - uncond)


def guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at time t: `guidance` where low < t <= high, else 1 (§2)."""
    return guidance if interval[0] < t <= interval[1] else 1.0


def euler(
    model: VelocityModel, noise: Array, labels: Array, grid: Array, guidance: float,
    interval: tuple[float, float], trajectory: list[Array] | None = None,
) -> Array:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i) (§3). Appends every state to `trajectory`."""
    x = noise
    if trajectory is not None:
        trajectory.append(x)
    for t_cur, t_next in pairwise(grid):
        g = guidance_at(t_cur, guidance, interval)
        x = x + (t_next - t_cur) * guided_velocity(model, x, t_cur, labels, g)
        if trajectory is not None:
            trajectory.append(x)
    return x


def heun(
    model: VelocityModel, noise: Array, labels: Array, grid: Array, guidance: float,
    interval: tuple[float, float], exact: bool = False,
) -> Array:
    """Heun's method with a plain Euler last step (§4).

    Predictor velocity at step i: evaluated at (x_i, t_i) when `exact` or i = 0, otherwise the
    corrector velocity of step i-1 (evaluated at x_hat_{i-1}, t_i): one model call per step
    instead of two. Both evaluations of step i use the guidance scale in force at t_i."""
    x = noise
    v_reuse: Array | None = None
    n = len(grid) - 1
    for i, (t_cur, t_next) in enumerate(pairwise(grid)):
        g = guidance_at(t_cur, guidance, interval)
        dt = t_next - t_cur
        v = guided_velocity(model, x, t_cur, labels, g) if exact or v_reuse is None else v_reuse
        x_hat = x + dt * v
        if i == n - 1:
            x = x_hat
            break
        v_hat = guided_velocity(model, x_hat, t_next, labels, g)
        x = x + dt * 0.5 * (v + v_hat)
        v_reuse = v_hat
    return x


def check_interval(interval: Any) -> tuple[float, float]:
    """The guidance interval as (low, high) with 0 <= low <= high <= 1."""
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise TypeError(f"interval: expected a pair (low, high), got {interval!r}")
    low, high = (as_finite_float("interval", v) for v in interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"interval: expected 0 <= low <= high <= 1, got {tuple(interval)}")
    return low, high


def sample(
    model: VelocityModel, noise: Any, labels: Any, *, steps: int, guidance: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
    solver: str = "euler", exact_heun: bool = False,
) -> Array:
    """Integrate dx/dt = v from t = 0 (noise) to t = 1 (data) with guidance (spec/04)."""
    noise = as_float_array("noise", noise, ndim=4)
    labels = as_labels("labels", labels, batch=noise.shape[0],
                       num_classes=model.config.num_classes)
    guidance = as_finite_float("guidance", guidance)
    low, high = check_interval(interval)
    grid = time_grid(steps, timeshift)
    if not isinstance(solver, str):
        raise TypeError(f"solver: expected 'euler' or 'heun', got {type(solver).__name__}")
    if solver == "euler":
        return euler(model, noise, labels, grid, guidance, (low, high))
    if solver == "heun":
        return heun(model, noise, labels, grid, guidance, (low, high), exact=bool(exact_heun))
    raise ValueError(f"solver: expected 'euler' or 'heun', got {solver!r}")
