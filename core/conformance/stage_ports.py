"""The components of the domain and stage vectors (protocol.STAGE_CALLERS) for the kit's own
ports: `ReferenceStages` (deco.reference, float64) and `OptimizedStages` (deco.optimized, in the
port's dtype), mixed into `ReferencePort` and `OptimizedPort` (ports.py).

The functions are the spec's stages: flow matching's interpolation and target velocity (01 §1),
the time shift (01 §3), the loss's padding and weighted error (02 §3, §6), the guidance scale in
force at a time and the guided velocity (04 §2, §6), and one Euler or Heun update (04 §3, §4).
The optimized ones import torch inside their methods, as ports.py does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from deco.reference import flow as ref_flow
from deco.reference import frequency as ref_frequency
from deco.reference import sampling as ref_sampling

Array = NDArray[Any]
#: The interval that puts every time inside it: a step's scale is the `guidance` given.
EVERYWHERE = (-np.inf, np.inf)


class ReferenceStages:
    """The stage components by deco.reference (float64)."""

    interpolate = staticmethod(ref_flow.interpolate)
    target_velocity = staticmethod(ref_flow.target_velocity)
    time_shift = staticmethod(ref_flow.time_shift)
    reflect_pad = staticmethod(ref_frequency.reflect_pad)
    guidance_at = staticmethod(ref_sampling.guidance_at)
    adams_guidance_at = staticmethod(ref_sampling.adams_guidance_at)

    @staticmethod
    def weighted_error(coeffs_pred: Array, coeffs_target: Array, weights: Array) -> float:
        """The loss's last stage (02 §6): mean over (B, 3, Bh, Bw, 8, 8) of
        w[c, u, v] (D(pred) - D(target))^2, given both block DCTs and the (3, 8, 8) weights."""
        diff = np.asarray(coeffs_pred, np.float64) - np.asarray(coeffs_target, np.float64)
        return float(np.mean(np.asarray(weights, np.float64)[None, :, None, None] * diff**2))

    @staticmethod
    def guided_velocity(model: Any, x: Array, t: float, cond: Array, null: Array | None,
                        guidance: float) -> Array:
        """u + g (c - u) at time t (04 §2); `null` None (the null class) or one null text (T, E)."""
        null = None if null is None else np.broadcast_to(null, np.shape(cond))
        return ref_sampling.guided_velocity(model, x, t, cond, guidance, null)

    @staticmethod
    def euler_step(model: Any, x: Array, labels: Array, t_cur: float, t_next: float,
                   guidance: float) -> Array:
        """One Euler update (04 §3) with the scale `guidance`."""
        return ref_sampling.euler(model, x, labels, np.array([t_cur, t_next]), guidance, EVERYWHERE)

    @staticmethod
    def heun_step(model: Any, x: Array, labels: Array, t_cur: float, t_next: float,
                  guidance: float) -> Array:
        """One predictor-corrector update of Heun (04 §4: a step that is not the last), both
        evaluations with the scale `guidance`."""
        dt = t_next - t_cur
        v = ref_sampling.guided_velocity(model, x, t_cur, labels, guidance)
        v_hat = ref_sampling.guided_velocity(model, x + dt * v, t_next, labels, guidance)
        return x + dt * 0.5 * (v + v_hat)


class TorchVelocity:
    """The kit's NumPy sampler model seen as a torch model (config + __call__ on tensors)."""

    def __init__(self, model: Any, torch: Any) -> None:
        self.model, self.torch, self.config = model, torch, model.config

    def __call__(self, x: Any, t: Any, y: Any) -> Any:
        v = self.model.forward(x.double().numpy(), t.double().numpy(), y.numpy())
        return self.torch.as_tensor(v, dtype=x.dtype)


class OptimizedStages:
    """The stage components by deco.optimized, for a port with `torch`, `_t` (NumPy -> tensor in
    the port's dtype) and `_np` (tensor -> float64 NumPy). No `weighted_error`: the optimized loss
    never forms the two block DCTs (it applies one operator to the difference), so it has no such
    stage, and the kit reports that vector as skipped for this port."""

    torch: Any

    def _t(self, a: Any) -> Any:
        raise NotImplementedError

    def _np(self, x: Any) -> Array:
        raise NotImplementedError

    def interpolate(self, x: Array, noise: Array, t: Array) -> Array:
        from deco.optimized.flow import interpolate  # here: the kit runs without torch

        return self._np(interpolate(self._t(x), self._t(noise), self._t(t)))

    def target_velocity(self, x: Array, noise: Array) -> Array:
        from deco.optimized.flow import target_velocity  # here: the kit runs without torch

        return self._np(target_velocity(self._t(x), self._t(noise)))

    def time_shift(self, t: Array, shift: float) -> Array:
        from deco.optimized.flow import time_shift  # here: the kit runs without torch

        return self._np(time_shift(self._t(t), shift))

    def reflect_pad(self, x: Array) -> Array:
        from deco.optimized.frequency import reflect_pad  # here: the kit runs without torch

        return self._np(reflect_pad(self._t(x)))

    def guidance_at(self, t: float, guidance: float, interval: tuple[float, float]) -> float:
        from deco.optimized.sampling import guidance_at  # here: the kit runs without torch

        return guidance_at(t, guidance, interval)

    def adams_guidance_at(self, t: float, guidance: float, interval: tuple[float, float]) -> float:
        from deco.optimized.sampling import adams_guidance_at  # here: the kit runs without torch

        return adams_guidance_at(t, guidance, interval)

    def _conditions(self, model: Any, x: Array, cond: Array, null: Array | None,
                    guidance: float) -> tuple[Any, Any, Any]:
        """(x as a tensor, condition, null condition) batched like x, as `sample` makes them."""
        from deco.optimized.checks import as_condition  # here: the kit runs without torch

        noise = self._t(x)
        convert = self._t if model.config.is_text else self.torch.as_tensor
        c, u = as_condition(model.config, convert(cond), None if null is None else convert(null),
                            noise, guidance)
        return noise, c, u

    def guided_velocity(self, model: Any, x: Array, t: float, cond: Array, null: Array | None,
                        guidance: float) -> Array:
        from deco.optimized.sampling import guided_velocity  # here: the kit runs without torch

        noise, c, u = self._conditions(model, x, cond, null, guidance)
        return self._np(guided_velocity(TorchVelocity(model, self.torch), noise, t, c, u, guidance))

    def euler_step(self, model: Any, x: Array, labels: Array, t_cur: float, t_next: float,
                   guidance: float) -> Array:
        from deco.optimized.sampling import euler  # here: the kit runs without torch

        noise, c, u = self._conditions(model, x, labels, None, guidance)
        states = euler(TorchVelocity(model, self.torch), noise, c, u, [t_cur, t_next], guidance,
                       EVERYWHERE)
        return self._np(states[-1])

    def heun_step(self, model: Any, x: Array, labels: Array, t_cur: float, t_next: float,
                  guidance: float) -> Array:
        from deco.optimized.sampling import heun  # here: the kit runs without torch

        noise, c, u = self._conditions(model, x, labels, None, guidance)
        # State 1 of a 3-point grid is one full predictor-corrector step (only the last is Euler).
        grid = [t_cur, t_next, 2.0 * t_next - t_cur]
        states = heun(TorchVelocity(model, self.torch), noise, c, u, grid, guidance, EVERYWHERE,
                      exact=True)
        return self._np(states[1])
