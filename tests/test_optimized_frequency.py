"""`deco.optimized.frequency` against independent oracles: the float64 NumPy reference, central finite
differences of the reference loss, `torch.autograd.gradcheck`, and the release's fixture values."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIXTURE_RTOL, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from deco import reference as R
from deco.optimized import flow
from deco.optimized import frequency as L

SETTINGS = settings(max_examples=25, deadline=None)
F64_RTOL = 1e-10
F32_RTOL = 1e-5
# Every H, W the reflect padding supports (pad < size needs n >= 5), multiples of 8 and not.
SIDES = st.integers(5, 40)
BATCH = st.integers(1, 3)
QUALITY = st.integers(1, 100)
GAMMA = st.floats(0.0, 2.0)


def random_pair(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape)


def as_torch(
    pred: np.ndarray, target: np.ndarray, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(pred).to(dtype), torch.from_numpy(target).to(dtype)


@pytest.fixture(autouse=True)
def fresh_caches() -> Iterator[None]:
    """The loss caches its operator; a test that patches a module constant must not leak it."""
    L._block_operator.cache_clear()
    L._cached_weights.cache_clear()
    yield
    L._block_operator.cache_clear()
    L._cached_weights.cache_clear()


# ----------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_weights_match_reference_for_every_quality(gamma: float) -> None:
    for quality in range(1, 101):
        got = L.frequency_weights(quality, gamma, dtype=torch.float64)
        assert got.shape == (3, 8, 8) and got.dtype == torch.float64
        assert rel_err(got.numpy(), R.frequency_weights(quality, gamma)) <= F64_RTOL, quality


def test_weights_dtype_device_and_cache_isolation() -> None:
    w = L.frequency_weights(85, device="cpu", dtype=torch.bfloat16)
    assert w.dtype == torch.bfloat16 and w.device.type == "cpu"
    first = L.frequency_weights(85)
    first.zero_()  # callers get a copy: the cached tensor must survive this
    again = L.frequency_weights(85)
    assert rel_err(again.numpy(), R.frequency_weights(85, 1.0)) <= F32_RTOL


# ------------------------------------------------------------------------ loss vs reference
@SETTINGS
@given(seed=st.integers(0, 2**31), b=BATCH, h=SIDES, w=SIDES, quality=QUALITY, gamma=GAMMA)
def test_loss_float64_matches_reference(
    seed: int, b: int, h: int, w: int, quality: int, gamma: float
) -> None:
    pred, target = random_pair(seed, (b, 3, h, w))
    p, t = as_torch(pred, target)
    got = L.frequency_aware_loss(p, t, quality, gamma)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert rel_err(got.item(), R.frequency_aware_loss(pred, target, quality, gamma)) <= F64_RTOL


@SETTINGS
@given(seed=st.integers(0, 2**31), b=BATCH, h=SIDES, w=SIDES, quality=QUALITY, gamma=GAMMA)
def test_loss_float32_matches_reference(
    seed: int, b: int, h: int, w: int, quality: int, gamma: float
) -> None:
    pred, target = as_torch(*random_pair(seed, (b, 3, h, w)), dtype=torch.float32)
    got = L.frequency_aware_loss(pred, target, quality, gamma)
    assert got.dtype == torch.float32
    # The reference sees the same (float32-rounded) values: only the arithmetic differs.
    expected = R.frequency_aware_loss(pred.double().numpy(), target.double().numpy(), quality, gamma)
    assert rel_err(got.item(), expected) <= F32_RTOL


def test_bf16_inputs_and_autocast_compute_in_float32() -> None:
    pred, target = as_torch(*random_pair(1, (2, 3, 16, 21)), dtype=torch.float32)
    expected = R.frequency_aware_loss(pred.double().numpy(), target.double().numpy(), 85, 1.0)
    # Under autocast a matmul would run in bf16 (relative error ~1e-3): the loss must opt out.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.frequency_aware_loss(pred, target)
    assert got.dtype == torch.float32
    assert rel_err(got.item(), expected) <= F32_RTOL
    pred16, target16 = pred.bfloat16(), target.bfloat16()
    got16 = L.frequency_aware_loss(pred16, target16)
    expected16 = R.frequency_aware_loss(pred16.double().numpy(), target16.double().numpy(), 85, 1.0)
    assert got16.dtype == torch.float32
    assert rel_err(got16.item(), expected16) <= F32_RTOL


# -------------------------------------------------------------------------------- gradients
def reference_gradient(pred: np.ndarray, target: np.ndarray, step: float) -> np.ndarray:
    """Central finite differences of the reference loss, one coordinate at a time."""
    grad = np.zeros_like(pred)
    for index in np.ndindex(pred.shape):
        plus, minus = pred.copy(), pred.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (R.frequency_aware_loss(plus, target) - R.frequency_aware_loss(minus, target)) / (
            2 * step
        )
    return grad


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 3, 10, 9)])
def test_autograd_matches_finite_differences_of_reference(shape: tuple[int, ...]) -> None:
    # The loss is quadratic in pred, so central differences have no truncation error at all; the
    # step only sets the rounding error, ~ eps * loss / (step * |grad|) ~ 1e-16 / (1e-3 * 1e-2)
    # = 1e-11, far below the 1e-6 bound. (A smaller step would only add rounding noise.)
    pred, target = random_pair(7, shape)
    p, t = as_torch(pred, target)
    p.requires_grad_(True)
    torch.autograd.backward(L.frequency_aware_loss(p, t))
    assert p.grad is not None
    assert rel_err(p.grad.numpy(), reference_gradient(pred, target, step=1e-3)) <= 1e-6


def test_gradcheck() -> None:
    pred, target = as_torch(*random_pair(3, (1, 3, 6, 7)))
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, t: L.frequency_aware_loss(p, t, 60, 1.3), (pred, target))


# ------------------------------------------------------------------ deliberately broken variants
def matches_reference(seed: int = 0, quality: int = 85) -> bool:
    """The comparison of `test_loss_float64_matches_reference`, on one input."""
    pred, target = random_pair(seed, (2, 3, 13, 16))
    p, t = as_torch(pred, target)
    got = L.frequency_aware_loss(p, t, quality).item()
    return rel_err(got, R.frequency_aware_loss(pred, target, quality, 1.0)) <= F64_RTOL


def swap_y_cb(m: torch.Tensor) -> torch.Tensor:
    # Swapping Cb and Cr would not change the loss (both use the chrominance weights), so swap Y.
    return m[[1, 0, 2]]


def transposed_dct(n: int = 8) -> torch.Tensor:
    return torch.from_numpy(R.dct_matrix(n).T.copy())


def scale_without_low_branch(quality: int) -> float:
    return 200.0 - 2.0 * quality


BREAKAGES: dict[str, tuple[str, Callable[[], object]]] = {
    "swapped YCbCr rows": ("YCBCR_MATRIX", lambda: swap_y_cb(L.YCBCR_MATRIX)),
    "transposed DCT": ("dct_matrix", lambda: transposed_dct),
    "quality scaling without the q < 50 branch": ("quality_scale", lambda: scale_without_low_branch),
}


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_broken_variants_fail_the_reference_comparison(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert matches_reference(quality=30)
    attribute, make = BREAKAGES[name]
    monkeypatch.setattr(L, attribute, make())
    L._block_operator.cache_clear()
    assert not matches_reference(quality=30), name


# ----------------------------------------------------------------------------- release fixture
@pytest.mark.parametrize("j", [0, 1])
def test_fixture_losses_float32(fixtures_dir: Path, j: int) -> None:
    a = np.load(fixtures_dir / "A.npz")
    pred, target = (torch.from_numpy(a[f"loss{j}_{k}"]).float() for k in ("pred", "target"))
    for quality in (50, 85, 100):
        got = L.frequency_aware_loss(pred, target, quality)
        assert rel_err(got.item(), a[f"loss{j}_freq_q{quality}"]) <= FIXTURE_RTOL, quality
        weights = L.frequency_weights(quality)
        assert rel_err(weights.numpy(), a[f"freq_weight_q{quality}"].reshape(3, 8, 8)) <= FIXTURE_RTOL
    assert rel_err(flow.flow_matching_loss(pred, target).item(), a[f"loss{j}_fm"]) <= FIXTURE_RTOL


# ----------------------------------------------------------------------------------- validation
GOOD = torch.zeros(1, 3, 8, 8)


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((GOOD.numpy(), GOOD), TypeError, "pred"),
        ((GOOD, GOOD.long()), TypeError, "target"),
        ((torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)), ValueError, "pred"),
        ((torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)), ValueError, "pred"),
        ((GOOD, torch.zeros(1, 3, 8, 9)), ValueError, "target"),
        ((GOOD, GOOD, 0), ValueError, "quality"),
        ((GOOD, GOOD, 101), ValueError, "quality"),
        ((GOOD, GOOD, 85.0), TypeError, "quality"),
        ((GOOD, GOOD, True), TypeError, "quality"),
        ((GOOD, GOOD, 85, float("nan")), ValueError, "gamma"),
        ((GOOD, GOOD, 85, "1"), TypeError, "gamma"),
        ((torch.zeros(1, 3, 4, 8), torch.zeros(1, 3, 4, 8)), ValueError, "pred"),  # pad 4 >= 4
    ],
)
def test_bad_input_names_the_argument(args: tuple[object, ...], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=f"^{name}"):
        L.frequency_aware_loss(*args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- compile and devices
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_reference() -> None:
    pred, target = random_pair(11, (1, 3, 10, 9))
    p, t = as_torch(pred, target)
    p.requires_grad_(True)
    compiled = torch.compile(L.frequency_aware_loss, fullgraph=True)
    value = compiled(p, t)
    assert rel_err(value.item(), R.frequency_aware_loss(pred, target)) <= F64_RTOL
    torch.autograd.backward(value)
    assert p.grad is not None
    assert rel_err(p.grad.numpy(), reference_gradient(pred, target, step=1e-3)) <= 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference() -> None:
    pred, target = random_pair(5, (3, 3, 37, 24))
    for dtype, tolerance in ((torch.float64, F64_RTOL), (torch.float32, F32_RTOL)):
        p, t = (x.cuda() for x in as_torch(pred, target, dtype=dtype))
        expected = R.frequency_aware_loss(p.double().cpu().numpy(), t.double().cpu().numpy(), 20, 0.7)
        assert rel_err(L.frequency_aware_loss(p, t, 20, 0.7).item(), expected) <= tolerance


# ---------------------------------------------------------------- the inverse transforms (02 §1, §3)
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), batch=BATCH, h=SIDES, w=SIDES)
def test_ycbcr_to_rgb_matches_the_reference(seed: int, batch: int, h: int, w: int) -> None:
    x = np.random.default_rng(seed).standard_normal((batch, 3, h, w))
    expected = R.ycbcr_to_rgb(x)
    assert rel_err(L.ycbcr_to_rgb(torch.from_numpy(x)).numpy(), expected) <= F64_RTOL
    assert rel_err(L.ycbcr_to_rgb(torch.from_numpy(x).float()).double().numpy(), expected) <= F32_RTOL


def test_ycbcr_to_rgb_inverts_rgb_to_ycbcr() -> None:
    # closed form: M^-1 M = I, so the round trip returns the input
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 5, 7)))
    assert rel_err(L.ycbcr_to_rgb(L.rgb_to_ycbcr(x)).numpy(), x.numpy()) <= F64_RTOL


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), batch=BATCH, bh=st.integers(1, 4), bw=st.integers(1, 4))
def test_block_idct_matches_the_reference(seed: int, batch: int, bh: int, bw: int) -> None:
    d = np.random.default_rng(seed).standard_normal((batch, 2, bh, bw, 8, 8))
    expected = R.block_idct(d)
    assert rel_err(L.block_idct(torch.from_numpy(d)).numpy(), expected) <= F64_RTOL
    assert rel_err(L.block_idct(torch.from_numpy(d).float()).double().numpy(), expected) <= F32_RTOL


def test_block_idct_inverts_block_dct_on_whole_blocks() -> None:
    # the DCT matrix is orthonormal: C^T (C X C^T) C = X, block by block, in place
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((2, 3, 16, 24)))
    assert rel_err(L.block_idct(L.block_dct(x)).numpy(), x.numpy()) <= F64_RTOL


@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 8), (1, 1, 1, 1, 8, 4)])
def test_block_idct_refuses_what_is_not_8x8_blocks(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"^coeffs: expected a \(B, C, Bh, Bw, 8, 8\) tensor"):
        L.block_idct(torch.zeros(shape))
