"""Argument validation of deco.optimized (spec/00-conventions.md §3, §4), in one place.

Every public entry point validates what it is given and raises TypeError (wrong kind of value) or
ValueError (right kind, wrong value) with a message that starts with the argument's name, as the
reference does (`reference/checks.py`). Configuration fields are checked by `deco.errors`' `field_*`
helpers, which raise `FieldError` (shared with the command line, which names the flag instead).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


# ------------------------------------------------------------------------------ numbers
def as_int(name: str, value: Any, low: int = 1) -> int:
    """An int >= low (bools are not ints here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")
    return int(value)


def as_finite_float(name: str, value: Any) -> float:
    """A finite real number as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)


def check_quality(quality: object) -> int:
    """A JPEG quality: an int in [1, 100] (the release clamps silently; we refuse)."""
    if not isinstance(quality, numbers.Integral) or isinstance(quality, bool):
        raise TypeError(f"quality: expected an int, got {type(quality).__name__}")
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"quality: expected an int in [1, 100], got {q}")
    return q


def check_gamma(gamma: object) -> float:
    """The frequency weights' exponent: any finite float."""
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool):
        raise TypeError(f"gamma: expected a float, got {type(gamma).__name__}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma: expected a finite float, got {gamma}")
    return float(gamma)


# ------------------------------------------------------------------------------ conditions
def check_label_range(name: str, y: Tensor, num_classes: int) -> None:
    """ValueError naming `name` unless every label lies in 0..num_classes (the null class).

    One host transfer (a device sync for a CUDA tensor): call it once per batch or sampling run,
    never inside a model's forward, which checks no values (spec/00 §4)."""
    if y.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(y.detach())).tolist()  # one transfer, not two
    if low < 0 or high > num_classes:
        raise ValueError(
            f"{name}: labels must lie in 0..{num_classes} ({num_classes} is the null class), "
            f"got values in {low}..{high}"
        )


def as_labels(name: str, labels: Any, batch: int, num_classes: int, device: torch.device) -> Tensor:
    """Class labels as a (batch,) int64 tensor on `device`, each in 0..num_classes."""
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name}: expected integer class labels, got {type(labels).__name__}") from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        hint = " (text embeddings are for a text-to-image model)" if y.ndim == 3 else ""
        raise TypeError(f"{name}: expected integer class labels, got dtype {y.dtype}{hint}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {tuple(y.shape)}")
    check_label_range(name, y, num_classes)
    return y.to(device=device, dtype=torch.long)


def as_text(name: str, value: Any, like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Text-encoder hidden states of exactly `shape`, on the device and in the dtype of `like`."""
    if not isinstance(value, Tensor) or not value.is_floating_point():
        what = f"a tensor of dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        hint = " (class labels are for a class-to-image model)" if name == "labels" else ""
        raise TypeError(f"{name}: expected a floating-point torch.Tensor of text-encoder hidden "
                        f"states {shape}, got {what}{hint}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (batch, text_length, text_dim), "
                         f"got {tuple(value.shape)}")
    return value.to(like.device, like.dtype)


def as_condition(config: Any, labels: Any, null: Any, noise: Tensor,
                 guidance: float) -> tuple[Tensor, Tensor]:
    """(condition, null condition) batched like the noise (spec/04 §5): labels and null labels for
    the class models (default the null class), text embeddings and the null text embedding
    ((T, E) for every sample or (B, T, E); needed for guidance) for the text model."""
    batch = noise.shape[0]
    if not getattr(config, "is_text", False):
        y = as_labels("labels", labels, batch, config.num_classes, noise.device)
        if null is None:
            return y, torch.full_like(y, config.num_classes)
        return y, as_labels("null", null, batch, config.num_classes, noise.device)
    text_shape = (config.text_length, config.text_dim)
    text = as_text("labels", labels, noise, (batch, *text_shape))
    if null is None:
        if guidance != 1.0:
            raise ValueError(f"null: guidance {guidance} needs the null text embedding "
                             f"{text_shape} or {(batch, *text_shape)}")
        return text, text  # never evaluated: the scale in force is always 1
    if isinstance(null, Tensor) and tuple(null.shape) == text_shape:
        null = null.expand(batch, *text_shape)
    return text, as_text("null", null, noise, (batch, *text_shape))


# ------------------------------------------------------------------------------ tensors
def check_pair(pred: object, target: object, *, images: bool) -> tuple[Tensor, Tensor]:
    """Two floating-point tensors of one shape; (B, 3, H, W) images if `images`."""
    for name, value in (("pred", pred), ("target", target)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        if images and (value.ndim != 4 or value.shape[1] != 3):
            raise ValueError(f"{name}: expected a (B, 3, H, W) tensor, got shape {tuple(value.shape)}")
    assert isinstance(pred, Tensor) and isinstance(target, Tensor)
    if pred.shape != target.shape:
        raise ValueError(
            f"target: expected the shape of pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    return pred, target


def check_batch(x: Any, y: Any) -> None:
    """A training batch: floating-point images (B, C, H, W) and integer labels (B,)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise TypeError(f"x: expected a floating-point (B, C, H, W) tensor, got {describe(x)}")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"y: expected an integer tensor of labels, got {describe(y)}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y: expected shape ({x.shape[0]},), got {tuple(y.shape)}")


def check_text_batch(x: Any, y: Any, length: int, width: int) -> None:
    """A text-to-image training batch: floating-point images (B, C, H, W) and text embeddings
    (B, T, E) with T = `length`, E = `width`."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise TypeError(f"x: expected a floating-point (B, C, H, W) tensor, got {describe(x)}")
    shape = (x.shape[0], length, width)
    if not isinstance(y, Tensor) or not y.is_floating_point():
        hint = " (class labels are for a class-to-image model)" if isinstance(y, Tensor) else ""
        raise TypeError(f"y: expected text embeddings, a floating-point tensor {shape}, got "
                        f"{describe(y)}{hint}")
    if tuple(y.shape) != shape:
        raise ValueError(f"y: expected text embeddings of shape {shape}, got {tuple(y.shape)}")
