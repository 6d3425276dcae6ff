"""The DeCo and baseline DiT forward passes, spec/03-model.md, in float64 NumPy.

Weights are a dict `name -> array` in the portable layout of `deco.config.parameter_shapes`.
Linear layers compute x @ W.T + b. Shapes: B batch, H x W image, p patch, L = (H/p)(W/p) tokens,
D hidden, P = p*p pixels per patch, w decoder width.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

from deco.config import (
    DCT_FREQS,
    NORM_EPS,
    ROPE_SPAN,
    ROPE_THETA,
    TIME_FREQ_DIM,
    TIME_MAX_PERIOD,
    DeCoConfig,
)

from .checks import Array

Weights = Mapping[str, Array]


def linear(x: Array, weights: Weights, name: str) -> Array:
    """x @ W.T + b; the bias is optional (spec §1: qkv and SwiGLU have none)."""
    out = x @ weights[name + ".weight"].T
    bias = weights.get(name + ".bias")
    return out if bias is None else out + bias


def silu(x: Array) -> Array:
    sig: Array = expit(x)
    return x * sig


def rms_norm(x: Array, weight: Array | None) -> Array:
    """x / sqrt(mean(x^2, last axis) + 1e-6), times a per-channel weight."""
    out: Array = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + NORM_EPS)
    return out if weight is None else out * weight


def layer_norm(x: Array, weight: Array | None = None, bias: Array | None = None) -> Array:
    """(x - mean) / sqrt(var + 1e-6) over the last axis (biased variance), optional affine."""
    mu = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mu) ** 2, axis=-1, keepdims=True)
    out: Array = (x - mu) / np.sqrt(var + NORM_EPS)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """AdaLN modulation x (1 + scale) + shift."""
    return x * (1.0 + scale) + shift


# ---------------------------------------------------------------------------------- embeddings
def timestep_features(t: Array) -> Array:
    """(B,) -> (B, 256): [cos(t f_k), sin(t f_k)], f_k = 10^(-k/128), k = 0..127 (cos first)."""
    half = TIME_FREQ_DIM // 2
    freqs = np.exp(-np.log(TIME_MAX_PERIOD) * np.arange(half) / half)
    args = t[:, None] * freqs[None, :]
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def timestep_embedding(t: Array, weights: Weights) -> Array:
    """(B,) -> (B, D): fc2(silu(fc1(features(t))))."""
    h = silu(linear(timestep_features(t), weights, "t_embed.fc1"))
    return linear(h, weights, "t_embed.fc2")


def label_embedding(y: NDArray[np.int64], weights: Weights) -> Array:
    """(B,) int -> (B, D): a table row per class; row num_classes is the null class."""
    rows: Array = weights["y_embed.weight"][y]
    return rows


# --------------------------------------------------------------------------------- patches
def patchify(x: Array, p: int) -> Array:
    """(B, C, H, W) -> (B, L, C*p*p). Tokens row-major over the (H/p, W/p) grid; within a token
    the feature index is c*p*p + i*p + j for channel c and pixel (i, j) of the patch."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Array, c: int, h: int, w: int, p: int) -> Array:
    """Inverse of `patchify`: (B, L, C*p*p) -> (B, C, H, W)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, c, p, p)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# ----------------------------------------------------------------------------------- RoPE
def rope_angles(
    grid_h: int, grid_w: int, head_dim: int, span_x: float = ROPE_SPAN, span_y: float = ROPE_SPAN
) -> Array:
    """(L, head_dim/2) rotation angles. Pair k of a head rotates by pos_x * f_{k//2} for even k
    and pos_y * f_{k//2} for odd k, f_j = 10000^(-4j/head_dim); pos_x = linspace(0, span_x,
    grid_w), pos_y = linspace(0, span_y, grid_h). The class models use span 16 on both axes
    whatever the grid size; the text model other spans (spec/06 §3)."""
    freqs = ROPE_THETA ** (-np.arange(0, head_dim, 4)[: head_dim // 4] / head_dim)
    py, px = np.meshgrid(
        np.linspace(0, span_y, grid_h), np.linspace(0, span_x, grid_w), indexing="ij"
    )
    ax = px.reshape(-1, 1) * freqs[None, :]  # (L, head_dim/4)
    ay = py.reshape(-1, 1) * freqs[None, :]
    return np.stack([ax, ay], axis=-1).reshape(grid_h * grid_w, head_dim // 2)


def apply_rope(x: Array, angles: Array) -> Array:
    """Rotate adjacent pairs (x[2k], x[2k+1]) of (B, L, heads, head_dim) by angles (L, hd/2)."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


# ------------------------------------------------------------------------------- DiT block
def attention(
    x: Array, weights: Weights, prefix: str, heads: int, angles: Array | None,
    text: Array | None = None,
) -> Array:
    """Multi-head self-attention with RMS qk-norm and 2-D RoPE: (B, L, D) -> (B, L, D).

    `angles=None` skips RoPE (the text refine blocks). With `text` (B, T, D) the keys and values
    are [image tokens; text tokens]: the text goes through its own `kv_text` projection and the
    shared k_norm, without RoPE; queries come from x only (the text-to-image DiT, spec/06 §4)."""
    b, n, d = x.shape
    hd = d // heads
    qkv = linear(x, weights, prefix + "qkv").reshape(b, n, 3, heads, hd)
    q = rms_norm(qkv[:, :, 0], weights[prefix + "q_norm.weight"])  # (B, L, heads, hd)
    k = rms_norm(qkv[:, :, 1], weights[prefix + "k_norm.weight"])
    v = qkv[:, :, 2]
    if angles is not None:
        q, k = apply_rope(q, angles), apply_rope(k, angles)
    if text is not None:
        kv = linear(text, weights, prefix + "kv_text").reshape(b, text.shape[1], 2, heads, hd)
        k = np.concatenate([k, rms_norm(kv[:, :, 0], weights[prefix + "k_norm.weight"])], axis=1)
        v = np.concatenate([v, kv[:, :, 1]], axis=1)  # (B, L + T, heads, hd)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    logits -= logits.max(axis=-1, keepdims=True)
    attn = np.exp(logits)
    attn /= attn.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
    return linear(out, weights, prefix + "proj")


def swiglu(x: Array, weights: Weights, prefix: str) -> Array:
    """w2(silu(w1 x) * w3 x), no biases. The text model stores the two input projections
    stacked as one `w12` = [w1; w3] and calls the output projection `w3` (spec/06 §4)."""
    if prefix + "w12.weight" in weights:
        gate, up = np.split(linear(x, weights, prefix + "w12"), 2, axis=-1)
        return linear(silu(gate) * up, weights, prefix + "w3")
    return linear(silu(linear(x, weights, prefix + "w1")) * linear(x, weights, prefix + "w3"),
                  weights, prefix + "w2")


def dit_block(
    x: Array, c: Array, weights: Weights, index: int, heads: int, angles: Array | None,
    *, group: str = "blocks", text: Array | None = None,
) -> Array:
    """AdaLN-Zero block `{group}.{index}`: (B, L, D), condition c (B, D) -> (B, L, D).

    (shift1, scale1, gate1, shift2, scale2, gate2) = chunk6(adaln(c)); no SiLU here because c
    is already silu(t_emb + y_emb). `angles` and `text` go to `attention`."""
    p = f"{group}.{index}."
    mod = linear(c, weights, p + "adaln")[:, None, :]  # (B, 1, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, axis=-1)
    h = modulate(rms_norm(x, weights[p + "norm1.weight"]), shift1, scale1)
    x = x + gate1 * attention(h, weights, p + "attn.", heads, angles, text)
    h = modulate(rms_norm(x, weights[p + "norm2.weight"]), shift2, scale2)
    return x + gate2 * swiglu(h, weights, p + "mlp.")


# ----------------------------------------------------------------------------- pixel decoder
def dct_position_features(p: int) -> Array:
    """(P, 64) features of pixel (i, j) in a p x p patch: feature a*8 + b is
    cos(pi x_j f_a) cos(pi y_i f_b) / (1 + f_a f_b), x_j = linspace(0,1,p)[j], y_i likewise,
    f = linspace(0, 8, 8). Pixels row-major (index i*p + j)."""
    f = np.linspace(0, DCT_FREQS, DCT_FREQS)
    pos = np.linspace(0, 1, p)
    yy, xx = np.meshgrid(pos, pos, indexing="ij")
    cx = np.cos(np.pi * xx.reshape(-1, 1, 1) * f[None, :, None])  # (P, 8, 1)
    cy = np.cos(np.pi * yy.reshape(-1, 1, 1) * f[None, None, :])  # (P, 1, 8)
    scale = 1.0 / (1.0 + f[:, None] * f[None, :])
    return (cx * cy * scale[None]).reshape(p * p, DCT_FREQS * DCT_FREQS)


def decoder_block(x: Array, cond: Array, weights: Weights, index: int) -> Array:
    """Attention-free AdaLN block per pixel: (N, P, w), per-pixel condition (N, P, w).

    (shift, scale, gate) = chunk3(adaln(silu(cond))); x + gate * fc2(silu(fc1(
    modulate(LayerNorm(x), shift, scale))))."""
    p = f"decoder.blocks.{index}."
    shift, scale, gate = np.split(linear(silu(cond), weights, p + "adaln"), 3, axis=-1)
    h = layer_norm(x, weights[p + "norm.weight"], weights[p + "norm.bias"])
    h = linear(silu(linear(modulate(h, shift, scale), weights, p + "fc1")), weights, p + "fc2")
    return x + gate * h


def pixel_decoder(
    x: Array, s: Array, config: DeCoConfig, weights: Weights, features: Array | None = None
) -> Array:
    """x: (B, C, H, W) noisy image; s: (B, L, D) DiT output -> velocity (B, C, H, W).

    `features` (P, 64): the per-pixel position features; default `dct_position_features(p)`
    (the text model passes its own, spec/06 §5)."""
    b, c, h, w = x.shape
    p, wd = config.patch_size, config.decoder_width
    pixels = patchify(x, p).reshape(b * s.shape[1], c, p * p).transpose(0, 2, 1)  # (N, P, C)
    features = dct_position_features(p) if features is None else features
    pos = np.broadcast_to(features, (*pixels.shape[:2], DCT_FREQS**2))
    z = linear(np.concatenate([pixels, pos], axis=-1), weights, "decoder.pixel_embed")  # (N,P,w)
    cond = linear(s.reshape(-1, s.shape[-1]), weights, "decoder.cond_proj")  # (N, P*w)
    cond = cond.reshape(-1, p * p, wd)  # (N, P, w)
    z = linear(z, weights, "decoder.input_proj")
    for j in range(config.decoder_depth):
        z = decoder_block(z, cond, weights, j)
    out = linear(layer_norm(z), weights, "decoder.final")  # (N, P, C)
    tokens = out.transpose(0, 2, 1).reshape(b, s.shape[1], c * p * p)  # explicit L: b may be 0
    return unpatchify(tokens, c, h, w, p)


# ------------------------------------------------------------------------------ full models
Labels = NDArray[np.int64]


def dit_trunk(
    x: Array, t: Array, y: Labels, config: DeCoConfig, weights: Weights
) -> tuple[Array, Array, Array]:
    """Shared DiT trunk. Returns (tokens after the blocks (B, L, D), t_emb (B, D), c (B, D))."""
    p = config.patch_size
    gh, gw = x.shape[2] // p, x.shape[3] // p
    t_emb = timestep_embedding(t, weights)
    c = silu(t_emb + label_embedding(y, weights))
    tokens = linear(patchify(x, p), weights, "patch_embed")  # (B, L, D)
    angles = rope_angles(gh, gw, config.head_dim)
    for i in range(config.depth):
        tokens = dit_block(tokens, c, weights, i, config.num_heads, angles)
    return tokens, t_emb, c


def deco_semantic(x: Array, t: Array, y: Labels, config: DeCoConfig, weights: Weights) -> Array:
    """s = silu(t_emb + DiT tokens): (B, L, D), the condition passed to the pixel decoder."""
    tokens, t_emb, _ = dit_trunk(x, t, y, config, weights)
    return silu(t_emb[:, None, :] + tokens)


def deco_forward(x: Array, t: Array, y: Labels, config: DeCoConfig, weights: Weights) -> Array:
    """DeCo velocity (B, C, H, W) = pixel_decoder(x, silu(t_emb + DiT(x, t, y)))."""
    return pixel_decoder(x, deco_semantic(x, t, y, config, weights), config, weights)


def baseline_forward(x: Array, t: Array, y: Labels, config: DeCoConfig, weights: Weights) -> Array:
    """Baseline DiT: blocks, then LayerNorm, AdaLN (shift, scale) from c, linear to C*p*p."""
    tokens, _, c = dit_trunk(x, t, y, config, weights)
    shift, scale = np.split(linear(c, weights, "head.adaln")[:, None, :], 2, axis=-1)
    out = linear(modulate(layer_norm(tokens), shift, scale), weights, "head.linear")
    return unpatchify(out, config.in_channels, x.shape[2], x.shape[3], config.patch_size)
