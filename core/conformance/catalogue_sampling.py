"""Convention points of spec/04 (sampling), as variants of the reference
(deco.conformance.catalogue): the guided velocity's formula, branch order and domain of g (§2),
the guidance interval's ends for Euler/Heun (§2) and for Adams (§6), Heun's predictor, corrector
guidance and last step (§4), the Adams weights (§6). The time grid's shift is spec/01's
(catalogue_frequency)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import numpy as np

from deco.conformance.catalogue import SAMPLERS, Patch, Variant, constant, replace, variant, wrap

S = "deco.reference.sampling"
CS = "deco.conformance.catalogue_sampling"
EULER_HEUN = ("euler", "heun", "guidance_at")
#: The guided velocity's users: the samplers and their stages (spec/vectors' stage vectors).
GUIDED = (*SAMPLERS, "guided_velocity", "euler_step", "heun_step")


def _guided(*, formula: str = "spec", order: str = "null_first",
            null_label: str = "K") -> Callable[..., Any]:
    """04 §2's guided velocity: `formula` "sign" (u - g (c - u)) or "above_one" (guidance only
    when g > 1, else the conditional velocity); `order` "cond_first" reads the batch
    [null; cond] the other way round."""
    def guided_velocity(model: Any, x: Any, t: float, labels: Any, guidance: float,
                        null: Any = None) -> Any:
        b = x.shape[0]
        if null is None:
            if getattr(model.config, "is_text", False):
                return model.forward(x, np.full(b, t), labels)
            label = model.config.num_classes if null_label == "K" else 0
            null = np.full(b, label, dtype=np.int64)
        if formula == "above_one" and guidance <= 1.0:
            return model.forward(x, np.full(b, t), labels)
        out = model.forward(np.concatenate([x, x]), np.full(2 * b, t), np.concatenate([null, labels]))
        uncond, cond = (out[:b], out[b:]) if order == "null_first" else (out[b:], out[:b])
        return uncond - guidance * (cond - uncond) if formula == "sign" else \
            uncond + guidance * (cond - uncond)
    return guided_velocity


def _interval(rule: str) -> Callable[..., Any]:
    def guidance_at(t: float, guidance: float, interval: tuple[float, float]) -> float:
        low, high = interval
        inside = {"closed": low <= t <= high, "open": low < t < high, "low_closed": low <= t < high,
                  "high_closed": low < t <= high, "everywhere": True}[rule]
        return guidance if inside else 1.0
    return guidance_at


#: Heun's convention points, set by the Heun variants (module constants, so that several
#: of them compose in one flagged implementation).
HEUN_FLIP_EXACT = False
HEUN_CORRECT_LAST = False
HEUN_CORRECTOR_NEXT = False


def _heun(model: Any, noise: Any, labels: Any, grid: Any, guidance: float,
          interval: tuple[float, float], exact: bool = False, null: Any = None) -> Any:
    """04 §4's Heun with its convention points read from the HEUN_* flags."""
    from deco.reference import sampling as sm
    exact = exact != HEUN_FLIP_EXACT
    x, v_reuse, n = noise, None, len(grid) - 1
    for i, (t_cur, t_next) in enumerate(pairwise(grid)):
        g = sm.guidance_at(t_cur, guidance, interval)
        dt = t_next - t_cur
        v = sm.guided_velocity(model, x, t_cur, labels, g, null) if exact or v_reuse is None \
            else v_reuse
        x_hat = x + dt * v
        if i == n - 1 and not HEUN_CORRECT_LAST:
            return x_hat
        g_hat = sm.guidance_at(t_next, guidance, interval) if HEUN_CORRECTOR_NEXT else g
        v_hat = sm.guided_velocity(model, x_hat, t_next, labels, g_hat, null)
        x = x + dt * 0.5 * (v + v_hat)
        v_reuse = v_hat
    return x


def _heun_flag(name: str) -> tuple[Patch, Patch]:
    return constant(CS, name, True), wrap(S, "heun", lambda _old: _heun)


def _adams_weights(kind: str) -> Callable[..., Any]:
    def make(old: Callable[..., Any]) -> Callable[..., Any]:
        def adams_weights(grid: Any, order: int = 2) -> Any:
            grid = np.asarray(grid, dtype=np.float64)
            if kind == "uniform":
                return old(np.linspace(0.0, 1.0, grid.size), order)
            return [np.asarray(w)[::-1] for w in old(grid, order)]
        return adams_weights
    return make


VARIANTS: list[Variant] = [
    # ---- 04 §2: guidance
    variant("guidance_sign", "04 §2", "the sign of the guidance difference flipped: u - g (c - u) "
            "in place of u + g (c - u)", GUIDED, replace(S, "guided_velocity", _guided(formula="sign"))),
    variant("guidance_only_above_one", "04 §2", "guidance applied only when g > 1 (g <= 1 returns "
            "the conditional velocity: g = 0 is then not unconditional)", GUIDED,
            replace(S, "guided_velocity", _guided(formula="above_one"))),
    variant("guidance_branches_swapped", "04 §2", "the guided batch's branches read the other way "
            "round (condition first, null second)", GUIDED,
            replace(S, "guided_velocity", _guided(order="cond_first"))),
    variant("null_label_zero", "00 §3", "class 0 as the unconditional branch's label instead of "
            "the null class K", GUIDED, replace(S, "guided_velocity", _guided(null_label="zero"))),
    variant("interval_closed_low", "04 §2", "the guidance interval closed at its lower end "
            "(low <= t <= high)", EULER_HEUN, replace(S, "guidance_at", _interval("closed"))),
    variant("interval_open_high", "04 §2", "the guidance interval open at its upper end "
            "(low < t < high)", EULER_HEUN, replace(S, "guidance_at", _interval("open"))),
    variant("interval_half_open", "04 §2", "the guidance interval half-open the other way "
            "(low <= t < high, Python's range convention)", EULER_HEUN,
            replace(S, "guidance_at", _interval("low_closed"))),
    variant("interval_ignored", "04 §2", "guidance at every step (the interval ignored)",
            EULER_HEUN, replace(S, "guidance_at", _interval("everywhere"))),
    # ---- 04 §4: Heun
    variant("heun_predictor_swapped", "04 §4", "the other Heun predictor (exact re-evaluation for "
            "exact=False, reuse for exact=True)", ("heun",), *_heun_flag("HEUN_FLIP_EXACT")),
    variant("heun_last_step_corrected", "04 §4", "Heun's last step corrected too (not a plain "
            "Euler step)", ("heun",), *_heun_flag("HEUN_CORRECT_LAST")),
    variant("heun_corrector_guidance_next", "04 §4", "Heun's corrector guided with the scale of "
            "t_{i+1} instead of t_i", ("heun",), *_heun_flag("HEUN_CORRECTOR_NEXT")),
    # ---- 04 §6: Adams
    variant("adams_interval_high_closed", "04 §6", "the Adams guidance interval closed at its "
            "upper end (low < t <= high, the rule of §2)", ("adams", "adams_guidance_at"),
            replace(S, "adams_guidance_at", _interval("high_closed"))),
    variant("adams_interval_low_closed", "04 §6", "the Adams guidance interval closed at its "
            "lower end (low <= t < high)", ("adams", "adams_guidance_at"),
            replace(S, "adams_guidance_at", _interval("low_closed"))),
    variant("adams_weights_uniform", "04 §6", "the Adams weights of a uniform grid (unequal steps "
            "ignored)", ("adams_weights", "adams"), wrap(S, "adams_weights", _adams_weights("uniform"))),
    variant("adams_weights_newest_first", "04 §6", "the Adams weights applied newest velocity "
            "first", ("adams_weights", "adams"),
            wrap(S, "adams_weights", _adams_weights("reversed"))),
]
