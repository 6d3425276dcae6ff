"""REPA's target encoder: a frozen DINOv2 ViT-B/14, fed the way the public release feeds it.

    encoder = load_repa_encoder("dinov2_vitb14_pretrain.pth", device)    # or a HF folder
    trainer = Trainer(model, TrainConfig(repa_weight=0.5), encoder=encoder)
    features = encoder(x)       # x (B, 3, H, W) in [-1, 1] -> (B, (H/16)·(W/16), 768)

Two layouts of the weights are accepted, and nothing is ever downloaded:
- the original DINOv2 state dict (`dinov2_vitb14_pretrain.pth`, what the release gets through
  `torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14")`): its names (`blocks.0.attn.qkv`,
  `patch_embed.proj`, `ls1.gamma`, ...) are converted to those of transformers' `Dinov2Model`, built
  from a `Dinov2Config` inferred from the tensor shapes (read with `weights_only=True`);
- a Hugging Face folder in the `facebook/dinov2-base` layout (config.json + model.safetensors),
  read by `Dinov2Model.from_pretrained(..., local_files_only=True)`.

What the encoder computes, after the release's DINOv2 wrapper: x in [-1, 1] -> (x + 1) / 2 in
[0, 1] -> ImageNet mean/std normalisation -> bicubic resize (no antialias) to 14·H/16 × 14·W/16,
so that the 14-pixel patches of DINOv2 make the same token grid as the DiT's 16-pixel ones ->
DINOv2 -> final LayerNorm -> the patch tokens (the class token dropped).

One detail of the original DINOv2 differs from transformers: when the token grid is not the
pretraining one (37×37 at 518 px; the release uses 16×16 at 224 px), the original resizes the
position embeddings bicubically with `scale_factor = (grid + 0.1) / 37`, transformers with
`size = grid`. The two sample different points, so the features differ. We follow the original
(`dinov2_position_embeddings`), since that is what the release trained with.
"""

from __future__ import annotations

import math
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor, nn

from deco.errors import first_line, quiet_transformers
from deco.safe_load import load_weights_only
from deco.untrusted import UntrustedFileError, json_object, read_json

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

#: torchvision/timm's ImageNet statistics (IMAGENET_DEFAULT_MEAN/STD), which the release uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The original DINOv2's position-embedding resize offset (`interpolate_offset`).
POSITION_OFFSET = 0.1


def _require_transformers() -> Any:
    try:
        import transformers  # here: transformers is an optional extra
    except ImportError as exc:
        raise ImportError("REPA's DINOv2 encoder needs transformers: "
                          "pip install 'deco-diffusion[repa]'") from exc
    return transformers


# ------------------------------------------------------------------- preprocessing
def repa_preprocess(x: Tensor, base_patch_size: int = 16, patch_size: int = 14) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, ⌊14 H/16⌋, ⌊14 W/16⌋) ImageNet-normalised, as the release.

    The release normalises first and resizes second (bicubic, align_corners=False, no antialias)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point (B, 3, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    x = ((x + 1.0) / 2.0 - mean) / std
    h, w = x.shape[-2:]
    size = (int(patch_size * h / base_patch_size), int(patch_size * w / base_patch_size))
    return F.interpolate(x, size, mode="bicubic", align_corners=False)


def dinov2_position_embeddings(pos_embed: Tensor, grid_h: int, grid_w: int,
                               offset: float = POSITION_OFFSET) -> Tensor:
    """(1, 1 + M², D) pretrained embeddings -> (1, 1 + grid_h·grid_w, D), as the original DINOv2.

    The patch part is resized bicubically with scale factors (grid + offset) / M, in float32; the
    grid the model was trained on is returned unchanged (square grids only, like the original)."""
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or m * m != n:
        raise ValueError(f"pos_embed: expected (1, 1 + M², D), got {tuple(pos_embed.shape)}")
    if grid_h == m and grid_w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    patches = patches.reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    patches = F.interpolate(patches, scale_factor=((grid_h + offset) / m, (grid_w + offset) / m),
                            mode="bicubic", align_corners=False)
    if patches.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"grid: cannot resize {m}x{m} position embeddings to {grid_h}x{grid_w}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _original_interpolate_pos_encoding(embeddings: Any, tokens: Tensor, height: int,
                                       width: int) -> Tensor:
    """Dinov2Embeddings.interpolate_pos_encoding, the original DINOv2's way."""
    patch = embeddings.patch_embeddings.patch_size
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    position: Tensor = embeddings.position_embeddings
    return dinov2_position_embeddings(position, height // ph, width // pw)


# ------------------------------------------------------------------- the encoder
class RepaEncoder(nn.Module):
    """Frozen DINOv2 (transformers' Dinov2Model) as REPA's target: images in [-1, 1] -> patch tokens.

    The DiT's patch size is `base_patch_size` (16 for DeCo); the image is resized so that DINOv2's
    patches make the same grid. Parameters are frozen; the module stays in eval mode."""

    def __init__(self, model: Dinov2Model, base_patch_size: int = 16) -> None:
        super().__init__()
        self.model = model
        self.base_patch_size = base_patch_size
        patch = model.config.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.dim = int(model.config.hidden_size)
        # The original DINOv2's position-embedding resize instead of transformers' (see the module
        # docstring): the one method of Dinov2Embeddings that differs, overridden on this instance
        # (a bound method, so that a deep copy rebinds it to the copied embeddings).
        embeddings = model.embeddings
        setattr(embeddings, "interpolate_pos_encoding",  # noqa: B010
                types.MethodType(_original_interpolate_pos_encoding, embeddings))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RepaEncoder:
        """Always eval: the encoder is a frozen target (no dropout/drop-path)."""
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> DINOv2's input (B, 3, 14 H/16, 14 W/16), in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return repa_preprocess(x.float(), self.base_patch_size, self.patch_size).to(dtype)

    def features(self, pixels: Tensor) -> Tensor:
        """Preprocessed (B, 3, h, w) -> (B, (h/14)(w/14), D): last LayerNorm, class token dropped."""
        out: Tensor = self.model(pixel_values=pixels).last_hidden_state  # (B, 1 + N, D)
        return out[:, 1:]

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.features(self.preprocess(x))  # (B, N, D)


# ------------------------------------------------------------------- state-dict names
#: original DINOv2 name -> transformers name; `{i}` is a block index. The attention's names
#: changed in transformers 5 (q_proj/...); `_attention_names` picks the installed ones.
_GLOBAL_NAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_ATTENTION_NAMES = {
    # transformers >= 5: attention.{q,k,v,o}_proj; before: attention.attention.{query,key,value}
    # and attention.output.dense
    "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    "v4": ("attention.attention.query", "attention.attention.key", "attention.attention.value",
           "attention.output.dense"),
}


def _attention_names(hf_keys: Any) -> tuple[str, str, str, str]:
    """The (q, k, v, out) module names of block 0's attention in a Dinov2Model state dict."""
    for names in _ATTENTION_NAMES.values():
        if f"encoder.layer.0.{names[0]}.weight" in hf_keys:
            return names
    raise ValueError("model: unknown Dinov2Model attention layout (transformers version?)")


def original_to_hf(state: dict[str, Tensor], hf_keys: Any) -> dict[str, Tensor]:
    """Original DINOv2 state dict -> transformers Dinov2Model's (qkv split into q, k, v).

    hf_keys: the keys of the target Dinov2Model's state dict (they fix the attention names)."""
    q, k, v, o = _attention_names(hf_keys)
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name in _GLOBAL_NAMES:
            target = _GLOBAL_NAMES[name]
            # the original mask token is (1, D); some exports store (1, 1, D)
            out[target] = tensor.reshape(1, -1) if name == "mask_token" else tensor
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match is None:
            raise ValueError(f"state: unexpected DINOv2 tensor {name!r}")
        i, rest = match.groups()
        prefix = f"encoder.layer.{i}."
        if rest in _BLOCK_NAMES:
            out[prefix + _BLOCK_NAMES[rest]] = tensor
        elif rest in ("attn.qkv.weight", "attn.qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            for part, chunk in zip((q, k, v), tensor.chunk(3, dim=0), strict=True):
                out[f"{prefix}{part}.{kind}"] = chunk
        elif rest in ("attn.proj.weight", "attn.proj.bias"):
            out[f"{prefix}{o}.{rest.rsplit('.', 1)[1]}"] = tensor
        else:
            raise ValueError(f"state: unexpected DINOv2 tensor {name!r}")
    return out


def hf_to_original(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers Dinov2Model state dict -> the original DINOv2 names (q, k, v joined to qkv)."""
    q, k, v, o = _attention_names(state)
    inverse_global = {hf: orig for orig, hf in _GLOBAL_NAMES.items()}
    inverse_block = {hf: orig for orig, hf in _BLOCK_NAMES.items()}
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for name, tensor in state.items():
        if name in inverse_global:
            out[inverse_global[name]] = tensor
            continue
        match = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", name)
        if match is None:
            raise ValueError(f"state: unexpected Dinov2Model tensor {name!r}")
        i, module, kind = match.groups()
        if f"{module}.{kind}" in inverse_block:
            out[f"blocks.{i}.{inverse_block[module + '.' + kind]}"] = tensor
        elif module in (q, k, v):
            parts.setdefault((i, kind), {})[module] = tensor
        elif module == o:
            out[f"blocks.{i}.attn.proj.{kind}"] = tensor
        else:
            raise ValueError(f"state: unexpected Dinov2Model tensor {name!r}")
    for (i, kind), qkv in parts.items():
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([qkv[q], qkv[k], qkv[v]], dim=0)
    return out


def config_from_original(state: dict[str, Tensor]) -> Dinov2Config:
    """A Dinov2Config matching an original DINOv2 state dict (ViT-S/B/L/g all use 64-wide heads)."""
    transformers = _require_transformers()
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
    missing = [n for n in needed if n not in state]
    if missing:
        hint = " (SwiGLU DINOv2-g is not supported)" if "blocks.0.mlp.w12.weight" in state else ""
        raise ValueError(f"path: not an original DINOv2 ViT state dict, missing {missing}{hint}")
    if any(n.startswith("register_tokens") for n in state):
        raise ValueError("path: DINOv2 with registers is not supported (the release uses dinov2_vitb14)")
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    depth = 1 + max(int(m.group(1)) for n in state if (m := re.match(r"blocks\.(\d+)\.", n)))
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    if hidden % dim:
        raise ValueError(f"path: MLP width {hidden} is not a multiple of the width {dim}")
    config: Dinov2Config = transformers.Dinov2Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=max(dim // 64, 1),
        mlp_ratio=hidden // dim, image_size=grid * patch, patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in state, layer_norm_eps=1e-6, hidden_act="gelu",
    )
    return config


def _load_original(path: Path) -> Dinov2Model:
    transformers = _require_transformers()

    try:
        state = load_weights_only(path)
    except ValueError as exc:
        raise ValueError(f"path: {exc} (expected a DINOv2 state dict)") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # some exports wrap the weights
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"path: {path} does not hold a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    config = config_from_original(state)
    model: Dinov2Model = transformers.Dinov2Model(config)
    model_keys = model.state_dict().keys()
    converted = original_to_hf(state, model_keys)
    missing = sorted(set(model_keys) - set(converted))
    unexpected = sorted(set(converted) - set(model_keys))
    if missing or unexpected:
        raise ValueError(f"path: {path} does not match DINOv2 (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"path: {path}: tensor shapes do not match DINOv2: {exc}") from exc
    return model


def _load_hf_folder(path: Path) -> Dinov2Model:
    transformers = _require_transformers()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"path: {path} has no config.json (expected a facebook/dinov2-base folder)")
    try:
        model_type = json_object(read_json(config_file), str(config_file)).get("model_type")
    except OSError as exc:
        raise ValueError(f"path: unreadable {config_file}: {exc}") from exc
    except UntrustedFileError as exc:
        raise ValueError(f"path: {exc}") from None
    if model_type != "dinov2":
        raise ValueError(f"path: {config_file} is model_type {model_type!r}, expected 'dinov2'")

    try:
        model: Dinov2Model = transformers.Dinov2Model.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ValueError(f"path: cannot load the DINOv2 folder {path}: {first_line(exc)}") from exc
    return model


def load_repa_encoder(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, base_patch_size: int = 16) -> RepaEncoder:
    """REPA's frozen DINOv2 from an original `.pth` state dict or a Hugging Face folder.

    dtype: default bfloat16 on CUDA (the release trains REPA under bf16), float32 elsewhere.
    A missing or malformed path raises FileNotFoundError/ValueError with a one-line message."""
    path = Path(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(base_patch_size, int) or base_patch_size < 1:
        raise ValueError(f"base_patch_size: expected a positive int, got {base_patch_size!r}")
    if not path.exists():
        raise FileNotFoundError(f"path: no such file or folder: {path}")
    with quiet_transformers():
        model = _load_hf_folder(path) if path.is_dir() else _load_original(path)
    return RepaEncoder(model, base_patch_size).to(device=device, dtype=dtype)
