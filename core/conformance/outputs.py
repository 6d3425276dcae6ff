"""The conformance kit for ports in any language (deco.conformance, spec/vectors/README.md, "File
protocol"): check the outputs a port computed by itself (`--outputs DIR`: `DIR/<vector>.safetensors`
holding the tensor `out`), list what each vector holds (`--list`), and copy the vectors out of
the installed package (`--export-vectors`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from deco.atomic import atomic_write
from deco.conformance.kit import (
    TOLERANCE,
    Array,
    Result,
    Vector,
    comparable,
    default_folder,
    judge,
)
from deco.conformance.ports import Precision
from deco.conformance.stages import with_stage_verdicts
from deco.paths_inside import resolve_inside
from deco.untrusted import SAFETENSORS_DTYPES, UntrustedFileError, read_safetensors_header

OUTPUT_TENSOR = "out"
OUTPUT_DTYPES = {"float64": "float64", "float32": "float32"}
#: The safetensors dtypes, by the names the notes use (NumPy's, and bfloat16/float8 for the rest).
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "F8_E4M3": "float8_e4m3", "F8_E5M2": "float8_e5m2", "BOOL": "bool",
               **{f"{k}{b}": f"{n}{b}" for k, n in (("I", "int"), ("U", "uint")) for b in (8, 16, 32, 64)}}


class OutputDtypeError(ValueError):
    """An output file whose `out` is neither float32 nor float64 (read from its header)."""


def read_output(path: Path, elements: int | None = None) -> Array:
    """The tensor `out` of a port's output file; ValueError naming what is wrong. The header is
    checked first (deco.untrusted): a float32 or float64 `out`, and, given `elements` (the
    expected output's size), no more elements than that: a file declaring gigabytes is refused
    before anything is allocated."""
    try:
        header = read_safetensors_header(path, path.name)
    except (UntrustedFileError, OSError) as exc:
        raise ValueError(str(exc).removeprefix(f"{path.name}: ")) from None
    entry = header.tensors.get(OUTPUT_TENSOR)
    if entry is None:
        raise ValueError(f"no tensor {OUTPUT_TENSOR!r} (has {sorted(header.tensors)[:8]})")
    dtype = DTYPE_NAMES.get(entry.dtype, entry.dtype)
    if dtype not in OUTPUT_DTYPES:
        raise OutputDtypeError(f"dtype {dtype}, expected float64 or float32")
    count = entry.nbytes // SAFETENSORS_DTYPES[entry.dtype]
    if elements is not None and count > elements:
        raise ValueError(f"shape {entry.shape} of {OUTPUT_TENSOR!r} has {count} elements, more than "
                         f"the {elements} expected; not read")
    try:
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor(OUTPUT_TENSOR)  # type: ignore[no-any-return]
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"not a readable safetensors file ({exc})") from None


def check_output(folder: Path, vector: Vector, vectors: dict[str, Vector],
                 precision: Precision | None, findings: list[Any] | None = None) -> Result:
    """One vector against `folder/<vector>.safetensors`: missing is skipped; unreadable, a wrong
    dtype or shape is a failure; else compared as a Python port's result. Without `precision`,
    a float32 output is held to the float32 tolerance, a float64 one to float64's."""
    path = folder / f"{vector.name}.safetensors"
    if not path.is_file():
        return Result(vector.name, vector.component, "skipped", note=f"no {path.name}")
    try:
        resolve_inside(folder, path.name, what="outputs")  # a link out of the folder: not read
        got = read_output(path, None if vector.expected is None else int(vector.expected.size))
    except OutputDtypeError as exc:  # the row names the vector, and so the file
        tol = TOLERANCE[precision or "float64"]
        return Result(vector.name, vector.component, "FAIL", tolerance=tol, note=str(exc))
    except ValueError as exc:
        return Result(vector.name, vector.component, "FAIL", note=f"{path.name}: {exc}")
    chosen: Precision = precision or ("float32" if got.dtype == np.float32 else "float64")
    # a wrong shape: judge fails it; `findings`: the run's explanations so far (kit.judge)
    return judge(vector, vectors, got.astype(np.float64), chosen, findings)


def run_outputs(folder: str | Path, vectors: Sequence[Vector],
                precision: Precision | None = None) -> list[Result]:
    """Every vector checked against the port's output file in `folder`, in order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"outputs: no such folder: {folder}")
    by_name = {v.name: v for v in vectors}
    findings: list[Any] = []
    results = [check_output(folder, v, by_name, precision, findings) for v in vectors]
    return with_stage_verdicts(results, vectors)


# --------------------------------------------------------------------------------------- list
def _tensor(name: str, array: Array) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}


def describe(vector: Vector) -> dict[str, Any]:
    """What a port needs to know about `vector` (one record of `--list --json`)."""
    assert vector.expected is not None
    return {
        "vector": vector.name, "file": f"{vector.name}.safetensors", "component": vector.component,
        "inputs": [_tensor(f"in.{k}", v) for k, v in vector.inputs.items()],
        "weights": [_tensor(f"w.{k}", v) for k, v in vector.weights.items()],
        "domain": vector.domain, "stage_of": vector.stage_of,
        "args": vector.args, "config": vector.config, "velocity_model": vector.velocity_model,
        "output": {"tensor": OUTPUT_TENSOR, "shape": list(vector.expected.shape),
                   "dtype": "float64 or float32"},
        "compared": "cos and sin of the angles (modulo 2 pi)"
        if comparable(vector.component, vector.expected).shape != vector.expected.shape else "values",
        "tolerance": dict(TOLERANCE),
    }


def list_text(vectors: Sequence[Vector]) -> str:
    """One block per vector: component, inputs, scalar arguments, weights, output, tolerance."""
    tol = ", ".join(f"{k} {v:.0e}" for k, v in TOLERANCE.items())
    blocks = []
    for v in vectors:
        d = describe(v)
        lines = [f"{d['vector']}  (component {d['component']})"]
        lines += [f"  {t['name']}: {t['dtype']} {tuple(t['shape'])}" for t in d["inputs"]]
        if d["args"]:
            lines.append(f"  args: {json.dumps(d['args'], sort_keys=True)}")
        if d["weights"]:
            lines.append(f"  weights: {len(d['weights'])} w.* tensors (float32)")
        if d["config"]:
            lines.append(f"  config: {json.dumps(d['config'], sort_keys=True)}")
        if d["velocity_model"]:
            lines.append(f"  velocity model: the config and weights of {d['velocity_model']}")
        lines.append(f"  out: {tuple(d['output']['shape'])} float64 or float32, compared by "
                     f"{d['compared']}; tolerance {tol}")
        if d["domain"]:
            lines.append(f"  domain: {d['domain']}")
        if d["stage_of"]:
            lines.append(f"  stage of: {d['stage_of']} (its inputs taken through one stage)")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def list_json(vectors: Sequence[Vector]) -> str:
    return json.dumps([describe(v) for v in vectors], indent=1)


# ------------------------------------------------------------------------------------- export
def export_vectors(target: str | Path, source: str | Path | None = None, force: bool = False) -> list[Path]:
    """Copy the vectors (and README.md) of `source` (default: the installed ones) into `target`,
    each file atomically. A target holding any file is refused unless `force`, which overwrites
    files of the same names and leaves the others."""
    source = Path(source) if source is not None else default_folder()
    target = Path(target)
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"vectors: no .safetensors vectors in {source}")
    if (source / "README.md").is_file():
        files.append(source / "README.md")
    if target.exists() and not target.is_dir():
        raise ValueError(f"export-vectors: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ValueError(f"export-vectors: {target} is not empty (pass --force to overwrite the "
                         f"vector files in it)")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        atomic_write(target / path.name, _copier(path))
        written.append(target / path.name)
    return written


def _copier(source: Path) -> Callable[[str], object]:
    return lambda tmp: shutil.copyfile(source, tmp)
