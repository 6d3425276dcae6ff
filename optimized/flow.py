"""Flow matching (spec/01-flow-matching.md) in PyTorch: times, their shift, label dropout, the
interpolation, the target velocity and the plain loss (mirrors reference/flow.py).

Random draws are arguments, never drawn here: the Trainer draws them from its generator, and the
tests feed the same draws to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_label_range, check_pair
from .frequency import compute_dtype


def logit_normal_time(normal: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """t = sigmoid(mean + std n) for standard normal draws n (01 §2)."""
    return torch.sigmoid(mean + std * normal)


def uniform_time(uniform: Tensor) -> Tensor:
    """t = u for draws u ~ U[0, 1) (01 §2)."""
    return uniform


def time_shift(t: Tensor, shift: float = 1.0) -> Tensor:
    """t / (t + (1 - t) s): s > 1 moves times towards noise (t = 0); s = 1 is the identity (01 §3)."""
    if not shift > 0:
        raise ValueError(f"shift: expected > 0, got {shift!r}")
    return t / (t + (1.0 - t) * shift)


def drop_labels(labels: Tensor, uniform: Tensor, p: float, null_class: int) -> Tensor:
    """Replace label i by the null class where uniform[i] < p, for classifier-free guidance (01 §4)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    if labels.is_floating_point() or labels.ndim != 1:
        raise TypeError(f"labels: expected a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if uniform.shape != labels.shape:
        raise ValueError(f"uniform: expected shape {tuple(labels.shape)}, got {tuple(uniform.shape)}")
    # Checked here, not left to the embedding: on CUDA an out-of-range index is a device-side
    # assert (one host read for both bounds).
    check_label_range("labels", labels, null_class)
    return null_where(labels, uniform, p, null_class)


def null_where(labels: Tensor, uniform: Tensor, p: float, null_class: int) -> Tensor:
    """`drop_labels` without its checks, for a caller that validated the labels already (the
    Trainer checks each batch once, on the host, before it reaches the device: no sync here)."""
    return torch.where(uniform < p, torch.full_like(labels, null_class), labels)


def drop_text(text: Tensor, uniform: Tensor, p: float, null: Tensor) -> Tensor:
    """Replace sample i's text embedding (T, E) by the null embedding where uniform[i] < p:
    caption dropout, the text model's label dropout (01 §4)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    if not text.is_floating_point() or text.ndim != 3:
        raise TypeError(f"text: expected a (B, T, E) floating-point tensor, got {text.dtype} "
                        f"{tuple(text.shape)}")
    if tuple(null.shape) != tuple(text.shape[1:]):
        raise ValueError(f"null: expected shape {tuple(text.shape[1:])}, got {tuple(null.shape)}")
    if tuple(uniform.shape) != tuple(text.shape[:1]):
        raise ValueError(f"uniform: expected shape {tuple(text.shape[:1])}, got {tuple(uniform.shape)}")
    return torch.where((uniform < p)[:, None, None], null.to(text.dtype)[None], text)


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = t x + (1 - t) noise, t (B,) broadcast over the other axes (01 §1)."""
    if noise.shape != x.shape:  # a broadcastable noise would otherwise pass silently
        raise ValueError(f"noise: expected the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    t = t.view(-1, *([1] * (x.ndim - 1)))
    return t * x + (1.0 - t) * noise


def target_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """v = d x_t / d t = x - noise (01 §1)."""
    return x - noise


def flow_matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean((pred - target)^2) over every element, in float32 at least (01 §5)."""
    pred, target = check_pair(pred, target, images=False)
    dtype = compute_dtype(pred, target)
    return (pred.to(dtype) - target.to(dtype)).square().mean()
