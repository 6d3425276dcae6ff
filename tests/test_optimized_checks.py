"""deco.optimized.checks: the validators behind every entry point's errors (spec/00-conventions.md
§4): TypeError for the wrong kind of value, ValueError for a wrong value, and a message that starts
with the argument's name. The same cases as tests/test_reference_checks.py, on the torch side."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from deco.optimized import checks


@pytest.mark.parametrize(("call", "error"), [
    (lambda: checks.as_int("steps", 2.0), TypeError),
    (lambda: checks.as_int("steps", True), TypeError),
    (lambda: checks.as_int("steps", 0), ValueError),
    (lambda: checks.as_finite_float("steps", "1"), TypeError),
    (lambda: checks.as_finite_float("steps", math.nan), ValueError),
    (lambda: checks.check_quality(85.0), TypeError),
    (lambda: checks.check_quality(101), ValueError),
    (lambda: checks.check_gamma(math.inf), ValueError),
    (lambda: checks.check_pair(torch.zeros(1, 3, 8, 8), [0.0], images=True), TypeError),
    (lambda: checks.check_pair(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), images=True), ValueError),
    (lambda: checks.check_batch(torch.zeros(2, 3, 4, 4), torch.zeros(2)), TypeError),
    (lambda: checks.check_batch(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long)), ValueError),
])
def test_errors_have_the_right_type_and_name_the_argument(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert str(info.value).split(":")[0] in {"steps", "quality", "gamma", "pred", "target", "x", "y"}


def test_valid_values_pass_through() -> None:
    assert checks.as_int("steps", 3) == 3 and checks.as_finite_float("g", 2) == 2.0
    assert checks.check_quality(85) == 85 and checks.check_gamma(0) == 0.0


