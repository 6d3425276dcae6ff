"""Building blocks of the fast DeCo model (spec/03-model.md), each mirroring a reference function.

Attribute names follow the portable weight names of `deco.config.parameter_shapes`, so a module's
`state_dict()` *is* a portable weight file. Shapes: B batch, L tokens, D hidden, N = B*L patches,
P = p*p pixels per patch, w decoder width.

Constant tables (RoPE angles, DCT position features, time frequencies) are computed in `forward`
from shapes with plain torch ops: they cost microseconds, need no cache keyed by device/dtype,
and `torch.compile` and the ONNX exporter fold them into constants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deco.config import DCT_FREQS, NORM_EPS, ROPE_SPAN, ROPE_THETA, TIME_FREQ_DIM, TIME_MAX_PERIOD

from .gemm import Linear, is_tracing, linear


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    """Constant tables are built in float64 for float64 models, float32 otherwise (also for
    bfloat16/float16 models: the angles need float32, and MPS has no float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine over the last axis: (x - mean) / sqrt(var + 1e-6).

    Without autograd it is written as centring + F.rms_norm: on the decoder's narrow (w = 32)
    rows that is ~2x faster than F.layer_norm on the CPU. With autograd F.layer_norm wins: its
    backward is one fused kernel, the other's a chain of elementwise ops."""
    if (torch.is_grad_enabled() and x.requires_grad) or torch.onnx.is_in_onnx_export():
        # (exported as the one ONNX LayerNormalization op, which onnxruntime runs as one kernel)
        return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)
    return F.rms_norm(x - x.mean(-1, keepdim=True), (x.shape[-1],), eps=NORM_EPS)


# ------------------------------------------------------------------------------------ embeddings
def timestep_features(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t (B,) -> (B, 256) [cos(t f_k), sin(t f_k)], f_k = 10^(-k/128), computed in at least
    float32 and returned in `dtype`."""
    half = TIME_FREQ_DIM // 2
    tdt = table_dtype(dtype)
    k = torch.arange(half, device=t.device, dtype=tdt)
    freqs = torch.exp(k * (-math.log(TIME_MAX_PERIOD) / half))  # (128,)
    args = t.to(tdt)[:, None] * freqs[None, :]  # (B, 128)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): fc2(silu(fc1(timestep_features(t))))."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc1 = Linear(TIME_FREQ_DIM, hidden_size)
        self.fc2 = Linear(hidden_size, hidden_size)

    def forward(self, t: Tensor) -> Tensor:
        """t (B,) in the compute dtype (the model's `check_inputs` casts it) -> (B, D). The
        features take t's dtype, not fc1's: a weight read outside fc1 would see its storage dtype
        under diffusers' layerwise casting, which casts a weight only while its module runs."""
        feats = timestep_features(t, t.dtype)  # (B, 256)
        out: Tensor = self.fc2(F.silu(self.fc1(feats)))  # (B, D)
        return out


# ------------------------------------------------------------------------------------------ RoPE
def rope_angles(grid_h: int, grid_w: int, head_dim: int, device: torch.device,
                dtype: torch.dtype, spans: tuple[float, float] = (ROPE_SPAN, ROPE_SPAN)
                ) -> tuple[Tensor, Tensor]:
    """The RoPE angles of spec/03 §4 as the tables the model uses: (cos, sin), each
    (L, 1, head_dim/2) (the reference returns the angles themselves). Pair k rotates by
    pos_x f_{k//2} (even k) or pos_y f_{k//2} (odd k), f_j = 10000^(-4j/head_dim), positions
    pos_x = linspace(0, spans[0], grid_w) and pos_y = linspace(0, spans[1], grid_h) (the class
    models: both spans 16)."""
    tdt = table_dtype(dtype)
    freqs = ROPE_THETA ** (-torch.arange(0, head_dim, 4, device=device, dtype=tdt) / head_dim)
    pos_y = torch.linspace(0, spans[1], grid_h, device=device, dtype=tdt)
    pos_x = torch.linspace(0, spans[0], grid_w, device=device, dtype=tdt)
    ax = pos_x[None, :, None] * freqs  # (1, gw, hd/4): varies along a row
    ay = pos_y[:, None, None] * freqs  # (gh, 1, hd/4)
    shape = (grid_h, grid_w, head_dim // 4)
    angles = torch.stack([ax.expand(shape), ay.expand(shape)], dim=-1)  # (gh, gw, hd/4, 2)
    angles = angles.reshape(grid_h * grid_w, 1, head_dim // 2)  # (L, 1, hd/2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def text_rope_angles(grid_h: int, grid_w: int, head_dim: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The text-to-image model's RoPE (spec/06-text-to-image.md): the span of each axis is a grid
    size, crossed as in the release: x positions (along a row) run to grid_h, y positions to grid_w."""
    return rope_angles(grid_h, grid_w, head_dim, device, dtype, spans=(grid_h, grid_w))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the adjacent pairs (x[2k], x[2k+1]) of x (B, L, heads, hd) with real arithmetic
    (complex tensors block ONNX export and are slow on CPU)."""
    a, b = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)  # each (B, L, heads, hd/2)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


# ------------------------------------------------------------------------------------ DiT block
def split_product(x: Tensor, layer: Linear, parts: int) -> tuple[Tensor, ...]:
    """layer(x).chunk(parts, dim=-1) for a layer without bias. In an ONNX export it is written as
    `parts` products of row blocks of the weight: onnxruntime copies each slice of one product's
    output, where separate products write their own (bench/RESULTS.md §6). Eager torch slices
    views of one product, which copies nothing."""
    if torch.onnx.is_in_onnx_export():
        return tuple(F.linear(x, w) for w in layer.weight.chunk(parts))
    out: Tensor = layer(x)
    return out.chunk(parts, dim=-1)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + 1e-6) * weight over the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Under autocast x may be bfloat16 while the gain is float32: match it, or the fused
        # kernel is skipped.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), NORM_EPS)


class Attention(nn.Module):
    """Multi-head self-attention, fused QKV (no bias), RMS qk-norm and 2-D RoPE.

    joint: also attend to text tokens (the text-to-image DiT blocks): they are projected by
    `kv_text` (no bias) to extra keys and values, their keys normalised by the same k_norm and
    not rotated. Without RoPE tables (cos = sin = None: the text refine blocks) nothing rotates."""

    def __init__(self, hidden_size: int, num_heads: int, joint: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim = hidden_size // num_heads
        self.qkv = Linear(hidden_size, 3 * hidden_size, bias=False)
        self.kv_text = Linear(hidden_size, 2 * hidden_size, bias=False) if joint else None
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                text: Tensor | None = None) -> Tensor:
        """x (B, L, D), text (B, T, D) for a joint block -> (B, L, D)."""
        b, n, d = x.shape
        q, k, v = self.project(x, cos, sin, text)
        # SDPA wants (B, h, L, hd); its default scale is 1/sqrt(hd), as in the spec.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        proj: Tensor = self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, L, D)
        return proj

    def project(self, x: Tensor, cos: Tensor | None, sin: Tensor | None,
                text: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The attention's inputs: q (B, L, h, hd) and k, v (B, L(+T), h, hd), normalised and
        rotated. A method of its own so that other attention kernels (deco.diffusers' attention
        processors) reuse the projections and run only the attention itself."""
        b, n, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        q, k, v = (part.view(b, n, heads, hd) for part in split_product(x, self.qkv, 3))  # (B, L, h, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_text is not None:
            if text is None:
                raise ValueError("text: a joint attention block needs the text tokens")
            k_text, v_text = (part.view(b, text.shape[1], heads, hd)
                              for part in split_product(text, self.kv_text, 2))
            k = torch.cat([k, self.k_norm(k_text)], dim=1)  # (B, L + T, h, hd)
            v = torch.cat([v, v_text], dim=1)
        return q, k, v


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, hidden_size: int, inner: int) -> None:
        super().__init__()
        self.w1 = Linear(hidden_size, inner, bias=False)
        self.w3 = Linear(hidden_size, inner, bias=False)
        self.w2 = Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out


class FusedSwiGLU(nn.Module):
    """The text-to-image model's SwiGLU: (a, b) = halves of w12 x; w3(silu(a) * b), no biases.
    The same function as `SwiGLU` with w12 = [w1; w3] and w3 in the place of w2; kept apart
    because the weight files name and stack the matrices differently."""

    def __init__(self, hidden_size: int, inner: int) -> None:
        super().__init__()
        self.w12 = Linear(hidden_size, 2 * inner, bias=False)
        self.w3 = Linear(inner, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = split_product(x, self.w12, 2)  # each (..., F)
        out: Tensor = self.w3(F.silu(a) * b)
        return out


class DiTBlock(nn.Module):
    """AdaLN block (attention + SwiGLU) conditioned on c (B, D): silu(t_emb + y_emb) in the class
    models, silu(t_emb) in the text model.

    fused_mlp: the text model's `FusedSwiGLU`. joint: the attention also reads text tokens
    (`Attention(joint=True)`): the text-to-image DiT blocks; its refine blocks are not joint."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, joint: bool = False,
                 fused_mlp: bool = False) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, joint=joint)
        self.norm2 = RMSNorm(hidden_size)
        mlp = FusedSwiGLU if fused_mlp else SwiGLU
        self.mlp: nn.Module = mlp(hidden_size, mlp_hidden)
        self.adaln = Linear(hidden_size, 6 * hidden_size)

    def forward(self, x: Tensor, c: Tensor, cos: Tensor | None, sin: Tensor | None,
                text: Tensor | None = None) -> Tensor:
        """x (B, L, D), c (B, D), RoPE tables or None, text (B, T, D) for a joint block."""
        # c is already silu(...): the adaln linear takes it directly.
        mod = self.adaln(c).unsqueeze(1)  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)  # modulate, one pass
        x = torch.addcmul(x, gate1, self.attn(h, cos, sin, text))
        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        return torch.addcmul(x, gate2, self.mlp(h))  # (B, L, D)


class LinearHead(nn.Module):
    """The baseline's de-patch head: LayerNorm (no affine), AdaLN shift/scale from c, linear."""

    def __init__(self, hidden_size: int, out_features: int) -> None:
        super().__init__()
        self.adaln = Linear(hidden_size, 2 * hidden_size)
        self.linear = Linear(hidden_size, out_features)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaln(c).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        out: Tensor = self.linear(torch.addcmul(shift, layer_norm(x), 1 + scale))  # (B, L, C*p*p)
        return out


# --------------------------------------------------------------------------------- pixel decoder
def dct_position_features(p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(P, 64) DCT position features of the pixels of a p x p patch, row-major: feature a*8 + b
    of pixel (i, j) is cos(pi x_j f_a) cos(pi y_i f_b) / (1 + f_a f_b), f = linspace(0, 8, 8)."""
    tdt = table_dtype(dtype)
    f = torch.linspace(0, DCT_FREQS, DCT_FREQS, device=device, dtype=tdt)
    pos = torch.linspace(0, 1, p, device=device, dtype=tdt)
    cx = torch.cos(math.pi * pos[None, :, None, None] * f[:, None])  # (1, p_j, 8_a, 1)
    cy = torch.cos(math.pi * pos[:, None, None, None] * f)  # (p_i, 1, 1, 8_b)
    scale = 1.0 / (1.0 + f[:, None] * f)  # (8_a, 8_b)
    return (cx * cy * scale).reshape(p * p, DCT_FREQS * DCT_FREQS).to(dtype)


def text_position_features(p: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(P, 64) position features of the text model's pixel decoder: the real part of the
    release's complex RoPE table over the p x p patch with dim 128, i.e. the cosines of
    `text_rope_angles(p, p, 128)`: feature 2k is cos(x_j f_k), 2k+1 cos(y_i f_k) for pixel (i, j),
    f_k = 10000^(-k/32), x_j, y_i in linspace(0, p, p)."""
    cos, _ = text_rope_angles(p, p, 2 * DCT_FREQS * DCT_FREQS, device, dtype)  # (P, 1, 64)
    return cos.reshape(p * p, DCT_FREQS * DCT_FREQS)


def image_to_pixels(x: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (N, P, C) pixels: patches row-major, pixels row-major inside a patch.

    An ONNX export writes it as two transposes, channels last first and then (p*C)-value blocks:
    onnxruntime runs those 4x faster than the one six-axis permutation (bench/RESULTS.md §6)."""
    b, c, h, w = x.shape
    gh, gw = h // p, w // p
    if torch.onnx.is_in_onnx_export():
        nhwc = x.permute(0, 2, 3, 1).reshape(b, gh, p, gw, p * c)
        return nhwc.transpose(2, 3).reshape(b * gh * gw, p * p, c)
    return x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b * gh * gw, p * p, c)


def pixels_to_image(rows: Tensor, b: int, c: int, h: int, w: int, p: int) -> Tensor:
    """(N*P, C) rows in the order of `image_to_pixels` -> (B, C, H, W) (in an export also as two
    transposes)."""
    gh, gw = h // p, w // p
    if torch.onnx.is_in_onnx_export():
        nhwc = rows.view(b, gh, gw, p, p * c).transpose(2, 3).reshape(b, h, w, c)
        return nhwc.permute(0, 3, 1, 2)
    return rows.view(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class DecoderBlock(nn.Module):
    """Attention-free AdaLN MLP block applied to every pixel: (N*P, w) with condition u (N*P, w).

    Spec: (shift, scale, gate) = adaln(u); z + gate * fc2(silu(fc1(LN(z) (1+scale) + shift))),
    LN with affine (g, b). Since (x g + b)(1 + scale) + shift is affine in u, the LayerNorm
    affine and the "1 +" are folded into the adaln weights (`modulation_weights`), so the block
    runs a LayerNorm without affine and one addcmul instead of four elementwise passes per pixel.
    `unfolded` is the spec's form, which reads norm's and adaln's weights only inside their own
    forward (see `PixelDecoder.folding`).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS)
        self.fc1 = Linear(width, width)
        self.fc2 = Linear(width, width)
        self.adaln = Linear(width, 3 * width)

    def modulation_weights(self) -> tuple[Tensor, Tensor]:
        """(3w, w) weight and (3w,) bias mapping u to (shift', scale', gate) with
        LN(z)(1 + scale) + shift = layer_norm(z) * scale' + shift' (layer_norm without affine)."""
        g, b = self.norm.weight, self.norm.bias
        w_shift, w_scale, w_gate = self.adaln.weight.chunk(3, dim=0)
        b_shift, b_scale, b_gate = self.adaln.bias.chunk(3, dim=0)
        weight = torch.cat([w_shift + b[:, None] * w_scale, g[:, None] * w_scale, w_gate])
        bias = torch.cat([b_shift + b * (1 + b_scale), g * (1 + b_scale), b_gate])
        return weight, bias

    def forward(self, z: Tensor, mod: Tensor) -> Tensor:
        """z (N*P, w); mod (N*P, 3w) = F.linear(u, *modulation_weights())."""
        shift, scale, gate = mod.chunk(3, dim=-1)
        return self.residual(z, torch.addcmul(shift, layer_norm(z), scale), gate)

    def unfolded(self, z: Tensor, u: Tensor) -> Tensor:
        """z (N*P, w), u (N*P, w) -> (N*P, w) as the spec writes it: norm(z) (1 + scale) + shift."""
        shift, scale, gate = self.adaln(u).chunk(3, dim=-1)
        return self.residual(z, torch.addcmul(shift, self.norm(z), 1 + scale), gate)

    def residual(self, z: Tensor, h: Tensor, gate: Tensor) -> Tensor:
        """z + gate * fc2(silu(fc1(h))), h the modulated normalised z."""
        return torch.addcmul(z, gate, self.fc2(F.silu(self.fc1(h))))  # (N*P, w)


class PixelDecoder(nn.Module):
    """DeCo's per-pixel decoder: noisy pixels + DCT positions, conditioned per pixel on the DiT's
    semantic tokens, -> velocity. Works on (rows, w) matrices: each row is one pixel.

    On the CPU the pixels are decoded `chunk_rows` at a time: the decoder is a chain of
    memory-bound passes over (N*P, w) activations (tens of MB each at 256x256). Chunks of a few
    MB stay in cache and are recycled by malloc instead of being mapped and page-faulted afresh
    for every op, which makes the decoder several times faster. Elsewhere, and while tracing or
    compiling (the loop would be unrolled for one shape), it is one chunk.

    Weight folding: by default the decoder folds the weights of its affine layers together before
    use (`embed_weights`, `DecoderBlock.modulation_weights`; bench/RESULTS.md §9), reading them
    outside those layers' own forward. Hooks that change a layer's weights only while its
    forward runs (diffusers' leaf-level group offloading, accelerate's disk offload and device
    maps, layerwise casting) or that replace the layer (a peft LoRA layer) would not act there,
    so `folding` falls back to the unfolded form, which calls every layer. `fold_weights` (set it
    with `DeCo.set_weight_folding`) turns folding off outright.

    positions: the 64 per-pixel position features, "dct" (`dct_position_features`, the class models) or
    "rope" (`text_position_features`, the text model).
    """

    chunk_rows = 8192

    def __init__(self, in_channels: int, patch_size: int, hidden_size: int, width: int,
                 depth: int, positions: str = "dct") -> None:
        super().__init__()
        if positions not in ("dct", "rope"):
            raise ValueError(f"positions: expected 'dct' or 'rope', got {positions!r}")
        self.patch_size = patch_size
        self.positions = positions
        self.fold_weights = True
        self.pixel_embed = Linear(in_channels + DCT_FREQS * DCT_FREQS, width)
        self.cond_proj = Linear(hidden_size, patch_size * patch_size * width)
        self.input_proj = Linear(width, width)
        self.blocks = nn.ModuleList([DecoderBlock(width) for _ in range(depth)])
        self.final = Linear(width, in_channels)

    def folding(self) -> bool:
        """Whether this call folds: `fold_weights` is on and every folded layer is a plain `Linear`
        or `nn.LayerNorm` with its class's forward (diffusers' and accelerate's hooks set an
        instance `forward`, peft and quantizers replace the class; a torch forward hook, which
        sees the call and not the weights, does not count). A few attribute reads per call."""
        if not self.fold_weights:
            return False
        layers: list[tuple[nn.Module, type]] = [(self.pixel_embed, Linear), (self.input_proj, Linear)]
        for block in self.blocks:
            assert isinstance(block, DecoderBlock)
            layers += [(block.norm, nn.LayerNorm), (block.adaln, Linear)]
        return all(type(layer) is cls and "forward" not in vars(layer) for layer, cls in layers)

    def position_features(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The (P, 64) per-pixel position features of `positions`."""
        # Looked up at call time (not stored) so that tests can substitute the table function.
        features = dct_position_features if self.positions == "dct" else text_position_features
        return features(self.patch_size, device, dtype)

    def embed_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w, C) weight and (P, w) bias with input_proj(pixel_embed([pixel, pos])) = pixel @ W.T
        + bias. The position features are the same for every patch, so their share of pixel_embed is a
        per-pixel bias computed once; input_proj is affine too, so it is composed in."""
        c = self.final.out_features
        w_pix, w_pos = self.pixel_embed.weight[:, :c], self.pixel_embed.weight[:, c:]
        pos = self.position_features(w_pos.device, dtype)  # (P, 64)
        bias = self.input_proj(F.linear(pos, w_pos, self.pixel_embed.bias))  # (P, w)
        return self.input_proj.weight @ w_pix, bias

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        """x (B, C, H, W) noisy image, s (B, L, D) semantic condition -> velocity (B, C, H, W)."""
        b, c, h, w_img = x.shape
        pixels = image_to_pixels(x, self.patch_size)  # (N, P, C)
        out = self.rows(pixels, s.reshape(pixels.shape[0], s.shape[-1]))  # (N*P, C)
        return pixels_to_image(out, b, c, h, w_img, self.patch_size)  # (B, C, H, W)

    def rows(self, pixels: Tensor, s: Tensor) -> Tensor:
        """pixels (N, P, C), s (N, D) -> velocity rows (N*P, C). (The ONNX export may stand in
        its own lowering for this method: deco.onnx_optimize.)"""
        folded: tuple[tuple[Tensor, Tensor], list[tuple[Tensor, Tensor]]] | None = None
        if self.folding():
            folded = (self.embed_weights(pixels.dtype),
                      [block.modulation_weights() for block in self.blocks
                       if isinstance(block, DecoderBlock)])
        cond = self.cond_proj(s)  # (N, P*w): one GEMM, weight read once
        n, pp = pixels.shape[0], pixels.shape[1]
        chunked = pixels.device.type == "cpu" and not is_tracing()
        chunks = max(1, -(-n // max(1, self.chunk_rows // pp))) if chunked else 1
        # chunk (not slicing): its backward is one cat, not a full-size zero tensor per chunk.
        pairs = zip(pixels.chunk(chunks), cond.chunk(chunks), strict=True)
        if folded is not None:
            return torch.cat([self.decode(pix, con, *folded) for pix, con in pairs])  # (N*P, C)
        pos = self.position_features(pixels.device, pixels.dtype)  # (P, 64), once for all chunks
        return torch.cat([self.decode_unfolded(pix, con, pos) for pix, con in pairs])  # (N*P, C)

    def decode(self, pixels: Tensor, cond: Tensor, embed: tuple[Tensor, Tensor],
               mods: list[tuple[Tensor, Tensor]]) -> Tensor:
        """pixels (n, P, C), cond (n, P*w) -> velocity rows (n*P, C), with folded weights."""
        width = self.final.in_features
        rows = pixels.shape[0] * pixels.shape[1]
        z = linear(pixels, embed[0]).add_(embed[1]).view(rows, width)  # (n*P, w)
        u = F.silu(cond.view(rows, width))  # (n*P, w), shared by every block's adaln
        for block, mod in zip(self.blocks, mods, strict=True):
            z = block(z, linear(u, *mod))
        out: Tensor = self.final(layer_norm(z))  # (n*P, C)
        return out

    def decode_unfolded(self, pixels: Tensor, cond: Tensor, pos: Tensor) -> Tensor:
        """`decode` as the spec writes it, every weight read inside its own layer's forward;
        pos: the (P, 64) `position_features`."""
        width = self.final.in_features
        n, pp = pixels.shape[0], pixels.shape[1]
        features = torch.cat([pixels, pos.expand(n, pp, -1)], dim=-1)  # (n, P, C + 64)
        z = self.input_proj(self.pixel_embed(features))  # (n, P, w)
        z = z.reshape(n * pp, width)
        u = F.silu(cond.view(n * pp, width))  # (n*P, w)
        for block in self.blocks:
            assert isinstance(block, DecoderBlock)
            z = block.unfolded(z, u)
        out: Tensor = self.final(layer_norm(z))  # (n*P, C)
        return out
