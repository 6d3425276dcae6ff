"""onnxruntime-node (examples/node/run.mjs) runs the velocity, cfg and generator graphs of both
model kinds and agrees with torch (deco.optimized) to 1e-4 in float32 (the float16 bound of
deco.deploy.export for float16 graphs); its user errors are one line with exit status 2.

Needs `node` and `npm ci --ignore-scripts` in examples/ (skipped without, failed under CI).
About 10 s of CPU beyond the 12 tiny exports shared with the other runtime tests (about 15 s):
one Node process per case.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REPO_ROOT, missing_extra, node_with_onnxruntime
from runtime_graphs import (
    GENERATOR_CASES,
    VELOCITY_CASES,
    Case,
    check_outputs,
    feed_for,
    runtime_cases,
    session_folder,
)
from safetensors.numpy import load_file, save_file

EXAMPLES = REPO_ROOT / "examples"
RUNNER = EXAMPLES / "node" / "run.mjs"
CASES, GENERATORS = VELOCITY_CASES, GENERATOR_CASES


@pytest.fixture(scope="module")
def node() -> str:
    return node_with_onnxruntime()


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Case], str | None]:
    built, missing = runtime_cases(session_folder(tmp_path_factory))
    return {c.name: c for c in built}, missing


def graph_inputs(path: Path) -> list[str]:
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def run_node(node: str, model: Path, inputs: Path, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([node, str(RUNNER), str(model), str(inputs), str(out)], capture_output=True,
                          text=True, timeout=120, env=env)


def check_case(node: str, case: Case, tmp_path: Path) -> None:
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"
    save_file(feed_for(case, graph_inputs(case.model)), str(inputs))
    result = run_node(node, case.model, inputs, out)
    assert result.returncode == 0, result.stderr
    got = load_file(str(out))
    check_outputs("node", case, got)


@pytest.mark.parametrize("name", CASES)
def test_node_matches_torch(node: str, cases: tuple[dict[str, Case], str | None], name: str,
                            tmp_path: Path) -> None:
    check_case(node, cases[0][name], tmp_path)


@pytest.mark.parametrize("name", GENERATORS)
def test_node_generator_matches_torch(node: str, cases: tuple[dict[str, Case], str | None], name: str,
                                      tmp_path: Path) -> None:
    if cases[1]:
        missing_extra(cases[1])
    check_case(node, cases[0][name], tmp_path)


@pytest.mark.parametrize("change, message", [
    ("channels", r"^run\.mjs: error: x: expected shape \(batch, 3, height, width\), got \(2, 4, 8, 12\)$"),
    ("patch", r"^run\.mjs: error: x: height and width must be multiples of the patch size 4, got 8x10$"),
    ("batch", r"^run\.mjs: error: t: dimension batch is 3 here but 2 in x$"),
    ("missing", r"^run\.mjs: error: inputs: missing y \(the graph takes x, t, y\)$"),
    ("dtype", r"^run\.mjs: error: y: expected int64, got float32$"),
    ("model", r"^run\.mjs: error: model: no such file: .*absent\.onnx$"),
])
def test_node_user_errors_are_one_line_and_write_nothing(
        node: str, cases: tuple[dict[str, Case], str | None], change: str, message: str,
        tmp_path: Path) -> None:
    case = cases[0]["class-velocity-float32"]
    feed = dict(case.inputs)
    model = case.model
    if change == "channels":
        feed["x"] = np.zeros((2, 4, 8, 12), np.float32)
    elif change == "patch":
        feed["x"] = np.zeros((2, 3, 8, 10), np.float32)
    elif change == "batch":
        feed["t"] = np.zeros(3, np.float32)
    elif change == "missing":
        del feed["y"]
    elif change == "dtype":
        feed["y"] = feed["y"].astype(np.float32)
    else:
        model = tmp_path / "absent.onnx"
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"
    save_file(feed, str(inputs))
    result = run_node(node, model, inputs, out)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert re.match(message, result.stderr.strip()), result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["inputs.safetensors"]
