"""The frequency-aware loss of spec/02-frequency-loss.md in PyTorch: YCbCr, 8x8 block DCT, JPEG
weights (mirrors reference/frequency.py).

The frequency-aware loss is mean(w[c, u, v] (D(pred) - D(target))^2) with D = 8x8 block DCT of
the YCbCr image. D is linear, so D(pred) - D(target) = D(pred - target): we transform the
difference once, where the release transforms both images. Per 8x8 block, the YCbCr matrix (3x3),
the DCT of the rows and of the columns (8x8 each) and the square root of the weights fold into one
192x192 matrix K, K[(c,u,v), (j,i,k)] = sqrt(w[c,u,v]) M[c,j] C[u,i] C[v,k], so the loss is a
single matmul: mean over blocks b (flattened as (channel, row, column)) of |K b|^2 / 192. On a
CPU this is as fast as the separable form and on a GPU one dense matmul beats three small ones.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deco import config

from .checks import check_gamma, check_pair, check_quality

BLOCK = config.FREQ_BLOCK

# The spec's constants (02 §1, §4), from deco.config, as float64 torch tensors.
YCBCR_MATRIX = torch.tensor(config.YCBCR_MATRIX, dtype=torch.float64)
JPEG_LUMINANCE = torch.tensor(config.JPEG_LUMINANCE, dtype=torch.float64)
JPEG_CHROMINANCE = torch.tensor(config.JPEG_CHROMINANCE, dtype=torch.float64)


def compute_dtype(pred: Tensor, target: Tensor) -> torch.dtype:
    """The promoted dtype, but at least float32: a loss sums millions of terms, too many for bf16."""
    dtype = torch.promote_types(pred.dtype, target.dtype)
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# ------------------------------------------------------------------------- weights and DCT
def dct_matrix(n: int = BLOCK) -> Tensor:
    """Orthonormal DCT-II matrix (float64): C[k, i] = a_k cos(pi (2i + 1) k / (2n)),
    a_0 = sqrt(1/n), a_k = sqrt(2/n). The 2-D DCT of a block X is C X C^T."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    a = torch.full((n, 1), math.sqrt(2.0 / n), dtype=torch.float64)
    a[0] = math.sqrt(1.0 / n)
    return a * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))


def quality_scale(quality: int) -> float:
    """IJG quality scaling in percent: 5000/q for q < 50, else 200 - 2q."""
    q = check_quality(quality)
    return 5000.0 / q if q < 50 else 200.0 - 2.0 * q


def quantisation_table(base: Tensor, quality: int) -> Tensor:
    """Q = clamp(floor((T * scale + 50) / 100), 1, 255) for a base table T."""
    return torch.clamp(torch.floor((base * quality_scale(quality) + 50.0) / 100.0), 1.0, 255.0)


def _weights64(quality: int, gamma: float) -> Tensor:
    """(3, 8, 8) float64: w = (mean(Q)/Q)^gamma / mean, Y from luminance, Cb and Cr chrominance.
    Built once per (quality, gamma, device, dtype) (the operator is cached), so the check inside
    `quality_scale` runs at the first step, not per step; the tests replace `quality_scale` here."""
    out = []
    for base in (JPEG_LUMINANCE, JPEG_CHROMINANCE, JPEG_CHROMINANCE):
        q = quantisation_table(base, quality)
        w = (q.mean() / q) ** gamma
        out.append(w / w.mean())
    return torch.stack(out)


@functools.lru_cache(maxsize=64)
def _cached_weights(quality: int, gamma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _weights64(quality, gamma).to(device=device, dtype=dtype)


def frequency_weights(
    quality: int = config.JPEG_QUALITY,
    gamma: float = config.FREQ_GAMMA,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(3, 8, 8) weights for (Y, Cb, Cr), built in float64 and cast; a fresh copy of a cached
    tensor (so the caller may modify it)."""
    quality, gamma = check_quality(quality), check_gamma(gamma)
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_weights(quality, gamma, device, dtype).clone()


@functools.lru_cache(maxsize=64)
def _block_operator(quality: int, gamma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """K^T (192 x 192), K as in the module docstring; built in float64, then cast once."""
    m, c = YCBCR_MATRIX, dct_matrix(BLOCK)
    root_w = _weights64(quality, gamma).sqrt()
    k = torch.einsum("cuv,cj,ui,vk->cuvjik", root_w, m, c, c).reshape(3 * BLOCK**2, 3 * BLOCK**2)
    return k.T.contiguous().to(device=device, dtype=dtype)


def _operator(quality: int, gamma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    # Dynamo cannot see into an lru_cache: under torch.compile we trace the construction (all
    # constants, so the compiler folds it) instead of reading the cache.
    if torch.compiler.is_compiling():
        return _block_operator.__wrapped__(quality, gamma, device, dtype)
    return _block_operator(quality, gamma, device, dtype)


def reflect_pad(x: Tensor) -> Tensor:
    """Pads bottom and right to multiples of 8 by reflection without repeating the edge."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % BLOCK, (-w) % BLOCK
    if ph >= h or pw >= w:
        raise ValueError(
            f"pred: reflect padding {h}x{w} to a multiple of 8 needs pad < size on each axis "
            f"(H, W >= 5 or a multiple of 8), got H={h}, W={w}"
        )
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), mode="reflect")


# ------------------------------------------------------------------------- the transforms
def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB -> YCbCr: out[:, i] = sum_j M[i, j] x[:, j] (02 §1). The loss itself
    folds this matrix into its block operator; this function is the spec's step on its own."""
    return torch.einsum("ij,bjhw->bihw", YCBCR_MATRIX.to(x.device, x.dtype), x)


def block_dct(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, Bh, Bw, 8, 8): reflect-pad to multiples of 8, then the 2-D DCT
    C X C^T of every 8x8 block (02 §2-3)."""
    padded = reflect_pad(x)
    b, c, h, w = padded.shape
    blocks = padded.reshape(b, c, h // BLOCK, BLOCK, w // BLOCK, BLOCK).permute(0, 1, 2, 4, 3, 5)
    m = dct_matrix(BLOCK).to(x.device, x.dtype)
    return torch.einsum("ui,bcyxij,vj->bcyxuv", m, blocks, m)


def ycbcr_to_rgb(x: Tensor) -> Tensor:
    """(B, 3, H, W) YCbCr -> RGB, the inverse of `rgb_to_ycbcr`: out[:, i] = sum_j M^-1[i, j] x[:, j]
    (02 §1). The loss never needs it; it is the spec's inverse step, for ports and inspection."""
    inverse = torch.linalg.inv(YCBCR_MATRIX)  # float64, then cast: the inverse is computed once exactly
    return torch.einsum("ij,bjhw->bihw", inverse.to(x.device, x.dtype), x)


def block_idct(coeffs: Tensor) -> Tensor:
    """(B, C, Bh, Bw, 8, 8) -> (B, C, 8 Bh, 8 Bw), the inverse of `block_dct` without its padding:
    C^T X C per block, blocks laid out row-major (02 §3)."""
    if not isinstance(coeffs, Tensor) or coeffs.ndim != 6 or tuple(coeffs.shape[4:]) != (BLOCK, BLOCK):
        got = tuple(coeffs.shape) if isinstance(coeffs, Tensor) else type(coeffs).__name__
        raise ValueError(f"coeffs: expected a (B, C, Bh, Bw, 8, 8) tensor, got {got}")
    m = dct_matrix(BLOCK).to(coeffs.device, coeffs.dtype)
    blocks = torch.einsum("ui,bcyxuv,vj->bcyxij", m, coeffs, m)
    b, c, bh, bw = coeffs.shape[:4]
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, bh * BLOCK, bw * BLOCK)


# ------------------------------------------------------------------------------------ losses
def frequency_aware_loss(pred: Tensor, target: Tensor, quality: int = config.JPEG_QUALITY,
                         gamma: float = config.FREQ_GAMMA) -> Tensor:
    """Scalar mean over (B, 3, Bh, Bw, 8, 8) of w[c, u, v] (D(pred) - D(target))^2.

    Computed in float32 for bf16/fp16 inputs and with autocast off (an autocast matmul would
    round the DCT to bf16); the result has the compute dtype.
    """
    pred, target = check_pair(pred, target, images=True)
    return checked_frequency_loss(pred, target, check_quality(quality), check_gamma(gamma))


def checked_frequency_loss(pred: Tensor, target: Tensor, quality: int, gamma: float) -> Tensor:
    """`frequency_aware_loss` on arguments already validated where they entered (the training
    step's batch by `check_batch`, quality and gamma by `TrainConfig`): no checks, so the hot
    path of a training step validates nothing per micro-batch."""
    dtype = compute_dtype(pred, target)
    with torch.autocast(pred.device.type, enabled=False):
        d = reflect_pad(pred.to(dtype) - target.to(dtype))
        b, _, h, w = d.shape
        # (B, 3, Bh, 8, Bw, 8) -> one row per block, laid out (channel, row, column).
        blocks = d.reshape(b, 3, h // BLOCK, BLOCK, w // BLOCK, BLOCK).permute(0, 2, 4, 1, 3, 5)
        blocks = blocks.reshape(-1, 3 * BLOCK * BLOCK)
        coeffs = blocks @ _operator(quality, gamma, d.device, dtype)
        return coeffs.square().mean()

