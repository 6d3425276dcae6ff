"""Pins for `deco.optimized.flow` found by mutation testing (tests/MUTATION.md): caption dropout
(`drop_text`, the text model's label dropout) against the float64 reference, including draws
exactly at p (kept: the test is strict, uniform < p) and the closed ends p = 0 and p = 1, and the
argument checks of both dropout functions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from helpers import cases

from deco import reference as R
from deco.optimized import flow as T


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_drop_text_matches_reference(p: float) -> None:
    rng = np.random.default_rng(7)
    text, null = rng.standard_normal((5, 4, 6)), rng.standard_normal((4, 6))
    uniform = np.array([0.0, 0.25, 0.5, 0.75, 0.999])  # draws exactly at each p
    got = T.drop_text(torch.from_numpy(text), torch.from_numpy(uniform), p, torch.from_numpy(null))
    expected = R.drop_text(text, uniform, p, null)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_drop_text_casts_the_null_embedding_to_the_text_dtype() -> None:
    text = torch.zeros(2, 3, 4, dtype=torch.float32)
    null = torch.ones(3, 4, dtype=torch.float64)
    got = T.drop_text(text, torch.tensor([0.0, 0.9]), 0.5, null)
    assert got.dtype == torch.float32
    assert torch.equal(got[0], torch.ones(3, 4)) and torch.equal(got[1], torch.zeros(3, 4))


def _text() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros(2, 3, 4), torch.zeros(2), torch.zeros(3, 4)


DROP_TEXT_ERRORS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("p above 1", {"p": 1.5}, ValueError, r"^p: "),
    ("p below 0", {"p": -0.1}, ValueError, r"^p: "),
    ("integer text", {"text": torch.zeros(2, 3, 4, dtype=torch.int64)}, TypeError, r"^text: "),
    ("2-D text", {"text": torch.zeros(3, 4)}, TypeError, r"^text: "),
    ("4-D text", {"text": torch.zeros(2, 3, 4, 1)}, TypeError, r"^text: "),
    ("null of another shape", {"null": torch.zeros(4, 3)}, ValueError, r"^null: "),
    ("uniform of another batch", {"uniform": torch.zeros(3)}, ValueError, r"^uniform: "),
]


@pytest.mark.parametrize(("overrides", "error", "match"), cases(DROP_TEXT_ERRORS))
def test_drop_text_refuses_bad_arguments(overrides: dict[str, Any], error: type[Exception],
                                         match: str) -> None:
    text, uniform, null = _text()
    kwargs: dict[str, Any] = {"text": text, "uniform": uniform, "p": 0.5, "null": null, **overrides}
    with pytest.raises(error, match=match):
        T.drop_text(**kwargs)


def test_drop_labels_refuses_bad_arguments() -> None:
    labels, uniform = torch.tensor([1, 2]), torch.zeros(2)
    with pytest.raises(ValueError, match=r"^p: "):
        T.drop_labels(labels, uniform, 1.5, 10)
    with pytest.raises(ValueError, match=r"^p: "):
        T.drop_labels(labels, uniform, -0.5, 10)
    with pytest.raises(TypeError, match=r"^labels: "):
        T.drop_labels(labels.double(), uniform, 0.5, 10)
    with pytest.raises(TypeError, match=r"^labels: "):
        T.drop_labels(labels[None], uniform[None], 0.5, 10)
    with pytest.raises(ValueError, match=r"^uniform: "):
        T.drop_labels(labels, torch.zeros(3), 0.5, 10)
    # p = 0 and p = 1 are valid probabilities (the closed interval)
    assert torch.equal(T.drop_labels(labels, uniform, 0.0, 10), labels)
    assert torch.equal(T.drop_labels(labels, uniform, 1.0, 10), torch.tensor([10, 10]))
