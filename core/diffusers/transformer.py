"""`DeCoTransformer2DModel`: a diffusers `ModelMixin` around `deco.optimized`'s models.

The diffusers model holds the `deco.optimized` module (DeCo, the baseline DiT or the
text-to-image DeCo, by `architecture`) as its submodule `model` and forwards to it, so one
implementation serves both APIs; its state-dict names are the portable names (spec/05) with the
prefix `model.`. The config is `deco.config.DeCoConfig`'s fields plus two diffusers-side
entries: `id2label` (class names, for `DeCoPipeline.get_label_ids`) and `sample_size` (the
default image side in pixels).

Time convention: `timestep` is DeCo's t in [0, 1] with t = 0 pure noise and t = 1 data (spec/01),
and the output is DeCo's velocity v = d x / d t. diffusers' flow-matching schedulers count
sigma = 1 - t the other way and expect d x / d sigma = -v; the pipelines do that conversion.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor

from deco.config import DeCoConfig
from deco.optimized import build_model

from .attention import use_attention_processors


class DeCoTransformer2DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):  # type: ignore[misc]
    """A DeCo velocity model with diffusers' save_pretrained / from_pretrained.

    LoRA: diffusers' `PeftAdapterMixin` (`load_lora_adapter`, `set_adapters`, `fuse_lora`, ...;
    adapters of `deco train --lora` load as they are, see `deco.lora`). Gradient checkpointing:
    `enable_gradient_checkpointing` sets the wrapped model's `gradient_checkpointing` (its DiT
    and text refine blocks are recomputed in backward).

    The arguments are `DeCoConfig`'s fields (spec/03 §1, spec/06 §1), `id2label` (class id ->
    name, JSON keys are strings; None when the classes have no names) and `sample_size`.

    Attention runs through diffusers' attention processors (`attn_processors`,
    `set_attn_processor`, `set_attention_backend`; deco.diffusers.attention)."""

    _supports_gradient_checkpointing = True
    # Layerwise casting (enable_layerwise_casting) keeps these in the compute dtype: the input
    # embedding, whose weight dtype is the dtype the model casts its inputs to, and the pixel
    # decoder layers whose weights the decoder folds together before use (outside the layers'
    # own forward, where the casting hooks act; a few thousand parameters), and the text
    # embedding, a linear layer whose RMSNorm child a hook on it would store in the storage dtype.
    _skip_layerwise_casting_patterns = ("patch_embed", "text_embed", r"decoder\.pixel_embed",
                                        r"decoder\.input_proj", r"decoder\.blocks\.\d+\.adaln")
    # accelerate's device maps keep each of these on one device: a residual block, and the pixel
    # decoder (small; where hooks sit on its layers, e.g. offloaded to disk, it runs unfolded:
    # PixelDecoder.folding).
    _no_split_modules: ClassVar[list[str]] = ["DiTBlock", "PixelDecoder"]

    @register_to_config  # type: ignore[untyped-decorator]  # diffusers is not analysed (pyproject)
    def __init__(
        self,
        architecture: str = "deco",
        in_channels: int = 3,
        patch_size: int = 16,
        hidden_size: int = 1152,
        num_heads: int = 16,
        depth: int = 28,
        decoder_depth: int = 3,
        decoder_width: int = 32,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        text_depth: int = 0,
        text_dim: int = 0,
        text_length: int = 0,
        id2label: dict[str, str] | None = None,
        sample_size: int = 256,
    ) -> None:
        super().__init__()
        self.deco_config = DeCoConfig(
            architecture=architecture,  # type: ignore[arg-type]  # DeCoConfig checks the value
            in_channels=in_channels, patch_size=patch_size, hidden_size=hidden_size,
            num_heads=num_heads, depth=depth, decoder_depth=decoder_depth,
            decoder_width=decoder_width, num_classes=num_classes, mlp_ratio=mlp_ratio,
            text_depth=text_depth, text_dim=text_dim, text_length=text_length,
        )
        check_id2label(id2label, num_classes)
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1 \
                or sample_size % patch_size:
            raise ValueError(f"sample_size: expected a positive multiple of patch_size={patch_size}, "
                             f"got {sample_size!r}")
        self.model = build_model(self.deco_config)
        use_attention_processors(self.model)

    @classmethod
    def from_deco(cls, model: torch.nn.Module, *, id2label: dict[str, str] | None = None,
                  sample_size: int = 256) -> DeCoTransformer2DModel:
        """Wrap a `deco.optimized` model (its `config` a DeCoConfig); the wrapper shares its
        weights' storage (no copy)."""
        config = getattr(model, "config", None)
        if not isinstance(config, DeCoConfig):
            raise TypeError(f"model: expected a deco.optimized model with a DeCoConfig, "
                            f"got {type(model).__name__}")
        with torch.device("meta"):  # every parameter is assigned from `model` below
            wrapper: DeCoTransformer2DModel = cls(**config.to_dict(), id2label=id2label,
                                                  sample_size=sample_size)
        wrapper.model.load_state_dict(model.state_dict(), strict=True, assign=True)
        wrapper.train(model.training)
        return wrapper

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: list[str] | None = None) -> None:
        """PeftAdapterMixin.fuse_lora, with embedding LoRA layers (`y_embed`) fused at
        `lora_scale` too: diffusers scales each layer with peft's scale_layer before merging it,
        which skips the adapters it does not find in `lora_A`, i.e. an embedding's (peft 0.21;
        they would be fused at scale 1). The scale stays on the layer, as diffusers leaves it,
        so that unfuse_lora subtracts what was added."""
        scale_adapters(self, lora_scale, embeddings_only=True)
        super().fuse_lora(lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names)

    @property
    def is_text(self) -> bool:
        """Whether this is the text-to-image model (conditioned on text-encoder states)."""
        return self.deco_config.is_text

    def forward(
        self, hidden_states: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None, return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """DeCo's velocity (B, C, H, W) for noisy images `hidden_states` (B, C, H, W) at DeCo
        time `timestep` ((B,) or a number; 0 = noise), conditioned on `class_labels` (B,) for
        the class models or `encoder_hidden_states` (B, T, E) for the text model.
        attention_kwargs: diffusers' {"scale": s}, the LoRA layers' scale for this call
        (diffusers' scale_lora_layers; 1 = as loaded, 0 = without the adapters)."""
        if self.is_text:
            if class_labels is not None:
                raise TypeError("class_labels: the text-to-image model takes encoder_hidden_states")
            cond = encoder_hidden_states
        else:
            if encoder_hidden_states is not None:
                raise TypeError("encoder_hidden_states: the class-to-image model takes class_labels")
            cond = class_labels
        with scaled_lora(self, lora_scale(attention_kwargs)):
            velocity: Tensor = self.model(hidden_states, timestep, cond)  # (B, C, H, W)
        return Transformer2DModelOutput(sample=velocity) if return_dict else (velocity,)


def lora_scale(attention_kwargs: Any) -> float:
    """The LoRA scale of diffusers' `attention_kwargs` (None or {"scale": s}, s a finite number;
    default 1). DeCo's attention takes no other keyword, so any other key is an error."""
    if attention_kwargs is None:
        return 1.0
    if not isinstance(attention_kwargs, dict) or set(attention_kwargs) - {"scale"}:
        raise TypeError(f"attention_kwargs: expected None or {{'scale': number}} (the LoRA scale), got "
                        f"{attention_kwargs!r}")
    scale = attention_kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"attention_kwargs: 'scale' must be a finite number, got {scale!r}")
    return float(scale)


@contextmanager
def scaled_lora(model: torch.nn.Module, scale: float) -> Iterator[None]:
    """Every active LoRA adapter of `model` scaled by `scale` inside the block, and each layer's
    scales restored exactly after it. On peft's per-adapter `scaling` of each LoRA layer, not
    through diffusers' scale_lora_layers: that calls peft's scale_layer, which skips embedding
    LoRA layers (`y_embed`; peft 0.21: it looks for the adapter in `lora_A` only), and its
    unscale after a scale of 0 resets the weights set_adapters gave."""
    saved = scale_adapters(model, scale)
    try:
        yield
    finally:
        for scaling, before in saved:
            scaling.clear()
            scaling.update(before)


def scale_adapters(model: torch.nn.Module, scale: float, embeddings_only: bool = False
                   ) -> list[tuple[dict[str, float], dict[str, float]]]:
    """Multiply peft's per-adapter `scaling` of every active LoRA adapter in `model` by `scale`
    (embeddings_only: only the adapters of embedding layers, those peft's scale_layer skips).
    Returns (each changed layer's `scaling`, a copy from before) for restoring; nothing for 1."""
    saved: list[tuple[dict[str, float], dict[str, float]]] = []
    if scale == 1.0:
        return saved
    for module in model.modules():
        scaling, active = getattr(module, "scaling", None), getattr(module, "active_adapters", None)
        if not isinstance(scaling, dict) or active is None:  # not a peft LoRA layer
            continue
        embedded = getattr(module, "lora_embedding_A", {})
        names = [n for n in active if n in scaling
                 and (not embeddings_only or (n in embedded and n not in getattr(module, "lora_A", {})))]
        if names:
            saved.append((scaling, dict(scaling)))
        for name in names:
            scaling[name] *= scale
    return saved


def check_id2label(id2label: Any, num_classes: int) -> None:
    """id2label: None or a dict whose keys are the ids "0" .. str(num_classes - 1) (the null class
    has no name) and whose values are non-empty names."""
    if id2label is None:
        return
    if not isinstance(id2label, dict):
        raise TypeError(f"id2label: expected a dict of class id -> name, got {type(id2label).__name__}")
    expected = {str(i) for i in range(num_classes)}
    keys = {str(k) for k in id2label}
    if keys != expected:
        raise ValueError(f"id2label: expected the ids 0..{num_classes - 1}, got {len(keys)} ids "
                         f"({sorted(keys ^ expected)[:5]} differ)")
    bad = [k for k, v in id2label.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"id2label: names must be non-empty strings, not for ids {bad[:5]}")
