"""deco.errors: the configuration-field checks every config class uses (spec/00-conventions.md §4):
a `FieldError` is a ValueError that carries the field's name, so the command line can name the flag."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest

from deco import errors


@dataclass
class Fields:
    a: Any = 1.0
    n: Any = 1


@pytest.mark.parametrize(("check", "value"), [
    (lambda o: errors.field_positive(o, "a"), 0.0),
    (lambda o: errors.field_positive(o, "a"), math.inf),
    (lambda o: errors.field_non_negative(o, "a"), -1e-9),
    (lambda o: errors.field_probability(o, "a"), 1.5),
    (lambda o: errors.field_finite(o, "a"), math.nan),
    (lambda o: errors.field_positive(o, "a"), True),
])
def test_field_errors_carry_the_field(check: Any, value: Any) -> None:
    with pytest.raises(errors.FieldError) as info:
        check(Fields(a=value))
    assert info.value.field == "a" and str(info.value).startswith("a: ")
    assert isinstance(info.value, ValueError)


def test_field_int_bounds() -> None:
    errors.field_int(Fields(n=100), "n", 1, 100)
    for bad in (0, 101, 5.0, False):
        with pytest.raises(errors.FieldError, match=r"^n: expected an int in \[1, 100\]"):
            errors.field_int(Fields(n=bad), "n", 1, 100)
