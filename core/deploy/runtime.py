"""Run an exported DeCo graph with onnxruntime and NumPy only: no torch is imported.

`OnnxVelocityModel` has the `config` and `forward(x, t, y)` of the reference's model protocol
(spec/04-sampling.md), so `deco.reference.sample` drives it unchanged: the time grid, guidance
interval, Euler, Heun and Adams logic are the reference's own, and only the velocity comes from
the graph. `sample` below is that composition. For a text-to-image graph the condition y is the
text (B, T, E) and guidance needs the null text embedding (spec/06 §6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from deco.config import DeCoConfig
from deco.deploy.optimize import session_options as make_options
from deco.reference import sample as reference_sample
from deco.reference.checks import as_condition, as_float_array
from deco.reference.sampling import check_conditions

Array = NDArray[np.float64]


def default_providers() -> list[str]:
    """CUDAExecutionProvider where onnxruntime has it, then CPU."""
    import onnxruntime as ort  # here: onnxruntime is an optional extra

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def _session(path: Path, providers: list[str] | None, threads: int | None, level: str = "all") -> Any:
    import onnxruntime as ort  # here: onnxruntime is an optional extra

    chosen = providers or default_providers()
    session_options = make_options(threads=threads, level=level)
    # TF32 matmuls on NVIDIA GPUs round inputs to 10 mantissa bits: float32 results would then
    # miss the 1e-4 agreement that `deco onnx-check` promises.
    options = [{"use_tf32": 0} if p == "CUDAExecutionProvider" else {} for p in chosen]
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=chosen,
                                    provider_options=options)
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ValueError(f"path: {path} is not a loadable ONNX model ({reason})") from None


#: Bounds on what a graph's metadata may claim (it chooses sizes the checks allocate and loops
#: they run): far above any export deco makes, far below a hostile file's 1e9.
MAX_BATCH, MAX_SIDE, MAX_STEPS = 4096, 16384, 100_000
#: The inputs and outputs each graph kind must have (the names `OnnxVelocityModel` feeds).
GRAPH_INPUTS = {"velocity": ("x", "t"), "cfg": ("x", "t", "guidance"), "generator": ("noise",)}
GENERATOR_KEYS = ("deco_solver", "deco_steps", "deco_guidance", "deco_guided", "deco_interval",
                  "deco_timeshift", "deco_inputs", "deco_outputs")


def _bounded_int(text: str, low: int, high: int, what: str) -> int:
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"{what} {text[:40]!r}, expected an int in [{low}, {high}]")
    return int(text)


def check_metadata(meta: dict[str, str], session: Any, path: Path) -> DeCoConfig:
    """The config of a graph, after checking its metadata_props against the graph itself: a
    known graph kind whose inputs and outputs the graph has, a batch, resolution and step count
    within bounds and agreeing with the graph's fixed input dims, a generator's settings all
    present and finite. ValueError "path: PATH: ..." otherwise; nothing is trusted unchecked."""
    if "config" not in meta or "deco_graph" not in meta:
        raise ValueError(f"path: {path} has no DeCo metadata (not written by deco export-onnx)")
    try:
        config = DeCoConfig.from_json(meta["config"])
        kind = meta["deco_graph"]
        if kind not in GRAPH_INPUTS:
            raise ValueError(f"deco_graph {kind[:40]!r}, expected one of {sorted(GRAPH_INPUTS)}")
        inputs = {i.name: i.shape for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        wanted = GRAPH_INPUTS[kind] + (() if kind == "generator" else ("text",) if config.is_text else ("y",))
        if kind == "generator":
            missing = [k for k in GENERATOR_KEYS if k not in meta]
            if missing:
                raise ValueError(f"a generator graph without {missing}")
            _check_generator(meta, list(inputs), outputs)
        elif "v" not in outputs:
            raise ValueError(f"no output 'v' (the graph has {outputs[:6]})")
        absent = [name for name in wanted if name not in inputs]
        if absent:
            raise ValueError(f"a {kind} graph without the inputs {absent} (it has {list(inputs)[:8]})")
        image = inputs[wanted[0]]  # (B, C, H, W): ints where the graph fixes them
        _check_dims(meta, image, config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"path: {path}: metadata does not fit the graph ({str(exc).splitlines()[0][:300]})"
                         ) from None
    return config


def _check_dims(meta: dict[str, str], image: Any, config: DeCoConfig) -> None:
    fixed = [d if isinstance(d, int) else None for d in image]
    if len(fixed) != 4:
        raise ValueError(f"an image input of shape {image}, expected (B, C, H, W)")
    batch, resolution = meta.get("deco_batch", "dynamic"), meta.get("deco_resolution", "dynamic")
    if batch != "dynamic" and fixed[0] not in (None, _bounded_int(batch, 1, MAX_BATCH, "deco_batch")):
        raise ValueError(f"deco_batch {batch} but the graph's batch is {fixed[0]}")
    if resolution != "dynamic":
        h, _, w = resolution.partition("x")
        side = tuple(_bounded_int(s, 1, MAX_SIDE, "deco_resolution") for s in (h, w))
        if any(s % config.patch_size for s in side):
            raise ValueError(f"deco_resolution {resolution}: not a multiple of the patch {config.patch_size}")
        if any(f not in (None, s) for f, s in zip(fixed[2:], side, strict=True)):
            raise ValueError(f"deco_resolution {resolution}; the graph's input is {fixed[2]}x{fixed[3]}")


def _check_generator(meta: dict[str, str], inputs: list[str], outputs: list[str]) -> None:
    if meta["deco_inputs"].split(",") != inputs or meta["deco_outputs"].split(",") != outputs:
        raise ValueError(f"deco_inputs/deco_outputs name {meta['deco_inputs'][:60]!r} / "
                         f"{meta['deco_outputs'][:60]!r}; the graph has {inputs[:6]} / {outputs[:6]}")
    _bounded_int(meta["deco_steps"], 1, MAX_STEPS, "deco_steps")
    if meta["deco_guided"] not in ("true", "false"):
        raise ValueError(f"deco_guided {meta['deco_guided'][:20]!r}, expected true or false")
    numbers = [meta["deco_guidance"], meta["deco_timeshift"], *meta["deco_interval"].split()]
    if len(numbers) != 4 or not all(np.isfinite(float(n)) for n in numbers):
        raise ValueError(f"the sampler settings {numbers[:4]} are not 4 finite numbers")


class OnnxVelocityModel:
    """A DeCo graph exported by `deco export-onnx`, run by onnxruntime.

    A graph whose weights are in external data (`<path>.data`, see `deco.deploy.export`) loads
    the same way: onnxruntime reads the data file relative to `path`, so keep the pair together.

    `config` comes from the file's metadata; `graph` is "velocity" or "cfg". Inputs are cast to
    float32 (the graph's type) and outputs returned as float64, like the reference's. `threads`
    sets onnxruntime's intra-op thread count (default: its own choice, one per physical core);
    `level` its graph optimisation level (`deco.deploy.optimize.LEVELS`; "disable" for a graph
    that `optimize_for_ort` saved already optimised).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 threads: int | None = None, level: str = "all") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no such file: {path}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
        self.path = path
        self.session = _session(path, providers, threads, level)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.config = check_metadata(self.metadata, self.session, path)
        self.graph = self.metadata["deco_graph"]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def _inputs(self, x: Any, t: Any, y: Any) -> dict[str, Any]:
        """The graph's feed: x, t and y (labels, int64) or, for a text model, text (float32)."""
        cfg = self.config
        x = as_float_array("x", x, ndim=4, channels=cfg.in_channels)
        t = as_float_array("t", t)
        t = np.broadcast_to(t, (x.shape[0],)) if t.ndim == 0 else t
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {t.shape}")
        feed = {"x": x.astype(np.float32), "t": t.astype(np.float32)}
        if cfg.is_text:
            feed["text"] = as_condition("text", y, cfg, x.shape[0]).astype(np.float32)
        else:
            feed["y"] = as_condition("y", y, cfg, x.shape[0])
        return feed

    def forward(self, x: Any, t: Any, y: Any) -> Array:
        """Velocity (B, C, H, W) of a "velocity" graph."""
        if self.graph != "velocity":
            raise ValueError(f"path: {self.path} is a '{self.graph}' graph; forward needs one "
                             "exported without --cfg (use guided_velocity)")
        out = self.session.run(["v"], self._inputs(x, t, y))[0]
        return np.asarray(out, dtype=np.float64)

    __call__ = forward

    def guided_velocity(self, x: Any, t: Any, y: Any, guidance: float, null: Any = None) -> Array:
        """u + g (c - u) of a "cfg" graph (both branches inside the graph). A text model needs
        `null`, the null text embedding: (T, E) for every sample, or (B, T, E)."""
        if self.graph != "cfg":
            raise ValueError(f"path: {self.path} is a '{self.graph}' graph; export with --cfg")
        feed = self._inputs(x, t, y)
        if self.config.is_text:
            if null is None:
                raise ValueError("null: the text model's cfg graph needs the null text embedding "
                                 f"({self.config.text_length}, {self.config.text_dim}) or (B, T, E)")
            feed["null"] = check_conditions(self, y, null, x.shape[0])[1].astype(np.float32)
        elif null is not None:
            raise ValueError("null: a class model's cfg graph uses the null class; pass no null")
        feed["guidance"] = np.asarray(guidance, dtype=np.float32)
        return np.asarray(self.session.run(["v"], feed)[0], dtype=np.float64)


def sample(model: OnnxVelocityModel, noise: Any, labels: Any, null: Any = None,
           **options: Any) -> Array:
    """`deco.reference.sample` driven by a "velocity" graph: steps, guidance, interval,
    timeshift, solver ("euler", "heun", "adams"), exact_heun and order as there; float64 state,
    float32 velocities. For a text model `labels` is the text (B, T, E) and `null` the null text
    embedding, (T, E) or (B, T, E), needed when guidance != 1."""
    return reference_sample(model, noise, labels, null, **options)
