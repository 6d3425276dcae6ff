"""Input validation shared by the reference functions (spec/00-conventions.md §4).

Every public function validates its inputs and raises `TypeError` (wrong kind of object) or
`ValueError` (right kind, invalid value) with a message that starts with the argument's name.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


def as_float_array(
    name: str, x: Any, *, ndim: int | None = None, channels: int | None = None
) -> Array:
    """`x` as a float64 array, checked for rank, channel count (axis 1) and finiteness."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name}: expected an array of real numbers, got {type(x).__name__}")
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name}: expected an array of real numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if channels is not None and arr.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels on axis 1, got shape {arr.shape}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def as_labels(name: str, y: Any, *, batch: int, num_classes: int) -> NDArray[np.int64]:
    """Integer class labels of shape (batch,), each in 0..num_classes (num_classes = null class)."""
    arr = np.asarray(y)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: expected integer class labels, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > num_classes):
        raise ValueError(
            f"{name}: labels must lie in 0..{num_classes} ({num_classes} is the null class), "
            f"got values in {arr.min()}..{arr.max()}"
        )
    return arr.astype(np.int64)


def as_text(name: str, text: Any, batch: int, length: int, width: int) -> Array:
    """Text-encoder hidden states as float64 (batch, length, width); integer labels are refused."""
    arr = np.asarray(text) if not isinstance(text, (str, bytes)) and text is not None else None
    if arr is not None and np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: the text-to-image model takes text embeddings ({batch}, {length}, "
                        f"{width}), got integers of shape {arr.shape} (class labels?)")
    out = as_float_array(name, text)
    if out.shape != (batch, length, width):
        raise ValueError(f"{name}: expected ({batch}, {length}, {width}), got {out.shape}")
    return out


def as_int(name: str, value: Any, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    v = int(value)
    if v < low or (high is not None and v > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected {bound}, got {v}")
    return v


def as_finite_float(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not np.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name}: expected a finite{' positive' if positive else ''} number, got {v}")
    return v
