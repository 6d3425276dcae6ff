"""The vectors that cover the spec's domain and the stage vectors (deco.conformance.vectors).

Domain vectors put each argument where conventions diverge: guidance 0, between 0 and 1, exactly
1, negative and large (04 §2: any real g); each (quality, gamma) region of the weights (02 §4-5:
q < 50 and q >= 50, gamma = 1 and not) in a vector of its own, so that a port which refuses one
gamma still runs the rest; the smallest sizes the reflect padding allows (02 §3: 5) and
non-square, non-multiple-of-8 sizes; flow matching's interpolation and target velocity (01 §1);
the time shift on its own, above and below 1 (01 §3).

Stage vectors decompose a composite vector on its own inputs: a loss into YCbCr, padding, DCT,
weights and weighted error (02 §1-6); a sampler into its time grid, the guidance scale in force
at each step, the guided velocity and one update (04), and Heun also on one step (its last step,
plain Euler). Their inputs are the reference's results
of the stage before, so each stage is checked alone; `stage_of` names the composite, and the kit
lists the stages' verdicts under a failed composite (deco.conformance.stages).

`DOMAINS` states the domain of the vectors defined in vectors.py; the vectors made here carry
their own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deco import reference as ref
from deco.conformance.protocol import Array, Vector
from deco.reference import frequency as ref_frequency
from deco.reference import sampling as ref_sampling

#: The domain of each vector of vectors.py (shown by `deco conformance --list`).
DOMAINS = {
    "ycbcr": "non-square 5x7 images, values in [-1, 1]",
    "block_dct": "13x11: both axes reflect-padded (to 16x16), bottom and right",
    "loss_q85": "quality >= 50, gamma = 1 (the default); 16x13: width padded",
    "loss_q30_gamma2": "quality < 50 (scale 5000/q), gamma = 2; 8x16: no padding",
    "timestep_features": "t in [0, 1] including both ends",
    "rope_angles": "non-square 3x5 grid, d_h 16",
    "apply_rope": "non-square 3x5 grid, 2 heads",
    "dit_block": "2x3 token grid; batch element 1 tiny (norm epsilon matters)",
    "dct_position_features_p4": "patch size 4",
    "dct_position_features_p8": "patch size 8",
    "decoder_block": "batch element 1 tiny (norm epsilon matters)",
    "forward_deco": "DeCo, non-square 8x12 images, t 0.2 and 0.9, a class and the null class",
    "forward_baseline": "baseline (no decoder), 8x12, t 0.6 and 0.05, a class and the null class",
    "time_grid": "5 steps, shift 3 (> 1)",
    "euler_interval_edges": "guidance 3, interval ends (0.25, 0.75) on grid points, shift 1",
    "euler_timeshift": "guidance 2, shift 3, interval (0.1, 0.9) between grid points",
    "heun_interval_edges": "guidance 3, interval ends on grid points, velocity reuse (exact False)",
    "heun_exact": "guidance 2, shift 3, interval (0, 1), exact True",
    "text_rope_angles": "non-square 3x5 grid (the crossed spans show), d_h 16",
    "text_position_features_p4": "patch size 4",
    "text_position_features_p8": "patch size 8",
    "text_embedding": "T 5, E 12; batch element 1 tiny (norm epsilon matters)",
    "text_refine_block": "T 5; batch element 1 tiny (norm epsilon matters)",
    "joint_dit_block": "2x3 token grid with 5 text tokens",
    "forward_t2i": "text model, 8x12, t 0.3 and 0.85",
    "adams_weights_order2": "order 2, 6 uneven steps (shift 3)",
    "adams_weights_order4": "order 4, 7 uneven steps (shift 3)",
    "adams_interval_edges": "class model, guidance 3, order 3, interval ends on grid points",
    "adams_text": "text model, the release's t2i settings: guidance 4, order 2, interval (0, 1), "
                  "shift 3",
}

#: (name, qualities, gammas, domain) of the frequency-weight tables, one (quality, gamma) region
#: each. The first keeps the name of the single table that held them all before.
WEIGHT_TABLES = [
    ("frequency_weights", [50, 51, 75, 85, 99, 100], [1.0] * 6,
     "quality >= 50 (scale 200 - 2q) including 50 and 100, gamma = 1"),
    ("frequency_weights_q_below_50", [1, 10, 25, 49], [1.0] * 4,
     "quality < 50 (scale 5000/q) including 1 and 49, gamma = 1"),
    ("frequency_weights_gamma", [85, 50, 75, 99], [2.0, 0.5, 0.0, 3.0],
     "quality >= 50, gamma 2, 0.5, 0 and 3"),
    ("frequency_weights_q_below_50_gamma", [30, 10, 49], [2.0, 0.5, 1.5],
     "quality < 50, gamma 2, 0.5 and 1.5"),
]


def weight_table_specs() -> list[Vector]:
    return [Vector(name, "frequency_weights", {"quality": np.array(q, dtype=np.int64),
                                               "gamma": np.array(g)}, domain=domain)
            for name, q, g, domain in WEIGHT_TABLES]


def domain_vector_specs(class_sampler: dict[str, Array]) -> list[Vector]:
    """The vectors added to cover the domain. Their own generator, so that every earlier vector
    keeps its inputs."""
    rng = np.random.default_rng(20251207)
    u = rng.uniform
    times = np.array([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    # 5 steps, no shift: grid (0, .2, .4, .6, .8, 1); the interval's ends lie between grid
    # points, so these vectors test the scale alone (the edge vectors test the ends, the shifted
    # ones the shift): a port without a time shift or another interval rule still runs them.
    guided = {"steps": 5, "timeshift": 1.0, "interval": [0.1, 0.9]}

    def sampler(name: str, component: str, guidance: float, domain: str, **extra: Any) -> Vector:
        return Vector(name, component, class_sampler, {**guided, "guidance": guidance, **extra},
                      velocity_model="forward_deco", domain=domain)

    return [
        Vector("interpolate", "interpolate",
               {"x": u(-1, 1, (4, 3, 5, 7)), "noise": rng.standard_normal((4, 3, 5, 7)),
                "t": np.array([0.0, 0.3, 0.75, 1.0])},
               domain="t = 0 (noise), 1 (data) and between, one per batch element; 5x7"),
        Vector("target_velocity", "target_velocity",
               {"x": u(-1, 1, (2, 3, 5, 7)), "noise": rng.standard_normal((2, 3, 5, 7))},
               domain="5x7 images"),
        Vector("time_shift", "time_shift", {"t": times}, {"shift": 3.0},
               domain="shift 3 (> 1, towards noise), t in [0, 1] including both ends"),
        Vector("time_shift_below_1", "time_shift", {"t": times}, {"shift": 0.4},
               domain="shift 0.4 (< 1, towards data), t in [0, 1] including both ends"),
        Vector("time_grid_shift_below_1", "time_grid", {}, {"steps": 7, "timeshift": 0.5},
               domain="7 steps, shift 0.5 (< 1)"),
        Vector("block_dct_small", "block_dct", {"x": u(-1, 1, (1, 3, 5, 16))},
               domain="5x16: the smallest height reflect padding allows (pad 3), width not padded"),
        Vector("loss_q30", "frequency_aware_loss",
               {"pred": u(-1, 1, (1, 3, 5, 9)), "target": u(-1, 1, (1, 3, 5, 9))},
               {"quality": 30, "gamma": 1.0},
               domain="quality < 50, gamma = 1; 5x9: both axes padded, height the smallest"),
        Vector("loss_q85_gamma_half", "frequency_aware_loss",
               {"pred": u(-1, 1, (1, 3, 11, 6)), "target": u(-1, 1, (1, 3, 11, 6))},
               {"quality": 85, "gamma": 0.5},
               domain="quality >= 50, gamma 0.5 (< 1); 11x6: both axes padded"),
        sampler("euler_guidance_0", "euler", 0.0,
                "guidance 0 (unconditional inside the interval), no shift"),
        sampler("euler_guidance_1", "euler", 1.0,
                "guidance 1 (the conditional velocity; a port may skip the null branch)"),
        sampler("heun_guidance_half", "heun", 0.5,
                "guidance 0.5 (between 0 and 1), velocity reuse (exact False)", exact=False),
        sampler("heun_guidance_negative", "heun", -1.5, "guidance -1.5 (negative), exact True",
                exact=True),
        sampler("adams_guidance_large", "adams", 12.0, "class model, guidance 12 (large), order 2",
                order=2),
    ]


# ------------------------------------------------------------------------------ stage vectors
def stage_specs(specs: list[Vector]) -> list[Vector]:
    """The stage vectors of every loss and sampler vector in `specs`."""
    out: list[Vector] = []
    for v in specs:
        if v.component == "frequency_aware_loss":
            out += loss_stages(v)
        elif v.component in ("euler", "heun", "adams"):
            out += sampler_stages(v)
    return out


def _stage(composite: Vector, suffix: str, component: str, inputs: dict[str, Array],
           args: dict[str, Any] | None = None, domain: str = "", **extra: Any) -> Vector:
    return Vector(f"{composite.name}_{suffix}", component, inputs, args or {},
                  domain=f"{domain} ({composite.name}'s stage)", stage_of=composite.name, **extra)


def loss_stages(loss: Vector) -> list[Vector]:
    """YCbCr -> padding -> DCT -> weights -> weighted error of `loss` (02 §1-6): pred and
    target stacked on the batch axis, each stage's input the reference's result of the last."""
    pred, target = loss.inputs["pred"], loss.inputs["target"]
    quality, gamma = loss.args["quality"], loss.args["gamma"]
    both = np.concatenate([pred, target])  # (2B, 3, H, W): pred first
    ycc = ref.rgb_to_ycbcr(both)
    coeffs = ref.block_dct(ycc)
    b = pred.shape[0]
    return [
        _stage(loss, "ycbcr", "rgb_to_ycbcr", {"x": both}, domain="pred then target"),
        _stage(loss, "padding", "reflect_pad", {"x": ycc}, domain="their YCbCr"),
        _stage(loss, "dct", "block_dct", {"x": ycc}, domain="their YCbCr"),
        _stage(loss, "weights", "frequency_weights",
               {"quality": np.array([quality], dtype=np.int64), "gamma": np.array([gamma])},
               domain=f"quality {quality}, gamma {gamma}"),
        _stage(loss, "weighted_error", "weighted_error",
               {"coeffs_pred": coeffs[:b], "coeffs_target": coeffs[b:],
                "weights": ref_frequency.frequency_weights(quality, gamma)},
               domain="their block DCTs and weights"),
    ]


def sampler_step_times(v: Vector) -> tuple[Array, Array]:
    """(grid, the time of each step as the sampler sees it): the grid's t_i for Euler and Heun,
    the running sum of the steps for Adams (04 §6)."""
    grid = ref.time_grid(v.args["steps"], v.args["timeshift"])
    if v.component != "adams":
        return grid, grid[:-1]
    t, times = 0.0, []
    for i in range(grid.size - 1):
        times.append(t)
        t += grid[i + 1] - grid[i]
    return grid, np.array(times)


def sampler_stages(v: Vector) -> list[Vector]:
    """Time grid -> guidance scales -> guided velocity -> one update of the sampler `v` (04): the
    velocity and the update at the first step whose time lies inside the guidance interval,
    from the vector's noise."""
    a = v.args
    grid, times = sampler_step_times(v)
    adams = v.component == "adams"
    scale_at = ref_sampling.adams_guidance_at if adams else ref_sampling.guidance_at
    interval = (a["interval"][0], a["interval"][1])
    k = next((i for i, t in enumerate(times) if scale_at(t, 2.0, interval) == 2.0), 0)
    text = "text" in v.inputs
    cond = {"text": v.inputs["text"], "null": v.inputs["null"]} if text \
        else {"labels": v.inputs["labels"]}
    model = {"velocity_model": v.velocity_model}
    g, t_k = a["guidance"], float(times[k])
    stages = [
        _stage(v, "grid", "time_grid", {}, {"steps": a["steps"], "timeshift": a["timeshift"]},
               domain=f"{a['steps']} steps, shift {a['timeshift']}"),
        _stage(v, "guidance_scales", "adams_guidance_at" if adams else "guidance_at",
               {"t": times}, {"guidance": g, "interval": a["interval"]},
               domain=f"the step times, guidance {g}, interval {tuple(a['interval'])}"),
        _stage(v, "guided_velocity", "guided_velocity", {"x": v.inputs["noise"], **cond},
               {"t": t_k, "guidance": g}, domain=f"the noise at t {t_k:.4g}, guidance {g}", **model),
    ]
    if adams:
        stages.append(_stage(v, "step_weights", "adams_weights", {"grid": grid}, {"order": a["order"]},
                             domain=f"its grid, order {a['order']}"))
    else:
        stages.append(_stage(v, "step", f"{v.component}_step", {"x": v.inputs["noise"], **cond},
                             {"t_cur": t_k, "t_next": float(grid[k + 1]), "guidance": g},
                             domain=f"one update from t {t_k:.4g}, guidance {g}", **model))
    if v.component == "heun":  # on one step, Heun is its last step: plain Euler (04 §4)
        stages.append(_stage(v, "last_step", "heun", {"noise": v.inputs["noise"], **cond},
                             {**a, "steps": 1}, domain="1 step: the last step, plain Euler",
                             **model))
    return stages
