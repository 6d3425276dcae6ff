"""The conformance kit for ports in any language (deco.conformance.outputs, the file protocol of
spec/vectors/README.md): `--outputs`, `--list`, `--export-vectors`, and the `--json` / `--junit`
reports.

The outputs are written by `foreign_port` below, which follows the file protocol as a port in
another language would: it reads each vector file itself (metadata `component`, `args`,
`config`, `velocity_model`; tensors `in.*`, `w.*`), never the kit's loader, and writes
`<vector>.safetensors` with the tensor `out`. It computes with the float64 reference, so every
output must pass; the defects are then planted in the files.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO_ROOT
from safetensors import safe_open
from safetensors.numpy import save_file

from deco import reference as ref
from deco.cli import main
from deco.config import DeCoConfig
from deco.conformance import ReferencePort as P

VECTORS = REPO_ROOT / "spec" / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.safetensors"))


def _read(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(metadata, inputs without `in.`, weights without `w.`) of one vector file."""
    with safe_open(str(path), framework="np") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return (meta, {k[3:]: v for k, v in tensors.items() if k.startswith("in.")},
            {k[2:]: v for k, v in tensors.items() if k.startswith("w.")})


def _model(name: str) -> ref.Model:
    meta, _, weights = _read(VECTORS / f"{name}.safetensors")
    return ref.Model(DeCoConfig.from_dict(json.loads(meta["config"])), weights)


def _adams_table(rows: list[np.ndarray], order: int) -> np.ndarray:
    table = np.zeros((len(rows), order))
    for i, row in enumerate(rows):
        table[i, order - len(row):] = row
    return table


def _compute(component: str, i: dict[str, Any], a: dict[str, Any], w: dict[str, Any],
             c: dict[str, Any], model: Any) -> Any:
    """A port's answer for one vector, the arguments taken as the README's protocol table says."""
    interval = tuple(a.get("interval", (0.0, 1.0)))
    table: dict[str, Any] = {
        "rgb_to_ycbcr": lambda: P.rgb_to_ycbcr(i["x"]),
        "block_dct": lambda: P.block_dct(i["x"]),
        "frequency_weights": lambda: np.stack([P.frequency_weights(int(q), float(g))
                                               for q, g in zip(i["quality"], i["gamma"], strict=True)]),
        "frequency_aware_loss": lambda: np.array([P.frequency_aware_loss(
            i["pred"], i["target"], a["quality"], a["gamma"])]),
        "timestep_features": lambda: P.timestep_features(i["t"]),
        "rope_angles": lambda: P.rope_angles(a["grid_h"], a["grid_w"], a["head_dim"]),
        "apply_rope": lambda: P.apply_rope(i["x"], i["angles"]),
        "dit_block": lambda: P.dit_block(i["x"], i["c"], w, a["num_heads"], i["angles"]),
        "dct_position_features": lambda: P.dct_position_features(a["patch_size"]),
        "decoder_block": lambda: P.decoder_block(i["x"], i["cond"], w),
        "forward": lambda: P.forward(c, w, i["x"], i["t"], i["y"]),
        "text_rope_angles": lambda: P.text_rope_angles(a["grid_h"], a["grid_w"], a["head_dim"]),
        "text_position_features": lambda: P.text_position_features(a["patch_size"]),
        "text_embedding": lambda: P.text_embedding(i["text"], w),
        "text_refine_block": lambda: P.text_refine_block(i["x"], i["c"], w, a["num_heads"]),
        "joint_dit_block": lambda: P.joint_dit_block(i["x"], i["text"], i["c"], w, a["num_heads"],
                                                     i["angles"]),
        "t2i_forward": lambda: P.t2i_forward(c, w, i["x"], i["t"], i["text"]),
        "time_grid": lambda: P.time_grid(a["steps"], a["timeshift"]),
        "euler": lambda: P.euler(model, i["noise"], i["labels"], a["steps"], a["timeshift"],
                                 a["guidance"], interval),
        "heun": lambda: P.heun(model, i["noise"], i["labels"], a["steps"], a["timeshift"],
                               a["guidance"], interval, a["exact"]),
        "adams_weights": lambda: _adams_table(P.adams_weights(i["grid"], a["order"]), a["order"]),
        "adams": lambda: P.adams(model, i["noise"], i.get("text", i.get("labels")), i.get("null"),
                                 a["steps"], a["timeshift"], a["guidance"], interval, a["order"]),
        # the components of the domain and stage vectors
        "interpolate": lambda: P.interpolate(i["x"], i["noise"], i["t"]),
        "target_velocity": lambda: P.target_velocity(i["x"], i["noise"]),
        "time_shift": lambda: P.time_shift(i["t"], a["shift"]),
        "reflect_pad": lambda: P.reflect_pad(i["x"]),
        "weighted_error": lambda: np.array([P.weighted_error(i["coeffs_pred"], i["coeffs_target"],
                                                             i["weights"])]),
        "guidance_at": lambda: np.array([P.guidance_at(t, a["guidance"], interval) for t in i["t"]]),
        "adams_guidance_at": lambda: np.array([P.adams_guidance_at(t, a["guidance"], interval)
                                               for t in i["t"]]),
        "guided_velocity": lambda: P.guided_velocity(model, i["x"], a["t"], i.get("text", i.get(
            "labels")), i.get("null"), a["guidance"]),
        "euler_step": lambda: P.euler_step(model, i["x"], i["labels"], a["t_cur"], a["t_next"],
                                           a["guidance"]),
        "heun_step": lambda: P.heun_step(model, i["x"], i["labels"], a["t_cur"], a["t_next"],
                                         a["guidance"]),
    }
    return table[component]()


def foreign_port(vectors: Path, outputs: Path) -> None:
    """The loop of a port in any language: every vector file in, one output file out."""
    outputs.mkdir(parents=True, exist_ok=True)
    for path in sorted(vectors.glob("*.safetensors")):
        meta, inputs, weights = _read(path)
        config = json.loads(meta.get("config", "null"))
        model = _model(meta["velocity_model"]) if "velocity_model" in meta else None
        out = _compute(meta["component"], inputs, json.loads(meta["args"]), weights, config, model)
        save_file({"out": np.ascontiguousarray(out, dtype=np.float64)},
                  str(outputs / f"{path.stem}.safetensors"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    foreign_port(VECTORS, folder)
    return folder


@pytest.fixture
def outputs(written: Path, tmp_path: Path) -> Path:
    """A fresh copy of the foreign port's outputs, to plant defects in."""
    return Path(shutil.copytree(written, tmp_path / "outputs"))


def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["conformance", "--vectors", str(VECTORS), *argv])
    return code, capsys.readouterr().out


def rows(out: str) -> dict[str, str]:
    """vector -> its table row (the table ends at the first empty line)."""
    table = out.split("\n\n")[0].splitlines()
    return {line.split()[1]: line for line in table if len(line.split()) > 1 and line.split()[1] in NAMES}


def _write(path: Path, out: np.ndarray) -> None:
    save_file({"out": np.ascontiguousarray(out)}, str(path))


def _out(path: Path) -> np.ndarray:
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor("out")


# ----------------------------------------------------------------------------------- --outputs
def test_a_foreign_ports_outputs_pass(outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("--outputs", str(outputs), capsys=capsys)
    assert code == 0, out
    table = rows(out)
    assert sorted(table) == NAMES and all(row.rstrip().endswith(" pass") for row in table.values())
    assert all("1e-10" in row for row in table.values())  # float64 outputs: the float64 tolerance
    assert out.strip().endswith(f"PASS: {len(NAMES)} passed, 0 failed, 0 errors, 0 skipped")


def test_missing_wrong_shape_and_wrong_dtype(outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (outputs / "ycbcr.safetensors").unlink()
    _write(outputs / "time_grid.safetensors", _out(outputs / "time_grid.safetensors")[:-1])
    _write(outputs / "timestep_features.safetensors",
           _out(outputs / "timestep_features.safetensors").astype(np.float16))
    save_file({"output": np.zeros(3)}, str(outputs / "block_dct.safetensors"))
    code, out = run("--outputs", str(outputs), capsys=capsys)
    assert code == 1
    table = rows(out)
    assert "skipped (no ycbcr.safetensors)" in table["ycbcr"]
    assert "FAIL (shape (5,), expected (6,))" in table["time_grid"]
    assert "FAIL (dtype float16, expected float64 or float32)" in table["timestep_features"]
    assert "FAIL (block_dct.safetensors: no tensor 'out'" in table["block_dct"]
    assert out.strip().endswith(f"FAIL: {len(NAMES) - 4} passed, 3 failed, 0 errors, 1 skipped")


def test_float32_outputs_pass_at_float32(outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in outputs.glob("*.safetensors"):
        _write(path, _out(path).astype(np.float32))
    code, out = run("--outputs", str(outputs), capsys=capsys)
    assert code == 0, out
    assert all("1e-05" in row and row.rstrip().endswith(" pass") for row in rows(out).values())
    # Declared float64, they fail, and the kit says why.
    code, out = run("--outputs", str(outputs), "--precision", "float64", capsys=capsys)
    assert code == 1 and "hint: looks like float32: declare precision" in out


def test_a_slip_in_an_output_file_is_diagnosed(outputs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = outputs / "block_dct.safetensors"
    _write(path, np.swapaxes(_out(path), -1, -2))
    code, out = run("--outputs", str(outputs), capsys=capsys)
    assert code == 1 and "FAIL" in rows(out)["block_dct"]
    assert "hint: the last two axes transposed" in out and "worst element [" in out


def test_json_and_junit_reports(outputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = outputs / "timestep_features.safetensors"
    _write(path, np.roll(_out(path), 128, -1))  # sin half first
    (outputs / "ycbcr.safetensors").unlink()
    junit = tmp_path / "report.xml"
    code, out = run("--outputs", str(outputs), "--json", "--junit", str(junit), capsys=capsys)
    assert code == 1
    report = json.loads(out)
    assert report["passed"] is False and report["counts"] == {
        "pass": len(NAMES) - 2, "FAIL": 1, "ERROR": 0, "skipped": 1}
    records = {r["vector"]: r for r in report["results"]}
    assert sorted(records) == NAMES
    bad = records["timestep_features"]
    assert bad["status"] == "FAIL" and bad["tolerance"] == 1e-10 and bad["max_rel"] > 1e-2
    assert bad["hint"]["slip"] == "halves" and len(bad["worst"]["index"]) == 2
    assert bad["location"]["kind"] == "everywhere"
    assert records["ycbcr"]["status"] == "skipped" and records["ycbcr"]["max_rel"] is None
    assert records["forward_deco"]["hint"] is None and records["forward_deco"]["status"] == "pass"

    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == len(NAMES) == int(suite.get("tests", "0"))
    assert (suite.get("failures"), suite.get("errors"), suite.get("skipped")) == ("1", "0", "1")
    failures = [c for c in cases if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failures] == [
        ("timestep_features", "timestep_features")]
    assert "halves of the last axis swapped" in failures[0].find("failure").get("message", "")  # type: ignore[union-attr]
    assert sum(c.find("skipped") is not None for c in cases) == 1


def test_outputs_folder_must_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--outputs", str(tmp_path / "none"), "--vectors", str(VECTORS)]) == 2
    assert "outputs: no such folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --list, export
def test_list_json_describes_every_vector(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("--list", "--json", capsys=capsys)
    assert code == 0
    listed = {r["vector"]: r for r in json.loads(out)}
    assert sorted(listed) == NAMES
    for name, record in listed.items():  # against the files, read independently of the kit
        meta, inputs, weights = _read(VECTORS / f"{name}.safetensors")
        with safe_open(str(VECTORS / f"{name}.safetensors"), framework="np") as f:
            expected = f.get_tensor("expected")
        assert record["component"] == meta["component"]
        assert record["args"] == json.loads(meta["args"])
        assert {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in record["inputs"]} == {
            f"in.{k}": (v.shape, str(v.dtype)) for k, v in inputs.items()}
        assert len(record["weights"]) == len(weights)
        assert tuple(record["output"]["shape"]) == expected.shape
        assert record["tolerance"] == {"float64": 1e-10, "float32": 1e-5}
    assert listed["rope_angles"]["compared"].startswith("cos and sin")
    assert listed["forward_deco"]["config"]["architecture"] == "deco"


def test_list_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run("--list", capsys=capsys)
    assert code == 0
    assert "timestep_features  (component timestep_features)\n  in.t: float64 (6,)" in out
    assert all(f"{name}  (component " in out for name in NAMES)


def test_export_vectors_copies_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "vectors"
    code, out = run("--export-vectors", str(target), capsys=capsys)
    assert code == 0 and f"copied {len(NAMES) + 1} files" in out
    sources = [*sorted(VECTORS.glob("*.safetensors")), VECTORS / "README.md"]
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in sources)
    for src in sources:
        assert (target / src.name).read_bytes() == src.read_bytes(), src.name
    # Not empty now: refused (one line, status 2) unless --force.
    (target / "time_grid.safetensors").write_bytes(b"old")
    assert main(["conformance", "--vectors", str(VECTORS), "--export-vectors", str(target)]) == 2
    assert "is not empty (pass --force" in capsys.readouterr().err
    assert run("--export-vectors", str(target), "--force", capsys=capsys)[0] == 0
    assert (target / "time_grid.safetensors").read_bytes() == (VECTORS / "time_grid.safetensors").read_bytes()
