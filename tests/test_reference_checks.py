"""deco.reference.checks: the validators behind every reference function's errors (spec/00 §4):
TypeError for the wrong kind of value, ValueError for a wrong value, a message that starts with
the argument's name; valid values come back converted (float64 arrays, int64 labels)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from deco.reference import checks


@pytest.mark.parametrize(("call", "error"), [
    (lambda: checks.as_float_array("x", "abc"), TypeError),
    (lambda: checks.as_float_array("x", np.array([True])), TypeError),
    (lambda: checks.as_float_array("x", np.zeros((2, 3)), ndim=4), ValueError),
    (lambda: checks.as_float_array("x", np.zeros((1, 2, 4, 4)), ndim=4, channels=3), ValueError),
    (lambda: checks.as_float_array("x", [1.0, math.nan]), ValueError),
    (lambda: checks.as_labels("y", np.array([0.5]), batch=1, num_classes=10), TypeError),
    (lambda: checks.as_labels("y", np.array([1, 2]), batch=3, num_classes=10), ValueError),
    (lambda: checks.as_labels("y", np.array([11]), batch=1, num_classes=10), ValueError),
    (lambda: checks.as_labels("y", np.array([-1]), batch=1, num_classes=10), ValueError),
    (lambda: checks.as_int("steps", 2.0, low=1), TypeError),
    (lambda: checks.as_int("steps", True, low=1), TypeError),
    (lambda: checks.as_int("steps", 0, low=1), ValueError),
    (lambda: checks.as_int("quality", 101, low=1, high=100), ValueError),
    (lambda: checks.as_finite_float("steps", "1"), TypeError),
    (lambda: checks.as_finite_float("steps", math.inf), ValueError),
    (lambda: checks.as_finite_float("steps", 0.0, positive=True), ValueError),
])
def test_errors_have_the_right_type_and_name_the_argument(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert str(info.value).split(":")[0] in {"x", "y", "steps", "quality"}


def test_valid_values_come_back_converted() -> None:
    x = checks.as_float_array("x", np.ones((1, 3, 2, 2), dtype=np.int32), ndim=4, channels=3)
    assert x.dtype == np.float64 and x.shape == (1, 3, 2, 2)
    y = checks.as_labels("y", np.array([0, 10], dtype=np.int8), batch=2, num_classes=10)
    assert y.dtype == np.int64 and y.tolist() == [0, 10]  # 10: the null class
    assert checks.as_labels("y", np.zeros(0, dtype=np.int64), batch=0, num_classes=10).shape == (0,)
    assert checks.as_int("q", np.int16(100), low=1, high=100) == 100
    assert checks.as_finite_float("t", np.float32(0.5)) == 0.5
