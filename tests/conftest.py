"""Shared pytest fixtures. Helpers for all test modules live in tests/helpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import release_fixtures


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The release fixtures folder: $DECO_FIXTURES, else `<repo root>/../shared/fixtures`.

    Missing: the test is skipped locally, but fails under CI (CI set) so that CI never passes by
    silently skipping the conformance tests."""
    return release_fixtures("A.npz", "A.ckpt", "A-baseline.ckpt")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: with two on a shared 2-core machine, OpenMP spinning can
    stall a step by ~100x when another process holds a core (opt in with usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
