"""Helpers for user-facing messages: the `deco` command reports a user error on one line, so
exceptions are cut to their first line and transformers' progress bars and load reports are
silenced while a model loads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers (the unused `lm_head` of a causal-LM
    checkpoint is reported as unexpected): a command's stderr stays one line on error."""
    from transformers.utils import logging as hf_logging

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
