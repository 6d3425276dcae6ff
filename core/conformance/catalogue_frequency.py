"""Convention points of spec/01 (flow matching, time shift) and spec/02 (the frequency-aware loss),
as variants of the reference (deco.conformance.catalogue). Read from the spec constant by
constant: the YCbCr matrix and its offsets (02 §1), the DCT's normalisation and axes (§2), the
padding and block grid (§3), the quality scaling and tables (§4), the weights (§5) and the loss's
reduction (§6); the interpolant, the target and the time shift (01 §1, §3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from deco.conformance.catalogue import SAMPLERS, Variant, constant, replace, variant, wrap

F = "deco.reference.frequency"
FLOW = "deco.reference.flow"
LOSS = ("frequency_aware_loss",)
ERROR = (*LOSS, "weighted_error")  # the loss's last stage (spec/vectors' stage vectors)
DCT = ("block_dct", *LOSS)
PAD = (*DCT, "reflect_pad")
YCC = ("rgb_to_ycbcr", *LOSS)
WEIGHTS = ("frequency_weights", *LOSS)
SHIFTED = ("time_grid", "time_shift", *SAMPLERS)


def _ycbcr(kr: float, kb: float) -> Any:
    """The full-range YCbCr matrix of luma coefficients (kr, kb)."""
    kg = 1.0 - kr - kb
    return np.array([[kr, kg, kb],
                     [-0.5 * kr / (1 - kb), -0.5 * kg / (1 - kb), 0.5],
                     [0.5, -0.5 * kg / (1 - kr), -0.5 * kb / (1 - kr)]])


def _with_offset(old: Callable[..., Any]) -> Callable[..., Any]:
    def rgb_to_ycbcr(x: Any) -> Any:
        out = old(x)
        out[:, 1:] += 0.5
        return out
    return rgb_to_ycbcr


def _dct_unnormalised(n: int = 8) -> Any:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def _dct_uniform_scale(old: Callable[..., Any]) -> Callable[..., Any]:
    return lambda n=8: np.sqrt(2.0 / n) * old(n) / np.where(np.arange(n) == 0, np.sqrt(1.0 / n),
                                                            np.sqrt(2.0 / n))[:, None]


def _block_dct(left: str, right: str) -> Callable[..., Any]:
    """block_dct with Y = L X R^T, where L, R are C (the DCT), C^T (its inverse) or I (none)."""
    def block_dct(x: Any) -> Any:
        from deco.reference import frequency as fr
        x = fr.reflect_pad(x)
        b, c, h, w = x.shape
        blocks = x.reshape(b, c, h // 8, 8, w // 8, 8).transpose(0, 1, 2, 4, 3, 5)
        m = {"C": fr.dct_matrix(8), "Ct": fr.dct_matrix(8).T, "I": np.eye(8)}
        return np.einsum("ui,bcyxij,vj->bcyxuv", m[left], blocks, m[right])
    return block_dct


def _transposed(old: Callable[..., Any], axes: tuple[int, int]) -> Callable[..., Any]:
    return lambda *a: np.swapaxes(old(*a), *axes)


def _pad(mode: str, where: str = "end") -> Callable[..., Any]:
    def reflect_pad(x: Any) -> Any:
        x = np.asarray(x, dtype=np.float64)
        h, w = x.shape[2:]
        ph, pw = (-h) % 8, (-w) % 8
        if mode == "crop":
            return x[:, :, :h - (h % 8), :w - (w % 8)]
        pads = ((0, 0), (0, 0), (0, ph), (0, pw)) if where == "end" else \
            ((0, 0), (0, 0), (ph, 0), (pw, 0))
        return np.pad(x, pads, mode=mode)  # type: ignore[call-overload]
    return reflect_pad


def _crop_coefficients(old: Callable[..., Any]) -> Callable[..., Any]:
    """block_dct whose coefficient image (8 Bh, 8 Bw), laid out like the padded image, is cut
    back to H x W: the last blocks lose the coefficients u >= H mod 8 (v >= W mod 8), zeroed."""
    def block_dct(x: Any) -> Any:
        out = old(x)
        h, w = np.shape(x)[2:]
        bh, bw = out.shape[2:4]
        rows = (8 * np.arange(bh)[:, None] + np.arange(8)[None, :]) < h  # (Bh, 8): [by, u]
        cols = (8 * np.arange(bw)[:, None] + np.arange(8)[None, :]) < w  # (Bw, 8): [bx, v]
        keep = rows[:, None, :, None] & cols[None, :, None, :]  # (Bh, Bw, 8, 8)
        return out * keep
    return block_dct


def _scale(rule: str) -> Callable[..., Any]:
    def quality_scale(quality: int) -> float:
        if rule == "integer":
            return float(5000 // quality) if quality < 50 else 200.0 - 2.0 * quality
        return 200.0 - 2.0 * quality if rule == "linear" else 0.0
    return quality_scale


def _table(rounding: str) -> Callable[..., Any]:
    def quantisation_table(base: Any, quality: int) -> Any:
        from deco.reference import frequency as fr
        scaled = np.asarray(base, dtype=np.float64) * fr.quality_scale(quality)
        q = np.floor(scaled / 100.0) if rounding == "floor" else np.round(scaled / 100.0)
        return np.clip(q, 1.0, 255.0)
    return quantisation_table


def _weights(*, tables: str = "YCC", gamma: str = "before", norm: str = "channel",
             invert: bool = True) -> Callable[..., Any]:
    def frequency_weights(quality: int = 85, gamma_value: float = 1.0) -> Any:
        from deco.reference import frequency as fr
        bases = {"YCC": (fr.JPEG_LUMINANCE, fr.JPEG_CHROMINANCE, fr.JPEG_CHROMINANCE),
                 "YYY": (fr.JPEG_LUMINANCE,) * 3}[tables]
        g = 1.0 if gamma == "ignored" else float(gamma_value)
        raw = []
        for base in bases:
            q = fr.quantisation_table(base, quality)
            raw.append((q.mean() / q if invert else q / q.mean()) ** (g if gamma == "before" else 1.0))
        w = np.stack(raw)
        if norm == "channel":
            w = w / w.mean(axis=(1, 2), keepdims=True)
        elif norm == "global":
            w = w / w.mean()
        return w ** g if gamma == "after" else w
    return frequency_weights


def _loss(*, colour: bool = True, weight_power: float = 1.0, error: str = "square",
          reduce: str = "mean") -> Callable[..., Any]:
    def frequency_aware_loss(pred: Any, target: Any, quality: int = 85, gamma: float = 1.0) -> float:
        from deco.reference import frequency as fr
        pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
        w = fr.frequency_weights(quality, gamma) ** weight_power
        ycc = fr.rgb_to_ycbcr if colour else (lambda z: z)
        diff = fr.block_dct(ycc(pred)) - fr.block_dct(ycc(target))
        terms = w[None, :, None, None] * (diff**2 if error == "square" else np.abs(diff))
        if reduce == "sum":
            return float(np.sum(terms))
        if reduce == "pixels":
            return float(np.sum(terms) / pred.size)
        return float(np.mean(terms))
    return frequency_aware_loss


def _loss_patch(**kw: Any) -> Any:
    return replace(F, "frequency_aware_loss", _loss(**kw))


def _error_patch(*, weight_power: float = 1.0, error: str = "square", reduce: str = "mean") -> Any:
    """The same reduction in the loss's last stage (the kit's weighted_error stage component)."""
    def weighted_error(coeffs_pred: Any, coeffs_target: Any, weights: Any) -> float:
        diff = np.asarray(coeffs_pred, np.float64) - np.asarray(coeffs_target, np.float64)
        w = np.asarray(weights, np.float64)[None, :, None, None] ** weight_power
        terms = w * (diff**2 if error == "square" else np.abs(diff))
        return float(np.sum(terms) if reduce == "sum" else np.mean(terms))
    return replace("deco.conformance.stage_ports", "ReferenceStages.weighted_error",
                   staticmethod(weighted_error))


def _weights_patch(**kw: Any) -> Any:
    impl = _weights(**kw)
    return replace(F, "frequency_weights", lambda quality=85, gamma=1.0: impl(quality, gamma))


def _shift(rule: str) -> Callable[..., Any]:
    def make(old: Callable[..., Any]) -> Callable[..., Any]:
        return lambda t, shift=1.0: old(t, 1.0 / shift if rule == "inverted" else 1.0)
    return make


VARIANTS: list[Variant] = [
    # ---- 01 §1, §3: interpolant, target, time shift
    variant("flow_time_reversed", "01 §1", "the interpolant reversed: x_t = (1 - t) x + t noise "
            "(t = 0 taken as data)", ("interpolate",),
            replace(FLOW, "interpolate", lambda x, noise, t: np.asarray(noise) * np.asarray(t).reshape(
                (-1,) + (1,) * (np.ndim(x) - 1)) + np.asarray(x) * (1 - np.asarray(t).reshape(
                    (-1,) + (1,) * (np.ndim(x) - 1))))),
    variant("target_reversed", "01 §1", "the target velocity reversed: noise - x instead of x - noise",
            ("target_velocity",),
            replace(FLOW, "target_velocity", lambda x, noise: np.asarray(noise) - np.asarray(x))),
    variant("timeshift_inverted", "01 §3", "the time shift inverted: shift 1/s used for s (the "
            "s t / (1 + (s - 1) t) form)", SHIFTED, wrap(FLOW, "time_shift", _shift("inverted"))),
    variant("timeshift_ignored", "01 §3", "no time shift (s = 1 whatever the argument)", SHIFTED,
            wrap(FLOW, "time_shift", _shift("ignored"))),
    # ---- 02 §1: YCbCr
    variant("ycbcr_offsets", "02 §1", "the chroma offsets added (+0.5 on Cb and Cr, the JPEG +128)",
            ("rgb_to_ycbcr",), wrap(F, "rgb_to_ycbcr", _with_offset)),
    variant("ycbcr_bt709", "02 §1", "the BT.709 luma coefficients (0.2126, 0.7152, 0.0722) "
            "instead of BT.601's", YCC, constant(F, "YCBCR_MATRIX", _ycbcr(0.2126, 0.0722))),
    variant("ycbcr_rounded", "02 §1", "the YCbCr constants rounded to 3 decimals (-0.169, -0.331, "
            "-0.419, -0.081)", YCC, constant(F, "YCBCR_MATRIX", np.round(_ycbcr(0.299, 0.114), 3))),
    variant("ycbcr_transposed", "02 §1", "the YCbCr matrix transposed (rows taken as columns)", YCC,
            constant(F, "YCBCR_MATRIX", _ycbcr(0.299, 0.114).T)),
    # ---- 02 §2: the DCT
    variant("dct_unnormalised", "02 §2", "an unnormalised DCT-II (2 sum cos, SciPy's norm=None) "
            "instead of the orthonormal one", DCT, replace(F, "dct_matrix", _dct_unnormalised)),
    variant("dct_dc_scale", "02 §2", "the DC row scaled like the others (a_0 = sqrt(2/n), not "
            "sqrt(1/n))", DCT, wrap(F, "dct_matrix", _dct_uniform_scale)),
    variant("dct_height_only", "02 §2", "the DCT on the height axis only (Y = C X; the width axis "
            "untransformed)", DCT, replace(F, "block_dct", _block_dct("C", "I"))),
    variant("dct_width_only", "02 §2", "the DCT on the width axis only (Y = X C^T; the height axis "
            "untransformed)", DCT, replace(F, "block_dct", _block_dct("I", "C"))),
    variant("dct_width_inverse", "02 §2", "the DCT's width axis inverted (Y = C X C: the inverse "
            "transform along the width)", DCT, replace(F, "block_dct", _block_dct("C", "Ct"))),
    variant("dct_height_inverse", "02 §2", "the DCT's height axis inverted (Y = C^T X C^T: the "
            "inverse transform along the height)", DCT, replace(F, "block_dct", _block_dct("Ct", "C"))),
    variant("dct_inverse", "02 §2", "the inverse DCT on both axes (Y = C^T X C)", DCT,
            replace(F, "block_dct", _block_dct("Ct", "Ct"))),
    variant("dct_uv_swapped", "02 §2", "the coefficient axes swapped ([v, u]: horizontal frequency "
            "first), so each coefficient meets the transposed weight", DCT,
            wrap(F, "block_dct", lambda old: _transposed(old, (-1, -2)))),
    # ---- 02 §3: padding and blocks
    variant("block_grid_transposed", "02 §3", "the blocks ordered column-major (block grid "
            "(Bw, Bh))", ("block_dct",), wrap(F, "block_dct", lambda old: _transposed(old, (2, 3)))),
    variant("pad_symmetric", "02 §3", "the padding repeats the edge sample (mirror 'symmetric', "
            "x[H] = x[H - 1]) instead of reflecting about it", PAD,
            replace(F, "reflect_pad", _pad("symmetric"))),
    variant("pad_edge", "02 §3", "the padding replicates the last row/column ('edge')", PAD,
            replace(F, "reflect_pad", _pad("edge"))),
    variant("pad_zero", "02 §3", "zero padding instead of reflection", PAD,
            replace(F, "reflect_pad", _pad("constant"))),
    variant("pad_top_left", "02 §3", "the padding at the top and left instead of the bottom and "
            "right", PAD, replace(F, "reflect_pad", _pad("reflect", "start"))),
    variant("pad_cropped", "02 §3", "the padded border cropped: the blocks touching the padding "
            "dropped instead of kept", PAD, replace(F, "reflect_pad", _pad("crop"))),
    variant("coefficients_cropped", "02 §3", "the padded border's coefficients cropped: the "
            "coefficient image cut back to H x W (the last blocks lose their high frequencies) "
            "and the loss averaged over H x W", DCT, wrap(F, "block_dct", _crop_coefficients),
            _loss_patch(reduce="pixels")),
    # ---- 02 §4: quantisation tables
    variant("quality_integer_division", "02 §4", "libjpeg's integer division 5000 // q below "
            "quality 50 (the spec's is real)", WEIGHTS, replace(F, "quality_scale", _scale("integer"))),
    variant("quality_linear_scale", "02 §4", "the scaling 200 - 2q at every quality (no 5000/q "
            "below 50)", WEIGHTS, replace(F, "quality_scale", _scale("linear"))),
    variant("quant_no_rounding", "02 §4", "the table truncated, floor(T s / 100), without the +50 "
            "that rounds it", WEIGHTS, replace(F, "quantisation_table", _table("floor"))),
    variant("quant_round_half_even", "02 §4", "the table rounded half to even (np.round / "
            "torch.round) instead of floor(x + 0.5)", WEIGHTS,
            replace(F, "quantisation_table", _table("even"))),
    variant("quant_luma_everywhere", "02 §4", "the luminance table for the chroma channels too",
            WEIGHTS, _weights_patch(tables="YYY")),
    # ---- 02 §5: weights
    variant("weights_unnormalised", "02 §5", "the weights not divided by their channel mean",
            WEIGHTS, _weights_patch(norm="none")),
    variant("weights_global_mean", "02 §5", "the weights divided by the mean of all three "
            "channels, not each channel's", WEIGHTS, _weights_patch(norm="global")),
    variant("weights_gamma_ignored", "02 §5", "the exponent gamma ignored (gamma = 1)", WEIGHTS,
            _weights_patch(gamma="ignored")),
    variant("weights_gamma_after_mean", "02 §5", "the exponent gamma applied after the mean "
            "normalisation", WEIGHTS, _weights_patch(gamma="after")),
    variant("weights_proportional_to_step", "02 §5", "weights proportional to the quantisation "
            "step Q / mean(Q) instead of its inverse", WEIGHTS, _weights_patch(invert=False)),
    variant("weights_transposed", "02 §5", "the weight tables transposed ([v, u])", WEIGHTS,
            wrap(F, "frequency_weights", lambda old: _transposed(old, (-1, -2)))),
    # ---- 02 §6: the loss
    variant("loss_sum", "02 §6", "the weighted squared errors summed instead of averaged", ERROR,
            _loss_patch(reduce="sum"), _error_patch(reduce="sum")),
    variant("loss_mean_over_pixels", "02 §6", "the mean taken over the original pixels, not over "
            "the padded grid", LOSS, _loss_patch(reduce="pixels")),
    variant("loss_rgb", "02 §6", "the DCT of the RGB difference (no YCbCr)", LOSS,
            _loss_patch(colour=False)),
    variant("loss_unweighted", "02 §6", "no frequency weights (w = 1)", ERROR,
            _loss_patch(weight_power=0.0), _error_patch(weight_power=0.0)),
    variant("loss_weights_squared", "02 §6", "the weight applied to the difference before "
            "squaring ((w d)^2)", ERROR, _loss_patch(weight_power=2.0), _error_patch(weight_power=2.0)),
    variant("loss_absolute", "02 §6", "absolute errors |d| instead of squared", ERROR,
            _loss_patch(error="abs"), _error_patch(error="abs")),
]
