"""Convention points of spec/03 (the model) and spec/06 (the text-to-image model), as variants of
the reference (deco.conformance.catalogue): the time features' layout and constants (03 §2), the
conditioning's SiLUs (§2, §5), RoPE's positions, frequencies and pairing (§4), attention (§4),
the block's AdaLN chunks and modulation (§4), the norms' epsilons (§1), the decoder's position
features, condition layout and norms (§6), the baseline head (§7); the text model's RoPE spans,
decoder features, text embedding and joint attention (06 §2-§5). Each function below is the
reference's, with the convention point as a keyword."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from deco.conformance.catalogue import (
    ANY_MODEL,
    CLASS_MODEL,
    TEXT_MODEL,
    Variant,
    constant,
    replace,
    variant,
    wrap,
)

M = "deco.reference.model"
T = "deco.reference.text_to_image"
TIME = ("timestep_features", *ANY_MODEL)
ROPE = ("rope_angles", "text_rope_angles", *ANY_MODEL)
APPLY = ("apply_rope", "dit_block", "joint_dit_block", *ANY_MODEL)
ATTN = ("dit_block", "joint_dit_block", "text_refine_block", *ANY_MODEL)
DCT_FEATURES = ("dct_position_features", *CLASS_MODEL)
DECODER = ("decoder_block", *ANY_MODEL)
TEXT_FEATURES = ("text_position_features", *TEXT_MODEL)


def _m() -> Any:
    from deco.reference import model
    return model


def _time_frequency_shift(t: Any) -> Any:
    """03 §2's features with the exponent over half - 1 (the module's period, so that a patched
    period composes with it)."""
    args = np.asarray(t)[:, None] * np.exp(-np.log(_m().TIME_MAX_PERIOD) * np.arange(128) / 127)
    return np.concatenate([np.cos(args), np.sin(args)], axis=-1)


def _time_input(change: Callable[[Any], Any]) -> Callable[..., Any]:
    """A wrapper of the time features that changes the time first (composes with the others)."""
    return lambda old: lambda t: old(change(np.asarray(t, dtype=np.float64)))


def _rope(*, positions: str = "linspace", exponent: float = 4.0) -> Callable[..., Any]:
    def rope_angles(grid_h: int, grid_w: int, head_dim: int, span_x: float = 16.0,
                    span_y: float = 16.0) -> Any:
        freqs = 10000.0 ** (-exponent * np.arange(head_dim // 4) / head_dim)

        def axis(span: float, n: int) -> Any:
            if positions == "integer":
                return np.arange(n, dtype=np.float64)
            return np.arange(n) * span / n if positions == "exclusive" else np.linspace(0, span, n)
        py, px = np.meshgrid(axis(span_y, grid_h), axis(span_x, grid_w), indexing="ij")
        ax, ay = px.reshape(-1, 1) * freqs, py.reshape(-1, 1) * freqs
        return np.stack([ax, ay], axis=-1).reshape(grid_h * grid_w, head_dim // 2)
    return rope_angles


def _pairs(old: Callable[..., Any], layout: str) -> Callable[..., Any]:
    def rope_angles(*args: Any, **kw: Any) -> Any:
        a = old(*args, **kw)
        pairs = a.reshape(a.shape[0], -1, 2)  # (L, hd/4, [x, y])
        out = pairs[..., ::-1] if layout == "yx" else np.swapaxes(pairs, 1, 2)
        return np.ascontiguousarray(out).reshape(a.shape)
    return rope_angles


def _apply_rope_halves(x: Any, angles: Any) -> Any:
    """RoPE on the split halves (x[k], x[k + d/2]), GPT-NeoX style."""
    cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _adjacent(x: Any, cos: Any, sin: Any) -> Any:
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def _attention(*, qk_norm: str = "head", rope_first: bool = False, scale: str = "sqrt",
               layout: str = "shd", text_keys_normed: bool = True, rope_v: bool = False,
               softmax_axis: int = -1) -> Callable[..., Any]:
    """03 §4's attention (and 06 §4's text keys) with its convention points as keywords."""
    def attention(x: Any, weights: Any, prefix: str, heads: int, angles: Any, text: Any = None) -> Any:
        m = _m()
        b, n, d = x.shape
        hd = d // heads
        qkv = m.linear(x, weights, prefix + "qkv")
        qkv = qkv.reshape(b, n, 3, heads, hd) if layout == "shd" else \
            qkv.reshape(b, n, heads, 3, hd).transpose(0, 1, 3, 2, 4)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

        def norm(z: Any, name: str) -> Any:
            if qk_norm == "none":
                return z
            if qk_norm == "all":  # over the D features of all heads at once
                flat = m.rms_norm(z.reshape(b, z.shape[1], d), None).reshape(z.shape)
                return flat * weights[prefix + name]
            return m.rms_norm(z, weights[prefix + name])
        if angles is not None and rope_first:
            q, k = m.apply_rope(q, angles), m.apply_rope(k, angles)
        q, k = norm(q, "q_norm.weight"), norm(k, "k_norm.weight")
        if angles is not None and not rope_first:
            q, k = m.apply_rope(q, angles), m.apply_rope(k, angles)
        if angles is not None and rope_v:
            v = m.apply_rope(v, angles)
        if text is not None:
            kv = m.linear(text, weights, prefix + "kv_text").reshape(b, text.shape[1], 2, heads, hd)
            ky = norm(kv[:, :, 0], "k_norm.weight") if text_keys_normed else kv[:, :, 0]
            k, v = np.concatenate([k, ky], axis=1), np.concatenate([v, kv[:, :, 1]], axis=1)
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / (np.sqrt(hd) if scale == "sqrt" else hd)
        logits -= logits.max(axis=softmax_axis, keepdims=True)
        attn = np.exp(logits)
        attn /= attn.sum(axis=softmax_axis, keepdims=True)
        return m.linear(np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d), weights, prefix + "proj")
    return attention


def _block(*, order: str = "shift_scale", one: bool = True, silu_c: bool = False,
           text_modulated: bool = False) -> Callable[..., Any]:
    """03 §4's block with the AdaLN chunk order, the modulation's 1 + scale, a SiLU on c."""
    def dit_block(x: Any, c: Any, weights: Any, index: int, heads: int, angles: Any, *,
                  group: str = "blocks", text: Any = None) -> Any:
        m = _m()
        p = f"{group}.{index}."
        mod = m.linear(m.silu(c) if silu_c else c, weights, p + "adaln")[:, None, :]
        sh1, sc1, g1, sh2, sc2, g2 = np.split(mod, 6, axis=-1)
        if order == "scale_shift":
            sh1, sc1, sh2, sc2 = sc1, sh1, sc2, sh2

        def modulate(z: Any, shift: Any, scale: Any) -> Any:
            return z * (1.0 + scale) + shift if one else z * scale + shift
        h = modulate(m.rms_norm(x, weights[p + "norm1.weight"]), sh1, sc1)
        if text is not None and text_modulated:
            text = modulate(m.rms_norm(text, weights[p + "norm1.weight"]), sh1, sc1)
        x = x + g1 * m.attention(h, weights, p + "attn.", heads, angles, text)
        h = modulate(m.rms_norm(x, weights[p + "norm2.weight"]), sh2, sc2)
        return x + g2 * m.swiglu(h, weights, p + "mlp.")
    return dit_block


def _rms(eps: float) -> Callable[..., Any]:
    def rms_norm(x: Any, weight: Any) -> Any:
        out = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
        return out if weight is None else out * weight
    return rms_norm


def _layer(eps: float = 1e-6, ddof: int = 0) -> Callable[..., Any]:
    def layer_norm(x: Any, weight: Any = None, bias: Any = None) -> Any:
        mu = np.mean(x, axis=-1, keepdims=True)
        var = np.sum((x - mu) ** 2, axis=-1, keepdims=True) / (x.shape[-1] - ddof)
        out = (x - mu) / np.sqrt(var + eps)
        out = out if weight is None else out * weight
        return out if bias is None else out + bias
    return layer_norm


def _swiglu_swapped(x: Any, weights: Any, prefix: str) -> Any:
    m = _m()
    if prefix + "w12.weight" in weights:
        gate, up = np.split(m.linear(x, weights, prefix + "w12"), 2, axis=-1)
        return m.linear(m.silu(up) * gate, weights, prefix + "w3")
    return m.linear(m.linear(x, weights, prefix + "w1") * m.silu(m.linear(x, weights, prefix + "w3")),
                    weights, prefix + "w2")


def _dct_features(*, freqs: str = "linspace", swap: bool = False, damping: bool = True,
                  positions: str = "linspace") -> Callable[..., Any]:
    def dct_position_features(p: int) -> Any:
        f = np.linspace(0, 8, 8) if freqs == "linspace" else np.arange(8.0)
        pos = np.linspace(0, 1, p) if positions == "linspace" else np.arange(p) / p
        yy, xx = np.meshgrid(pos, pos, indexing="ij")
        if swap:
            xx, yy = yy, xx
        cx = np.cos(np.pi * xx.reshape(-1, 1, 1) * f[None, :, None])
        cy = np.cos(np.pi * yy.reshape(-1, 1, 1) * f[None, None, :])
        scale = 1.0 / (1.0 + f[:, None] * f[None, :]) if damping else np.ones((8, 8))
        return (cx * cy * scale[None]).reshape(p * p, 64)
    return dct_position_features


def _decoder_block_no_silu(x: Any, cond: Any, weights: Any, index: int) -> Any:
    m = _m()
    p = f"decoder.blocks.{index}."
    shift, scale, gate = np.split(m.linear(cond, weights, p + "adaln"), 3, axis=-1)
    h = m.layer_norm(x, weights[p + "norm.weight"], weights[p + "norm.bias"])
    h = m.linear(m.silu(m.linear(m.modulate(h, shift, scale), weights, p + "fc1")), weights, p + "fc2")
    return x + gate * h


def _pixel_decoder(*, cond_layout: str = "pixel", features_first: bool = False,
                   final_norm: bool = True) -> Callable[..., Any]:
    def pixel_decoder(x: Any, s: Any, config: Any, weights: Any, features: Any = None) -> Any:
        m = _m()
        b, c, h, w = x.shape
        p, wd = config.patch_size, config.decoder_width
        pixels = m.patchify(x, p).reshape(b * s.shape[1], c, p * p).transpose(0, 2, 1)
        features = m.dct_position_features(p) if features is None else features
        pos = np.broadcast_to(features, (*pixels.shape[:2], 64))
        inputs = [pos, pixels] if features_first else [pixels, pos]
        z = m.linear(np.concatenate(inputs, axis=-1), weights, "decoder.pixel_embed")
        cond = m.linear(s.reshape(-1, s.shape[-1]), weights, "decoder.cond_proj")
        cond = cond.reshape(-1, p * p, wd) if cond_layout == "pixel" else \
            cond.reshape(-1, wd, p * p).transpose(0, 2, 1)
        z = m.linear(z, weights, "decoder.input_proj")
        for j in range(config.decoder_depth):
            z = m.decoder_block(z, cond, weights, j)
        out = m.linear(m.layer_norm(z) if final_norm else z, weights, "decoder.final")
        return m.unpatchify(out.transpose(0, 2, 1).reshape(b, s.shape[1], c * p * p), c, h, w, p)
    return pixel_decoder


def _channel_last(x: Any, p: int) -> Any:
    """patchify with the features ordered (i, j, c): einops' "(p1 p2 c)"."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _trunk(*, c_silu: bool = True, channel_last: bool = False) -> Callable[..., Any]:
    def dit_trunk(x: Any, t: Any, y: Any, config: Any, weights: Any) -> Any:
        m = _m()
        p = config.patch_size
        t_emb = m.timestep_embedding(t, weights)
        c = t_emb + m.label_embedding(y, weights)
        c = m.silu(c) if c_silu else c
        patches = _channel_last(x, p) if channel_last else m.patchify(x, p)
        tokens = m.linear(patches, weights, "patch_embed")
        angles = m.rope_angles(x.shape[2] // p, x.shape[3] // p, config.head_dim)
        for i in range(config.depth):
            tokens = m.dit_block(tokens, c, weights, i, config.num_heads, angles)
        return tokens, t_emb, c
    return dit_trunk


def _semantic(source: str) -> Callable[..., Any]:
    def deco_semantic(x: Any, t: Any, y: Any, config: Any, weights: Any) -> Any:
        m = _m()
        tokens, t_emb, c = m.dit_trunk(x, t, y, config, weights)
        if source == "c":
            return m.silu(c[:, None, :] + tokens)
        return t_emb[:, None, :] + tokens
    return deco_semantic


def _baseline_head_silu(x: Any, t: Any, y: Any, config: Any, weights: Any) -> Any:
    m = _m()
    tokens, _, c = m.dit_trunk(x, t, y, config, weights)
    shift, scale = np.split(m.linear(m.silu(c), weights, "head.adaln")[:, None, :], 2, axis=-1)
    out = m.linear(m.modulate(m.layer_norm(tokens), shift, scale), weights, "head.linear")
    return m.unpatchify(out, config.in_channels, x.shape[2], x.shape[3], config.patch_size)


def _text_features(kind: str) -> Callable[..., Any]:
    def text_position_features(p: int) -> Any:
        from deco.reference import text_to_image as t2i
        if kind == "dct":
            return _m().dct_position_features(p)
        angles = t2i.text_rope_angles(p, p, 128)
        if kind == "sin":
            return np.sin(angles)
        return np.cos(angles).reshape(p * p, 32, 2)[..., ::-1].reshape(p * p, 64)
    return text_position_features


def _text_embedding(kind: str) -> Callable[..., Any]:
    def text_embedding(text: Any, weights: Any) -> Any:
        m = _m()
        h = m.linear(text, weights, "text_embed")
        if kind == "no_norm":
            return h + weights["text_pos_embed"][None]
        return m.rms_norm(h + weights["text_pos_embed"][None], weights["text_embed.norm.weight"])
    return text_embedding


def _text_rope(kind: str) -> Callable[..., Any]:
    def text_rope_angles(grid_h: int, grid_w: int, head_dim: int) -> Any:
        if kind == "class":
            return _m().rope_angles(grid_h, grid_w, head_dim)
        return _m().rope_angles(grid_h, grid_w, head_dim, float(grid_w), float(grid_h))
    return text_rope_angles


def _attn(**kw: Any) -> Any:
    return replace(M, "attention", _attention(**kw))


def _blk(**kw: Any) -> Any:
    return replace(M, "dit_block", _block(**kw))


VARIANTS: list[Variant] = [
    # ---- 03 §2: time features and conditioning
    variant("time_sin_first", "03 §2", "the time features' sin half before the cos half", TIME,
            wrap(M, "timestep_features", lambda old: lambda t: np.roll(old(t), 128, axis=-1))),
    variant("time_max_period_10000", "03 §2", "the time features' max period 10000 (DiT's) "
            "instead of 10", TIME, constant(M, "TIME_MAX_PERIOD", 10000.0)),
    variant("time_scaled_1000", "03 §2", "the time multiplied by 1000 before the features", TIME,
            wrap(M, "timestep_features", _time_input(lambda t: 1000.0 * t))),
    variant("time_frequency_shift", "03 §2", "the time frequencies 10^(-k/127) (exponent over "
            "half - 1, diffusers' downscale_freq_shift=1)", TIME,
            replace(M, "timestep_features", _time_frequency_shift)),
    variant("model_time_reversed", "00 §2", "the model's time reversed (1 - t: t = 1 taken as "
            "noise)", TIME, wrap(M, "timestep_features", _time_input(lambda t: 1.0 - t))),
    variant("cond_no_silu", "03 §2", "no SiLU on the condition c = t_emb + y_emb", CLASS_MODEL,
            replace(M, "dit_trunk", _trunk(c_silu=False))),
    variant("patch_features_channel_last", "03 §3", "the patch features ordered (i, j, c), channel "
            "last, instead of c p^2 + i p + j", CLASS_MODEL,
            replace(M, "dit_trunk", _trunk(channel_last=True))),
    variant("adaln_silu", "03 §2", "a SiLU on c before every block's AdaLN (c is already "
            "SiLU'd)", ATTN, _blk(silu_c=True)),
    variant("decoder_cond_from_c", "03 §5", "the decoder's condition from c (silu(c + tokens)) "
            "instead of t_emb", CLASS_MODEL, replace(M, "deco_semantic", _semantic("c"))),
    variant("decoder_cond_no_silu", "03 §5", "no SiLU on the decoder's condition t_emb + "
            "tokens", CLASS_MODEL, replace(M, "deco_semantic", _semantic("none"))),
    # ---- 03 §4: RoPE
    variant("rope_xy_swapped", "03 §4", "RoPE's x and y angles swapped (even pairs from the row "
            "position)", ROPE, wrap(M, "rope_angles", lambda old: _pairs(old, "yx"))),
    variant("rope_x_then_y", "03 §4", "RoPE's x angles in the first half, y in the second (not "
            "interleaved)", ROPE, wrap(M, "rope_angles", lambda old: _pairs(old, "blocks"))),
    variant("rope_integer_positions", "03 §4", "RoPE positions as integer token coordinates "
            "0..n-1 instead of linspace over the span", ROPE,
            replace(M, "rope_angles", _rope(positions="integer"))),
    variant("rope_span_exclusive", "03 §4", "RoPE positions span * arange(n) / n (the span's end "
            "excluded)", ROPE, replace(M, "rope_angles", _rope(positions="exclusive"))),
    variant("rope_frequency_2j", "03 §4", "RoPE frequencies theta^(-2j/d_h) (the 1-D formula) "
            "instead of theta^(-4j/d_h)", ROPE, replace(M, "rope_angles", _rope(exponent=2.0))),
    variant("rope_halves", "03 §4", "RoPE rotating the split halves (x[k], x[k + d/2]) instead of "
            "adjacent pairs", APPLY, replace(M, "apply_rope", _apply_rope_halves)),
    variant("rope_inverse", "03 §4", "RoPE rotating the other way (angle -a)", APPLY,
            replace(M, "apply_rope", lambda x, a: _adjacent(x, np.cos(a)[None, :, None, :],
                                                            -np.sin(a)[None, :, None, :]))),
    variant("rope_before_norm", "03 §4", "RoPE applied before the q/k RMSNorm", APPLY,
            _attn(rope_first=True)),
    # ---- 03 §4: attention and block
    variant("rope_on_values", "03 §4", "RoPE applied to the values too (v is not rotated)", APPLY,
            _attn(rope_v=True)),
    variant("softmax_over_queries", "03 §4", "the attention softmax over the queries instead of "
            "the keys", ATTN, _attn(softmax_axis=-2)),
    variant("qk_norm_missing", "03 §4", "no RMSNorm on q and k", ATTN, _attn(qk_norm="none")),
    variant("qk_norm_over_heads", "03 §4", "the q/k RMSNorm over all D features instead of per "
            "head", ATTN, _attn(qk_norm="all")),
    variant("attention_scale_d", "03 §4", "attention logits divided by d_h instead of sqrt(d_h)",
            ATTN, _attn(scale="d")),
    variant("qkv_head_major", "03 §4", "the qkv output read head-major (heads, 3, d_h) instead of "
            "(3, heads, d_h)", ATTN, _attn(layout="hsd")),
    variant("adaln_shift_scale_swapped", "03 §4", "the AdaLN chunks in the order (scale, shift, "
            "gate) instead of (shift, scale, gate)", ATTN, _blk(order="scale_shift")),
    variant("modulate_without_one", "03 §4", "modulation x * scale + shift instead of "
            "x * (1 + scale) + shift", ATTN, _blk(one=False)),
    variant("swiglu_gate_swapped", "03 §4", "the SwiGLU's SiLU on the other input projection "
            "(w3, or the second half of w12)", ATTN, replace(M, "swiglu", _swiglu_swapped)),
    variant("rmsnorm_eps_1e-5", "03 §1", "RMSNorm epsilon 1e-5 instead of 1e-6", (*ATTN,
            "text_embedding"), replace(M, "rms_norm", _rms(1e-5))),
    variant("layernorm_eps_1e-5", "03 §1", "LayerNorm epsilon 1e-5 (PyTorch's default) instead "
            "of 1e-6", DECODER, replace(M, "layer_norm", _layer(eps=1e-5))),
    variant("layernorm_unbiased", "03 §6", "LayerNorm with the unbiased variance (divided by "
            "n - 1)", DECODER, replace(M, "layer_norm", _layer(ddof=1))),
    # ---- 03 §6: pixel decoder
    variant("dct_features_integer", "03 §6", "the DCT position features' frequencies 0..7 "
            "instead of linspace(0, 8, 8)", DCT_FEATURES,
            replace(M, "dct_position_features", _dct_features(freqs="integer"))),
    variant("dct_features_axes_swapped", "03 §6", "the DCT position features' x and y swapped "
            "(the major index a on the row)", DCT_FEATURES,
            replace(M, "dct_position_features", _dct_features(swap=True))),
    variant("dct_features_no_damping", "03 §6", "the DCT position features without the "
            "1/(1 + f_a f_b) factor", DCT_FEATURES,
            replace(M, "dct_position_features", _dct_features(damping=False))),
    variant("dct_features_positions_exclusive", "03 §6", "pixel positions arange(p)/p instead of "
            "linspace(0, 1, p)", DCT_FEATURES,
            replace(M, "dct_position_features", _dct_features(positions="exclusive"))),
    variant("decoder_adaln_no_silu", "03 §6", "no SiLU on the decoder block's condition before "
            "its AdaLN", DECODER, replace(M, "decoder_block", _decoder_block_no_silu)),
    variant("decoder_cond_channel_major", "03 §6", "the decoder condition reshaped (w, P) "
            "(channel-major) instead of (P, w)", ANY_MODEL,
            replace(M, "pixel_decoder", _pixel_decoder(cond_layout="channel"))),
    variant("decoder_features_first", "03 §6", "the decoder's input [position features, pixel "
            "values] instead of [pixels, features]", ANY_MODEL,
            replace(M, "pixel_decoder", _pixel_decoder(features_first=True))),
    variant("decoder_final_no_norm", "03 §6", "no LayerNorm before the decoder's final linear",
            ANY_MODEL, replace(M, "pixel_decoder", _pixel_decoder(final_norm=False))),
    variant("baseline_head_silu", "03 §7", "a SiLU on c before the baseline head's AdaLN",
            ("forward",), replace(M, "baseline_forward", _baseline_head_silu)),
    # ---- 06: the text-to-image model
    variant("text_rope_uncrossed", "06 §3", "the text model's RoPE spans not crossed (x over the "
            "width, y over the height)", ("text_rope_angles", *TEXT_MODEL),
            replace(T, "text_rope_angles", _text_rope("uncrossed"))),
    variant("text_rope_class_span", "06 §3", "the class model's RoPE span 16 in the text model",
            ("text_rope_angles", *TEXT_MODEL), replace(T, "text_rope_angles", _text_rope("class"))),
    variant("text_features_dct", "06 §5", "the class model's DCT position features in the text "
            "model's decoder", TEXT_FEATURES,
            replace(T, "text_position_features", _text_features("dct"))),
    variant("text_features_sine", "06 §5", "the sines of the text decoder's angles instead of "
            "their cosines (the complex table's imaginary part)", TEXT_FEATURES,
            replace(T, "text_position_features", _text_features("sin"))),
    variant("text_features_rows_columns", "06 §5", "the text decoder features' column and row "
            "entries exchanged", TEXT_FEATURES,
            replace(T, "text_position_features", _text_features("swap"))),
    variant("text_position_in_norm", "06 §2", "the text position table added before the "
            "RMSNorm", ("text_embedding", *TEXT_MODEL),
            replace(T, "text_embedding", _text_embedding("inside"))),
    variant("text_embed_no_norm", "06 §2", "no RMSNorm in the text embedding",
            ("text_embedding", *TEXT_MODEL), replace(T, "text_embedding", _text_embedding("no_norm"))),
    variant("text_keys_unnormed", "06 §4", "the text keys not RMS-normalised",
            ("joint_dit_block", *TEXT_MODEL), _attn(text_keys_normed=False)),
    variant("text_modulated", "06 §4", "the text normalised and modulated like the image tokens "
            "before kv_text", ("joint_dit_block", *TEXT_MODEL), _blk(text_modulated=True)),
]
