"""Samplers, spec/04-sampling.md: the time grid, classifier-free guidance, Euler, Heun, Adams."""

from __future__ import annotations

from itertools import pairwise
from typing import Any, Protocol

import numpy as np
from numpy.polynomial import Polynomial

from .checks import Array, as_condition, as_finite_float, as_float_array, as_int
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
    model: VelocityModel, x: Array, t: float, labels: Any, guidance: float, null: Any = None
) -> Array:
    """u + g (c - u), with c the velocity for the condition and u for `null` (§2).

    `labels` is the condition: class labels (B,) or text embeddings (B, T, E). `null` is the
    unconditional one, batched like it; None means the null class (class models), and for the
    text model (no null class) is allowed only at g = 1, where c alone is evaluated. Both
    branches are evaluated as one batch [null; condition], as the release does."""
    b = x.shape[0]
    if null is None:
        if getattr(model.config, "is_text", False):
            if guidance != 1.0:
                raise ValueError("null: guidance != 1 with the text model needs the null text "
                                 "embedding (the text encoder's output for an empty prompt)")
            return model.forward(x, np.full(b, t), labels)
        null = np.full(b, model.config.num_classes, dtype=np.int64)
    out = model.forward(np.concatenate([x, x]), np.full(2 * b, t), np.concatenate([null, labels]))
    uncond, cond = out[:b], out[b:]
    return uncond + guidance * (cond - uncond)


def guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at time t: `guidance` where low < t <= high, else 1 (§2)."""
    return guidance if interval[0] < t <= interval[1] else 1.0


def adams_guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at the Adams sampler's time t (§6): `guidance` where low < t < high,
    strict at both ends like the release's AdamLMSampler (so never at t = 0), else 1."""
    return guidance if interval[0] < t < interval[1] else 1.0


def euler(
    model: VelocityModel, noise: Array, labels: Array, grid: Array, guidance: float,
    interval: tuple[float, float], trajectory: list[Array] | None = None, null: Any = None,
) -> Array:
    """x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i) (§3). Appends every state to `trajectory`;
    `labels`, `null`: the condition and the unconditional branch's (`guided_velocity`)."""
    x = noise
    if trajectory is not None:
        trajectory.append(x)
    for t_cur, t_next in pairwise(grid):
        g = guidance_at(t_cur, guidance, interval)
        x = x + (t_next - t_cur) * guided_velocity(model, x, t_cur, labels, g, null)
        if trajectory is not None:
            trajectory.append(x)
    return x


def heun(
    model: VelocityModel, noise: Array, labels: Array, grid: Array, guidance: float,
    interval: tuple[float, float], exact: bool = False, null: Any = None,
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
        v = guided_velocity(model, x, t_cur, labels, g, null) if exact or v_reuse is None \
            else v_reuse
        x_hat = x + dt * v
        if i == n - 1:
            x = x_hat
            break
        v_hat = guided_velocity(model, x_hat, t_next, labels, g, null)
        x = x + dt * 0.5 * (v + v_hat)
        v_reuse = v_hat
    return x


def adams_weights(grid: Array, order: int = 2) -> list[Array]:
    """Step i's weights of the velocities it combines, oldest first, each row summing to 1 (§6).

    Step i (from t_i to t_{i+1}) uses the last k = min(order, i + 1) velocities, at the nodes
    t_{i-k+1..i}. Weight j is the integral over [t_i, t_{i+1}] of the Lagrange basis polynomial
    of node j, divided by the step t_{i+1} - t_i (the basis sums to 1, so the weights do too)."""
    order = as_int("order", order, low=1)
    grid = as_float_array("grid", grid, ndim=1)
    if grid.size < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"grid: expected at least 2 increasing times, got {grid.size} values")
    out = []
    for i in range(grid.size - 1):
        nodes = grid[max(0, i + 1 - order): i + 1]
        rows = []
        for j, tj in enumerate(nodes):
            basis = Polynomial([1.0])  # becomes 1 at tj and 0 at every other node
            for tm in np.delete(nodes, j):
                basis = basis * Polynomial([-tm, 1.0]) / (tj - tm)
            antiderivative = basis.integ()
            rows.append(antiderivative(grid[i + 1]) - antiderivative(grid[i]))
        out.append(np.array(rows) / (grid[i + 1] - grid[i]))
    return out


def adams(
    model: VelocityModel, noise: Array, labels: Any, grid: Array, guidance: float,
    interval: tuple[float, float], order: int = 2, trajectory: list[Array] | None = None,
    null: Any = None,
) -> Array:
    """The release's Adams-Bashforth (linear multistep) sampler (§6).

    x_{i+1} = x_i + (t_{i+1} - t_i) sum_j w_ij v_j over the last k guided velocities
    (`adams_weights`). Like the release, the model's time is the running sum of the steps (not
    the grid value) and guidance applies where low < t < high, strictly at both ends: with the
    default interval (0, 1), the first step (t = 0) is unguided."""
    weights = adams_weights(grid, order)
    x, t = noise, 0.0
    history: list[Array] = []
    if trajectory is not None:
        trajectory.append(x)
    for i, w in enumerate(weights):
        g = adams_guidance_at(t, guidance, interval)
        history.append(guided_velocity(model, x, t, labels, g, null))
        v = sum((wj * vj for wj, vj in zip(w, history[-len(w):], strict=True)), np.zeros_like(x))
        dt = grid[i + 1] - grid[i]
        x = x + dt * v
        t += dt
        if trajectory is not None:
            trajectory.append(x)
    return x


def check_interval(interval: Any) -> tuple[float, float]:
    """The guidance interval as (low, high) with 0 <= low <= high <= 1."""
    if isinstance(interval, (str, bytes)) or not hasattr(interval, "__len__") or len(interval) != 2:
        raise TypeError(f"interval: expected a pair (low, high), got {interval!r}")
    low, high = (as_finite_float("interval", v) for v in interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"interval: expected 0 <= low <= high <= 1, got {tuple(interval)}")
    return low, high


def check_conditions(model: VelocityModel, cond: Any, null: Any, batch: int) -> tuple[Any, Any]:
    """(condition, null) validated for the model: labels (B,) for the class models (null: labels
    (B,), default None = the null class); text (B, T, E) for the text model (null: (T, E), used
    for every sample, or (B, T, E); None only without guidance)."""
    is_text = getattr(model.config, "is_text", False)
    cond = as_condition("text" if is_text else "labels", cond, model.config, batch)
    if null is not None:
        if is_text and np.ndim(null) == 2:  # one null text for every sample
            null = np.broadcast_to(np.asarray(null), (batch, *np.shape(null)))
        null = as_condition("null", null, model.config, batch)
    return cond, null


SOLVERS = ("euler", "heun", "adams")


def sample(
    model: VelocityModel, noise: Any, labels: Any, null: Any = None, *, steps: int,
    guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
    solver: str = "euler", exact_heun: bool = False, order: int = 2,
) -> Array:
    """Integrate dx/dt = v from t = 0 (noise) to t = 1 (data) with guidance (spec/04).

    `labels` is the condition: class labels (B,), or text embeddings (B, T, E) for a text model;
    `null` the unconditional branch's (§2, spec/06 §7). `order`: the Adams sampler's (§5)."""
    noise = as_float_array("noise", noise, ndim=4)
    cond, null = check_conditions(model, labels, null, noise.shape[0])
    guidance = as_finite_float("guidance", guidance)
    low, high = check_interval(interval)
    grid = time_grid(steps, timeshift)
    if not isinstance(solver, str):
        raise TypeError(f"solver: expected one of {SOLVERS}, got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    if null is None and getattr(model.config, "is_text", False) and guidance != 1.0:
        raise ValueError("null: guidance != 1 with the text model needs the null text embedding "
                         "(T, E) or (B, T, E)")
    if solver == "euler":
        return euler(model, noise, cond, grid, guidance, (low, high), null=null)
    if solver == "heun":
        return heun(model, noise, cond, grid, guidance, (low, high), exact=bool(exact_heun),
                    null=null)
    return adams(model, noise, cond, grid, guidance, (low, high), order=order, null=null)
