"""`deco.optimized.flow` against the float64 reference `deco.reference.flow` (spec/01): times,
their shift, label dropout, interpolation, target velocity and the plain flow-matching loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimized_frequency import as_torch, random_pair

from deco import reference as R
from deco.optimized import flow as T

SETTINGS = settings(max_examples=20, deadline=None)
F64_RTOL = 1e-10
F32_RTOL = 1e-5
SIDES = st.integers(1, 12)
BATCH = st.integers(1, 3)



@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 5), mean=st.floats(-2, 2), std=st.floats(0.1, 3),
       shift=st.floats(0.2, 5))
def test_time_functions_match_reference(seed: int, b: int, mean: float, std: float, shift: float) -> None:
    rng = np.random.default_rng(seed)
    normal, uniform = rng.standard_normal(b), rng.uniform(size=b)
    t = T.logit_normal_time(torch.from_numpy(normal), mean, std)
    assert rel_err(t.numpy(), R.logit_normal_time(normal, mean, std)) <= F64_RTOL
    shifted = T.time_shift(t, shift)
    expected = R.time_shift(R.logit_normal_time(normal, mean, std), shift)
    assert rel_err(shifted.numpy(), expected) <= F64_RTOL
    assert rel_err(T.uniform_time(torch.from_numpy(uniform)).numpy(), R.uniform_time(uniform)) <= F64_RTOL


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 8), p=st.floats(0, 1))
def test_drop_labels_matches_reference(seed: int, b: int, p: float) -> None:
    rng = np.random.default_rng(seed)
    labels, uniform = rng.integers(0, 10, b), rng.uniform(size=b)
    got = T.drop_labels(torch.from_numpy(labels), torch.from_numpy(uniform), p, 10)
    np.testing.assert_array_equal(got.numpy(), R.drop_labels(labels, uniform, p, 10))


@SETTINGS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9))
def test_interpolate_and_velocity_match_reference(seed: int, b: int, h: int, w: int) -> None:
    rng = np.random.default_rng(seed)
    x, noise, t = rng.standard_normal((b, 3, h, w)), rng.standard_normal((b, 3, h, w)), rng.uniform(size=b)
    got = T.interpolate(torch.from_numpy(x), torch.from_numpy(noise), torch.from_numpy(t))
    assert rel_err(got.numpy(), R.interpolate(x, noise, t)) <= F64_RTOL
    got_v = T.target_velocity(torch.from_numpy(x), torch.from_numpy(noise))
    assert rel_err(got_v.numpy(), R.target_velocity(x, noise)) <= F64_RTOL


def test_drop_labels_with_p_one_and_zero() -> None:
    labels = torch.arange(10)
    uniform = torch.rand(10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(T.drop_labels(labels, uniform, 1.0, 10), torch.full((10,), 10))
    assert torch.equal(T.drop_labels(labels, uniform, 0.0, 10), labels)


@SETTINGS
@given(seed=st.integers(0, 2**31), b=BATCH, h=SIDES, w=SIDES)
def test_flow_matching_loss_matches_reference(seed: int, b: int, h: int, w: int) -> None:
    pred, target = random_pair(seed, (b, 3, h, w))
    expected = R.flow_matching_loss(pred, target)
    p, t = as_torch(pred, target)
    assert rel_err(T.flow_matching_loss(p, t).item(), expected) <= F64_RTOL
    p32, t32 = as_torch(pred, target, dtype=torch.float32)
    expected32 = R.flow_matching_loss(p32.double().numpy(), t32.double().numpy())
    assert rel_err(T.flow_matching_loss(p32, t32).item(), expected32) <= F32_RTOL


def test_flow_matching_loss_validates() -> None:
    with pytest.raises(ValueError, match=r"^target"):
        T.flow_matching_loss(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"^pred"):
        T.flow_matching_loss([1.0], torch.zeros(1))  # type: ignore[arg-type]
