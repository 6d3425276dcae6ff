"""The portable weight file (spec/05-weights.md): safetensors, portable names, config in metadata."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from deco.atomic import atomic_write
from deco.config import DeCoConfig
from deco.portable import FORMAT_KEY, FORMAT_VERSION, read_metadata
from deco.release import check_shapes

from .checks import Array
from .model import Model


def check_weights(config: DeCoConfig, weights: Mapping[str, Any]) -> dict[str, Array]:
    """Validated float64 copies of `weights` for `config` (names and shapes must match exactly)."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    check_shapes(config, {k: v.shape for k, v in arrays.items()})
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"weights: {name} contains NaN or infinite values")
    return arrays


def load_weights(path: str | Path) -> tuple[DeCoConfig, dict[str, Array]]:
    """(config, float64 weights) from a DeCo `.safetensors` file."""
    meta = read_metadata(path)
    config = DeCoConfig.from_json(meta["config"])
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
