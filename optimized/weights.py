"""Loading and saving models (spec/05-weights.md; mirrors reference/weights.py).

`load_model` reads either a DeCo `.safetensors` file (portable names, config JSON in the header
metadata, deco.portable) or a public
release Lightning `.ckpt` directly (`torch.load(weights_only=True)`, EMA weights by default,
config inferred from the tensor shapes). The kind of file is told by its content, not its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deco.atomic import atomic_write
from deco.config import DeCoConfig
from deco.portable import FORMAT_KEY, FORMAT_VERSION, read_metadata
from deco.release import check_shapes, read_release_checkpoint

if TYPE_CHECKING:  # model.py imports this module (and re-exports load_model)
    from .model import BaselineDiT, DeCo, DiffusionTransformer


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
        config = DeCoConfig.from_json(read_metadata(path)["config"])
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
    from .model import build_model

    stored = next(iter(state.values())).dtype
    with torch.device("meta"):  # no initialisation work: every parameter is assigned below
        model = build_model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype or stored).eval()


def save_model(model: DiffusionTransformer, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write `model`'s weights and config atomically (temporary file in the same folder, fsync,
    rename). dtype: default float64 for float64 models, float32 otherwise (the format is read
    with NumPy by the reference, which has no bfloat16)."""
    from .model import DiffusionTransformer

    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"model: expected a DeCo, TextDeCo or BaselineDiT, got {type(model).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"path: folder {path.parent} does not exist")
    state = model.state_dict()
    if dtype is None:
        dtype = torch.float64 if model.patch_embed.weight.dtype == torch.float64 else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
    meta = {FORMAT_KEY: FORMAT_VERSION, "config": model.config.to_json()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
