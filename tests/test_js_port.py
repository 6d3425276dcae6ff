"""The JavaScript port (examples/ports/js), a non-Python port checked through the vectors' file
protocol: run.js reads spec/vectors and writes one `out` per vector it implements; every output
is compared with the vector's `expected` (computed by the float64 reference, an independent
oracle) at the float64 bound. A planted defect (DECO_JS_DEFECT=transpose_dct) must fail exactly
the vectors that go through the block DCT.

Needs `node` (>= 18) on PATH: skipped locally without it, failed under CI (CI set), as for the
release fixtures (helpers.release_fixtures)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, rel_err
from safetensors import safe_open

PORT = REPO_ROOT / "examples" / "ports" / "js"
VECTORS = REPO_ROOT / "spec" / "vectors"
FLOAT64_TOL = 1e-10  # spec/00 §5
FLOAT32_TOL = 1e-5

#: The components the port implements (its README), i.e. the vectors it must write.
JS_COMPONENTS = {"rgb_to_ycbcr", "block_dct", "frequency_weights", "frequency_aware_loss",
                 "timestep_features", "rope_angles", "dct_position_features", "time_grid"}

#: The vectors a transposed DCT must fail: the block DCT ones (block_dct, block_dct_small and
#: each loss's DCT stage), and the four losses, because their luminance weights are not symmetric
#: in (u, v) (table K.1 is not; K.2 is), so swapping u and v moves coefficients onto other
#: weights (err 2.8e-3 to 1.8e-2). A loss vector at quality 100 (all weights 1) would not
#: notice; there is none. The loss's other stages (YCbCr, weights) do not use the DCT.
LOSSES = ("loss_q85", "loss_q30_gamma2", "loss_q30", "loss_q85_gamma_half")
TRANSPOSE_DCT_FAILS = {"block_dct", "block_dct_small", *LOSSES, *(f"{n}_dct" for n in LOSSES)}


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable (skip locally / fail under CI when absent)."""
    found = shutil.which("node")
    if found is None:
        message = "node not found on PATH (the JavaScript port's tests need Node >= 18)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_port(node: str, out: Path, *extra: str, defect: str | None = None,
             vectors: Path = VECTORS) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DECO_JS_DEFECT"}
    if defect is not None:
        env["DECO_JS_DEFECT"] = defect
    return subprocess.run([node, str(PORT / "run.js"), str(vectors), str(out), *extra],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


def _read(path: Path, name: str) -> tuple[dict[str, str], np.ndarray]:
    with safe_open(str(path), framework="np") as f:
        return dict(f.metadata() or {}), f.get_tensor(name)


# --- The comparison of written outputs with the vectors (spec/00 §5, spec/vectors/README.md:
# --- err = max|got - exp| / max|exp|; RoPE angles through (cos, sin), i.e. modulo 2 pi).
def output_errors(out: Path, dtype: type = np.float64) -> dict[str, float]:
    """vector name -> err of the port's output, for every output file in `out`; inf for a
    wrong shape, a NaN or a dtype other than `dtype`."""
    errors = {}
    for written in sorted(out.glob("*.safetensors")):
        meta, expected = _read(VECTORS / written.name, "expected")
        _, got = _read(written, "out")
        if got.dtype != dtype or not np.all(np.isfinite(got)):
            errors[written.stem] = float("inf")
            continue
        if meta["component"] == "rope_angles":
            got = np.stack([np.cos(got), np.sin(got)])
            expected = np.stack([np.cos(expected), np.sin(expected)])
        errors[written.stem] = rel_err(got, expected)
    return errors


def implemented_vectors() -> set[str]:
    """The vectors whose component the port implements, from the vector files' metadata."""
    names = set()
    for path in VECTORS.glob("*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {})["component"] in JS_COMPONENTS:
                names.add(path.stem)
    return names


def test_port_passes_its_vectors_in_float64(node: str, tmp_path: Path) -> None:
    proc = run_port(node, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = output_errors(tmp_path)
    assert set(errors) == implemented_vectors() and len(errors) == 40
    assert {k: e for k, e in errors.items() if not e <= FLOAT64_TOL} == {}
    for name in errors:
        assert f"wrote   {name} (" in proc.stdout
    assert "skipped forward_deco (forward: not implemented)" in proc.stdout


def test_transposed_dct_fails_exactly_the_dct_vectors(node: str, tmp_path: Path) -> None:
    proc = run_port(node, tmp_path, defect="transpose_dct")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = output_errors(tmp_path)
    assert set(errors) == implemented_vectors()
    assert {k for k, e in errors.items() if not e <= FLOAT64_TOL} == TRANSPOSE_DCT_FAILS
    # a convention slip, not rounding: far above even the float32 bound
    assert min(errors[k] for k in TRANSPOSE_DCT_FAILS) > 1e-3


def test_float32_outputs(node: str, tmp_path: Path) -> None:
    proc = run_port(node, tmp_path, "--precision", "float32")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta, _ = _read(tmp_path / "ycbcr.safetensors", "out")
    assert meta["precision"] == "float32"
    errors = output_errors(tmp_path, np.float32)
    assert set(errors) == implemented_vectors()
    assert {k: e for k, e in errors.items() if not e <= FLOAT32_TOL} == {}


@pytest.mark.parametrize(("args", "defect", "message"), [
    (["missing", "out"], None, "run.js: VECTORS_DIR: cannot read folder"),
    (["spec", "out"], None, "run.js: VECTORS_DIR: no .safetensors vector files in"),
    (["spec/vectors", "out", "--precision", "float16"], None,
     "run.js: --precision: expected float64 or float32"),
    (["spec/vectors"], None, "run.js: usage: node run.js VECTORS_DIR OUT_DIR"),
    (["spec/vectors", "out"], "transpose", "run.js: DECO_JS_DEFECT: expected one of transpose_dct"),
])
def test_usage_errors_exit_2_with_one_line(node: str, tmp_path: Path, args: list[str],
                                           defect: str | None, message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DECO_JS_DEFECT"}
    if defect is not None:
        env["DECO_JS_DEFECT"] = defect
    folders = {"missing": tmp_path / "missing", "out": tmp_path / "out", "spec": REPO_ROOT / "spec",
               "spec/vectors": VECTORS}
    argv = [str(folders.get(a, a)) for a in args]
    proc = subprocess.run([node, str(PORT / "run.js"), *argv], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr


def test_unreadable_vector_file_is_an_error_line_and_status_1(node: str, tmp_path: Path) -> None:
    vectors = tmp_path / "vectors"
    vectors.mkdir()
    shutil.copy(VECTORS / "time_grid.safetensors", vectors)
    (vectors / "broken.safetensors").write_bytes(json.dumps({"not": "safetensors"}).encode())
    proc = run_port(node, tmp_path / "out", vectors=vectors)
    assert proc.returncode == 1
    assert "ERROR   broken: " in proc.stdout and "wrote   time_grid (" in proc.stdout
    assert output_errors(tmp_path / "out")["time_grid"] <= FLOAT64_TOL


def test_node_unit_tests(node: str) -> None:
    """The port's own `node --test` suite (safetensors round trip, the spec's worked examples)."""
    proc = subprocess.run([node, "--test"], cwd=PORT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


# --- The same outputs through the kit's file protocol, as a porter in any language checks them.
def kit_records(out: Path, capsys: pytest.CaptureFixture[str],
                *precision: str) -> dict[str, dict[str, object]]:
    """`deco conformance --outputs OUT --json` (exit status 0 or 1) -> vector name -> record."""
    from deco.cli import main

    status = main(["conformance", "--outputs", str(out), *precision, "--json"])
    records = json.loads(capsys.readouterr().out)["results"]
    assert status == (0 if all(r["status"] in ("pass", "skipped") for r in records) else 1)
    return {r["vector"]: r for r in records}


def test_kit_passes_the_port_through_the_file_protocol(node: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_port(node, tmp_path).returncode == 0
    records = kit_records(tmp_path, capsys, "--precision", "float64")
    assert {n for n, r in records.items() if r["status"] == "pass"} == implemented_vectors()
    assert {r["status"] for n, r in records.items() if n not in implemented_vectors()} == {"skipped"}


def test_kit_names_the_planted_transposition(node: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run_port(node, tmp_path, defect="transpose_dct").returncode == 0
    records = kit_records(tmp_path, capsys, "--precision", "float64")
    assert {n for n, r in records.items() if r["status"] == "FAIL"} == TRANSPOSE_DCT_FAILS
    hint = records["block_dct"]["hint"]
    assert isinstance(hint, dict) and hint["slip"] == "transposed"


#: The port's catalogue slips (deco.js DEFECTS, named as deco.conformance.differential names them).
JS_SLIPS = ("pad_symmetric", "dct_width_inverse", "quality_integer_division", "time_max_period_10000",
            "rope_integer_positions", "timeshift_inverted")


@pytest.mark.parametrize("slip", JS_SLIPS)
def test_kit_names_each_catalogue_slip_through_the_file_protocol(
        node: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], slip: str) -> None:
    """The JS port with a slip fails exactly the vectors that the float64 reference with the same
    catalogue variant planted fails (the audit's row, computed in Python), and each failure names
    the variant."""
    from deco.conformance import load_vectors
    from deco.conformance.audit import NAMED, audit_variant
    from deco.conformance.differential import BY_NAME

    vectors = load_vectors(VECTORS)
    row = audit_variant(BY_NAME[slip], vectors)
    expected = {v.name for v, c in zip(vectors, row.cells, strict=True) if c == NAMED}
    assert run_port(node, tmp_path, defect=slip).returncode == 0
    records = kit_records(tmp_path, capsys, "--precision", "float64")
    failed = {n for n, r in records.items() if r["status"] == "FAIL"}
    assert failed and failed == expected & implemented_vectors(), failed
    for name in failed:
        record = records[name]
        assert isinstance(record["hint"], dict), record
        named = [e["variants"] for e in record["explanations"]]  # type: ignore[union-attr]
        assert [slip] in named and record["explanations"][0]["exact"], (name, named)  # type: ignore[index]
