"""The forward vectors checked in a runtime that is not Python, through the vectors' file protocol:
`deco conformance --export-vector-model` writes the graph of each forward vector's model,
examples/ports/onnx-node/run.mjs runs it in onnxruntime-node and writes one `out` per forward
vector, and `deco conformance --outputs` compares them with the vectors' `expected` (the float64
reference, an independent oracle) at the float32 bound. A planted defect
(DECO_ONNX_NODE_DEFECT=negate) must fail exactly the forward vectors, with the kit's sign hint.

Needs `node` and `npm ci --ignore-scripts` in examples/ (skipped without, failed under CI).
About 10 s: three tiny exports (the vector models: D 32, 2 blocks, 8x12 images), four Node runs
of about 0.5 s each and the kit's comparisons.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, node_with_onnxruntime, rel_err
from safetensors import safe_open

from deco.cli import main

EXAMPLES = REPO_ROOT / "examples"
RUNNER = EXAMPLES / "ports" / "onnx-node" / "run.mjs"
VECTORS = REPO_ROOT / "spec" / "vectors"
ARCHITECTURES = ("deco", "baseline", "t2i")
FLOAT32_TOL = 1e-5  # spec/00 §5


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {})


def _tensor(path: Path, name: str) -> np.ndarray:
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(name)


#: The forward vectors, found from the files' metadata (not from the runner's own choice).
FORWARD = {p.stem for p in VECTORS.glob("*.safetensors")
           if _metadata(p)["component"] in ("forward", "t2i_forward")}
ALL_VECTORS = {p.stem for p in VECTORS.glob("*.safetensors")}


@pytest.fixture(scope="module")
def node() -> str:
    return node_with_onnxruntime()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MODELS/<architecture>.onnx for the three forward vectors, written by the CLI."""
    folder = tmp_path_factory.mktemp("vector-models")
    for arch in ARCHITECTURES:
        rc = main(["conformance", "--export-vector-model", str(folder / f"{arch}.onnx"),
                   "--architecture", arch, "--vectors", str(VECTORS)])
        assert rc == 0
    return folder


def run_node(node: str, out: Path, models: Path, defect: str | None = None,
             vectors: Path = VECTORS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DECO_ONNX_NODE_DEFECT"}
    env["OMP_NUM_THREADS"] = "1"
    if defect is not None:
        env["DECO_ONNX_NODE_DEFECT"] = defect
    out.mkdir(exist_ok=True)
    return subprocess.run([node, str(RUNNER), str(vectors), str(out), str(models)], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def kit_report(out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, dict]]:
    capsys.readouterr()
    rc = main(["conformance", "--outputs", str(out), "--json", "--vectors", str(VECTORS)])
    report = json.loads(capsys.readouterr().out)
    return rc, {r["vector"]: r for r in report["results"]}


def test_forward_vectors_pass_in_onnxruntime_node(node: str, models: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert len(FORWARD) == 3
    result = run_node(node, tmp_path / "out", models)
    assert result.returncode == 0, result.stderr
    written = {p.stem for p in (tmp_path / "out").glob("*.safetensors")}
    assert written == FORWARD
    for name in FORWARD:  # our own measure first, then the kit's report
        got = _tensor(tmp_path / "out" / f"{name}.safetensors", "out")
        assert got.dtype == np.float32
        assert rel_err(got, _tensor(VECTORS / f"{name}.safetensors", "expected")) < FLOAT32_TOL
    rc, records = kit_report(tmp_path / "out", capsys)
    assert rc == 0
    assert set(records) == ALL_VECTORS
    for name, record in records.items():
        if name in FORWARD:
            assert record["status"] == "pass", record
            assert record["tolerance"] == FLOAT32_TOL
        else:
            assert record["status"] == "skipped", record


def test_negated_output_fails_exactly_the_forward_vectors(node: str, models: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    result = run_node(node, tmp_path / "out", models, defect="negate")
    assert result.returncode == 0, result.stderr
    rc, records = kit_report(tmp_path / "out", capsys)
    assert rc == 1
    assert {n for n, r in records.items() if r["status"] == "FAIL"} == FORWARD
    assert {n for n, r in records.items() if r["status"] != "FAIL"} == ALL_VECTORS - FORWARD
    assert all(r["status"] == "skipped" for n, r in records.items() if n not in FORWARD)
    for name in FORWARD:
        assert records[name]["hint"]["slip"] == "sign", records[name]


def test_vector_without_its_graph_is_skipped(node: str, models: Path, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    partial.mkdir()
    shutil.copy(models / "deco.onnx", partial / "deco.onnx")
    # A graph of another config under a vector's name: not used for that vector.
    shutil.copy(models / "deco.onnx", partial / "baseline.onnx")
    result = run_node(node, tmp_path / "out", partial)
    assert result.returncode == 0, result.stderr
    assert {p.stem for p in (tmp_path / "out").glob("*.safetensors")} == {"forward_deco"}
    assert "skipped forward_t2i: no graph" in result.stdout
    assert "skipped forward_baseline:" in result.stdout and "another config" in result.stdout


def test_user_errors_are_one_line(node: str, models: Path, tmp_path: Path) -> None:
    missing = run_node(node, tmp_path / "out", tmp_path / "absent")
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"run.mjs: error: models: no such folder: {tmp_path / 'absent'}"
    unknown = run_node(node, tmp_path / "out", models, defect="nonsense")
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1 and "DECO_ONNX_NODE_DEFECT" in unknown.stderr
