"""Conformance kit for ports of DeCo: test vectors from the float64 reference, and a runner.

A *vector* is one `.safetensors` file in spec/vectors/: the inputs of one spec component (`in.*`
tensors, scalar arguments as JSON in the metadata), weights where the component has any (`w.*`,
portable names relative to the block for block vectors) and the reference's output (`expected`).
A *port* is any Python object with some of the protocol functions of spec/vectors/README.md
(`rgb_to_ycbcr`, ..., `forward`, `euler`, `heun`, and the text-to-image components
`text_embedding`, ..., `t2i_forward`, `adams`), taking and returning NumPy arrays. The runner
calls each function the port has on the vectors of its component and compares with the spec's
error measure and tolerance (spec/00-conventions.md §5); components the port lacks are skipped.

Expected outputs are computed by running `ReferencePort` (thin wrappers over `deco.reference`)
through the same calling code that runs a port, so a vector's meaning is exactly "what the
reference returns for these inputs".
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from deco.atomic import atomic_write
from deco.conformance.catalogue import Variant, variant_output, vector_key
from deco.conformance.diagnose import Diagnosis, diagnose
from deco.conformance.differential import explain
from deco.conformance.fixtures import error_measure
from deco.conformance.ports import OnnxPort, OptimizedPort, OptimizedPort32, Precision, ReferencePort
from deco.conformance.protocol import (
    STAGE_CALLERS,
    Caller,
    Skip,
    Vector,
    VelocityModel,
    port_function,
    sampler_model,
)
from deco.conformance.stages import with_stage_verdicts
from deco.untrusted import (
    NUMPY_DTYPES,
    UntrustedFileError,
    json_object,
    parse_json,
    read_safetensors_header,
)

__all__ = ["OnnxPort", "OptimizedPort", "OptimizedPort32", "ReferencePort", "Skip", "Vector",
           "VelocityModel", "load_vectors", "run_port"]

Array = NDArray[Any]
FORMAT_KEY = "deco_vectors"
FORMAT_VERSION = "1"
#: spec/00-conventions.md §5: the bound on max|got - exp| / max|exp| for each port precision.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
Status = Literal["pass", "FAIL", "ERROR", "skipped"]


@dataclass(frozen=True)
class Result:
    vector: str
    component: str
    status: Status
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tolerance: float = float("nan")
    note: str = ""
    diagnosis: Diagnosis | None = None  # failures: worst element, where, hint (diagnose.py)


# ---------------------------------------------------------------- calling a port's functions
_fn, _sampler_model = port_function, sampler_model


def _call_weights_table(port: Any, v: Vector, _: Mapping[str, Vector]) -> Any:
    fn = _fn(port, "frequency_weights")
    pairs = zip(v.inputs["quality"].tolist(), v.inputs["gamma"].tolist(), strict=True)
    return np.stack([np.asarray(fn(int(q), float(g))) for q, g in pairs])


def _call_sampler(name: str) -> Caller:
    def call(port: Any, v: Vector, vectors: Mapping[str, Vector]) -> Any:
        fn = _fn(port, name)
        extra = (v.args["exact"],) if name == "heun" else ()
        interval = (v.args["interval"][0], v.args["interval"][1])
        return fn(_sampler_model(v, vectors), v.inputs["noise"], v.inputs["labels"], v.args["steps"],
                  v.args["timeshift"], v.args["guidance"], interval, *extra)

    return call


def _call_adams_weights(port: Any, v: Vector, _: Mapping[str, Vector]) -> Any:
    """Row i of the port's answer holds min(order, i + 1) weights, oldest first; they are
    right-aligned in a (steps, order) table (zeros where a step has fewer velocities), so that
    column order - 1 always weights the newest velocity."""
    order = v.args["order"]
    rows = _fn(port, "adams_weights")(v.inputs["grid"], order)
    table = np.zeros((len(rows), order))
    for i, row in enumerate(rows):
        row = np.asarray(row, dtype=np.float64).reshape(-1)
        if row.size > order:
            raise ValueError(f"adams_weights: row {i} has {row.size} weights, more than order {order}")
        table[i, order - row.size:] = row
    return table


def _call_adams(port: Any, v: Vector, vectors: Mapping[str, Vector]) -> Any:
    fn = _fn(port, "adams")
    cond = v.inputs["text"] if "text" in v.inputs else v.inputs["labels"]
    interval = (v.args["interval"][0], v.args["interval"][1])
    return fn(_sampler_model(v, vectors), v.inputs["noise"], cond, v.inputs.get("null"),
              v.args["steps"], v.args["timeshift"], v.args["guidance"], interval, v.args["order"])


#: component -> how its vectors are passed to the port's function of the same name.
CALLERS: dict[str, Caller] = {
    "rgb_to_ycbcr": lambda p, v, _: _fn(p, "rgb_to_ycbcr")(v.inputs["x"]),
    "block_dct": lambda p, v, _: _fn(p, "block_dct")(v.inputs["x"]),
    "frequency_weights": _call_weights_table,
    # A scalar, stored with shape (1,) (safetensors has no 0-d tensors).
    "frequency_aware_loss": lambda p, v, _: np.array([float(_fn(p, "frequency_aware_loss")(
        v.inputs["pred"], v.inputs["target"], v.args["quality"], v.args["gamma"]))]),
    "timestep_features": lambda p, v, _: _fn(p, "timestep_features")(v.inputs["t"]),
    "rope_angles": lambda p, v, _: _fn(p, "rope_angles")(
        v.args["grid_h"], v.args["grid_w"], v.args["head_dim"]),
    "apply_rope": lambda p, v, _: _fn(p, "apply_rope")(v.inputs["x"], v.inputs["angles"]),
    "dit_block": lambda p, v, _: _fn(p, "dit_block")(
        v.inputs["x"], v.inputs["c"], dict(v.weights), v.args["num_heads"], v.inputs["angles"]),
    "dct_position_features": lambda p, v, _: _fn(p, "dct_position_features")(v.args["patch_size"]),
    "decoder_block": lambda p, v, _: _fn(p, "decoder_block")(
        v.inputs["x"], v.inputs["cond"], dict(v.weights)),
    "forward": lambda p, v, _: _fn(p, "forward")(
        dict(v.config or {}), dict(v.weights), v.inputs["x"], v.inputs["t"], v.inputs["y"]),
    "text_rope_angles": lambda p, v, _: _fn(p, "text_rope_angles")(
        v.args["grid_h"], v.args["grid_w"], v.args["head_dim"]),
    "text_position_features": lambda p, v, _: _fn(p, "text_position_features")(
        v.args["patch_size"]),
    "text_embedding": lambda p, v, _: _fn(p, "text_embedding")(v.inputs["text"], dict(v.weights)),
    "text_refine_block": lambda p, v, _: _fn(p, "text_refine_block")(
        v.inputs["x"], v.inputs["c"], dict(v.weights), v.args["num_heads"]),
    "joint_dit_block": lambda p, v, _: _fn(p, "joint_dit_block")(
        v.inputs["x"], v.inputs["text"], v.inputs["c"], dict(v.weights), v.args["num_heads"],
        v.inputs["angles"]),
    "t2i_forward": lambda p, v, _: _fn(p, "t2i_forward")(
        dict(v.config or {}), dict(v.weights), v.inputs["x"], v.inputs["t"], v.inputs["text"]),
    "time_grid": lambda p, v, _: _fn(p, "time_grid")(v.args["steps"], v.args["timeshift"]),
    "euler": _call_sampler("euler"),
    "heun": _call_sampler("heun"),
    "adams_weights": _call_adams_weights,
    "adams": _call_adams,
    **STAGE_CALLERS,  # the components of the domain and stage vectors (protocol.py)
}
COMPONENTS = tuple(CALLERS)


def comparable(component: str, value: Array) -> Array:
    """What is compared: the value itself, except RoPE angles (both models'), compared through
    (cos, sin), i.e. modulo 2 pi, because only the rotation they define matters."""
    if component in ("rope_angles", "text_rope_angles"):
        return np.stack([np.cos(value), np.sin(value)])
    return value


# ------------------------------------------------------------------------------------ runner
def run_vector(port: Any, vector: Vector, vectors: Mapping[str, Vector],
               precision: Precision, findings: list[Variant] | None = None) -> Result:
    """Run one vector through `port`; exceptions from the port become an ERROR result.
    `findings` collects the catalogue variants that explained the run's failures so far."""
    tol = TOLERANCE[precision]
    caller = CALLERS[vector.component]
    try:
        got = np.asarray(caller(port, vector, vectors), dtype=np.float64)
    except (Skip, NotImplementedError) as exc:
        return Result(vector.name, vector.component, "skipped", note=str(exc) or "not provided")
    except Exception as exc:  # a port's failure is a result, not a crash of the kit
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return Result(vector.name, vector.component, "ERROR", tolerance=tol, note=message)
    return judge(vector, vectors, got, precision, findings)


def judge(vector: Vector, vectors: Mapping[str, Vector], got: Array, precision: Precision,
          findings: list[Variant] | None = None) -> Result:
    """Compare a port's output for `vector` (float64, the shape of `expected`) with the expected
    one; a failure carries a diagnosis. Shared by ports called in Python and --outputs files.
    `findings` (the run's): the variants that explained earlier vectors, tried first in
    combinations here, and extended with what explains this one."""
    tol = TOLERANCE[precision]
    assert vector.expected is not None
    raw = got
    got, expected = comparable(vector.component, got), comparable(vector.component, vector.expected)

    def fail(note: str) -> Result:
        return Result(vector.name, vector.component, "FAIL", tolerance=tol, note=note,
                      diagnosis=_diagnose(vector, vectors, raw, tol, precision, findings))

    if got.shape != expected.shape:
        return fail(f"shape {raw.shape}, expected {vector.expected.shape}")
    if not np.all(np.isfinite(got)):
        return fail("NaN or inf")
    max_abs, max_rel = error_measure(got, expected)
    if max_rel <= tol:
        return Result(vector.name, vector.component, "pass", max_abs, max_rel, tol)
    diagnosis = _diagnose(vector, vectors, raw, tol, precision, findings)
    return Result(vector.name, vector.component, "FAIL", max_abs, max_rel, tol, diagnosis=diagnosis)


def reference_with(variants: Sequence[Variant], vector: Vector,
                   vectors: Mapping[str, Vector]) -> Array | None:
    """The reference's output for `vector` with catalogue variants planted (cached; None when
    the reference cannot take the vector's inputs with them)."""
    assert vector.expected is not None
    return variant_output(variants, vector_key(vector.name, vector.expected),
                          lambda port: CALLERS[vector.component](port, vector, vectors))


def _diagnose(vector: Vector, vectors: Mapping[str, Vector], raw: Array, tol: float,
              precision: Precision, findings: list[Variant] | None) -> Diagnosis:
    """The diagnosis of `raw` (the port's output for `vector`, float64): the catalogue's
    explanations (deco.conformance.differential), then the location and hint."""
    assert vector.expected is not None
    component = vector.component
    explanations = explain(component, raw, vector.expected,
                           lambda variants: reference_with(variants, vector, vectors),
                           lambda a: comparable(component, a), tol, findings or ()) \
        if np.all(np.isfinite(raw)) else []
    if findings is not None:
        findings += [v for e in explanations if e.exact for v in e.variants if v not in findings]
    x = vector.inputs.get("x")
    image_hw = (int(x.shape[-2]), int(x.shape[-1])) if x is not None and x.ndim == 4 else None
    return diagnose(component, comparable(component, raw), comparable(component, vector.expected),
                    tol, precision, explanations, image_hw)


def port_precision(port: Any) -> Precision:
    """The port's declared `precision` attribute ("float64" or "float32", default float32)."""
    precision = getattr(port, "precision", "float32")
    if precision == "float64":
        return "float64"
    if precision == "float32":
        return "float32"
    raise ValueError(f"port: precision must be 'float64' or 'float32', got {precision!r}")


def run_port(port: Any, vectors: Iterable[Vector], precision: Precision | None = None) -> list[Result]:
    """Every vector through `port`, in order. `precision` defaults to the port's own."""
    vectors = list(vectors)
    by_name = {v.name: v for v in vectors}
    chosen = precision or port_precision(port)
    findings: list[Variant] = []
    results = [run_vector(port, v, by_name, chosen, findings) for v in vectors]
    return with_stage_verdicts(results, vectors)


def passed(results: Iterable[Result]) -> bool:
    """True when nothing failed or errored and at least one vector ran."""
    results = list(results)
    ran = [r for r in results if r.status != "skipped"]
    return bool(ran) and all(r.status == "pass" for r in ran)


def format_table(results: Iterable[Result]) -> str:
    rows = [("component", "vector", "max abs err", "max rel err", "tolerance", "result")]
    for r in results:
        nums = ("-", "-", "-") if r.status == "skipped" else (
            f"{r.max_abs:.3e}", f"{r.max_rel:.3e}", f"{r.tolerance:.0e}")
        result = r.status + (f" ({r.note})" if r.note else "")
        rows.append((r.component, r.vector, *nums, result))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:5])) + "  " + row[5]
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def summary(results: Iterable[Result]) -> str:
    results = list(results)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "ERROR", "skipped")}
    verdict = "PASS" if passed(results) else "FAIL"
    return (f"{verdict}: {counts['pass']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors, "
            f"{counts['skipped']} skipped")


# ------------------------------------------------------------------------------ loading ports
def load_port(spec: str) -> Any:
    """The object named by "module:object" (dotted attributes allowed); a class is instantiated
    with no arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"python: expected MODULE:OBJECT, got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"python: cannot import {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"python: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj() if inspect.isclass(obj) else obj


# ------------------------------------------------------------------------ reading and writing
def default_folder() -> Path:
    """$DECO_VECTORS, else the copy of spec/vectors installed with the package (`deco/vectors`),
    else spec/vectors of the source checkout (editable installs)."""
    env = os.environ.get("DECO_VECTORS")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parent.parent  # deco/ (core/ in a checkout)
    installed = package / "vectors"
    return installed if installed.is_dir() else package.parent / "spec" / "vectors"


def save_vector(folder: Path, vector: Vector) -> Path:
    assert vector.expected is not None
    tensors = {f"in.{k}": np.ascontiguousarray(v) for k, v in vector.inputs.items()}
    tensors.update({f"w.{k}": np.ascontiguousarray(v) for k, v in vector.weights.items()})
    tensors["expected"] = np.ascontiguousarray(vector.expected)
    meta = {FORMAT_KEY: FORMAT_VERSION, "component": vector.component,
            "args": json.dumps(vector.args, sort_keys=True)}
    if vector.config is not None:
        meta["config"] = json.dumps(vector.config, sort_keys=True)
    if vector.velocity_model is not None:
        meta["velocity_model"] = vector.velocity_model
    meta.update({k: v for k, v in (("domain", vector.domain), ("stage_of", vector.stage_of)) if v})
    path = folder / f"{vector.name}.safetensors"
    data = _serialise(tensors, meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def _serialise(tensors: dict[str, Array], meta: dict[str, str]) -> bytes:
    """The safetensors bytes with the metadata keys sorted. The library writes the metadata from
    a hash map whose order changes from one process to the next, so the same vector would
    otherwise give different bytes on every regeneration. Same keys and values, so the header
    keeps its length (and its padding to 8 bytes)."""
    raw = save(tensors, metadata=meta)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size, "a reordered header cannot be longer"
    return raw[:8] + text.ljust(size) + raw[8 + size:]



def load_vector(path: Path) -> Vector:
    """One vector file; its header is checked (deco.untrusted: dtypes, shapes inside the file,
    the memory budget, JSON limits on args and config) before any tensor is read."""
    try:
        header = read_safetensors_header(path)
        meta = header.metadata
        if meta.get(FORMAT_KEY) != FORMAT_VERSION or meta.get("component") not in CALLERS:
            raise ValueError(f"vectors: {path} is not a DeCo test vector (format {FORMAT_VERSION})")
        if "expected" not in header.tensors:
            raise ValueError(f"vectors: {path} has no 'expected' tensor")
        unreadable = sorted(k for k, t in header.tensors.items() if t.dtype not in NUMPY_DTYPES)
        if unreadable:
            raise ValueError(f"vectors: {path}: tensor {unreadable[0]!r} has dtype "
                             f"{header.tensors[unreadable[0]].dtype}, which NumPy cannot read")
        args = json_object(parse_json(meta.get("args", "{}"), f"{path} (args)"), f"{path} (args)")
        config = None if "config" not in meta else json_object(
            parse_json(meta["config"], f"{path} (config)"), f"{path} (config)")
        with safe_open(str(path), framework="np") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UntrustedFileError as exc:
        raise ValueError(f"vectors: {exc}") from None
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"vectors: {path} is not a readable safetensors file ({exc})") from None
    return Vector(
        name=path.stem, component=meta["component"],
        inputs={k[3:]: v for k, v in tensors.items() if k.startswith("in.")},
        args=args,
        weights={k[2:]: v for k, v in tensors.items() if k.startswith("w.")},
        config=config,
        velocity_model=meta.get("velocity_model"),
        expected=tensors["expected"],
        domain=meta.get("domain", ""), stage_of=meta.get("stage_of"),
    )


def load_vectors(folder: str | Path | None = None) -> list[Vector]:
    """Every vector of `folder` (default `default_folder()`), in the order of `COMPONENTS`."""
    folder = Path(folder) if folder is not None else default_folder()
    if not folder.is_dir():
        raise FileNotFoundError(f"vectors: no such folder: {folder} (pass --vectors DIR)")
    vectors = [load_vector(p) for p in sorted(folder.glob("*.safetensors"))]
    if not vectors:
        raise ValueError(f"vectors: no .safetensors vectors in {folder}")
    names = {v.name for v in vectors}
    for v in vectors:
        if v.velocity_model is not None and v.velocity_model not in names:
            raise ValueError(f"vectors: {v.name} needs the missing vector {v.velocity_model!r}")
    return sorted(vectors, key=lambda v: (COMPONENTS.index(v.component), v.name))
