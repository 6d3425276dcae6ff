"""The training losses of spec/01-flow-matching.md §5 and spec/02-frequency-loss.md, in PyTorch.

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
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from deco.reference import frequency as reference_frequency

BLOCK = 8

# The YCbCr matrix and the JPEG tables are data of the spec (02 §1, §4): taken from the reference
# so there is one copy of them, as float64 torch tensors.
YCBCR_MATRIX = torch.from_numpy(reference_frequency.YCBCR_MATRIX.copy())
JPEG_LUMINANCE = torch.from_numpy(reference_frequency.JPEG_LUMINANCE.copy())
JPEG_CHROMINANCE = torch.from_numpy(reference_frequency.JPEG_CHROMINANCE.copy())


# ------------------------------------------------------------------------------- validation
def _check_quality(quality: object) -> int:
    if not isinstance(quality, numbers.Integral) or isinstance(quality, bool):
        raise TypeError(f"quality: expected an int, got {type(quality).__name__}")
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"quality: expected an int in [1, 100], got {q}")
    return q


def _check_gamma(gamma: object) -> float:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool):
        raise TypeError(f"gamma: expected a float, got {type(gamma).__name__}")
    if not math.isfinite(gamma):
        raise ValueError(f"gamma: expected a finite float, got {gamma}")
    return float(gamma)


def _check_pair(pred: object, target: object, *, images: bool) -> tuple[Tensor, Tensor]:
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


def _compute_dtype(pred: Tensor, target: Tensor) -> torch.dtype:
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
    q = _check_quality(quality)
    return 5000.0 / q if q < 50 else 200.0 - 2.0 * q


def quantisation_table(base: Tensor, quality: int) -> Tensor:
    """Q = clamp(floor((T * scale + 50) / 100), 1, 255) for a base table T."""
    return torch.clamp(torch.floor((base * quality_scale(quality) + 50.0) / 100.0), 1.0, 255.0)


def _weights64(quality: int, gamma: float) -> Tensor:
    """(3, 8, 8) float64: w = (mean(Q)/Q)^gamma / mean, Y from luminance, Cb and Cr chrominance."""
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
    quality: int = 85,
    gamma: float = 1.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(3, 8, 8) weights for (Y, Cb, Cr), built in float64 and cast; a fresh copy of a cached
    tensor (so the caller may modify it)."""
    quality, gamma = _check_quality(quality), _check_gamma(gamma)
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


def _reflect_pad(x: Tensor) -> Tensor:
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


# ------------------------------------------------------------------------------------ losses
def frequency_aware_loss(pred: Tensor, target: Tensor, quality: int = 85, gamma: float = 1.0) -> Tensor:
    """Scalar mean over (B, 3, Bh, Bw, 8, 8) of w[c, u, v] (D(pred) - D(target))^2.

    Computed in float32 for bf16/fp16 inputs and with autocast off (an autocast matmul would
    round the DCT to bf16); the result has the compute dtype.
    """
    pred, target = _check_pair(pred, target, images=True)
    quality, gamma = _check_quality(quality), _check_gamma(gamma)
    dtype = _compute_dtype(pred, target)
    with torch.autocast(pred.device.type, enabled=False):
        d = _reflect_pad(pred.to(dtype) - target.to(dtype))
        b, _, h, w = d.shape
        # (B, 3, Bh, 8, Bw, 8) -> one row per block, laid out (channel, row, column).
        blocks = d.reshape(b, 3, h // BLOCK, BLOCK, w // BLOCK, BLOCK).permute(0, 2, 4, 1, 3, 5)
        blocks = blocks.reshape(-1, 3 * BLOCK * BLOCK)
        coeffs = blocks @ _operator(quality, gamma, d.device, dtype)
        return coeffs.square().mean()


def flow_matching_loss(pred: Tensor, target: Tensor) -> Tensor:
    """mean((pred - target)^2) over every element, in float32 at least."""
    pred, target = _check_pair(pred, target, images=False)
    dtype = _compute_dtype(pred, target)
    return (pred.to(dtype) - target.to(dtype)).square().mean()
