"""Generator graphs (`deco export-onnx --generator`): noise and condition in, image out, the whole
sampler of spec/04 inside ONE ONNX graph (spec/04-sampling.md §7 defines the interface). The graph itself
is built by `deco.deploy.generator_graph`; this module exports, checks and installs it.

The graph wraps the velocity graph that `deco.deploy.export.export_onnx` writes (same symbolics,
same optimisations): its nodes become the body of an ONNX `Loop` with one model evaluation per
iteration, and its weights stay initializers of the main graph, which the body reads from the
outer scope, so they are stored once whatever the number of steps. The sampler's constants are
fixed at export (steps, time shift, solver, interval): per evaluation the model's time, whether
the step is guided, and the update's coefficients are small constant tables indexed by the
iteration number. The guidance scale stays an input; a step guides (2B batch [null; cond],
u + g (c - u)) where the interval says so and g != 1, else it evaluates the condition alone
(batch B), as `deco.optimized.sample` does.

Every solver is one evaluation per iteration (N iterations for N steps):
- Euler: x <- x + dt_k v(x, t_k).
- Heun (the release's, corrector velocity reused; spec/04 §4): evaluation k is the corrector of
  step k - 1 (k = 0: the first predictor); carried x_k, the predicted point and the previous
  velocity; x_k = x_{k-1} + c_k (v_prev + v), c_0 = 0, c_k = dt_{k-1} / 2, and the next point
  x_k + dt_k v. The last point is x_N.
- Adams (order 2, spec/04 §6): the last order - 1 velocities are carried, the weights are
  zero-padded rows of `adams_weights` (a zero weight on a zero or finite velocity adds exactly 0,
  so the sum equals the optimized sampler's).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deco.checkpoint import find_checkpoint
from deco.config import DeCoConfig
from deco.deploy.export import (
    DEFAULT_OPSET,
    FORMAT_VERSION,
    _check_options,
    checkpoint_metadata,
    config_of,
    export_onnx,
    output_path,
)
from deco.deploy.generator_check import check_export
from deco.deploy.generator_graph import ADAMS_ORDER, OUTPUTS, build_generator, input_names
from deco.deploy.onnx_file import _install, data_file, save_checked
from deco.generate import load_for_sampling
from deco.optimized.sampling import SampleSettings

GRAPH_GENERATOR = "generator"


def generator_properties(config: DeCoConfig, settings: SampleSettings, guided: bool, steps_mode: str,
                         batch: int | None, resolution: tuple[int, int] | None,
                         dtype: str, metadata: dict[str, str] | None) -> dict[str, str]:
    """The metadata_props of a generator graph (spec/04 §7)."""
    low, high = settings.interval
    return {"deco_format": FORMAT_VERSION, "config": config.to_json(), "deco_graph": GRAPH_GENERATOR,
            "deco_solver": settings.solver, "deco_steps": str(settings.steps),
            "deco_guidance": repr(settings.guidance), "deco_guided": "true" if guided else "false",
            "deco_interval": f"{low!r} {high!r}", "deco_timeshift": repr(settings.timeshift),
            "deco_adams_order": str(ADAMS_ORDER), "deco_steps_mode": steps_mode,
            "deco_inputs": ",".join(input_names(config, guided)), "deco_outputs": ",".join(OUTPUTS),
            "deco_batch": "dynamic" if batch is None else str(batch),
            "deco_resolution": "dynamic" if resolution is None else f"{resolution[0]}x{resolution[1]}",
            "deco_dtype": dtype, **(metadata or {})}


def export_generator(
    model: nn.Module, path: str | Path, settings: SampleSettings, *, guided: bool | None = None,
    opset: int | None = None, batch: int | None = None, resolution: tuple[int, int] | None = None,
    dtype: str = "float32", metadata: dict[str, str] | None = None,
    external_data: bool | None = None, unrolled: bool = False, **velocity_options: Any,
) -> Path:
    """Export the generator graph of `model` (a `deco.optimized` model) sampling with `settings`.

    guided: whether the graph has the null branch and the `guidance` input (default: when
    settings.guidance != 1; the graph's default scale is settings.guidance, recorded in the
    metadata). `unrolled` writes every step's nodes instead of one Loop (for measurements).
    Other options as `deco.deploy.export.export_onnx`, whose velocity graph this wraps (any
    further keyword goes to it unchanged, so an export option added there applies here too); the
    velocity graph keeps a dynamic batch (a guided step evaluates 2B). Built in a temporary
    folder and moved into place only after the ONNX checker passes and the graph matches
    `deco.optimized.sample` in onnxruntime (ValueError otherwise); nothing is left on failure.
    """
    config = config_of(model)
    if not isinstance(settings, SampleSettings):
        raise TypeError(f"settings: expected a SampleSettings, got {type(settings).__name__}")
    opset = DEFAULT_OPSET if opset is None else opset
    _check_options(config, opset, batch, resolution)
    guided = settings.guidance != 1.0 if guided is None else bool(guided)
    path = output_path(path)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        velocity = export_onnx(model, folder / "velocity.onnx", opset=opset, resolution=resolution,
                               dtype=dtype, external_data=external_data, **velocity_options)
        import onnx  # here: onnx is an optional extra

        staged = folder / path.name
        external = data_file(velocity).is_file()
        proto = build_generator(onnx.load(str(velocity), load_external_data=False), config, settings,
                                guided, batch, resolution, unrolled)
        if external:  # the weights stay in the velocity export's data file: renamed, not rewritten
            os.replace(data_file(velocity), data_file(staged))
            _relocate(proto, data_file(staged).name)
        velocity.unlink()
        props = generator_properties(config, settings, guided, "unrolled" if unrolled else "loop",
                                     batch, resolution, dtype, metadata)
        external = save_checked(proto, staged, props, False if external else external_data) or external
        check_export(model, staged, settings, guided, batch, resolution, dtype)
        _install(staged, path, external)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def _relocate(proto: Any, location: str) -> None:
    """Point every initializer held in external data at the data file `location` (the offsets
    stay: the file is the velocity export's, renamed)."""
    import onnx  # here: onnx is an optional extra

    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location


def export_generator_checkpoint(checkpoint: str | Path, path: str | Path, *, steps: int | None = None,
                                guidance: float | None = None, interval: tuple[float, float] | None = None,
                                timeshift: float | None = None, solver: str | None = None,
                                **options: Any) -> tuple[Path, SampleSettings]:
    """Export the generator of a weight file, training checkpoint or run folder, sampling with the
    settings it records (`deco sample`'s defaults) overridden by the arguments given. The
    weight file's path and SHA-256 go into the metadata, as for the velocity graph. Returns the
    path and the settings used. An invalid setting raises deco.errors.FieldError."""
    model, settings, meta = load_for_generator(checkpoint, {
        "steps": steps, "guidance": guidance, "timeshift": timeshift, "solver": solver,
        "interval": interval})
    return export_generator(model, path, settings, metadata=meta, **options), settings


def load_for_generator(checkpoint: str | Path,
                       changes: dict[str, Any]) -> tuple[nn.Module, SampleSettings, dict[str, str]]:
    """The model of a weight file, training checkpoint or run folder, the settings it records
    (`recorded_settings`) with `changes` applied (None entries ignored; an invalid one raises
    deco.errors.FieldError), and the weight file's `checkpoint_metadata`."""
    loaded = load_for_sampling(Path(checkpoint), torch.device("cpu"), text=True)
    given = {k: v for k, v in changes.items() if v is not None}
    settings = dataclasses.replace(recorded_settings(loaded), **given)
    return loaded.model, settings, checkpoint_metadata(find_checkpoint(checkpoint))


def recorded_settings(loaded: Any) -> SampleSettings:
    """`deco sample`'s defaults for a loaded model: its run's settings, else the release's
    text-to-image ones for a text model, else the spec's (50 Euler steps, no guidance)."""
    if loaded.sample is not None:
        return loaded.sample  # type: ignore[no-any-return]
    return SampleSettings.release("t2i") if loaded.model.config.is_text else SampleSettings()
