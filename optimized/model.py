"""DeCo and the baseline DiT as `nn.Module`s (spec/03-model.md), sharing one DiT trunk.

`DeCo(config)(x, t, y)` and `BaselineDiT(config)(x, t, y)` return the velocity (B, C, H, W) for
noisy images x (B, C, H, W) (H, W multiples of the patch size; RoPE makes any grid valid), times
t (B,) in [0, 1] (t = 1 is data) and labels y (B,) in 0..num_classes (num_classes = null class).
`state_dict()` uses exactly the portable names and shapes of `deco.config.parameter_shapes`.
`build_model` (which picks the class from the config), `load_model` and `save_model` are in
`weights.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch import Tensor, nn

from deco.atomic import atomic_write
from deco.config import DeCoConfig
from deco.portable import FORMAT_KEY, FORMAT_VERSION

from .gemm import Linear
from .layers import (
    Attention,
    DecoderBlock,
    DiTBlock,
    LinearHead,
    PixelDecoder,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    dct_position_features,
    layer_norm,
    rope_angles,
    timestep_features,
)


def checkpoint_block(block: nn.Module, *args: Any) -> Tensor:
    """block(*args) under activation checkpointing: only the inputs are kept for backward and
    the block's forward runs again there (non-reentrant: works with frozen inputs and kwargs-free
    calls, and gives the plain gradients exactly). The signature of diffusers'
    `_gradient_checkpointing_func`, which `enable_gradient_checkpointing` may replace it with."""
    out: Tensor = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return out


class DiffusionTransformer(nn.Module):
    """The DiT trunk shared by `DeCo` and `BaselineDiT`: time/label embeddings, a linear patch
    embedding and `config.depth` AdaLN blocks with 2-D RoPE attention.

    `gradient_checkpointing` (default off; `set_gradient_checkpointing`, `deco train
    --grad-checkpointing`, diffusers' `enable_gradient_checkpointing`): while gradients are
    recorded, every DiT block (and the text model's refine blocks) keeps only its input and is
    recomputed in backward, trading one more forward of the blocks for their activations.

    Initialisation is DiT's: xavier-uniform linears with zero biases, normal(0.02) label table
    and time-MLP weights, unit norm gains. Like the release, the DiT blocks' adaln is *not*
    zeroed (the release comments AdaLN-Zero out); the subclasses zero their output layers as the
    release does. (The release leaves the DiT blocks' linears at PyTorch's default init.)
    """

    def __init__(self, config: DeCoConfig) -> None:
        super().__init__()
        if not isinstance(config, DeCoConfig):
            raise TypeError(f"config: expected a DeCoConfig, got {type(config).__name__}")
        self.config = config
        h = config.hidden_size
        self.t_embed = TimestepEmbedder(h)
        self.build_condition()
        self.patch_embed = Linear(config.in_channels * config.patch_size**2, h)
        # The text model's blocks also attend to its text tokens, with the fused SwiGLU layout.
        text = config.is_text
        self.blocks = nn.ModuleList([
            DiTBlock(h, config.num_heads, config.mlp_hidden, joint=text, fused_mlp=text)
            for _ in range(config.depth)
        ])
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = checkpoint_block

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn activation checkpointing of the blocks on or off (see the class docstring)."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
        self.gradient_checkpointing = enabled

    def run_block(self, block: nn.Module, *args: Any) -> Tensor:
        """block(*args), checkpointed when `gradient_checkpointing` is on and autograd records."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        out: Tensor = block(*args)
        return out

    def build_condition(self) -> None:
        """Create the condition's embedding: the label table (the text model overrides this)."""
        self.y_embed = nn.Embedding(self.config.num_classes + 1, self.config.hidden_size)

    def init_condition(self) -> None:
        """Initialise what `build_condition` made, after the generic linear init."""
        nn.init.normal_(self.y_embed.weight, std=0.02)

    def condition(self, t_emb: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """(c (B, D) for every AdaLN, extra tokens the DiT blocks attend to or None)."""
        return F.silu(t_emb + self.y_embed(y)), None

    def rope(self, grid_h: int, grid_w: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The DiT's RoPE tables (L, 1, hd/2) for a grid_h x grid_w token grid."""
        return rope_angles(grid_h, grid_w, self.config.head_dim, like.device, like.dtype)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.init_condition()
        nn.init.normal_(self.t_embed.fc1.weight, std=0.02)
        nn.init.normal_(self.t_embed.fc2.weight, std=0.02)

    # ------------------------------------------------------------------------------- inputs
    def check_inputs(self, x: Any, t: Any, y: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Validate (x, t, y) and return them as (x, t (B,), y) in the model's dtype; a 0-d t is
        broadcast over the batch. Errors name the argument.

        Only types and shapes are checked, never values: reading a value of a CUDA tensor on the
        host would synchronise the device on every model call and cannot happen inside CUDA-graph
        capture. So the label range is *not* checked here; a label outside 0..num_classes in a
        raw forward is undefined (the CPU embedding lookup raises IndexError, a CUDA one trips a
        device-side assert). `deco.optimized.sample` and `Trainer.step` check it once per call."""
        cfg = self.config
        x, t = check_image_and_time(cfg, x, t)
        b = x.shape[0]
        if isinstance(y, Tensor) and y.is_floating_point() and y.ndim == 3:
            raise TypeError(f"y: expected an integer torch.Tensor of class labels, got a float tensor "
                            f"of shape {tuple(y.shape)} (text embeddings are for a text-to-image model)")
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y: expected an integer torch.Tensor of labels, got {_describe(y)}")
        if tuple(y.shape) != (b,):
            raise ValueError(f"y: expected shape ({b},), got {tuple(y.shape)}")
        dtype = self.patch_embed.weight.dtype
        return x.to(dtype), t.to(dtype), y.long()

    # -------------------------------------------------------------------------------- trunk
    def trunk(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Checked inputs -> (tokens after the blocks (B, L, D), t_emb (B, D), c (B, D))."""
        p = self.config.patch_size
        gh, gw = x.shape[2] // p, x.shape[3] // p
        t_emb = self.t_embed(t)  # (B, D)
        c, context = self.condition(t_emb, y)  # (B, D), text tokens (B, T, D) or None
        tokens = self.patch_embed(patchify(x, p))  # (B, L, D)
        cos, sin = self.rope(gh, gw, tokens)  # (L, 1, hd/2)
        for block in self.blocks:
            tokens = self.run_block(block, tokens, c, cos, sin, context)
        return tokens, t_emb, c

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the weights and config to a DeCo `.safetensors` file (spec/05) atomically
        (temporary file in the same folder, fsync, rename). dtype: default float64 for float64
        models, float32 otherwise (the format is read with NumPy by the reference, which has no
        bfloat16)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"path: folder {path.parent} does not exist")
        if dtype is None:
            dtype = torch.float64 if self.patch_embed.weight.dtype == torch.float64 else torch.float32
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        meta = {FORMAT_KEY: FORMAT_VERSION, "config": self.config.to_json()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, L, C*p*p) patches, row-major, with a view + permute (no unfold):
    feature index c*p*p + i*p + j, as the release's unfold."""
    b, ch, h, w = x.shape
    gh, gw = h // p, w // p
    return x.reshape(b, ch, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, ch * p * p)


def check_image_and_time(cfg: DeCoConfig, x: Any, t: Any) -> tuple[Tensor, Tensor]:
    """Validate the image batch x (B, C, H, W) and times t ((B,), 0-d or a number); returns
    (x, t (B,)) unconverted. Shared by every model kind; errors name the argument."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {_describe(x)}")
    if x.ndim != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x: expected shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
    p = cfg.patch_size
    if x.shape[2] % p or x.shape[3] % p or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(
            f"x: height and width must be positive multiples of patch_size={p}, "
            f"got {x.shape[2]}x{x.shape[3]}"
        )
    b = x.shape[0]
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        t = torch.tensor(float(t), dtype=torch.float64, device=x.device)
    if not isinstance(t, Tensor) or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t: expected a real torch.Tensor or number, got {_describe(t)}")
    if t.ndim == 0:
        t = t.expand(b)
    if tuple(t.shape) != (b,):
        raise ValueError(f"t: expected shape ({b},), got {tuple(t.shape)}")
    return x, t


class DeCo(DiffusionTransformer):
    """DeCo: the DiT trunk models low frequencies on patches; a light per-pixel decoder
    conditioned on its tokens produces the velocity (high frequencies) at full resolution.

    The decoder's adaln and final linear are zero-initialised (as in the release), so a fresh
    model predicts zero velocity."""

    architecture = "deco"  # the config's architecture this class builds (`TextDeCo`: "t2i")

    def __init__(self, config: DeCoConfig) -> None:
        if isinstance(config, DeCoConfig) and config.architecture != self.architecture:
            raise ValueError(f"config: {type(self).__name__} needs architecture="
                             f"{self.architecture!r}, got {config.architecture!r}")
        super().__init__(config)
        # The text model's decoder takes RoPE-style position features instead of the DCT ones.
        self.decoder = PixelDecoder(config.in_channels, config.patch_size, config.hidden_size,
                                    config.decoder_width, config.decoder_depth,
                                    positions="rope" if config.is_text else "dct")
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        for block in self.decoder.blocks:
            assert isinstance(block, DecoderBlock)
            nn.init.zeros_(block.adaln.weight)
            nn.init.zeros_(block.adaln.bias)
        nn.init.zeros_(self.decoder.final.weight)
        nn.init.zeros_(self.decoder.final.bias)

    def set_weight_folding(self, enabled: bool = True) -> None:
        """Let the pixel decoder fold its layers' weights together (the default, fast) or run every
        layer as the spec writes it (`PixelDecoder.folding`: hooked or replaced layers turn
        folding off by themselves). The outputs agree to rounding."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
        self.decoder.fold_weights = enabled

    def semantic_tokens(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Checked inputs -> s = silu(t_emb + DiT tokens) (B, L, D), the decoder's condition."""
        tokens, t_emb, _ = self.trunk(x, t, y)
        return F.silu(t_emb.unsqueeze(1) + tokens)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, H, W)."""
        x, t, y = self.check_inputs(x, t, y)
        out: Tensor = self.decoder(x, self.semantic_tokens(x, t, y))
        return out

    def semantic(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The decoder's condition silu(t_emb + s) laid out as (B, D, H/p, W/p)."""
        x, t, y = self.check_inputs(x, t, y)
        s = self.semantic_tokens(x, t, y)  # (B, L, D)
        p = self.config.patch_size
        return s.view(x.shape[0], x.shape[2] // p, x.shape[3] // p, s.shape[-1]).permute(0, 3, 1, 2)


class BaselineDiT(DiffusionTransformer):
    """The paper's baseline: the same DiT, all `config.depth` blocks, then a linear de-patch head
    (LayerNorm, AdaLN shift/scale, linear to C*p*p). Head adaln and linear are zero-initialised."""

    def __init__(self, config: DeCoConfig) -> None:
        super().__init__(config)
        if config.architecture != "baseline":
            raise ValueError(
                f"config: BaselineDiT needs architecture='baseline', got {config.architecture!r}"
            )
        self.head = LinearHead(config.hidden_size, config.in_channels * config.patch_size**2)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        for layer in (self.head.adaln, self.head.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """Velocity (B, C, H, W)."""
        x, t, y = self.check_inputs(x, t, y)
        tokens, _, c = self.trunk(x, t, y)
        out: Tensor = self.head(tokens, c)  # (B, L, C*p*p)
        b, ch, h, w = x.shape
        p = self.config.patch_size
        return out.view(b, h // p, w // p, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


#: The optimized object that implements each function of reference/model.py (spec/03) that has no
#: twin of the same name here: the blocks live in layers.py as `nn.Module`s, and the reference's
#: whole-model functions are methods of the model classes. (The table functions of layers.py,
#: `rope_angles`, `apply_rope`, `timestep_features`, `dct_position_features` and `layer_norm`, are
#: imported here under their reference names.)
REFERENCE_TWINS: dict[str, object] = {
    "linear": Linear,
    "silu": F.silu,
    "rms_norm": RMSNorm,
    "modulate": DiTBlock,  # adaLN modulation, fused into the block's forward
    "timestep_embedding": TimestepEmbedder,
    "label_embedding": nn.Embedding,  # DiffusionTransformer.y_embed
    "unpatchify": BaselineDiT.forward,  # DeCo's decoder writes pixels in image layout directly
    "attention": Attention,
    "swiglu": SwiGLU,
    "dit_block": DiTBlock,
    "decoder_block": DecoderBlock,
    "pixel_decoder": PixelDecoder,
    "dit_trunk": DiffusionTransformer.trunk,
    "deco_semantic": DeCo.semantic,
    "deco_forward": DeCo.forward,
    "baseline_forward": BaselineDiT.forward,
}


__all__ = [
    "REFERENCE_TWINS", "BaselineDiT", "DeCo", "DiffusionTransformer", "apply_rope", "check_image_and_time",
    "checkpoint_block",
    "dct_position_features", "layer_norm", "patchify", "rope_angles", "timestep_features",
]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype}"
    return type(value).__name__
