"""The conformance vectors of spec/vectors: their inputs, drawn from seeded generators, and their
expected outputs, computed by `ReferencePort` through the kit's own calling code (deco.conformance),
so a vector means exactly "what the reference returns for these inputs". `deco conformance
--write DIR` (`nox -s vectors`) regenerates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from deco import reference as ref
from deco.config import DeCoConfig, parameter_shapes
from deco.conformance.domain import DOMAINS, domain_vector_specs, stage_specs, weight_table_specs
from deco.conformance.kit import CALLERS, Array, ReferencePort, Vector, save_vector
from deco.reference import model as ref_model
from deco.reference import text_to_image as ref_t2i

#: The model of the forward and sampler vectors: small enough that all vectors stay < 2.5 MB,
#: with a non-square token grid (8x12 pixels, 2x3 patches) so swapped axes show. The text model
#: (2 refine blocks, E = 12, T = 5 tokens) has SwiGLU width F = 64, unlike D = 32, so that the
#: fused w12 / w3 layout cannot be mistaken for a square one.
VECTOR_MODELS = {
    "deco": DeCoConfig("deco", 3, 4, 32, 2, 2, 2, 8, 4),
    "baseline": DeCoConfig("baseline", 3, 4, 32, 2, 2, 0, 0, 4),
    "t2i": DeCoConfig("t2i", 3, 4, 32, 2, 2, 2, 8, 0, 2.0, 2, 12, 5),
}
IMAGE_HW = (8, 12)


def random_weights(config: DeCoConfig, rng: np.random.Generator) -> dict[str, Array]:
    """Non-zero weights for every parameter, rounded to float32 so that a float32 port sees
    exactly the weights the float64 reference used. Norm gains 1 + 0.1 N, matrices N(0, 1/fan_in),
    biases and label table 0.1 N: nothing is zero (unlike AdaLN-Zero), so any wiring matters."""
    out: dict[str, Array] = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith(
                "norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 2 and name != "y_embed.weight":
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        else:
            w = 0.1 * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def _block_weights(weights: Mapping[str, Array], prefix: str) -> dict[str, Array]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _small_row(x: Array) -> Array:
    """Scale batch element 1 by 1e-3: its mean square (~1e-6) is then comparable to the norm
    epsilon, so a port with a different epsilon (or none) fails instead of agreeing to 1e-6."""
    x = x.copy()
    x[1] *= 1e-3
    return x


def vector_specs() -> list[Vector]:
    """The vectors without expected outputs, from fixed seeds (deterministic)."""
    rng = np.random.default_rng(20251124)
    n = rng.standard_normal
    deco_cfg, base_cfg = VECTOR_MODELS["deco"], VECTOR_MODELS["baseline"]
    deco_w, base_w = random_weights(deco_cfg, rng), random_weights(base_cfg, rng)
    h, w = IMAGE_HW
    hd = deco_cfg.head_dim
    angles_block = ref_model.rope_angles(h // 4, w // 4, hd)
    model_labels = np.array([1, deco_cfg.num_classes], dtype=np.int64)  # a class and the null class
    sampler = {"noise": n((2, 3, h, w)), "labels": np.array([1, 3], dtype=np.int64)}
    # Interval (0.25, 0.75] on the 4-step grid (0, .25, .5, .75, 1): one grid point sits on each
    # edge, so the strict/inclusive ends of spec/04 §2 decide the result.
    edge = {"steps": 4, "timeshift": 1.0, "guidance": 3.0, "interval": [0.25, 0.75]}
    shifted = {"steps": 5, "timeshift": 3.0, "guidance": 2.0}
    return [
        Vector("ycbcr", "rgb_to_ycbcr", {"x": rng.uniform(-1, 1, (2, 3, 5, 7))}),
        # 13x11: both axes need reflect padding (to 16x16), bottom and right.
        Vector("block_dct", "block_dct", {"x": rng.uniform(-1, 1, (2, 3, 13, 11))}),
        *weight_table_specs(),
        Vector("loss_q85", "frequency_aware_loss",
               {"pred": rng.uniform(-1, 1, (2, 3, 16, 13)), "target": rng.uniform(-1, 1, (2, 3, 16, 13))},
               {"quality": 85, "gamma": 1.0}),
        Vector("loss_q30_gamma2", "frequency_aware_loss",
               {"pred": rng.uniform(-1, 1, (1, 3, 8, 16)), "target": rng.uniform(-1, 1, (1, 3, 8, 16))},
               {"quality": 30, "gamma": 2.0}),
        Vector("timestep_features", "timestep_features",
               {"t": np.array([0.0, 0.03, 0.3, 0.5, 0.77, 1.0])}),
        Vector("rope_angles", "rope_angles", {}, {"grid_h": 3, "grid_w": 5, "head_dim": 16}),
        Vector("apply_rope", "apply_rope",
               {"x": n((2, 15, 2, 16)), "angles": ref_model.rope_angles(3, 5, 16)}),
        Vector("dit_block", "dit_block",
               {"x": _small_row(n((2, 6, 32))), "c": n((2, 32)), "angles": angles_block},
               {"num_heads": deco_cfg.num_heads}, _block_weights(deco_w, "blocks.1.")),
        Vector("dct_position_features_p4", "dct_position_features", {}, {"patch_size": 4}),
        Vector("dct_position_features_p8", "dct_position_features", {}, {"patch_size": 8}),
        Vector("decoder_block", "decoder_block",
               {"x": _small_row(n((3, 16, 8))), "cond": n((3, 16, 8))},
               weights=_block_weights(deco_w, "decoder.blocks.1.")),
        Vector("forward_deco", "forward",
               {"x": n((2, 3, h, w)), "t": np.array([0.2, 0.9]), "y": model_labels},
               weights=deco_w, config=deco_cfg.to_dict()),
        Vector("forward_baseline", "forward",
               {"x": n((2, 3, h, w)), "t": np.array([0.6, 0.05]), "y": model_labels},
               weights=base_w, config=base_cfg.to_dict()),
        Vector("time_grid", "time_grid", {}, {"steps": 5, "timeshift": 3.0}),
        Vector("euler_interval_edges", "euler", sampler, edge, velocity_model="forward_deco"),
        Vector("euler_timeshift", "euler", sampler, {**shifted, "interval": [0.1, 0.9]},
               velocity_model="forward_deco"),
        Vector("heun_interval_edges", "heun", sampler, {**edge, "exact": False},
               velocity_model="forward_deco"),
        Vector("heun_exact", "heun", sampler, {**shifted, "interval": [0.0, 1.0], "exact": True},
               velocity_model="forward_deco"),
        *text_vector_specs(sampler),
        *domain_vector_specs(sampler),
    ]


def text_vector_specs(class_sampler: dict[str, Array]) -> list[Vector]:
    """The text-to-image and Adams vectors (spec/06, spec/04 §6). They draw from a generator of
    their own, so that adding them left every earlier vector byte-identical."""
    rng = np.random.default_rng(20251201)
    n = rng.standard_normal
    cfg = VECTOR_MODELS["t2i"]
    weights = random_weights(cfg, rng)
    h, w = IMAGE_HW
    b, length, width = 2, cfg.text_length, cfg.text_dim
    embed = {k: v for k, v in weights.items() if k.startswith("text_embed.") or k == "text_pos_embed"}
    # Bias scaled too: element 1's projection is then ~1e-3 and the RMSNorm epsilon matters.
    embed["text_embed.bias"] = (embed["text_embed.bias"] * 1e-3).astype(np.float32)
    edge = {"steps": 4, "timeshift": 1.0, "guidance": 3.0, "interval": [0.25, 0.75], "order": 3}
    release_like = {"steps": 5, "timeshift": 3.0, "guidance": 4.0, "interval": [0.0, 1.0], "order": 2}
    return [
        # 3x5: the crossed spans of spec/06 §3 show only on a non-square grid.
        Vector("text_rope_angles", "text_rope_angles", {}, {"grid_h": 3, "grid_w": 5, "head_dim": 16}),
        Vector("text_position_features_p4", "text_position_features", {}, {"patch_size": 4}),
        Vector("text_position_features_p8", "text_position_features", {}, {"patch_size": 8}),
        Vector("text_embedding", "text_embedding", {"text": _small_row(n((b, length, width)))},
               weights=embed),
        Vector("text_refine_block", "text_refine_block",
               {"x": _small_row(n((b, length, cfg.hidden_size))), "c": n((b, cfg.hidden_size))},
               {"num_heads": cfg.num_heads}, _block_weights(weights, "text_blocks.1.")),
        Vector("joint_dit_block", "joint_dit_block",
               {"x": _small_row(n((b, 6, cfg.hidden_size))), "text": n((b, length, cfg.hidden_size)),
                "c": n((b, cfg.hidden_size)),
                "angles": ref_t2i.text_rope_angles(h // 4, w // 4, cfg.head_dim)},
               {"num_heads": cfg.num_heads}, _block_weights(weights, "blocks.1.")),
        Vector("forward_t2i", "t2i_forward",
               {"x": n((b, 3, h, w)), "t": np.array([0.3, 0.85]), "text": n((b, length, width))},
               weights=weights, config=cfg.to_dict()),
        # Shifted grids: unequal steps, so the weights are not the textbook (3/2, -1/2).
        Vector("adams_weights_order2", "adams_weights", {"grid": ref.time_grid(6, 3.0)}, {"order": 2}),
        Vector("adams_weights_order4", "adams_weights", {"grid": ref.time_grid(7, 3.0)}, {"order": 4}),
        # Adams guides where low < t < high: the edge grid points 0.25 and 0.75 are both unguided.
        Vector("adams_interval_edges", "adams", class_sampler, edge, velocity_model="forward_deco"),
        # The release's t2i settings (time shift 3, guidance 4, order 2, interval (0, 1): the
        # first step unguided) on 5 steps, with one null text embedding (T, E) for the batch.
        Vector("adams_text", "adams",
               {"noise": n((b, 3, h, w)), "text": n((b, length, width)), "null": n((length, width))},
               release_like, velocity_model="forward_t2i"),
    ]


def generate_vectors() -> list[Vector]:
    """`vector_specs()` and their stage vectors (`stage_specs`), each with its `domain` and
    `expected` filled in by the reference."""
    specs = vector_specs()
    specs += stage_specs(specs)
    by_name = {v.name: v for v in specs}
    out = []
    for v in specs:
        value = np.asarray(CALLERS[v.component](ReferencePort, v, by_name), dtype=np.float64)
        out.append(replace(v, expected=value, domain=v.domain or DOMAINS[v.name]))
    return out


def write_vectors(folder: str | Path) -> list[Path]:
    """Regenerate every vector into `folder` (created if needed; stale vectors are removed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = generate_vectors()
    keep = {f"{v.name}.safetensors" for v in vectors}
    for stale in folder.glob("*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    return [save_vector(folder, v) for v in vectors]
