"""onnxruntime's Python binding (CPU provider) on the same graphs as the other runtime tests
(tests/runtime_graphs.py): velocity, cfg (float32 and float16) and generator graphs of both
model kinds against torch (deco.optimized), so the runtime table of examples/README.md has one
column per runtime from one set of graphs and inputs. About 2 s beyond the shared exports."""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
import pytest
from helpers import missing_extra
from runtime_graphs import (
    GENERATOR_CASES,
    VELOCITY_CASES,
    Case,
    check_outputs,
    feed_for,
    runtime_cases,
    session_folder,
)

CASES, GENERATORS = VELOCITY_CASES, GENERATOR_CASES


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Case], str | None]:
    built, missing = runtime_cases(session_folder(tmp_path_factory))
    return {c.name: c for c in built}, missing


def run_onnxruntime(case: Case) -> dict[str, Any]:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # float16 graphs warn about constant folding, nothing else
    session = ort.InferenceSession(str(case.model), options, providers=["CPUExecutionProvider"])
    feed = feed_for(case, [i.name for i in session.get_inputs()])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def check_case(case: Case) -> None:
    got = run_onnxruntime(case)
    check_outputs("onnxruntime", case, got)


@pytest.mark.parametrize("name", CASES)
def test_onnxruntime_matches_torch(cases: tuple[dict[str, Case], str | None], name: str) -> None:
    check_case(cases[0][name])


@pytest.mark.parametrize("name", GENERATORS)
def test_onnxruntime_generator_matches_torch(cases: tuple[dict[str, Case], str | None], name: str) -> None:
    if cases[1]:
        missing_extra(cases[1])
    check_case(cases[0][name])
