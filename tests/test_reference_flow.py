"""Flow-matching pieces of `deco.reference` (spec/01-flow-matching.md): closed forms and endpoints."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from helpers import cases
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit

from deco import reference as R

SETTINGS = settings(max_examples=30, deadline=None)


@SETTINGS
@given(b=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_interpolate_endpoints_and_velocity(b: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x, noise = rng.standard_normal((2, b, 3, 4, 5))
    np.testing.assert_array_equal(R.interpolate(x, noise, np.zeros(b)), noise)  # t = 0: noise
    np.testing.assert_array_equal(R.interpolate(x, noise, np.ones(b)), x)  # t = 1: data
    t = rng.uniform(size=b)
    xt = R.interpolate(x, noise, t)
    for i in range(b):  # per-sample times
        np.testing.assert_allclose(xt[i], t[i] * x[i] + (1 - t[i]) * noise[i], rtol=1e-14)
    # the target velocity is the time derivative of x_t (exact: x_t is linear in t)
    dt = 1e-3
    fd = (R.interpolate(x, noise, np.clip(t + dt, 0, 1)) - R.interpolate(x, noise, np.clip(t - dt, 0, 1)))
    span = (np.clip(t + dt, 0, 1) - np.clip(t - dt, 0, 1)).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(fd / span, R.target_velocity(x, noise), rtol=1e-8, atol=1e-10)


@SETTINGS
@given(shift=st.floats(0.05, 20.0), n=st.integers(2, 50))
def test_time_shift_formula(shift: float, n: int) -> None:
    t = np.linspace(0, 1, n)
    got = R.time_shift(t, shift)
    np.testing.assert_allclose(got, t / (t + (1 - t) * shift), rtol=1e-14)
    assert got[0] == 0.0 and got[-1] == 1.0
    assert np.all(np.diff(got) > 0)
    if shift > 1:  # s > 1 moves every interior time towards noise
        assert np.all(got[1:-1] < t[1:-1])
    # the shift is a Moebius map: shifting by s then 1/s is the identity
    np.testing.assert_allclose(R.time_shift(got, 1 / shift), t, atol=1e-12)


def test_time_shift_identity() -> None:
    t = np.random.default_rng(0).uniform(size=100)
    np.testing.assert_array_equal(R.time_shift(t, 1.0), t)
    assert R.time_shift(0.5, 3.0) == pytest.approx(0.25)  # 0.5 / (0.5 + 0.5 * 3)


@SETTINGS
@given(mean=st.floats(-3, 3), std=st.floats(0.1, 3), seed=st.integers(0, 2**31))
def test_logit_normal(mean: float, std: float, seed: int) -> None:
    n = np.random.default_rng(seed).standard_normal(1001)
    t = R.logit_normal_time(n, mean, std)
    assert np.all((t > 0) & (t < 1))
    np.testing.assert_allclose(t, expit(mean + std * n), rtol=1e-13)
    # sigmoid is monotone: the median of t is sigmoid(mean) for draws whose median is 0
    sym = np.concatenate([n, -n, [0.0]])
    assert np.median(R.logit_normal_time(sym, mean, std)) == pytest.approx(expit(mean), rel=1e-13)


def test_logit_normal_median_statistically() -> None:
    n = np.random.default_rng(1).standard_normal(20001)
    assert np.median(R.logit_normal_time(n, 0.4, 1.2)) == pytest.approx(expit(0.4), abs=0.01)


def test_uniform_time_is_identity_on_draws() -> None:
    u = np.random.default_rng(0).uniform(size=10)
    np.testing.assert_array_equal(R.uniform_time(u), u)


def test_drop_labels() -> None:
    labels = np.array([0, 3, 7, 9, 2])
    u = np.array([0.0, 0.2, 0.5, 0.999, 0.3])
    np.testing.assert_array_equal(R.drop_labels(labels, u, 0.0, 10), labels)
    np.testing.assert_array_equal(R.drop_labels(labels, u, 1.0, 10), np.full(5, 10))
    # p = 0.3: dropped exactly where u < 0.3 (strict)
    np.testing.assert_array_equal(R.drop_labels(labels, u, 0.3, 10), [10, 10, 7, 9, 2])
    assert R.drop_labels(labels, u, 0.5, 10).dtype == np.int64


def test_flow_matching_loss_is_mse() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 2, 3, 5, 7))
    assert R.flow_matching_loss(pred, target) == pytest.approx(np.sum((pred - target) ** 2) / pred.size)
    assert R.flow_matching_loss(pred, pred) == 0.0


# ---------------------------------------------------------------------------------- bad input
X = np.zeros((2, 3, 4, 4))
BAD_INPUTS = [
    ("noise-shape", lambda: R.interpolate(X, np.zeros((2, 3, 4, 5)), [0.5, 0.5]), ValueError, "noise"),
    ("t-shape", lambda: R.interpolate(X, X, [0.5]), ValueError, "t"),
    ("t-range", lambda: R.interpolate(X, X, [0.5, 1.5]), ValueError, "t"),
    ("t-nan", lambda: R.interpolate(X, X, [0.5, np.nan]), ValueError, "t"),
    ("x-inf", lambda: R.interpolate(np.full((2, 3, 4, 4), np.inf), X, [0.5, 0.5]), ValueError, "x"),
    ("x-str", lambda: R.interpolate("image", X, [0.5, 0.5]), TypeError, "x"),
    ("shift-zero", lambda: R.time_shift([0.5], 0.0), ValueError, "shift"),
    ("shift-nan", lambda: R.time_shift([0.5], np.nan), ValueError, "shift"),
    ("shift-t-range", lambda: R.time_shift([-0.1], 1.0), ValueError, "t"),
    ("std-negative", lambda: R.logit_normal_time([0.0], 0.0, -1.0), ValueError, "std"),
    ("normal-nan", lambda: R.logit_normal_time([np.nan]), ValueError, "normal"),
    ("uniform-range", lambda: R.uniform_time([1.5]), ValueError, "uniform"),
    ("p-range", lambda: R.drop_labels([1, 2], [0.1, 0.2], 1.5, 10), ValueError, "p"),
    ("labels-float", lambda: R.drop_labels([1.0, 2.0], [0.1, 0.2], 0.5, 10), TypeError, "labels"),
    ("uniform-shape", lambda: R.drop_labels([1, 2], [0.1], 0.5, 10), ValueError, "uniform"),
    ("target-shape", lambda: R.flow_matching_loss(np.zeros((2, 3)), np.zeros((3, 2))), ValueError, "target"),
    ("pred-inf", lambda: R.flow_matching_loss(np.array([np.inf]), np.zeros(1)), ValueError, "pred"),
]


@pytest.mark.parametrize(("call", "error", "name"), cases(BAD_INPUTS))
def test_flow_bad_inputs(call: Callable[[], object], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=rf"^{name}:"):
        call()
