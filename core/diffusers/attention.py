"""DeCo's attention through diffusers' attention processors and attention backends.

`deco.optimized.layers.Attention` (fused QKV, RMS qk-norm, 2-D RoPE, and for the text model's
joint blocks extra keys and values from the text tokens) computes the attention itself with
SDPA. Inside `DeCoTransformer2DModel` every such module becomes a `DeCoAttention`: the same
module (same parameters, same `project`) that is also a diffusers `AttentionModuleMixin`, whose
forward hands the work to its `processor`. So `model.attn_processors`,
`model.set_attn_processor(...)`, `model.set_attention_backend("native")`, the context manager
`diffusers.attention_backend(...)` and the attention mixin tests act on DeCo as on diffusers'
own transformers.

The default processor, `DeCoAttnProcessor`, runs `Attention.project` and then diffusers'
`dispatch_attention_fn` on the (B, L, heads, head_dim) tensors; with the native backend (the
default) that is the same SDPA call as `Attention.forward`, so outputs are unchanged bit for bit.

A processor is called as `processor(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, image_rotary_emb=None)`: hidden_states (B, L, D) image tokens,
encoder_hidden_states (B, T, D) the text tokens of a joint block (None elsewhere),
image_rotary_emb the RoPE tables (cos, sin), each (L, 1, head_dim/2), or None (the text refine
blocks); it returns (B, L, D).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn

from deco.optimized.layers import Attention


class DeCoAttnProcessor:
    """DeCo's attention: `attn.project` (QKV, qk-norm, RoPE, text keys/values), attention by
    diffusers' dispatcher (backend: `_attention_backend`, set by `set_attention_backend`; None =
    the active one, SDPA by default), then `attn.proj`."""

    _attention_backend: Any = None
    _parallel_config: Any = None

    def __call__(self, attn: Attention, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None, attention_mask: Tensor | None = None,
                 image_rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        b, n, d = hidden_states.shape
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        q, k, v = attn.project(hidden_states, cos, sin, encoder_hidden_states)  # (B, L(+T), h, hd)
        # parallel_config only when set: diffusers 0.35's dispatcher does not take it.
        parallel = {} if self._parallel_config is None else {"parallel_config": self._parallel_config}
        out: Tensor = dispatch_attention_fn(q, k, v, attn_mask=attention_mask,
                                            backend=self._attention_backend, **parallel)  # (B, L, h, hd)
        proj: Tensor = attn.proj(out.reshape(b, n, d))  # (B, L, D)
        return proj


class DeCoAttention(Attention, AttentionModuleMixin):  # type: ignore[misc]
    """`deco.optimized.layers.Attention` whose forward calls its diffusers attention processor.

    QKV are stored fused (`qkv`, the portable layout), so diffusers' `fuse_qkv_projections` has
    nothing to fuse (`_supports_qkv_fusion = False`, as for Flux2's single-stream blocks)."""

    _default_processor_cls = DeCoAttnProcessor
    _available_processors: ClassVar[list[type]] = [DeCoAttnProcessor]
    _supports_qkv_fusion = False
    processor: Any

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                text: Tensor | None = None) -> Tensor:
        """x (B, L, D), RoPE tables or None, text (B, T, D) for a joint block -> (B, L, D)."""
        rope = (cos, sin) if cos is not None and sin is not None else None
        out: Tensor = self.processor(self, x, encoder_hidden_states=text, image_rotary_emb=rope)
        return out


def use_attention_processors(model: nn.Module) -> int:
    """Turn every `Attention` of `model` into a `DeCoAttention` with the default processor, in
    place (parameters and buffers untouched); returns how many were turned."""
    count = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = DeCoAttention
            cast(DeCoAttention, module).processor = DeCoAttnProcessor()
            count += 1
    return count

