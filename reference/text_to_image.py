"""The text-to-image DeCo forward pass, spec/06-text-to-image.md, in float64 NumPy.

Everything the class-to-image model shares (linear layers, RMSNorm, AdaLN modulation, the time
embedding, patches, RoPE, the AdaLN block, the pixel decoder) comes from `model.py`; this module
holds only what differs: the text embedding and refine blocks, the joint-attention DiT blocks, the
RoPE positions and the decoder's position features. Shapes: B batch, T text tokens, E text width,
L = (H/p)(W/p) image tokens, D hidden, P = p*p pixels per patch.
"""

from __future__ import annotations

import numpy as np

from deco.config import DCT_FREQS, DeCoConfig

from .checks import Array
from .model import (
    Weights,
    dit_block,
    linear,
    patchify,
    pixel_decoder,
    rms_norm,
    rope_angles,
    silu,
    timestep_embedding,
)


def text_rope_angles(grid_h: int, grid_w: int, head_dim: int) -> Array:
    """(L, head_dim/2) RoPE angles of the text model's image tokens (§3).

    As in the release, the x positions (along a row, grid_w of them) span the grid's HEIGHT,
    linspace(0, grid_h, grid_w), and the y positions span its WIDTH, linspace(0, grid_w, grid_h);
    on a square grid both are linspace(0, n, n)."""
    return rope_angles(grid_h, grid_w, head_dim, span_x=float(grid_h), span_y=float(grid_w))


def text_position_features(p: int) -> Array:
    """(P, 64) position features of the pixels of a p x p patch for the text model's decoder (§6).

    The cosines of the RoPE angles `text_rope_angles(p, p, 128)`: feature 2k is
    cos(x_j f_k), feature 2k+1 is cos(y_i f_k), f_k = 10000^(-k/32), x_j = y_j = linspace(0, p, p)[j],
    pixel (i, j) at row i*p + j (the real part of the release's complex table)."""
    return np.cos(text_rope_angles(p, p, 2 * DCT_FREQS**2))


def text_embedding(text: Array, weights: Weights) -> Array:
    """(B, T, E) -> (B, T, D): RMSNorm(Linear(text)) + the learned position table (§2)."""
    h = rms_norm(linear(text, weights, "text_embed"), weights["text_embed.norm.weight"])
    return h + weights["text_pos_embed"][None, :, :]


def text_refine_block(tokens: Array, c: Array, weights: Weights, index: int, heads: int) -> Array:
    """Text refine block `text_blocks.{index}`: an AdaLN block over the text tokens alone,
    without RoPE or mask (§2). (B, T, D), c (B, D) -> (B, T, D)."""
    return dit_block(tokens, c, weights, index, heads, None, group="text_blocks")


def joint_dit_block(
    x: Array, text: Array, c: Array, weights: Weights, index: int, heads: int, angles: Array
) -> Array:
    """DiT block `blocks.{index}` whose attention keys and values also include the refined text
    tokens (§4). x (B, L, D), text (B, T, D), c (B, D) -> (B, L, D); the text is not updated."""
    return dit_block(x, c, weights, index, heads, angles, text=text)


def t2i_trunk(
    x: Array, t: Array, text: Array, config: DeCoConfig, weights: Weights
) -> tuple[Array, Array]:
    """Text refine blocks then the joint DiT. Returns (image tokens (B, L, D), t_emb (B, D))."""
    p = config.patch_size
    t_emb = timestep_embedding(t, weights)
    c = silu(t_emb)  # no label: the text enters through attention only
    y = text_embedding(text, weights)  # (B, T, D)
    for i in range(config.text_depth):
        y = text_refine_block(y, c, weights, i, config.num_heads)
    tokens = linear(patchify(x, p), weights, "patch_embed")  # (B, L, D)
    angles = text_rope_angles(x.shape[2] // p, x.shape[3] // p, config.head_dim)
    for i in range(config.depth):
        tokens = joint_dit_block(tokens, y, c, weights, i, config.num_heads, angles)
    return tokens, t_emb


def t2i_semantic(x: Array, t: Array, text: Array, config: DeCoConfig, weights: Weights) -> Array:
    """s = silu(t_emb + DiT tokens): (B, L, D), the condition of the pixel decoder (§6)."""
    tokens, t_emb = t2i_trunk(x, t, text, config, weights)
    return silu(t_emb[:, None, :] + tokens)


def t2i_forward(x: Array, t: Array, text: Array, config: DeCoConfig, weights: Weights) -> Array:
    """Velocity (B, C, H, W) of the text-to-image DeCo for images x, times t (B,), text (B, T, E)."""
    s = t2i_semantic(x, t, text, config, weights)
    return pixel_decoder(x, s, config, weights, text_position_features(config.patch_size))
