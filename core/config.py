"""Model configuration shared by `deco.reference` and `deco.optimized` (pure Python, no NumPy/torch).

The fields are exactly the free hyper-parameters of spec/03-model.md; every other number in the
model (time-frequency width 256, max period 10, RoPE base 10000 and span 16, 8 DCT frequencies,
norm epsilon 1e-6) is a constant of the spec, defined below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, TypeVar

from deco.untrusted import parse_json

#: "deco": class-to-image DeCo; "baseline": the release's plain DiT; "t2i": text-to-image DeCo
#: (spec/06-text-to-image.md), conditioned on text-encoder hidden states instead of a label.
Architecture = Literal["deco", "baseline", "t2i"]
ARCHITECTURES = ("deco", "baseline", "t2i")

# Constants fixed by the spec (spec/03-model.md §1). They are not configurable: the release
# hard-codes them and its checkpoints do not record them.
TIME_FREQ_DIM = 256
TIME_MAX_PERIOD = 10.0  # not DiT's 10000: t lies in [0, 1]
ROPE_THETA = 10000.0
ROPE_SPAN = 16.0  # positions are linspace(0, 16, n) per axis, whatever n is
DCT_FREQS = 8
NORM_EPS = 1e-6

# Constants of the frequency-aware loss (spec/02-frequency-loss.md §1, §4), as plain nested
# tuples so that this module stays free of NumPy and torch; each implementation converts them.
FREQ_BLOCK = 8  # the DCT block size
JPEG_QUALITY = 85  # the paper's quality of the JPEG tables behind the frequency weights (02 §4)
FREQ_GAMMA = 1.0  # the exponent of the frequency weights (02 §5)
#: Full-range JPEG / BT.601 RGB -> YCbCr matrix, rows (Y, Cb, Cr); no +128 offsets (02 §1).
YCBCR_MATRIX: tuple[tuple[float, ...], ...] = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
#: Standard JPEG quantisation tables (ITU-T T.81 Annex K, tables K.1 and K.2), [row = vertical
#: frequency u, column = horizontal frequency v].
JPEG_LUMINANCE: tuple[tuple[int, ...], ...] = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMINANCE: tuple[tuple[int, ...], ...] = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)

#: The release's sampler for each model kind (spec/04-sampling.md §5, spec/06-text-to-image.md §6),
#: as the fields of `deco.optimized.sampling.SampleSettings` (`SampleSettings.release(kind)`):
#: "c2i" DeCo-XL at 256 px (100 Euler steps, guidance 3.2 on (0.1, 1], shift 1); "t2i" the text
#: model's fine-tuning config and demo (Adams, 25 steps, guidance 4 on (0, 1), shift 3). Every
#: default built on the release's sampler (`deco train --data`, `deco sample` of a text model, ...)
#: reads it here.
RELEASE_SAMPLING: dict[str, dict[str, Any]] = {
    "c2i": {"steps": 100, "guidance": 3.2, "interval": (0.1, 1.0), "timeshift": 1.0, "solver": "euler"},
    "t2i": {"steps": 25, "guidance": 4.0, "interval": (0.0, 1.0), "timeshift": 3.0, "solver": "adams"},
}


@dataclass(frozen=True)
class DeCoConfig:
    """Hyper-parameters of a DeCo model or of the baseline DiT (spec/03-model.md §1).

    architecture: "deco" (DiT + pixel decoder), "baseline" (DiT + linear de-patch head) or
        "t2i" (text-to-image DeCo: text refine blocks + joint-attention DiT + pixel decoder).
    depth: number of DiT blocks. For the baseline this is every transformer block.
    decoder_depth, decoder_width: pixel-decoder blocks and channels (ignored by the baseline).
    num_classes: real classes; label `num_classes` is the null class used for guidance. The
        text-to-image model has no label table: num_classes is 0 there.
    text_depth, text_dim, text_length: text refine blocks, the width E of the text encoder's
        hidden states and the number T of text tokens (right-padded); 0 for the class models.
    """

    architecture: Architecture = "deco"
    in_channels: int = 3
    patch_size: int = 16
    hidden_size: int = 1152
    num_heads: int = 16
    depth: int = 28
    decoder_depth: int = 3
    decoder_width: int = 32
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    text_depth: int = 0
    text_dim: int = 0
    text_length: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture: expected one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        positive = ["in_channels", "patch_size", "hidden_size", "num_heads", "depth"]
        text = ["text_depth", "text_dim", "text_length"]
        if self.architecture in ("deco", "t2i"):
            positive += ["decoder_depth", "decoder_width"]
        if self.architecture == "t2i":
            positive += text
            if self.num_classes != 0:
                raise ValueError(f"num_classes: the text-to-image model has no classes; expected 0, "
                                 f"got {self.num_classes!r}")
        else:
            positive.append("num_classes")
            for name in text:
                if getattr(self, name) != 0:
                    raise ValueError(f"{name}: only the text-to-image model has text settings; "
                                     f"expected 0 for architecture {self.architecture!r}, got "
                                     f"{getattr(self, name)!r}")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"hidden_size/num_heads: 2-D RoPE needs a head dim divisible by 4, got {self.head_dim}"
            )
        ratio = self.mlp_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
            raise ValueError(f"mlp_ratio: expected a positive finite number, got {ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU inner width F: int(2/3 * int(hidden * mlp_ratio)) for the class models
        (spec/03-model.md §4); int(hidden * mlp_ratio) for the text-to-image model, whose fused
        SwiGLU has no 2/3 factor (spec/06-text-to-image.md)."""
        if self.architecture == "t2i":
            return int(self.hidden_size * self.mlp_ratio)
        return int(2 * int(self.hidden_size * self.mlp_ratio) / 3)

    @property
    def is_text(self) -> bool:
        return self.architecture == "t2i"

    @property
    def null_class(self) -> int:
        return self.num_classes

    # ----------------------------------------------------------------- presets and (de)serialising
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DeCoConfig:
        """A named preset (`PRESETS`), with keyword overrides, e.g. `preset("DeCo-S/16", num_classes=10)`."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; expected one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict; the class models' omit the (zero) text fields, so their files
        read as they did before the text-to-image model existed."""
        data = config_to_dict(self)
        if not self.is_text:
            for name in ("text_depth", "text_dim", "text_length"):
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeCoConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return config_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DeCoConfig:
        data = parse_json(text, "config: the text")  # depth, size and finite numbers checked
        if not isinstance(data, dict):
            raise ValueError("config: expected a JSON object")
        return cls.from_dict(data)


def _deco(hidden: int, heads: int, depth: int, decoder_depth: int = 3) -> DeCoConfig:
    return DeCoConfig("deco", 3, 16, hidden, heads, depth, decoder_depth, 32, 1000)


def _dit(hidden: int, heads: int, depth: int) -> DeCoConfig:
    return DeCoConfig("baseline", 3, 16, hidden, heads, depth, 0, 0, 1000)


#: Paper-sized presets. DeCo-L and DeCo-XL are the release's configurations (DeCo_large.yaml:
#: 22 DiT + 3 decoder blocks against DiT-L's 24; DeCo_XL.yaml: 28 + 3 against DiT-XL's 28).
#: The release ships no S or B: ours follow DiT's widths and, like DeCo-L, trade two DiT blocks
#: for the 3-block decoder (10 + 3 against DiT's 12), so DeCo and DiT have similar size.
#: "tiny" presets are for tests and CPU demos.
PRESETS: dict[str, DeCoConfig] = {
    "DeCo-S/16": _deco(384, 6, 10),
    "DeCo-B/16": _deco(768, 12, 10),
    "DeCo-L/16": _deco(1024, 16, 22),
    "DeCo-XL/16": _deco(1152, 16, 28),
    "DiT-S/16": _dit(384, 6, 12),
    "DiT-B/16": _dit(768, 12, 12),
    "DiT-L/16": _dit(1024, 16, 24),
    "DiT-XL/16": _dit(1152, 16, 28),
    # Text-to-image: the release's t2i_DeCo.ckpt (hidden 1536, 24 heads, 16 DiT + 3 decoder blocks,
    # 4 text refine blocks, Qwen3-1.7B hidden states E = 2048 right-padded to T = 128 tokens).
    "DeCo-XXL/16": DeCoConfig("t2i", 3, 16, 1536, 24, 16, 3, 32, 0, 4.0, 4, 2048, 128),
    "DeCo-tiny/4": DeCoConfig("deco", 3, 4, 64, 4, 3, 2, 16, 10),
    # The shapes of ../shared/fixtures/T.ckpt.
    "DeCo-T2I-tiny/4": DeCoConfig("t2i", 3, 4, 64, 4, 3, 2, 16, 0, 4.0, 2, 48, 8),
    "DiT-tiny/4": DeCoConfig("baseline", 3, 4, 64, 4, 5, 0, 0, 10),
    # The built-in text demo (deco train --task t2i), patch 8: 4x8 DiT tokens on its 32x64 images
    # (4 times fewer than patch 4, for speed). The tiny offline Qwen3 gives E = 32, its
    # longest demo caption has 20 tokens (T = 24).
    "DeCo-T2I-demo/8": DeCoConfig("t2i", 3, 8, 64, 4, 4, 2, 16, 0, 4.0, 1, 32, 24),
}


def parameter_shapes(config: DeCoConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every weight, in the portable (safetensors) layout of spec/03-model.md §9.

    Linear weights are (out_features, in_features) and act as y = x @ W.T + b. This table is the
    single source of truth for the file format: loaders validate against it and the release
    converter infers a config by matching it.
    """
    h, c, p = config.hidden_size, config.in_channels, config.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "t_embed.fc1.weight": (h, TIME_FREQ_DIM),
        "t_embed.fc1.bias": (h,),
        "t_embed.fc2.weight": (h, h),
        "t_embed.fc2.bias": (h,),
    }
    if config.is_text:
        shapes.update({
            "text_embed.weight": (h, config.text_dim),
            "text_embed.bias": (h,),
            "text_embed.norm.weight": (h,),
            "text_pos_embed": (config.text_length, h),
        })
        for i in range(config.text_depth):
            shapes.update(_transformer_block(config, f"text_blocks.{i}.", joint=False))
    else:
        shapes["y_embed.weight"] = (config.num_classes + 1, h)
    shapes.update({"patch_embed.weight": (h, c * p * p), "patch_embed.bias": (h,)})
    for i in range(config.depth):
        shapes.update(_transformer_block(config, f"blocks.{i}.", joint=config.is_text))
    if config.architecture == "baseline":
        shapes.update({
            "head.adaln.weight": (2 * h, h),
            "head.adaln.bias": (2 * h,),
            "head.linear.weight": (c * p * p, h),
            "head.linear.bias": (c * p * p,),
        })
        return shapes
    w = config.decoder_width
    shapes.update({
        "decoder.pixel_embed.weight": (w, c + DCT_FREQS * DCT_FREQS),
        "decoder.pixel_embed.bias": (w,),
        "decoder.cond_proj.weight": (p * p * w, h),
        "decoder.cond_proj.bias": (p * p * w,),
        "decoder.input_proj.weight": (w, w),
        "decoder.input_proj.bias": (w,),
    })
    for j in range(config.decoder_depth):
        b = f"decoder.blocks.{j}."
        shapes.update({
            b + "norm.weight": (w,),
            b + "norm.bias": (w,),
            b + "fc1.weight": (w, w),
            b + "fc1.bias": (w,),
            b + "fc2.weight": (w, w),
            b + "fc2.bias": (w,),
            b + "adaln.weight": (3 * w, w),
            b + "adaln.bias": (3 * w,),
        })
    shapes.update({"decoder.final.weight": (c, w), "decoder.final.bias": (c,)})
    return shapes


def _transformer_block(config: DeCoConfig, b: str, joint: bool) -> dict[str, tuple[int, ...]]:
    """One AdaLN transformer block. The class models' SwiGLU has separate w1/w3 (in) and w2 (out);
    the text model's has a fused w12 (in, the two halves stacked) and w3 (out). A joint block
    (text-to-image DiT block) also projects the text tokens to keys and values (`attn.kv_text`)."""
    h, f = config.hidden_size, config.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        b + "norm1.weight": (h,),
        b + "attn.qkv.weight": (3 * h, h),
    }
    if joint:
        shapes[b + "attn.kv_text.weight"] = (2 * h, h)
    shapes.update({
        b + "attn.q_norm.weight": (config.head_dim,),
        b + "attn.k_norm.weight": (config.head_dim,),
        b + "attn.proj.weight": (h, h),
        b + "attn.proj.bias": (h,),
        b + "norm2.weight": (h,),
    })
    if config.is_text:
        shapes.update({b + "mlp.w12.weight": (2 * f, h), b + "mlp.w3.weight": (h, f)})
    else:
        shapes.update({
            b + "mlp.w1.weight": (f, h),
            b + "mlp.w3.weight": (f, h),
            b + "mlp.w2.weight": (h, f),
        })
    shapes.update({b + "adaln.weight": (6 * h, h), b + "adaln.bias": (6 * h,)})
    return shapes


def parameter_count(config: DeCoConfig) -> int:
    total = 0
    for shape in parameter_shapes(config).values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# ------------------------------------------------------------------- frozen configs <-> JSON types
Config = TypeVar("Config")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass as JSON types: tuples become lists, paths strings, and a
    nested config (a dataclass field) its own dict. `config_from_dict` reverses it. One
    serializer for every frozen config (DeCoConfig, TrainConfig, SampleSettings, RunConfig)."""
    return {f.name: _to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}


def config_from_dict(cls: type[Config], data: dict[str, Any]) -> Config:
    """`cls(**data)` after converting each value back to its field's declared type: a list to a
    tuple for a tuple field, a string to a Path for a path field, a dict to the nested config
    dataclass (through its own `from_dict` when it has one). Missing fields take their defaults;
    an unknown field is the constructor's TypeError; the values are validated by `cls` itself."""
    hints = typing.get_type_hints(cls)
    return cls(**{k: _from_json(hints[k], v) if k in hints else v for k, v in data.items()})


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value


def _from_json(hint: Any, value: Any) -> Any:
    """`value` read back as type `hint`: the first member of a union (X | None) that fits."""
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(hint):
            if member is not type(None):
                return _from_json(member, value)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        if len(args) == len(value):
            return tuple(_from_json(a, v) for a, v in zip(args, value, strict=True))
        return tuple(value)
    if isinstance(hint, type) and issubclass(hint, PurePath) and isinstance(value, str):
        return hint(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        from_dict = getattr(hint, "from_dict", None)
        return from_dict(value) if callable(from_dict) else config_from_dict(hint, value)
    return value
