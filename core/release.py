"""Reading checkpoints of the public DeCo release (Lightning layout), spec/05-weights.md §3.

The release stores `state_dict` with `denoiser.*` (online weights), `ema_denoiser.*` (EMA) and
trainer-only entries (`diffusion_trainer.*`). This module renames the release's parameter names
to the portable names of `deco.config.parameter_shapes` and infers the config from the shapes.
It is generic over the tensor type so the same code serves NumPy and torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from deco.config import DeCoConfig, parameter_shapes
from deco.safe_load import load_weights_only


class HasShape(Protocol):
    @property
    def shape(self) -> Any: ...

    def reshape(self, *shape: Any) -> Any: ...


T = TypeVar("T", bound=HasShape)
WeightSet = Literal["ema", "online"]

# (release name pattern, portable name). Patterns are matched after stripping the prefix.
_RENAMES: list[tuple[str, str]] = [
    (r"t_embedder\.mlp\.0\.", "t_embed.fc1."),
    (r"t_embedder\.mlp\.2\.", "t_embed.fc2."),
    (r"y_embedder\.embedding_table\.", "y_embed."),
    # The text-to-image model (spec/06-text-to-image.md). Its DiT blocks' fused image QKV is
    # `qkv_x` and their text key/value projection `kv_y`; the refine blocks' QKV is `qkv`.
    (r"y_embedder\.proj\.", "text_embed."),
    (r"y_embedder\.norm\.", "text_embed.norm."),
    (r"y_pos_embedding$", "text_pos_embed"),
    (r"text_refine_blocks\.(\d+)\.adaLN_modulation\.0\.", r"text_blocks.\1.adaln."),
    (r"text_refine_blocks\.(\d+)\.", r"text_blocks.\1."),
    (r"blocks\.(\d+)\.attn\.qkv_x\.", r"blocks.\1.attn.qkv."),
    (r"blocks\.(\d+)\.attn\.kv_y\.", r"blocks.\1.attn.kv_text."),
    (r"s_embedder\.proj\.", "patch_embed."),  # DeCo's DiT patch embedding
    (r"x_embedder\.proj\.", "patch_embed."),  # the baseline's patch embedding
    (r"x_embedder\.embedder\.0\.", "decoder.pixel_embed."),  # DeCo's per-pixel embedding
    (r"blocks\.(\d+)\.adaLN_modulation\.0\.", r"blocks.\1.adaln."),
    (r"blocks\.(\d+)\.", r"blocks.\1."),
    (r"dec_net\.cond_embed\.", "decoder.cond_proj."),
    (r"dec_net\.input_proj\.", "decoder.input_proj."),
    (r"dec_net\.res_blocks\.(\d+)\.in_ln\.", r"decoder.blocks.\1.norm."),
    (r"dec_net\.res_blocks\.(\d+)\.mlp\.0\.", r"decoder.blocks.\1.fc1."),
    (r"dec_net\.res_blocks\.(\d+)\.mlp\.2\.", r"decoder.blocks.\1.fc2."),
    (r"dec_net\.res_blocks\.(\d+)\.adaLN_modulation\.1\.", r"decoder.blocks.\1.adaln."),
    (r"dec_net\.final_layer\.linear\.", "decoder.final."),
    (r"final_layer\.linear\.", "head.linear."),
    (r"final_layer\.adaLN_modulation\.0\.", "head.adaln."),
]
_PREFIX = {"ema": "ema_denoiser.", "online": "denoiser."}


def portable_name(release_name: str) -> str:
    """The portable name of a release parameter name without its `denoiser.` prefix."""
    for pattern, repl in _RENAMES:
        new, n = re.subn("^" + pattern, repl, release_name)
        if n:
            return new
    raise ValueError(f"checkpoint: unknown parameter {release_name!r}: not a DeCo checkpoint")


def select_weights(state_dict: Mapping[str, T], weights: WeightSet = "ema") -> dict[str, T]:
    """The chosen weight set of a release `state_dict`, renamed to portable names."""
    if weights not in _PREFIX:
        raise ValueError(f"weights: expected 'ema' or 'online', got {weights!r}")
    prefix = _PREFIX[weights]
    out = {portable_name(k[len(prefix):]): v for k, v in state_dict.items() if k.startswith(prefix)}
    pos = out.get("text_pos_embed")
    if pos is not None and len(pos.shape) == 3 and pos.shape[0] == 1:
        # The release keeps its learned text position table as (1, T, D), broadcast over the batch.
        out["text_pos_embed"] = pos.reshape(*pos.shape[1:])
    if not out:
        raise ValueError(
            f"checkpoint: no '{prefix}*' entries in its state_dict: not a DeCo release checkpoint"
        )
    return out


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(pattern, k))}
    return len(ids)


def _mlp_ratio(hidden: int, mlp_hidden: int) -> float:
    # mlp_hidden = int(2 n / 3) with n = int(hidden * ratio): n = ceil(3 mlp_hidden / 2) always works.
    n = -(-3 * mlp_hidden // 2)
    for ratio in (4.0, n / hidden, (n + 0.5) / hidden):
        if int(2 * int(hidden * ratio) / 3) == mlp_hidden:
            return ratio
    raise ValueError(f"checkpoint: cannot infer mlp_ratio from SwiGLU width {mlp_hidden}")


def _text_mlp_ratio(hidden: int, mlp_hidden: int) -> float:
    # The text model's SwiGLU width is int(hidden * ratio), with no 2/3 factor.
    for ratio in (4.0, mlp_hidden / hidden, (mlp_hidden + 0.5) / hidden):
        if int(hidden * ratio) == mlp_hidden:
            return ratio
    raise ValueError(f"checkpoint: cannot infer mlp_ratio from SwiGLU width {mlp_hidden}")


def _infer_text_config(shapes: Mapping[str, tuple[int, ...]]) -> DeCoConfig:
    """infer_config for the text-to-image model (its weights have `text_embed.*`)."""
    try:
        hidden, text_dim = shapes["text_embed.weight"]
        text_length = shapes["text_pos_embed"][0]
        head_dim = shapes["blocks.0.attn.q_norm.weight"][0]
        mlp_ratio = _text_mlp_ratio(hidden, shapes["blocks.0.mlp.w12.weight"][0] // 2)
        channels = shapes["decoder.final.weight"][0]
        patch_features = shapes["patch_embed.weight"][1]
        width = shapes["decoder.pixel_embed.weight"][0]
    except (KeyError, IndexError, ValueError):
        raise ValueError("checkpoint: missing core text-to-image DeCo parameters: not a DeCo "
                         "checkpoint") from None
    config = DeCoConfig(
        architecture="t2i", in_channels=channels,
        patch_size=round((patch_features / channels) ** 0.5), hidden_size=hidden,
        num_heads=hidden // head_dim, depth=_count(shapes, r"blocks\.(\d+)\."),
        decoder_depth=_count(shapes, r"decoder\.blocks\.(\d+)\."), decoder_width=width,
        num_classes=0, mlp_ratio=mlp_ratio, text_depth=_count(shapes, r"text_blocks\.(\d+)\."),
        text_dim=text_dim, text_length=text_length,
    )
    check_shapes(config, shapes)
    return config


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> DeCoConfig:
    """The config whose `parameter_shapes` equals `shapes` exactly, or a ValueError saying why.

    The baseline's head only records C*p*p; it is read as 3 channels (RGB) like the release.
    Weights with `text_embed.*` are the text-to-image model's."""
    if "text_embed.weight" in shapes:
        return _infer_text_config(shapes)
    try:
        hidden = shapes["y_embed.weight"][1]
        num_classes = shapes["y_embed.weight"][0] - 1
        head_dim = shapes["blocks.0.attn.q_norm.weight"][0]
        mlp_ratio = _mlp_ratio(hidden, shapes["blocks.0.mlp.w1.weight"][0])
        patch_features = shapes["patch_embed.weight"][1]
        if "decoder.final.weight" in shapes:
            kind: Any = "deco"
            channels = shapes["decoder.final.weight"][0]
            width = shapes["decoder.pixel_embed.weight"][0]
            dec_depth = _count(shapes, r"decoder\.blocks\.(\d+)\.")
        else:
            kind, channels, width, dec_depth = "baseline", 3, 0, 0
    except (KeyError, IndexError):
        raise ValueError("checkpoint: missing core DeCo parameters: not a DeCo checkpoint") from None
    patch = round((patch_features / channels) ** 0.5)
    config = DeCoConfig(
        architecture=kind, in_channels=channels, patch_size=patch, hidden_size=hidden,
        num_heads=hidden // head_dim, depth=_count(shapes, r"blocks\.(\d+)\."),
        decoder_depth=dec_depth, decoder_width=width, num_classes=num_classes,
        mlp_ratio=mlp_ratio,
    )
    check_shapes(config, shapes)
    return config


def check_shapes(config: DeCoConfig, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError unless `shapes` has exactly the parameters of `config`, with the same shapes."""
    # Every block has parameters: a config claiming more blocks than the file has tensors (a
    # depth of 1e9 in a few bytes of metadata) is refused before its table is built.
    decoder = config.decoder_depth if config.architecture != "baseline" else 0
    blocks = config.depth + config.text_depth + decoder
    if blocks > len(shapes):
        raise ValueError(f"weights: do not match the config ({blocks} blocks for {len(shapes)} tensors)")
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected))
    if missing or extra:
        raise ValueError(
            f"weights: do not match the config (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"weights: {name} has shape {tuple(shapes[name])}, expected {shape}")


def read_release_checkpoint(
    path: str | Path, weights: WeightSet = "ema"
) -> tuple[DeCoConfig, dict[str, Any]]:
    """(config, portable-name -> torch.Tensor) from a release `.ckpt`, loaded with
    `torch.load(weights_only=True)` (no code from the file is ever run)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {path}")
    try:
        ckpt = load_weights_only(path)
    except ValueError as exc:
        raise ValueError(f"checkpoint: {exc}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"checkpoint: {path} has no 'state_dict': not a DeCo release checkpoint")
    state = select_weights(ckpt["state_dict"], weights)
    config = infer_config({k: tuple(v.shape) for k, v in state.items()})
    return config, state
