"""A model as the reference holds it (`Model`: a config plus float64 weights, spec/03 and 06) and
the portable weight file it is read from and written to (spec/05-weights.md): safetensors,
portable names, config in metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from deco.atomic import atomic_write
from deco.config import DeCoConfig
from deco.portable import FORMAT_KEY, FORMAT_VERSION, read_header
from deco.release import check_shapes

from .checks import Array, as_condition, as_float_array
from .model import baseline_forward, deco_forward, deco_semantic
from .text_to_image import t2i_forward, t2i_semantic


def check_weights(config: DeCoConfig, weights: Mapping[str, Any]) -> dict[str, Array]:
    """Validated float64 copies of `weights` for `config` (names and shapes must match exactly)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    check_shapes(config, {k: v.shape for k, v in arrays.items()})
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"weights: {name} contains NaN or infinite values")
    return arrays



class Model:
    """A DeCo, baseline or text-to-image model: a config plus float64 weights.

    `forward(x, t, y)` -> velocity, where y is the condition: class labels (B,) for the class
    models, text-encoder hidden states (B, T, E) for architecture "t2i" (spec/06)."""

    def __init__(self, config: DeCoConfig, weights: Mapping[str, Any]) -> None:
        self.config = config
        self.weights: dict[str, Array] = check_weights(config, weights)

    def check_inputs(self, x: Any, t: Any, y: Any) -> tuple[Array, Array, Any]:
        """Validated (x, t, condition): labels (B,) or, for the text model, text (B, T, E)."""
        cfg = self.config
        x = as_float_array("x", x, ndim=4, channels=cfg.in_channels)
        h, w = x.shape[2], x.shape[3]
        if h % cfg.patch_size or w % cfg.patch_size or h == 0 or w == 0:
            raise ValueError(
                f"x: height and width must be positive multiples of patch_size={cfg.patch_size}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        t = as_float_array("t", t)
        t = np.broadcast_to(t, (x.shape[0],)).copy() if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {t.shape}")
        return x, t, as_condition("text" if cfg.is_text else "y", y, cfg, x.shape[0])

    def forward(self, x: Any, t: Any, y: Any) -> Array:
        """Velocity for noisy images x (B, C, H, W), times t (B,) and condition y: labels (B,)
        or, for the text model, text embeddings (B, T, E)."""
        x, t, y = self.check_inputs(x, t, y)
        if self.config.is_text:
            return t2i_forward(x, t, y, self.config, self.weights)
        fn = deco_forward if self.config.architecture == "deco" else baseline_forward
        return fn(x, t, y, self.config, self.weights)

    __call__ = forward

    def semantic(self, x: Any, t: Any, y: Any) -> Array:
        """DeCo and text DeCo: the decoder's condition silu(t_emb + s) as (B, D, H/p, W/p)."""
        if self.config.architecture == "baseline":
            raise ValueError("semantic: only defined for architectures 'deco' and 't2i'")
        x, t, y = self.check_inputs(x, t, y)
        fn = t2i_semantic if self.config.is_text else deco_semantic
        s = fn(x, t, y, self.config, self.weights)
        p = self.config.patch_size
        return s.reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p, s.shape[-1]).transpose(0, 3, 1, 2)


def load_weights(path: str | Path) -> tuple[DeCoConfig, dict[str, Array]]:
    """(config, float64 weights) from a DeCo `.safetensors` file."""
    header = read_header(path)
    config = DeCoConfig.from_json(header.metadata["config"])
    check_shapes(config, header.shapes())  # before any tensor is read
    try:
        with safe_open(str(path), framework="np") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"path: {path} is truncated or corrupt ({exc})") from None
    return config, check_weights(config, raw)


def load_model(path: str | Path) -> Model:
    """A `Model` (float64) from a DeCo `.safetensors` file."""
    config, weights = load_weights(path)
    return Model(config, weights)


def save_weights(
    path: str | Path, config: DeCoConfig, weights: Mapping[str, Any], dtype: Any = np.float32
) -> None:
    """Write weights and config atomically: temporary file in the same folder, fsync, rename."""
    check_shapes(config, {k: np.shape(v) for k, v in weights.items()})
    path = Path(path)
    arrays = {k: np.ascontiguousarray(np.asarray(v, dtype=dtype)) for k, v in weights.items()}
    meta = {FORMAT_KEY: FORMAT_VERSION, "config": config.to_json()}
    atomic_write(path, lambda tmp: save_file(arrays, tmp, metadata=meta))
