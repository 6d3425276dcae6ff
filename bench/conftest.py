"""Fixtures of the benchmarks (pytest-benchmark). See bench/README.md for how to run them."""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch
from common import PROFILES, Sizes, load_release_module, release_source


@pytest.fixture(scope="session")
def profile(request: pytest.FixtureRequest) -> dict[str, Sizes]:
    """$DECO_BENCH_PROFILE; by default "smoke" when timing is off (--benchmark-disable, the CI
    smoke run: every code path, tiny sizes) and "cpu" otherwise."""
    name = os.environ.get("DECO_BENCH_PROFILE")
    if name is None:
        name = "smoke" if request.config.getoption("benchmark_disable") else "cpu"
    if name not in PROFILES:
        raise pytest.UsageError(f"DECO_BENCH_PROFILE: expected one of {sorted(PROFILES)}, got {name!r}")
    return PROFILES[name]


@pytest.fixture(scope="session")
def release() -> ModuleType:
    """The release's model module from $DECO_RELEASE_SRC; the benchmark is skipped when unset."""
    root = release_source()
    if root is None:
        pytest.skip("DECO_RELEASE_SRC is not set (point it at the release's folder to compare)")
    return load_release_module(root)


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
