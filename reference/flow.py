"""Flow matching, spec/01-flow-matching.md. t = 1 is data, t = 0 is pure noise.

Random draws are arguments (normal or uniform samples), so every function is deterministic and a
port can be compared on the same draws.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .checks import Array, as_finite_float, as_float_array, as_int, as_labels


def _time(name: str, t: ArrayLike, batch: int) -> Array:
    t = as_float_array(name, t, ndim=1)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},), got {t.shape}")
    if np.any((t < 0) | (t > 1)):
        raise ValueError(f"{name}: times must lie in [0, 1]")
    return t


def interpolate(x: ArrayLike, noise: ArrayLike, t: ArrayLike) -> Array:
    """x_t = t x + (1 - t) noise, t broadcast over all but the batch axis (§1)."""
    x = as_float_array("x", x)
    noise = as_float_array("noise", noise)
    if noise.shape != x.shape:
        raise ValueError(f"noise: expected the shape of x {x.shape}, got {noise.shape}")
    t = _time("t", t, x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1))
    return t * x + (1.0 - t) * noise


def target_velocity(x: ArrayLike, noise: ArrayLike) -> Array:
    """v = d x_t / d t = x - noise (§1)."""
    x = as_float_array("x", x)
    noise = as_float_array("noise", noise)
    if noise.shape != x.shape:
        raise ValueError(f"noise: expected the shape of x {x.shape}, got {noise.shape}")
    return x - noise


def time_shift(t: ArrayLike, shift: float = 1.0) -> Array:
    """t / (t + (1 - t) s): s > 1 moves times towards noise (t = 0); s = 1 is the identity (§3)."""
    shift = as_finite_float("shift", shift, positive=True)
    t = as_float_array("t", t)
    if np.any((t < 0) | (t > 1)):
        raise ValueError("t: times must lie in [0, 1]")
    return t / (t + (1.0 - t) * shift)


def logit_normal_time(normal: ArrayLike, mean: float = 0.0, std: float = 1.0) -> Array:
    """t = sigmoid(mean + std n) for standard normal draws n (§2)."""
    n = as_float_array("normal", normal)
    mean = as_finite_float("mean", mean)
    std = as_finite_float("std", std, positive=True)
    return 1.0 / (1.0 + np.exp(-(mean + std * n)))


def uniform_time(uniform: ArrayLike) -> Array:
    """t = u for draws u ~ U[0, 1) (§2)."""
    u = as_float_array("uniform", uniform)
    if np.any((u < 0) | (u > 1)):
        raise ValueError("uniform: draws must lie in [0, 1]")
    return u


def drop_labels(labels: ArrayLike, uniform: ArrayLike, p: float, null_class: int) -> NDArray[np.int64]:
    """Replace label i by the null class where uniform[i] < p (classifier-free guidance, §4)."""
    p = as_finite_float("p", p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    null_class = as_int("null_class", null_class, low=1)
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"labels: expected an integer array, got dtype {y.dtype}")
    if y.ndim != 1:
        raise ValueError(f"labels: expected a 1-D array, got shape {y.shape}")
    y = as_labels("labels", y, batch=y.shape[0], num_classes=null_class)  # values in 0..null_class
    u = as_float_array("uniform", uniform, ndim=1)
    if u.shape != y.shape:
        raise ValueError(f"uniform: expected shape {y.shape}, got {u.shape}")
    if np.any((u < 0) | (u > 1)):
        raise ValueError("uniform: draws must lie in [0, 1]")
    return np.where(u < p, null_class, y).astype(np.int64)


def drop_text(text: ArrayLike, uniform: ArrayLike, p: float, null: ArrayLike) -> Array:
    """Replace sample i's text embedding (T, E) by the null embedding where uniform[i] < p:
    caption dropout, the text model's label dropout (§4)."""
    p = as_finite_float("p", p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p}")
    y = as_float_array("text", text, ndim=3)
    n = as_float_array("null", null, ndim=2)
    if n.shape != y.shape[1:]:
        raise ValueError(f"null: expected shape {y.shape[1:]}, got {n.shape}")
    u = as_float_array("uniform", uniform, ndim=1)
    if u.shape != y.shape[:1]:
        raise ValueError(f"uniform: expected shape {y.shape[:1]}, got {u.shape}")
    return np.where((u < p)[:, None, None], n[None], y)


def flow_matching_loss(pred: ArrayLike, target: ArrayLike) -> float:
    """mean((pred - target)^2) over every element (§5)."""
    pred = as_float_array("pred", pred)
    target = as_float_array("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"target: expected the shape of pred {pred.shape}, got {target.shape}")
    return float(np.mean((pred - target) ** 2))
