"""Building, loading and saving models (spec/05-weights.md; mirrors reference/weights.py).

`load_model` reads either a DeCo `.safetensors` file (portable names, config JSON in the header
metadata, deco.portable) or a public
release Lightning `.ckpt` directly (`torch.load(weights_only=True)`, EMA weights by default,
config inferred from the tensor shapes). The kind of file is told by its content, not its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deco.config import DeCoConfig
from deco.portable import read_header
from deco.release import check_shapes, read_release_checkpoint

from .model import BaselineDiT, DeCo, DiffusionTransformer
from .text_to_image import TextDeCo


def build_model(config: DeCoConfig) -> DeCo | BaselineDiT:
    """`DeCo`, `TextDeCo` (a `DeCo`) or `BaselineDiT` according to `config.architecture`."""
    if not isinstance(config, DeCoConfig):
        raise TypeError(f"config: expected a DeCoConfig, got {type(config).__name__}")
    if config.architecture == "t2i":
        return TextDeCo(config)
    return DeCo(config) if config.architecture == "deco" else BaselineDiT(config)


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length and then the JSON header '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_weights(path: str | Path, weights: str = "ema") -> tuple[DeCoConfig, dict[str, torch.Tensor]]:
    """(config, portable name -> CPU tensor) from a DeCo `.safetensors` or a release `.ckpt`."""
    if weights not in ("ema", "online"):
        raise ValueError(f"weights: expected 'ema' or 'online', got {weights!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    if _is_safetensors(path):
        if weights != "ema":
            raise ValueError("weights: a .safetensors file holds one weight set; "
                             "'online' only applies to release .ckpt files")
        header = read_header(path)
        config = DeCoConfig.from_json(header.metadata["config"])
        check_shapes(config, header.shapes())  # before any tensor is read
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"path: {path} is truncated or corrupt ({exc})") from None
    else:
        try:
            config, state = read_release_checkpoint(path, weights)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"path: {str(exc).removeprefix('checkpoint: ')}") from None
    check_shapes(config, {k: tuple(v.shape) for k, v in state.items()})
    for name, value in state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError(f"weights: {name} is not a finite floating-point tensor")
    return config, state


def load_model(
    path: str | Path, *, weights: str = "ema", device: Any = None, dtype: torch.dtype | None = None
) -> DeCo | BaselineDiT:
    """A `DeCo`, `TextDeCo` (text-to-image, a `DeCo`) or `BaselineDiT` (by the file's
    parameters) in eval mode.

    weights: "ema" (default) or "online", for release checkpoints. dtype: default the stored
    dtype (float32 for release checkpoints). device: default CPU."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    config, state = load_weights(path, weights)
    stored = next(iter(state.values())).dtype
    with torch.device("meta"):  # no initialisation work: every parameter is assigned below
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype or stored).eval()


def save_model(model: DiffusionTransformer, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `model`'s weights and config atomically (`DiffusionTransformer.save`), after checking
    that it is one of this package's models."""
    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"model: expected a DeCo, TextDeCo or BaselineDiT, got {type(model).__name__}")
    model.save(path, dtype)


#: The optimized object that implements each function or class of reference/weights.py (spec/05)
#: that has no twin of the same name here.
REFERENCE_TWINS: dict[str, object] = {
    "Model": DiffusionTransformer,  # a config plus weights, callable as forward(x, t, y)
    "check_weights": DiffusionTransformer.load_state_dict,  # strict names and shapes (portable names)
    "save_weights": save_model,
}
