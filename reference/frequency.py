"""Frequency-aware loss, spec/02-frequency-loss.md: YCbCr, 8x8 block DCT, JPEG weights, loss."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from deco import config

from .checks import Array, as_finite_float, as_float_array, as_int

BLOCK = config.FREQ_BLOCK

# The spec's constants (02 §1, §4) live in deco.config; here as float64 arrays.
YCBCR_MATRIX: Array = np.array(config.YCBCR_MATRIX, dtype=np.float64)
JPEG_LUMINANCE: Array = np.array(config.JPEG_LUMINANCE, dtype=np.float64)
JPEG_CHROMINANCE: Array = np.array(config.JPEG_CHROMINANCE, dtype=np.float64)


def rgb_to_ycbcr(x: ArrayLike) -> Array:
    """(B, 3, H, W) RGB -> (B, 3, H, W) YCbCr: out[:, i] = sum_j M[i, j] x[:, j]."""
    x = as_float_array("x", x, ndim=4, channels=3)
    out: Array = np.einsum("ij,bjhw->bihw", YCBCR_MATRIX, x)
    return out


def ycbcr_to_rgb(x: ArrayLike) -> Array:
    """Inverse of `rgb_to_ycbcr` (the matrix inverse of M)."""
    x = as_float_array("x", x, ndim=4, channels=3)
    out: Array = np.einsum("ij,bjhw->bihw", np.linalg.inv(YCBCR_MATRIX), x)
    return out


def dct_matrix(n: int = BLOCK) -> Array:
    """Orthonormal DCT-II matrix C (n x n): C[k, i] = a_k cos(pi (2i + 1) k / (2n)),
    a_0 = sqrt(1/n), a_k = sqrt(2/n). The 2-D DCT of a block X is C X C^T."""
    n = as_int("n", n, low=1)
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    a = np.full((n, 1), np.sqrt(2.0 / n))
    a[0] = np.sqrt(1.0 / n)
    return a * np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def reflect_pad(x: ArrayLike) -> Array:
    """Pads (B, C, H, W) at the bottom and right to multiples of 8 by mirror reflection that does
    not repeat the edge sample (x[H] = x[H-2]); needs pad < size on each axis (§3)."""
    x = as_float_array("x", x, ndim=4)
    h, w = x.shape[2:]
    ph, pw = (-h) % BLOCK, (-w) % BLOCK
    if ph >= h or pw >= w:
        raise ValueError(
            f"x: reflect padding {h}x{w} to a multiple of 8 needs pad < size on each axis "
            f"(H, W >= 5 or a multiple of 8), got H={h}, W={w}"
        )
    return np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")


def block_dct(x: ArrayLike) -> Array:
    """(B, C, H, W) -> (B, C, Bh, Bw, 8, 8): reflect-pad, cut into 8x8 blocks (row-major), and
    transform each block X to C X C^T. Coefficient [u, v]: u vertical, v horizontal frequency."""
    x = reflect_pad(x)
    b, c, h, w = x.shape
    blocks = x.reshape(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(0, 1, 2, 4, 3, 5)
    m = dct_matrix(BLOCK)
    coeffs: Array = np.einsum("ui,bcyxij,vj->bcyxuv", m, blocks, m)
    return coeffs


def block_idct(coeffs: ArrayLike) -> Array:
    """Inverse of `block_dct` without the padding: (B, C, Bh, Bw, 8, 8) -> (B, C, 8Bh, 8Bw)."""
    d = as_float_array("coeffs", coeffs, ndim=6)
    if d.shape[4:] != (BLOCK, BLOCK):
        raise ValueError(f"coeffs: expected 8x8 blocks in the last two axes, got {d.shape}")
    m = dct_matrix(BLOCK)
    blocks: Array = np.einsum("ui,bcyxuv,vj->bcyxij", m, d, m)
    b, c, bh, bw = d.shape[:4]
    return blocks.transpose(0, 1, 2, 4, 3, 5).reshape(b, c, bh * BLOCK, bw * BLOCK)


def quality_scale(quality: int) -> float:
    """IJG quality scaling: 5000/q for q < 50, else 200 - 2q (percent)."""
    q = as_int("quality", quality, low=1, high=100)
    return 5000.0 / q if q < 50 else 200.0 - 2.0 * q


def quantisation_table(base: ArrayLike, quality: int) -> Array:
    """Q = clamp(floor((T * scale + 50) / 100), 1, 255) for a base table T."""
    t = as_float_array("base", base)
    return np.clip(np.floor((t * quality_scale(quality) + 50.0) / 100.0), 1.0, 255.0)


def frequency_weights(quality: int = config.JPEG_QUALITY, gamma: float = config.FREQ_GAMMA) -> Array:
    """(3, 8, 8) weights for (Y, Cb, Cr): w = (mean(Q)/Q)^gamma, divided by its mean per channel.

    Y uses the luminance table, Cb and Cr the chrominance table (§5)."""
    gamma = as_finite_float("gamma", gamma)
    out = []
    for base in (JPEG_LUMINANCE, JPEG_CHROMINANCE, JPEG_CHROMINANCE):
        q = quantisation_table(base, quality)
        w = (q.mean() / q) ** gamma
        out.append(w / w.mean())
    return np.stack(out)


def frequency_aware_loss(
    pred: ArrayLike, target: ArrayLike, quality: int = config.JPEG_QUALITY, gamma: float = config.FREQ_GAMMA
) -> float:
    """mean over (B, 3, Bh, Bw, 8, 8) of w[c, u, v] (D(pred) - D(target))^2, with
    D = block_dct(rgb_to_ycbcr(.)) (§6)."""
    pred = as_float_array("pred", pred, ndim=4, channels=3)
    target = as_float_array("target", target, ndim=4, channels=3)
    if pred.shape != target.shape:
        raise ValueError(f"target: expected the shape of pred {pred.shape}, got {target.shape}")
    w = frequency_weights(quality, gamma)
    diff = block_dct(rgb_to_ycbcr(pred)) - block_dct(rgb_to_ycbcr(target))
    return float(np.mean(w[None, :, None, None] * diff**2))
