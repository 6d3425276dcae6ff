"""The graphs every deployment runtime is tested on, with torch's outputs for their inputs.

Two tiny random models, one per kind (class: DeCo-tiny/4, text: DeCo-T2I-tiny/4), each exported
as the velocity graph, the cfg graph and, once `deco export-onnx --generator` exists, the
generator graph, in float32 and (velocity, cfg) float16. Each `Case` holds a graph's inputs and
what torch (deco.optimized, float32) gives for them: the oracle each runtime is compared with.
The guided velocity is computed from two plain torch calls, not from the exporter's wrapper,
and the generator's expected sample from `deco.optimized.sampling.sample` at the settings passed
to the export. Built once per test session (`runtime_cases`), shared by the runtime tests.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from helpers import random_weights, rel_err, tiny_config

from deco.config import DeCoConfig
from deco.deploy.export import RTOL_BY_DTYPE, export_onnx
from deco.optimized.weights import build_model
from deco.reference import save_weights

#: The agreement each runtime must reach with torch (spec/00 §5's measure, relative to max|expected|).
FLOAT32_RTOL = 1e-4
KINDS = {"class": tiny_config("deco"), "text": DeCoConfig.preset("DeCo-T2I-tiny/4")}
#: Generator settings per kind: guidance with an interval edge on a grid point (class, Euler,
#: grid 0, .2, ... 1) and the text model's release sampler (Adams, time shift 3).
GENERATOR_OPTIONS: dict[str, dict[str, Any]] = {
    "class": {"solver": "euler", "steps": 5, "guidance": 3.0, "interval": (0.2, 1.0), "timeshift": 1.0},
    "text": {"solver": "adams", "steps": 4, "guidance": 4.0, "interval": (0.0, 1.0), "timeshift": 3.0},
}
BATCH, HEIGHT, WIDTH = 2, 8, 12  # a non-square grid (2 x 3 patches), another size than the trace's


@dataclass
class Case:
    """One graph, its inputs, and torch's outputs for them (`expected`), compared to `rtol`."""

    name: str
    kind: str
    graph: str
    dtype: str
    model: Path
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    rtol: float
    options: dict[str, Any] = field(default_factory=dict)


def generator_export_available() -> bool:
    """Whether this deco's `export-onnx` has --generator (issue 18 §1, another branch)."""
    from deco.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "--generator" in action.choices["export-onnx"]._option_string_actions
    return False


class TinyModel:
    """A tiny random model of one kind: its torch version and its weight file."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind, self.config = kind, KINDS[kind]
        weights = {k: v.astype(np.float32) for k, v in random_weights(self.config, seed=7).items()}
        self.torch = build_model(self.config)
        self.torch.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        self.torch.eval()
        self.checkpoint = folder / f"{kind}.safetensors"
        save_weights(self.checkpoint, self.config, weights)

    def condition(self, rng: np.random.Generator) -> np.ndarray:
        """Labels (B,) int64 (the null class included) or a text (B, T, E)."""
        c = self.config
        if self.kind == "class":
            return np.array([3, c.num_classes])[:BATCH].astype(np.int64)
        return rng.standard_normal((BATCH, c.text_length, c.text_dim)).astype(np.float32)

    def velocity(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.torch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(cond))
        return np.asarray(out.numpy(), dtype=np.float32)


def velocity_cases(model: TinyModel, folder: Path, dtype: str) -> list[Case]:
    """The velocity and cfg graphs of `model` in `dtype`, with inputs and torch's outputs."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((BATCH, 3, HEIGHT, WIDTH)).astype(np.float32)
    t = np.full(BATCH, 0.37, dtype=np.float32)
    cond = model.condition(rng)
    cond_name = "text" if model.kind == "text" else "y"
    rtol = RTOL_BY_DTYPE[dtype] if dtype != "float32" else FLOAT32_RTOL
    cases = []
    path = export_onnx(model.torch, folder / f"{model.kind}-velocity-{dtype}.onnx", dtype=dtype)
    cases.append(Case(f"{model.kind}-velocity-{dtype}", model.kind, "velocity", dtype, path,
                      {"x": x, "t": t, cond_name: cond}, {"v": model.velocity(x, t, cond)}, rtol))
    g = np.float32(2.5)
    if model.kind == "text":
        null = rng.standard_normal(cond.shape).astype(np.float32)
        extra = {"null": null}
    else:
        null = np.full(BATCH, model.config.num_classes, dtype=np.int64)
        extra = {}
    uncond, conditional = model.velocity(x, t, null), model.velocity(x, t, cond)
    path = export_onnx(model.torch, folder / f"{model.kind}-cfg-{dtype}.onnx", cfg=True, dtype=dtype)
    cases.append(Case(f"{model.kind}-cfg-{dtype}", model.kind, "cfg", dtype, path,
                      {"x": x, "t": t, cond_name: cond, **extra, "guidance": np.asarray(g)},
                      {"v": uncond + g * (conditional - uncond)}, rtol))
    return cases


def to_uint8(sample: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounding (x + 1) 127.5 (spec'd by issue 18)."""
    return np.round((np.clip(sample, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def generator_case(model: TinyModel, folder: Path, height: int = HEIGHT, width: int = WIDTH,
                   labels: np.ndarray | None = None, seed: int = 12, dtype: str = "float32") -> Case:
    """The generator graph of `model` in `dtype` (exported by the command), with the float32
    torch model's sample."""
    from deco.cli import main
    from deco.optimized.sampling import sample

    options = GENERATOR_OPTIONS[model.kind]
    path = folder / f"{model.kind}-generator-{dtype}.onnx"
    if not path.is_file():
        lo, hi = options["interval"]
        argv = ["export-onnx", str(model.checkpoint), str(path), "--generator",
                "--solver", options["solver"], "--steps", str(options["steps"]),
                "--guidance", str(options["guidance"]), "--interval", str(lo), str(hi),
                "--timeshift", str(options["timeshift"]), "--dtype", dtype]
        if main(argv) != 0:
            raise RuntimeError(f"deco {' '.join(argv)} failed")
    rng = np.random.default_rng(seed)
    batch = 1 if labels is not None else BATCH
    noise = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    g = np.float32(options["guidance"])
    if model.kind == "text":
        text = model.condition(rng)[:batch]
        null = rng.standard_normal(text.shape).astype(np.float32)
        inputs = {"noise": noise, "text": text, "null_text": null}
        cond, null_t = torch.from_numpy(text), torch.from_numpy(null)
    else:
        cond_np = labels if labels is not None else model.condition(rng)
        inputs, cond, null_t = {"noise": noise, "labels": cond_np}, torch.from_numpy(cond_np), None
    settings = {k: v for k, v in options.items() if k != "guidance"}
    with torch.no_grad():
        out = sample(model.torch, torch.from_numpy(noise), cond, null_t, guidance=float(g), **settings)
    assert isinstance(out, torch.Tensor)
    expected = np.clip(out.numpy(), -1.0, 1.0)
    rtol = RTOL_BY_DTYPE[dtype] if dtype != "float32" else FLOAT32_RTOL
    return Case(f"{model.kind}-generator-{dtype}", model.kind, "generator", dtype, path,
                {**inputs, "guidance": np.asarray(g)}, {"sample": expected, "image": to_uint8(expected)},
                rtol, options)


def feed_for(case: Case, input_names: list[str]) -> dict[str, np.ndarray]:
    """The case's inputs that the graph declares (a generator exported without a guidance input
    takes none)."""
    return {k: v for k, v in case.inputs.items() if k in input_names}


@functools.cache
def runtime_cases(folder: Path) -> tuple[list[Case], str | None]:
    """Every case, built once into `folder`, and why the generator cases are absent (or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    models = {kind: TinyModel(kind, folder) for kind in KINDS}
    for model in models.values():
        for dtype in ("float32", "float16"):
            cases += velocity_cases(model, folder, dtype)
    missing = None
    if generator_export_available():
        cases += [generator_case(m, folder, dtype=d) for m in models.values() for d in ("float32", "float16")]
    else:
        missing = "this deco has no `deco export-onnx --generator` yet (issue 18 section 1)"
    return cases, missing


def check_outputs(runtime: str, case: Case, got: dict[str, np.ndarray]) -> None:
    """A runtime's outputs `got` against torch's: every float output to the case's bound (spec/00
    §5 measure); the uint8 image equal, up to one level, to round((clip(sample) + 1) 127.5) of
    the runtime's own sample and, for float32, of torch's (a value within ~1e-6 of a rounding
    boundary may round either way, hence one level)."""
    for name, expected in case.expected.items():
        if name == "image":
            image = got["image"]
            assert image.dtype == np.uint8 and image.shape == expected.shape, (image.dtype, image.shape)
            assert int(np.max(np.abs(image.astype(int) - to_uint8(got["sample"])))) <= 1
            if case.dtype == "float32":
                assert int(np.max(np.abs(image.astype(int) - expected))) <= 1
        else:
            err = rel_err(got[name], expected)
            print(f"{runtime} {case.name} {name}: {err:.1e}")
            assert err <= case.rtol, f"{name}: {err:.2e} > {case.rtol}"


#: Every case's name, for parametrising the runtime tests.
VELOCITY_CASES = [f"{k}-{g}-{d}" for k in KINDS for g in ("velocity", "cfg") for d in ("float32", "float16")]
GENERATOR_CASES = [f"{k}-generator-{d}" for k in KINDS for d in ("float32", "float16")]


def session_folder(factory: Any) -> Path:
    """One folder per test session (pytest's base temp), so every runtime module shares the graphs."""
    return Path(factory.getbasetemp()) / "runtime_graphs"

