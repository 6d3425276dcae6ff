"""Samplers (spec/04-sampling.md) for the torch models: time grid, classifier-free guidance,
Euler, Heun and the release's Adams multistep sampler, with the semantics of
the reference (`reference/sampling.py`).

The condition is class labels (B,) for the class models, text-encoder hidden states (B, T, E)
for the text-to-image model, whose unconditional branch takes a null text embedding instead of
the null label. Guidance evaluates both branches as one batch [null; cond] like the reference
and the release. On steps where the scale in force is 1 the null branch is skipped (half the
batch): u + 1 (c - u) equals c up to one rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from deco.config import RELEASE_SAMPLING, config_from_dict, config_to_dict
from deco.errors import FieldError, field_finite, field_int, field_positive

from .checks import as_condition, as_finite_float, as_int

SOLVERS = ("euler", "heun", "adams")


class VelocityModel(Protocol):
    """A torch model with a `config` (for num_classes) returning velocities from (x, t, y)."""

    @property
    def config(self) -> Any: ...

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor: ...


def time_grid(steps: int, timeshift: float = 1.0) -> list[float]:
    """steps + 1 times from noise (0) to data (1): shift(i / steps) with shift(t) =
    t / (t + (1 - t) s), computed in float64 like the reference."""
    steps = as_int("steps", steps)
    s = as_finite_float("timeshift", timeshift)
    if s <= 0:
        raise ValueError(f"timeshift: expected a finite positive number, got {s}")
    return _time_grid(steps, s)


def _time_grid(steps: int, timeshift: float) -> list[float]:
    """`time_grid` on arguments already validated (by `sample` or `SampleSettings`)."""
    grid = [i / steps for i in range(steps + 1)]
    return [t / (t + (1.0 - t) * timeshift) for t in grid]


def guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at time t for Euler and Heun: `guidance` where low < t <= high, else 1."""
    return guidance if interval[0] < t <= interval[1] else 1.0


def adams_guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
    """The scale in force at the Adams sampler's time t: `guidance` where low < t < high, strict at
    both ends like the release's AdamLMSampler (so never at t = 0), else 1."""
    return guidance if interval[0] < t < interval[1] else 1.0


def check_interval(interval: Any) -> tuple[float, float]:
    """The guidance interval as (low, high) with 0 <= low <= high <= 1."""
    if isinstance(interval, (str, bytes)) or not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise TypeError(f"interval: expected a pair (low, high), got {interval!r}")
    low, high = (as_finite_float("interval", v) for v in interval)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"interval: expected 0 <= low <= high <= 1, got {tuple(interval)}")
    return low, high


def guided_velocity(model: VelocityModel, x: Tensor, t: float, cond: Tensor, null: Tensor,
                    scale: float) -> Tensor:
    """u + scale (c - u): c the velocity for `cond`, u for `null` (the null class's labels or
    the null text embedding, batched like cond)."""
    b = x.shape[0]
    if scale == 1.0:
        return model(x, torch.full((b,), t, dtype=x.dtype, device=x.device), cond)
    times = torch.full((2 * b,), t, dtype=x.dtype, device=x.device)
    uncond, conditional = model(torch.cat([x, x]), times, torch.cat([null, cond])).chunk(2)
    return uncond + scale * (conditional - uncond)


def adams_weights(grid: Sequence[float], order: int = 2) -> list[list[float]]:
    """Row i: the weights of the Adams-Bashforth step from grid[i] to grid[i+1] (the release's
    AdamLMSampler), for the last k = min(order, i + 1) velocities, oldest first.

    Each weight is the integral over [grid[i], grid[i+1]] of the Lagrange basis polynomial of
    one of the nodes grid[i+1-k..i], divided by the sum of the k integrals (that sum is the step
    length, so the weights sum to 1 and the step is x + dt * sum_j w_j v_j)."""
    order = as_int("order", order)
    rows = []
    for i in range(len(grid) - 1):
        nodes = [float(t) for t in grid[max(0, i + 1 - order): i + 1]]
        start, end = float(grid[i]), float(grid[i + 1])
        integrals = []
        for j, node in enumerate(nodes):
            basis = [1.0]  # power-series coefficients of prod_{m != j} (t - t_m) / (t_j - t_m)
            for m in nodes[:j] + nodes[j + 1:]:
                shifted = [0.0, *basis]  # t * basis
                basis = [(a - m * b) / (node - m) for a, b in zip(shifted, [*basis, 0.0], strict=True)]
            integrals.append(sum(c * (end ** (k + 1) - start ** (k + 1)) / (k + 1)
                                 for k, c in enumerate(basis)))
        total = sum(integrals)
        rows.append([v / total for v in integrals])
    return rows


@torch.inference_mode()
def sample(
    model: VelocityModel, noise: Tensor, labels: Any, null: Any = None, *, steps: int,
    guidance: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), timeshift: float = 1.0,
    solver: str = "euler", exact_heun: bool = False, order: int = 2,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate dx/dt = v from t = 0 (noise (B, C, H, W)) to t = 1 (images).

    labels: the condition (as in the reference): class labels (B,) for the class models, whose
    `null` is labels (B,) too, by default
    the null class num_classes; text embeddings (B, T, E) for the text model, whose `null` is the
    null text embedding, (T, E) (for every sample) or (B, T, E), required when guidance != 1.

    Euler: x_{i+1} = x_i + dt v(x_i, t_i). Heun: predictor x^ = x_i + dt v, corrector
    x_{i+1} = x_i + dt (v + v(x^, t_{i+1})) / 2, a plain Euler last step; the predictor velocity
    is the previous corrector's (the release's default, one model call per step) unless
    `exact_heun`. Both evaluations of a step use the guidance scale in force at its start, with
    the interval low < t <= high. Adams (the release's AdamLMSampler, `order` 1..4, default 2):
    x_{i+1} = x_i + dt sum_j w_ij v_j over the last velocities (`adams_weights`; the release
    has orders 1..4, any order >= 1 works here); like the
    release, it evaluates the model at the accumulated time t_0 + dt_0 + ... + dt_{i-1} and
    guides where low < t < high (strict at both ends: never at t = 0).
    With `return_trajectory`, also returns every state (steps + 1, B, C, H, W)."""
    _check_noise(noise)
    guidance = as_finite_float("guidance", guidance)
    cond, null = as_condition(model.config, labels, null, noise, guidance)
    interval = check_interval(interval)
    if not isinstance(solver, str):
        raise TypeError(f"solver: expected one of {SOLVERS}, got {type(solver).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {SOLVERS}, got {solver!r}")
    grid = time_grid(steps, timeshift)
    states = _integrate(model, noise, cond, null, grid, guidance, interval, solver, exact_heun, order)
    return (states[-1], torch.stack(states)) if return_trajectory else states[-1]


@torch.inference_mode()
def sample_with(model: VelocityModel, noise: Tensor, labels: Any, settings: SampleSettings,
                null: Any = None) -> Tensor:
    """`sample(model, noise, labels, null, **settings.options())`, without validating the
    settings again: `SampleSettings` did that once, where they entered (`deco sample`, a run's
    config), so a loop over batches checks only each batch's noise and condition."""
    if not isinstance(settings, SampleSettings):
        raise TypeError(f"settings: expected a SampleSettings, got {type(settings).__name__}")
    _check_noise(noise)
    cond, null = as_condition(model.config, labels, null, noise, settings.guidance)
    grid = _time_grid(settings.steps, settings.timeshift)
    return _integrate(model, noise, cond, null, grid, settings.guidance, settings.interval,
                      settings.solver, False, 2)[-1]


def _check_noise(noise: Any) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating-point torch.Tensor, got {type(noise).__name__}")
    if noise.ndim != 4:
        raise ValueError(f"noise: expected a 4-D tensor (B, C, H, W), got shape {tuple(noise.shape)}")


def _integrate(model: VelocityModel, noise: Tensor, cond: Tensor, null: Tensor, grid: list[float],
               guidance: float, interval: tuple[float, float], solver: str, exact_heun: bool,
               order: int) -> list[Tensor]:
    """Every state of `solver` on `grid`, all arguments already checked."""
    if solver == "adams":
        return adams(model, noise, cond, null, grid, guidance, interval, order)
    if solver == "heun":
        return heun(model, noise, cond, null, grid, guidance, interval, exact_heun)
    return euler(model, noise, cond, null, grid, guidance, interval)


def euler(model: VelocityModel, noise: Tensor, cond: Tensor, null: Tensor, grid: list[float],
          guidance: float, interval: tuple[float, float]) -> list[Tensor]:
    """Every state of the Euler sampler (04 §3) on `grid`, conditions already checked."""
    return euler_heun(model, noise, cond, null, grid, guidance, interval, heun=False, exact=False)


def heun(model: VelocityModel, noise: Tensor, cond: Tensor, null: Tensor, grid: list[float],
         guidance: float, interval: tuple[float, float], exact: bool = False) -> list[Tensor]:
    """Every state of the Heun sampler (04 §4) on `grid`, conditions already checked."""
    return euler_heun(model, noise, cond, null, grid, guidance, interval, heun=True, exact=exact)


def euler_heun(model: VelocityModel, noise: Tensor, cond: Tensor, null: Tensor, grid: list[float],
               guidance: float, interval: tuple[float, float], heun: bool,
               exact: bool) -> list[Tensor]:
    """Every state of the Euler (heun=False) or Heun sampler (see `sample`)."""
    x = noise
    states = [x]
    v_reuse: Tensor | None = None
    for i in range(len(grid) - 1):
        t_cur, t_next = grid[i], grid[i + 1]
        scale = guidance_at(t_cur, guidance, interval)
        dt = t_next - t_cur
        if not heun or v_reuse is None or exact:
            v = guided_velocity(model, x, t_cur, cond, null, scale)
        else:
            v = v_reuse
        x_hat = x + dt * v
        if not heun or i == len(grid) - 2:
            x = x_hat
        else:
            v_reuse = guided_velocity(model, x_hat, t_next, cond, null, scale)
            x = x + dt * 0.5 * (v + v_reuse)
        states.append(x)
    return states


def adams(model: VelocityModel, noise: Tensor, cond: Tensor, null: Tensor, grid: list[float],
          guidance: float, interval: tuple[float, float], order: int = 2) -> list[Tensor]:
    """Every state of the release's Adams multistep sampler (see `sample`)."""
    coeffs = adams_weights(grid, order)
    x = noise
    states = [x]
    history: list[Tensor] = []
    t = 0.0  # accumulated like the release's t_cur (equal to grid[i] up to rounding)
    for i in range(len(grid) - 1):
        dt = grid[i + 1] - grid[i]
        scale = adams_guidance_at(t, guidance, interval)
        history = [*history, guided_velocity(model, x, t, cond, null, scale)][-order:]
        weights = coeffs[i]  # min(order, i + 1) of them, oldest first
        recent = history[-len(weights):]
        v = weights[0] * recent[0]
        for w, velocity in zip(weights[1:], recent[1:], strict=True):
            v = v + w * velocity
        x = x + dt * v
        t += dt
        states.append(x)
    return states


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class SampleSettings:
    """The keyword arguments of `sample` as one validated value (spec/04-sampling.md §5): what a
    run records for its sample grid and what `deco sample` starts from. Errors name the field."""

    steps: int = 50
    guidance: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    timeshift: float = 1.0
    solver: str = "euler"

    def __post_init__(self) -> None:
        field_int(self, "steps", 1)
        field_finite(self, "guidance")
        field_positive(self, "timeshift")
        try:
            interval = check_interval(self.interval)
        except (TypeError, ValueError) as exc:
            raise FieldError("interval", str(exc).removeprefix("interval: ")) from None
        object.__setattr__(self, "interval", interval)
        if self.solver not in SOLVERS:
            raise FieldError("solver", f"expected one of {', '.join(SOLVERS)}, got {self.solver!r}")

    @classmethod
    def release(cls, kind: str) -> SampleSettings:
        """The release's sampler for a model kind, "c2i" or "t2i" (`deco.config.RELEASE_SAMPLING`)."""
        if kind not in RELEASE_SAMPLING:
            raise ValueError(f"kind: expected one of {sorted(RELEASE_SAMPLING)}, got {kind!r}")
        return cls(**RELEASE_SAMPLING[kind])

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON types (`deco.config.config_to_dict`: the interval as a list)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SampleSettings:
        """The inverse of `to_dict` (`deco.config.config_from_dict`)."""
        return config_from_dict(cls, data)

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `sample`."""
        return {"steps": self.steps, "guidance": self.guidance, "interval": self.interval,
                "timeshift": self.timeshift, "solver": self.solver}


#: The optimized object that implements each function of reference/sampling.py (spec/04) that has
#: no twin of the same name here.
REFERENCE_TWINS: dict[str, object] = {
    "check_conditions": as_condition,  # deco.optimized.checks: labels/text and null, once per call
}
