"""Text-to-image DeCo as an `nn.Module` (spec/06-text-to-image.md): the release's t2i model.

`TextDeCo(config)(x, t, text)` returns the velocity (B, C, H, W) for noisy images x (B, C, H, W)
(H, W multiples of the patch size, any grid), times t (B,) in [0, 1] and text (B, T, E): the text
encoder's last hidden states, right-padded to T = config.text_length tokens, with no mask.

It is `DeCo` with a different condition: no label, c = silu(t_emb) alone, and text tokens
(linear + RMSNorm + a learned position table, refined by `text_depth` AdaLN self-attention
blocks without RoPE) that every DiT block also attends to as extra keys/values. The trunk loop,
blocks, attention, decoder and checks are the class model's, parametrised (`layers.DiTBlock`
joint/fused_mlp, `layers.text_rope_angles`, `PixelDecoder(positions="rope")`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemm import Linear
from .layers import DiTBlock, RMSNorm, text_position_features, text_rope_angles
from .model import DeCo, check_image_and_time


class TextEmbedder(Linear):
    """Text-encoder states (B, T, E) -> RMSNorm(Linear(E -> D)) (B, T, D); weights named
    text_embed.{weight, bias, norm.weight} like the portable layout."""

    def __init__(self, text_dim: int, hidden_size: int) -> None:
        super().__init__(text_dim, hidden_size)
        self.norm = RMSNorm(hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.norm(super().forward(x))  # (B, T, D)
        return out


class TextDeCo(DeCo):
    """Text-to-image DeCo (the release's `dit_t2i_DeCo.PixNerDiT`).

    Initialisation: the class model's (xavier linears, zero biases, normal(0.02) time MLP, zeroed
    decoder outputs); the text position table is standard normal, as the release draws it."""

    architecture = "t2i"

    def build_condition(self) -> None:
        cfg = self.config
        h = cfg.hidden_size
        self.text_embed = TextEmbedder(cfg.text_dim, h)
        self.text_pos_embed = nn.Parameter(torch.zeros(cfg.text_length, h))
        self.text_blocks = nn.ModuleList([
            DiTBlock(h, cfg.num_heads, cfg.mlp_hidden, joint=False, fused_mlp=True)
            for _ in range(cfg.text_depth)
        ])

    def init_condition(self) -> None:
        nn.init.normal_(self.text_pos_embed)

    def condition(self, t_emb: Tensor, text: Tensor) -> tuple[Tensor, Tensor | None]:
        """(c = silu(t_emb) (B, D), refined text tokens (B, T, D))."""
        c = F.silu(t_emb)  # (B, D): the text does not enter the AdaLN condition
        tokens = self.text_embed(text) + self.text_pos_embed  # (B, T, D)
        for block in self.text_blocks:
            tokens = self.run_block(block, tokens, c, None, None)  # self-attention, no RoPE
        return c, tokens

    def rope(self, grid_h: int, grid_w: int, like: Tensor) -> tuple[Tensor, Tensor]:
        return text_rope_angles(grid_h, grid_w, self.config.head_dim, like.device, like.dtype)

    def check_inputs(self, x: Any, t: Any, text: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Validate (x, t, text) and return them in the model's dtype; a 0-d t is broadcast over
        the batch. Errors name the argument and the expected (B, T, E)."""
        cfg = self.config
        x, t = check_image_and_time(cfg, x, t)
        b = x.shape[0]
        expected = f"({b}, {cfg.text_length}, {cfg.text_dim})"
        if not isinstance(text, Tensor) or not text.is_floating_point():
            got = (f"an integer tensor of shape {tuple(text.shape)}: class labels are for the "
                   f"class-to-image model" if isinstance(text, Tensor) else type(text).__name__)
            raise TypeError(f"text: expected a floating-point tensor of text-encoder hidden states "
                            f"{expected} (batch, text_length, text_dim), got {got}")
        if tuple(text.shape) != (b, cfg.text_length, cfg.text_dim):
            raise ValueError(f"text: expected shape {expected} (batch, text_length, text_dim), "
                             f"got {tuple(text.shape)}")
        dtype = self.patch_embed.weight.dtype
        return x.to(dtype), t.to(dtype), text.to(dtype)

    def forward(self, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        """Velocity (B, C, H, W) for x (B, C, H, W), t (B,), text (B, T, E)."""
        out: Tensor = super().forward(x, t, text)
        return out


#: The optimized object that implements each function of reference/text_to_image.py (spec/06) that
#: has no twin of the same name here (see model.py's map).
REFERENCE_TWINS: dict[str, object] = {
    "text_embedding": TextEmbedder,
    "text_refine_block": DiTBlock,  # a DiT block on the text tokens alone
    "joint_dit_block": DiTBlock,  # a DiT block given the text tokens as context
    "t2i_trunk": TextDeCo.trunk,
    "t2i_semantic": TextDeCo.semantic,
    "t2i_forward": TextDeCo.forward,
}

__all__ = [
    "REFERENCE_TWINS", "TextDeCo", "TextEmbedder", "text_position_features", "text_rope_angles",
]
