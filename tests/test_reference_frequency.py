"""Properties of the frequency-aware loss pieces of `deco.reference` (spec/02-frequency-loss.md).

Oracles: SciPy's orthonormal DCT-II (`scipy.fft.dct`/`dctn`, norm="ortho"), the JFIF colour
conversion constants, the IJG quality-scaling formula evaluated by hand, explicit index arithmetic
for reflect padding, and closed forms.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.fft
from helpers import cases
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.reference.frequency import JPEG_CHROMINANCE, JPEG_LUMINANCE, quality_scale, reflect_pad

SETTINGS = settings(max_examples=25, deadline=None)
# Sizes the reflect padding supports: a multiple of 8, or pad (= -n mod 8) < n, i.e. n >= 5.
PADDABLE = st.integers(5, 30) | st.sampled_from([8, 16, 24, 32])

# JFIF (ITU-T T.871) full-range RGB -> YCbCr without the +128 offsets.
JFIF = np.array([
    [0.299, 0.587, 0.114],
    [-0.168736, -0.331264, 0.5],
    [0.5, -0.418688, -0.081312],
])


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def explicit_reflect_pad(x: np.ndarray) -> np.ndarray:
    """Bottom/right padding to multiples of 8 by index arithmetic: index i >= n maps to 2(n-1) - i
    (mirror about the last sample, which is not repeated)."""
    h, w = x.shape[-2:]
    hp, wp = h + (-h) % 8, w + (-w) % 8

    def idx(i: int, n: int) -> int:
        return i if i < n else 2 * (n - 1) - i

    rows = [idx(i, h) for i in range(hp)]
    cols = [idx(j, w) for j in range(wp)]
    return x[..., rows, :][..., :, cols]


def explicit_block_dct(x: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, C, Bh, Bw, 8, 8) with scipy's dctn per 8x8 block of the padded image."""
    xp = explicit_reflect_pad(x)
    b, c, h, w = xp.shape
    out = np.empty((b, c, h // 8, w // 8, 8, 8))
    for by in range(h // 8):
        for bx in range(w // 8):
            block = xp[:, :, 8 * by: 8 * by + 8, 8 * bx: 8 * bx + 8]
            out[:, :, by, bx] = scipy.fft.dctn(block, type=2, norm="ortho", axes=(-2, -1))
    return out


def ijg_table(base: np.ndarray, quality: int) -> np.ndarray:
    """IJG scaling as the release computes it (float 5000/q below 50, 200-2q from 50)."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    return np.clip(np.floor((base * scale + 50.0) / 100.0), 1, 255)


def explicit_weights(quality: int, gamma: float) -> np.ndarray:
    """w = (mean(Q)/Q)^gamma / mean(...) = Q^-gamma / mean(Q^-gamma) (the mean(Q) factor cancels)."""
    out = []
    for base in (JPEG_LUMINANCE, JPEG_CHROMINANCE, JPEG_CHROMINANCE):
        qinv = ijg_table(base, quality) ** -gamma
        out.append(qinv / qinv.mean())
    return np.stack(out)


def explicit_loss(pred: np.ndarray, target: np.ndarray, quality: int, gamma: float) -> float:
    def d(x: np.ndarray) -> np.ndarray:
        ycc = np.einsum("ij,bjhw->bihw", JFIF, x)
        return explicit_block_dct(ycc)

    w = explicit_weights(quality, gamma)
    return float(np.mean(w[None, :, None, None] * (d(pred) - d(target)) ** 2))


# ------------------------------------------------------------------------------------------ DCT
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16])
def test_dct_matrix_is_orthonormal_and_equals_scipy(n: int) -> None:
    c = R.dct_matrix(n)
    np.testing.assert_allclose(c @ c.T, np.eye(n), atol=1e-13)
    # Row k of C is the DCT-II basis vector k: C = dct(I) along axis 0 (C e_i = column i).
    np.testing.assert_allclose(c, scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0), atol=1e-13)


def test_dct_matrix_known_entries() -> None:
    c = R.dct_matrix(8)
    np.testing.assert_allclose(c[0], np.full(8, np.sqrt(1 / 8)), rtol=1e-14)  # DC row is flat
    # C[1, 0] = sqrt(2/8) cos(pi/16); C[4, 1] = sqrt(2/8) cos(pi * 3 * 4 / 16) = 0.5 cos(3pi/4)
    assert c[1, 0] == pytest.approx(0.5 * np.cos(np.pi / 16), rel=1e-14)
    assert c[4, 1] == pytest.approx(-0.5 / np.sqrt(2), rel=1e-13)


@SETTINGS
@given(b=st.integers(1, 2), c=st.integers(1, 3), h=PADDABLE, w=PADDABLE, seed=st.integers(0, 2**31))
def test_block_dct_equals_scipy_per_block(b: int, c: int, h: int, w: int, seed: int) -> None:
    x = _rng(seed).standard_normal((b, c, h, w))
    got = R.block_dct(x)
    assert got.shape == (b, c, -(-h // 8), -(-w // 8), 8, 8)
    np.testing.assert_allclose(got, explicit_block_dct(x), atol=1e-12)


@SETTINGS
@given(h=PADDABLE, w=PADDABLE, seed=st.integers(0, 2**31))
def test_reflect_padding_semantics(h: int, w: int, seed: int) -> None:
    x = _rng(seed).standard_normal((1, 2, h, w))
    expected = explicit_reflect_pad(x)
    np.testing.assert_array_equal(reflect_pad(x), expected)
    # the explicit rule is numpy's "reflect" (edge sample not repeated), e.g. row h = row h-2
    np.testing.assert_array_equal(
        expected, np.pad(x, ((0, 0), (0, 0), (0, (-h) % 8), (0, (-w) % 8)), mode="reflect")
    )
    if h % 8:
        np.testing.assert_array_equal(expected[:, :, h, :w], x[:, :, h - 2])


@SETTINGS
@given(bh=st.integers(1, 3), bw=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_block_dct_invertible_and_parseval(bh: int, bw: int, seed: int) -> None:
    x = _rng(seed).standard_normal((2, 3, 8 * bh, 8 * bw))
    d = R.block_dct(x)
    np.testing.assert_allclose(R.block_idct(d), x, atol=1e-12)
    assert np.sum(d**2) == pytest.approx(np.sum(x**2), rel=1e-12)
    # and block_idct equals scipy's inverse on arbitrary coefficients
    coeffs = _rng(seed + 1).standard_normal((1, 1, bh, bw, 8, 8))
    img = R.block_idct(coeffs)
    for by in range(bh):
        for bx in range(bw):
            np.testing.assert_allclose(
                img[0, 0, 8 * by: 8 * by + 8, 8 * bx: 8 * bx + 8],
                scipy.fft.idctn(coeffs[0, 0, by, bx], type=2, norm="ortho"), atol=1e-12,
            )


def test_block_dct_coefficient_axes() -> None:
    # A block varying only horizontally (along W) has energy only in row u = 0, columns v.
    x = np.tile(np.cos(np.pi * (2 * np.arange(8) + 1) * 3 / 16), (1, 1, 8, 1))
    d = R.block_dct(x)[0, 0, 0, 0]
    mask = np.zeros((8, 8), dtype=bool)
    mask[0, 3] = True
    assert abs(d[0, 3]) > 1
    np.testing.assert_allclose(d[~mask], 0, atol=1e-12)


# --------------------------------------------------------------------------------------- YCbCr
@SETTINGS
@given(h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 2**31))
def test_ycbcr_round_trip_and_jfif(h: int, w: int, seed: int) -> None:
    x = _rng(seed).standard_normal((2, 3, h, w))
    ycc = R.rgb_to_ycbcr(x)
    np.testing.assert_allclose(ycc, np.einsum("ij,bjhw->bihw", JFIF, x), atol=1e-14)
    np.testing.assert_allclose(R.ycbcr_to_rgb(ycc), x, atol=1e-12)
    np.testing.assert_allclose(R.rgb_to_ycbcr(R.ycbcr_to_rgb(x)), x, atol=1e-12)


def test_ycbcr_known_values() -> None:
    # Y weights sum to 1 and Cb, Cr weights to 0: gray (R = G = B = v) maps to (v, 0, 0).
    gray = np.full((1, 3, 2, 2), 0.7)
    np.testing.assert_allclose(R.rgb_to_ycbcr(gray)[0, :, 0, 0], [0.7, 0, 0], atol=1e-15)
    primaries = np.eye(3).reshape(3, 3, 1, 1)  # batch of pure red, green, blue
    ycc = R.rgb_to_ycbcr(primaries)[:, :, 0, 0]
    np.testing.assert_allclose(ycc[0], [0.299, -0.168736, 0.5], rtol=1e-15)
    np.testing.assert_allclose(ycc[1], [0.587, -0.331264, -0.418688], rtol=1e-15)
    np.testing.assert_allclose(ycc[2], [0.114, 0.5, -0.081312], rtol=1e-15)


# ---------------------------------------------------------------------------- frequency weights
def test_quality_scaling_hand_derived() -> None:
    # q = 50: scale = 200 - 100 = 100, floor((T*100 + 50)/100) = floor(T + 0.5) = T: the base table.
    np.testing.assert_array_equal(R.quantisation_table(JPEG_LUMINANCE, 50), JPEG_LUMINANCE)
    np.testing.assert_array_equal(R.quantisation_table(JPEG_CHROMINANCE, 50), JPEG_CHROMINANCE)
    # q = 100: scale = 0, floor(50/100) = 0, clamped up to 1 everywhere.
    np.testing.assert_array_equal(R.quantisation_table(JPEG_LUMINANCE, 100), np.ones((8, 8)))
    # q = 75: scale 50. T=16: floor(850/100) = 8; T=11: floor(600/100) = 6; T=10: floor(550/100) = 5;
    #          T=121: floor(6100/100) = 61.
    q75 = R.quantisation_table(JPEG_LUMINANCE, 75)
    assert (q75[0, 0], q75[0, 1], q75[0, 2], q75[6, 5]) == (8, 6, 5, 61)
    # q = 90: scale 20. T=16: floor(370/100) = 3; T=10: floor(250/100) = 2; T=99: floor(2030/100) = 20.
    q90c = R.quantisation_table(JPEG_CHROMINANCE, 90)
    q90y = R.quantisation_table(JPEG_LUMINANCE, 90)
    assert (q90y[0, 0], q90y[0, 2], q90c[7, 7]) == (3, 2, 20)
    # q = 30: scale 5000/30 = 166.67 (float division, as the release). T=99: floor(16550/100) = 165
    #          (IJG's integer 5000/30 = 166 would give 164); T=16: floor(2716.7/100) = 27.
    q30c = R.quantisation_table(JPEG_CHROMINANCE, 30)
    assert (q30c[7, 7], R.quantisation_table(JPEG_LUMINANCE, 30)[0, 0]) == (165, 27)
    # q = 10: scale 500. T=16: floor(8050/100) = 80; T=99: 495, clamped to 255.
    q10 = R.quantisation_table(JPEG_LUMINANCE, 10)
    assert (q10[0, 0], q10[7, 7]) == (80, 255)
    # q = 1: scale 5000. T=10: floor(50050/100) = 500 -> 255; every entry clamps to 255.
    np.testing.assert_array_equal(R.quantisation_table(JPEG_LUMINANCE, 1), np.full((8, 8), 255))
    assert quality_scale(25) == 200.0 and quality_scale(85) == 30.0


def test_base_tables_are_annex_k() -> None:
    # ITU-T T.81 Annex K: first rows and corners of tables K.1 (luminance) and K.2 (chrominance).
    np.testing.assert_array_equal(JPEG_LUMINANCE[0], [16, 11, 10, 16, 24, 40, 51, 61])
    np.testing.assert_array_equal(JPEG_LUMINANCE[:, 0], [16, 12, 14, 14, 18, 24, 49, 72])
    assert JPEG_LUMINANCE[7, 7] == 99 and JPEG_LUMINANCE[6, 5] == 121
    np.testing.assert_array_equal(JPEG_CHROMINANCE[0], [17, 18, 24, 47, 99, 99, 99, 99])
    np.testing.assert_array_equal(JPEG_CHROMINANCE[3, :4], [47, 66, 99, 99])
    assert np.all(JPEG_CHROMINANCE[4:] == 99) and np.all(JPEG_CHROMINANCE[:, 4:] == 99)


@settings(max_examples=40, deadline=None)
@given(quality=st.integers(1, 100), gamma=st.floats(0.1, 3.0))
def test_frequency_weights_properties(quality: int, gamma: float) -> None:
    w = R.frequency_weights(quality, gamma)
    assert w.shape == (3, 8, 8)
    np.testing.assert_allclose(w.mean(axis=(1, 2)), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(w[1], w[2])  # Cb and Cr share the chrominance table
    assert np.all(w > 0)
    np.testing.assert_allclose(w, explicit_weights(quality, gamma), rtol=1e-12)
    # higher quantisation step -> strictly lower weight (gamma > 0), equal steps -> equal weights
    for c, base in enumerate((JPEG_LUMINANCE, JPEG_CHROMINANCE)):
        q = R.quantisation_table(base, quality).ravel()
        wc = w[c].ravel()
        qi, qj = np.meshgrid(q, q, indexing="ij")
        wi, wj = np.meshgrid(wc, wc, indexing="ij")
        assert np.all(wi[qi > qj] < wj[qi > qj])
        np.testing.assert_allclose(wi[qi == qj], wj[qi == qj], rtol=1e-13)


def test_frequency_weights_special_cases() -> None:
    np.testing.assert_array_equal(R.frequency_weights(100), np.ones((3, 8, 8)))
    np.testing.assert_allclose(R.frequency_weights(85, gamma=0.0), np.ones((3, 8, 8)), rtol=1e-15)
    # q = 50, gamma = 1: w = (1/T) / mean(1/T) with the base tables themselves
    w = R.frequency_weights(50)
    np.testing.assert_allclose(w[0], (1 / JPEG_LUMINANCE) / np.mean(1 / JPEG_LUMINANCE), rtol=1e-13)
    # DC of luminance: 1/16 over the mean of 1/T; the mean of the chroma table's 1/T at q = 50 is
    # (1/17 + 2/18 + 2/24 + 2/47 + 1/21 + 2/26 + 2/66 + 1/56 + 51/99) / 64
    chroma_mean = (1 / 17 + 2 / 18 + 2 / 24 + 2 / 47 + 1 / 21 + 2 / 26 + 2 / 66 + 1 / 56 + 51 / 99) / 64
    assert w[1, 0, 0] == pytest.approx((1 / 17) / chroma_mean, rel=1e-13)
    assert w[1, 7, 7] == pytest.approx((1 / 99) / chroma_mean, rel=1e-13)


# ------------------------------------------------------------------------------------------ loss
@SETTINGS
@given(
    h=PADDABLE, w=PADDABLE, quality=st.sampled_from([1, 30, 50, 85, 100]),
    gamma=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**31),
)
def test_loss_equals_explicit_formula(h: int, w: int, quality: int, gamma: float, seed: int) -> None:
    rng = _rng(seed)
    pred, target = rng.standard_normal((2, 2, 3, h, w))
    got = R.frequency_aware_loss(pred, target, quality=quality, gamma=gamma)
    assert got == pytest.approx(explicit_loss(pred, target, quality, gamma), rel=1e-12)
    assert got > 0
    assert R.frequency_aware_loss(pred, pred, quality=quality, gamma=gamma) == 0.0


def test_loss_quality_100_is_orthonormal_mse_on_multiples_of_8() -> None:
    # All weights 1 and an orthonormal block DCT: the loss is the MSE of the YCbCr difference.
    rng = _rng(3)
    pred, target = rng.standard_normal((2, 2, 3, 16, 8))
    diff = np.einsum("ij,bjhw->bihw", JFIF, pred - target)
    assert R.frequency_aware_loss(pred, target, quality=100) == pytest.approx(np.mean(diff**2), rel=1e-12)


def test_plain_flow_matching_loss() -> None:
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    target = np.array([[1.0, 0.0], [0.0, 4.0]])
    assert R.flow_matching_loss(pred, target) == pytest.approx((4 + 9) / 4)


# ------------------------------------------------------------------------------------ bad input
IMG = np.zeros((1, 3, 8, 8))
BAD_INPUTS = [
    ("quality-zero", lambda: R.frequency_weights(0), ValueError, "quality"),
    ("quality-101", lambda: R.frequency_weights(101), ValueError, "quality"),
    ("quality-float", lambda: R.frequency_weights(85.0), TypeError, "quality"),
    ("quality-bool", lambda: R.quantisation_table(JPEG_LUMINANCE, True), TypeError, "quality"),
    ("loss-quality", lambda: R.frequency_aware_loss(IMG, IMG, quality=0), ValueError, "quality"),
    ("gamma-nan", lambda: R.frequency_weights(85, gamma=np.nan), ValueError, "gamma"),
    ("pred-nan", lambda: R.frequency_aware_loss(np.full((1, 3, 8, 8), np.nan), IMG), ValueError, "pred"),
    ("pred-inf", lambda: R.frequency_aware_loss(IMG + np.inf, IMG), ValueError, "pred"),
    ("target-nan", lambda: R.frequency_aware_loss(IMG, IMG * np.nan), ValueError, "target"),
    ("pred-channels", lambda: R.frequency_aware_loss(np.zeros((1, 4, 8, 8)), IMG), ValueError, "pred"),
    ("pred-rank", lambda: R.frequency_aware_loss(np.zeros((3, 8, 8)), IMG), ValueError, "pred"),
    ("target-shape", lambda: R.frequency_aware_loss(IMG, np.zeros((1, 3, 8, 16))), ValueError, "target"),
    ("x-rank", lambda: R.rgb_to_ycbcr(np.zeros((3, 8, 8))), ValueError, "x"),
    ("x-channels", lambda: R.ycbcr_to_rgb(np.zeros((1, 1, 8, 8))), ValueError, "x"),
    ("x-dtype", lambda: R.rgb_to_ycbcr(np.zeros((1, 3, 2, 2), dtype=complex)), TypeError, "x"),
    ("reflect-h4", lambda: R.block_dct(np.zeros((1, 3, 4, 8))), ValueError, "x"),
    ("reflect-w3", lambda: R.block_dct(np.zeros((1, 3, 8, 3))), ValueError, "x"),
    ("loss-reflect-h4", lambda: R.frequency_aware_loss(np.zeros((1, 3, 4, 8)), np.zeros((1, 3, 4, 8))),
     ValueError, "x"),
    ("coeffs-block", lambda: R.block_idct(np.zeros((1, 1, 1, 1, 4, 4))), ValueError, "coeffs"),
    ("coeffs-rank", lambda: R.block_idct(np.zeros((1, 1, 8, 8))), ValueError, "coeffs"),
    ("dct-n", lambda: R.dct_matrix(0), ValueError, "n"),
]


@pytest.mark.parametrize(("call", "error", "name"), cases(BAD_INPUTS))
def test_frequency_bad_inputs(call: Callable[[], object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=rf"^{name}:"):
        call()
