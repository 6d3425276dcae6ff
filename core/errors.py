"""The error types every layer shares, and helpers for user-facing messages.

`UsageError` is a user error of the `deco` command (one line, exit status 2); `FieldError` is the
ValueError of a configuration field, carrying the field's name so that the command line can name
the flag instead; the `field_*` helpers raise it. The `deco` command reports a user error on one
line, so exceptions are cut to their first line, and transformers' progress bars and load reports
are silenced while a model loads. Importing this module imports neither NumPy nor torch."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any


class UsageError(Exception):
    """A user error: reported as one line, exit status 2."""


class FieldError(ValueError):
    """An invalid configuration field: `str(e)` is "<field>: <message>"."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ------------------------------------------------------------------------------ fields
def field_positive(obj: Any, *names: str) -> None:
    """Each field is a positive finite number."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise FieldError(name, f"expected a positive finite float, got {value!r}")


def field_non_negative(obj: Any, *names: str) -> None:
    """Each field is a finite number >= 0."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
            raise FieldError(name, f"expected a finite float >= 0, got {value!r}")


def field_probability(obj: Any, *names: str) -> None:
    """Each field is a number in [0, 1]."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise FieldError(name, f"expected a float in [0, 1], got {value!r}")


def field_int(obj: Any, name: str, low: int, high: int | None = None) -> None:
    """The field is an int in [low, high]."""
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (
        high is not None and value > high
    ):
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise FieldError(name, f"expected {expected}, got {value!r}")


def field_finite(obj: Any, *names: str) -> None:
    """Each field is a finite number."""
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise FieldError(name, f"expected a finite float, got {value!r}")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers (the unused `lm_head` of a causal-LM
    checkpoint is reported as unexpected): a command's stderr stays one line on error."""
    from transformers.utils import logging as hf_logging  # here: transformers is an optional extra

    logging: Any = hf_logging  # partly untyped
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
