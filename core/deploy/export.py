"""Export a DeCo or baseline velocity model to ONNX (`deco export-onnx`).

Two graphs:
- "velocity": inputs x (B, C, H, W) float32, t (B,) float32, y (B,) int64 -> v (B, C, H, W);
  a text-to-image model takes `text` (B, T, E) float32 (the text encoder's hidden states)
  instead of y;
- "cfg": the same plus a scalar float32 `guidance` g -> u + g (c - u), where c is the velocity
  for the labels and u for the null class, both evaluated as ONE batch [null; y] inside the graph
  (spec/04-sampling.md §2), so a deployment makes one call per sampling step. A text model's
  cfg graph takes the null text embedding too: inputs x, t, text, `null` (B, T, E), guidance
  (spec/06 §6; `deco.deploy.runtime` broadcasts one (T, E) null text over the batch).

The batch axis is dynamic unless a fixed batch is asked for. Height and width are dynamic too
(any multiple of the patch size): the RoPE angles and DCT position features are computed in the
graph from the input's shape, so one file serves every resolution; `resolution=(H, W)` fixes the
size instead, which lets the exporter fold those tables into constants.

We use the TorchScript exporter (`dynamo=False`): the torch.export-based one needs `onnxscript`,
which is not a dependency of this project. It has no symbolic for `aten::rms_norm`, and its
`layer_norm` symbolic needs a normalized shape known at trace time, whereas the model passes
`(x.shape[-1],)`, which tracing records as a graph value; its `linspace` returns NaN for one
step; its `addcmul` multiplies by a float32 constant, which promotes a float16/bfloat16 graph to
float32 from the first AdaLN modulation on. `deco.deploy.symbolics` supplies replacements, written
for the case the model uses (normalisation over the last axis). `deco onnx-check` is in
`deco.deploy.check`.

Weights above `deco.deploy.onnx_file.EXTERNAL_DATA_THRESHOLD` (1 GiB) go to ONE external data
file `<graph>.data` beside the graph (protobuf cannot hold 2 GiB; DeCo-XL/16 has 2.7 GB of float32
weights), found by onnxruntime relative to the graph's path. `dtype="float16"|"bfloat16"` stores
and computes in that type behind a float32 interface (`RTOL_BY_DTYPE` states the agreement).

A DeCo's pixel decoder is exported as a standard ONNX `Scan` over chunks of 4096 pixels
(`deco.deploy.optimize`; `decoder_chunk_rows=None` keeps the straight-line decoder): onnxruntime's
CPU provider then runs it from cache instead of through memory, the largest of the levers in
bench/RESULTS.md §6. A few of the model's own operations take an export form there too
(`deco.optimized.layers.split_product`, `image_to_pixels`). Only standard operators are written;
onnxruntime's own fusions (contrib operators) are left to its session or to
`deco.deploy.optimize.optimize_for_ort`.

The file carries `metadata_props`: `deco_format`, `config` (JSON), `deco_graph`, and the
SHA-256 and path of the weight file it came from, so `deco onnx-check` can rebuild the float64
reference from the very same weights (rather than guess them back from initializers, which
constant folding renames and merges).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deco.atomic import make_temporary_folder, writing
from deco.config import DeCoConfig
from deco.deploy.onnx_file import _install, save_checked
from deco.deploy.onnx_file import data_file as data_file  # re-exported: part of the export's API
from deco.deploy.optimize import DEFAULT_CHUNK_ROWS, lower_decoders, lowered_decoders
from deco.deploy.runtime import OnnxVelocityModel
from deco.deploy.symbolics import symbolics
from deco.optimized.weights import load_model
from deco.plan_identity import file_sha256 as sha256_file  # re-exported: the weight file hash, one home

DEFAULT_OPSET = 17
#: Opsets the export is tested with (the TorchScript exporter stops at 20).
OPSETS = range(17, 21)
FORMAT_VERSION = "1"
GRAPH_VELOCITY, GRAPH_CFG = "velocity", "cfg"
#: float32 agreement required of a graph (relative to max|expected|), by the export's own check
#: at a second shape and by `deco onnx-check`.
ONNX_CHECK_RTOL = 1e-4
#: Weight dtypes of an export: graph inputs and output stay float32 whatever the weights are.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Agreement bound of a graph with the float32 torch model (relative to max|expected|) per weight
#: dtype. float16 / bfloat16 carry 11 / 8 significant bits (unit roundoff 4.9e-4 / 3.9e-3).
#: Measured with random weights (0.02 N, gains 1 + 0.1 N), float16 in onnxruntime (CPU): DeCo-tiny/4
#: 1.2e-3, DeCo-S/16 at 256x256 7.3e-4, DeCo-XL/16 at 128x128 5.9e-4; bfloat16 in onnx's reference
#: evaluator: DeCo-tiny/4 1.9e-2, DeCo-XL/16 (16x80) 1.4e-2. The bounds leave a margin for trained
#: weights, whose activations are larger than these random ones'.
#: int8 (`deco.deploy.quantize`, onnxruntime's dynamic quantisation): measured on 30 random tiny
#: models 0.02..0.11 and on the trained digits model 0.03..0.13 (worst near t = 1, where v is
#: small), against >= 1.04 for a model with other weights (tests/test_onnx_int8.py).
RTOL_BY_DTYPE = {"float32": ONNX_CHECK_RTOL, "float16": 1e-2, "bfloat16": 5e-2, "int8": 0.25}
#: A whole sampling run (generator graphs) against deco.optimized.sample: as RTOL_BY_DTYPE, except
#: int8, whose error compounds over the steps (random tiny models, 8 steps, guidance 3: up to 0.66;
#: two different models' clamped samples differ by 2).
GENERATOR_RTOL_BY_DTYPE = {**RTOL_BY_DTYPE, "int8": 1.0}
#: Above this many bytes of tensor data the weights go to one external data file beside the graph.
class Guided(nn.Module):
    """Classifier-free guidance around a velocity model: u + g (c - u), both branches in one
    batch [null; cond] (spec/04 §2)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def guide(self, x: Tensor, t: Tensor, cond: Tensor, null: Tensor, guidance: Tensor) -> Tensor:
        b = x.shape[0]
        out: Tensor = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))
        uncond, conditional = out[:b], out[b:]  # (B, C, H, W) each
        return uncond + guidance * (conditional - uncond)


class GuidedVelocity(Guided):
    """(x, t, y, guidance) -> u + g (c - u) of a class model; u for the null class."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__(model)
        self.num_classes = num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor, guidance: Tensor) -> Tensor:
        return self.guide(x, t, y, torch.full_like(y, self.num_classes), guidance)


class GuidedTextVelocity(Guided):
    """(x, t, text, null, guidance) -> u + g (c - u) of the text model; u for the null text
    embedding, (B, T, E) like the text."""

    def forward(self, x: Tensor, t: Tensor, text: Tensor, null: Tensor, guidance: Tensor) -> Tensor:
        return self.guide(x, t, text, null, guidance)


def guided(model: nn.Module, config: DeCoConfig) -> Guided:
    """The cfg wrapper of `model`: `GuidedTextVelocity` for a text model, else `GuidedVelocity`."""
    return GuidedTextVelocity(model) if config.is_text else GuidedVelocity(model, config.num_classes)


def input_names(config: DeCoConfig, cfg: bool) -> list[str]:
    """The graph's inputs, in order: x, t, then y (labels) or text, then for a cfg graph the text
    model's null and the guidance."""
    cond = ["text", *(["null"] if cfg else [])] if config.is_text else ["y"]
    return ["x", "t", *cond, *(["guidance"] if cfg else [])]


# ------------------------------------------------------------------------------------ export
def _example_inputs(config: DeCoConfig, batch: int, resolution: tuple[int, int],
                    cfg: bool) -> tuple[Tensor, ...]:
    """Random inputs in the order of `input_names`, the same at every call (a seeded generator:
    the export's checks do not depend on what else the process drew)."""
    h, w = resolution
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g)
    if config.is_text:
        text_shape = (batch, config.text_length, config.text_dim)
        cond: tuple[Tensor, ...] = (torch.randn(text_shape, generator=g),
                                    *([torch.randn(text_shape, generator=g)] if cfg else []))
    else:
        cond = (torch.arange(batch) % (config.num_classes + 1),)
    return (x, t, *cond, torch.tensor(2.0)) if cfg else (x, t, *cond)


def _check_options(config: DeCoConfig, opset: int, batch: int | None,
                   resolution: tuple[int, int] | None) -> None:
    if opset not in OPSETS:
        raise ValueError(f"opset: expected {OPSETS.start}..{OPSETS.stop - 1}, got {opset}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch: expected a positive int or None (dynamic), got {batch!r}")
    if resolution is not None:
        p = config.patch_size
        if len(resolution) != 2 or any(
                not isinstance(s, int) or s < p or s % p for s in resolution):
            raise ValueError(
                f"resolution: expected (H, W), positive multiples of patch_size={p}, got {resolution!r}"
            )


def export_onnx(
    model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, batch: int | None = None,
    resolution: tuple[int, int] | None = None, cfg: bool = False,
    metadata: dict[str, str] | None = None, external_data: bool | None = None,
    dtype: str = "float32", decoder_chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> Path:
    """Export `model` (a `deco.optimized` DeCo or BaselineDiT with a `.config`) to `path`.

    batch None and resolution None give dynamic axes. `dtype` is the weights' and computation's
    type ("float32", "float16" or "bfloat16", for GPU runtimes such as onnxruntime-gpu or
    TensorRT); inputs and output stay float32. Agreement with the float32 torch model, relative
    to max|v|: <= 1e-4 (float32), <= 1e-2 (float16), <= 5e-2 (bfloat16) (`RTOL_BY_DTYPE`).
    A copy of the model is traced where needed; the caller's model is left as it is.

    `external_data` True writes the weights to ONE file `<path>.data` beside the graph (ONNX
    external data, found by onnxruntime relative to the graph), False keeps them inside;
    None (default) chooses external data above `EXTERNAL_DATA_THRESHOLD` bytes of tensors (1 GiB;
    DeCo-XL/16's 2.7 GB cannot be one protobuf). `metadata` entries are added to the file's
    metadata_props.

    Everything is built in a temporary folder beside `path` and moved into place only after the
    graph passes `onnx.checker.check_model(full_check=True)` and matches the float32 torch model,
    to the dtype's bound, in onnxruntime (bfloat16: onnx's reference evaluator) at a shape other
    than the traced one (ValueError otherwise); on any failure, KeyboardInterrupt
    included, the folder is removed and nothing is left (an earlier export at `path` is left as
    it was). The data file is moved first and the graph last, so a graph is never visible
    without its own data (see `_install`).

    `decoder_chunk_rows` (default 4096): a DeCo's pixel decoder becomes a standard ONNX Scan over
    chunks of that many pixels (`deco.deploy.optimize`: onnxruntime runs it faster than one pass
    over all pixels); None keeps the straight-line decoder.
    """
    config = config_of(model)
    _check_options(config, opset, batch, resolution)
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if external_data is not None and not isinstance(external_data, bool):
        raise TypeError(f"external_data: expected True, False or None, got {external_data!r}")
    path = output_path(path)
    reference = _cpu_copy(model, torch.float32)
    net = _cpu_copy(model, DTYPES[dtype])
    if cfg:
        reference, net = guided(reference, config), guided(net, config)
    if dtype != "float32":
        net = Float32Output(net)
    p = config.patch_size
    # Trace at a non-square size so that a height/width mix-up cannot hide in the trace.
    example = _example_inputs(config, batch or 2, resolution or (2 * p, 3 * p), cfg)
    if decoder_chunk_rows is not None and (isinstance(decoder_chunk_rows, bool) or not isinstance(
            decoder_chunk_rows, int) or decoder_chunk_rows < 1):
        raise ValueError(f"decoder_chunk_rows: expected a positive int or None, got {decoder_chunk_rows!r}")
    folder = make_temporary_folder(path)
    try:
        with writing(path, folder, data_file(path)):
            traced = folder / "trace" / "model.onnx"  # the exporter may scatter tensor files here
            traced.parent.mkdir()
            lowering: contextlib.AbstractContextManager[list[Any]] = (
                lowered_decoders() if decoder_chunk_rows else contextlib.nullcontext([]))
            with lowering as decoders:
                _trace(net, example, traced, opset, input_names(config, cfg), batch is None,
                       resolution is None)
            staged = folder / path.name
            props = _properties(config, cfg, batch, resolution, dtype, metadata)
            external = _finish(traced, staged, props, external_data,
                               lambda proto: lower_decoders(proto, decoders, decoder_chunk_rows or 1))
            shutil.rmtree(traced.parent)
            _check_other_shapes(reference, staged, config, cfg, batch, resolution, dtype)
            _install(staged, path, external)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


class Float32Output(nn.Module):
    """A float16/bfloat16 model behind a float32 interface: the model casts its float32 inputs
    itself (check_inputs), so only the output needs a cast back."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Tensor) -> Tensor:
        out: Tensor = self.model(*inputs)
        return out.float()


def _run_on_cpu(path: Path, feed: dict[str, Any], dtype: str) -> Any:
    """The graph's output "v" for `feed`, on the CPU: onnxruntime, except for bfloat16, which its
    CPU provider cannot run (no bfloat16 Gemm/MatMul kernels); then onnx's reference evaluator
    (NumPy, in the graph's own types: slow, but DeCo-XL/16 at the check's size takes seconds)."""
    if dtype == "bfloat16":
        from onnx.reference import ReferenceEvaluator  # here: onnx is an optional extra

        outputs: Any = ReferenceEvaluator(str(path)).run(["v"], feed)  # typed as list or dict
        return outputs[0]

    return OnnxVelocityModel(path, providers=["CPUExecutionProvider"]).session.run(["v"], feed)[0]


def _cpu_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model in eval mode in `dtype` on the CPU, without touching the caller's model."""
    if all(p.device.type == "cpu" and p.dtype == dtype for p in model.parameters()) \
            and not model.training:
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=dtype).eval()


def _trace(net: nn.Module, example: tuple[Tensor, ...], path: Path, opset: int, names: list[str],
           dynamic_batch: bool, dynamic_size: bool) -> None:
    dynamic: dict[str, dict[int, str]] = {}
    if dynamic_batch:  # every input but the scalar guidance, and the output, are batched
        dynamic = {name: {0: "batch"} for name in [*names, "v"] if name != "guidance"}
    if dynamic_size:
        for name in ("x", "v"):
            dynamic.setdefault(name, {}).update({2: "height", 3: "width"})
    with symbolics(opset), warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns that it is deprecated and that tracing records shapes;
        # `_check_other_shapes` verifies that the dynamic axes really are dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(net, example, str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=["v"], dynamic_axes=dynamic or None)


def _properties(config: DeCoConfig, cfg: bool, batch: int | None, resolution: tuple[int, int] | None,
                dtype: str, metadata: dict[str, str] | None) -> dict[str, str]:
    """The metadata_props of an export."""
    return {"deco_format": FORMAT_VERSION, "config": config.to_json(),
            "deco_graph": GRAPH_CFG if cfg else GRAPH_VELOCITY,
            "deco_batch": "dynamic" if batch is None else str(batch),
            "deco_resolution": "dynamic" if resolution is None else f"{resolution[0]}x{resolution[1]}",
            "deco_dtype": dtype, **(metadata or {})}


def _finish(traced: Path, staged: Path, props: dict[str, str], external_data: bool | None,
            rewrite: Callable[[Any], Any] | None = None) -> bool:
    """Save the traced graph with its metadata at `staged` (weights in `<staged>.data` when
    external), run the full ONNX checker on the path, and say whether the data is external."""
    import onnx  # here: onnx is an optional extra

    proto = onnx.load(str(traced))  # with any tensor files the exporter wrote beside it
    if rewrite is not None:  # e.g. the decoder placeholders lowered to Loops
        proto = rewrite(proto)
    return save_checked(proto, staged, props, external_data)


def _check_other_shapes(net: nn.Module, path: Path, config: DeCoConfig, cfg: bool,
                        batch: int | None, resolution: tuple[int, int] | None, dtype: str) -> None:
    """Run the graph on the CPU at a batch and size other than the traced ones (where they are
    dynamic) and compare with the float32 torch model `net` to the dtype's bound: tracing
    silently freezes any shape the model's Python code computes, and this is where such a freeze
    shows. The size has a one-row token grid, the edge case of the RoPE positions."""
    p = config.patch_size
    inputs = _example_inputs(config, batch or 3, resolution or (p, 5 * p), cfg)
    feed = dict(zip(input_names(config, cfg), (a.numpy() for a in inputs), strict=True))
    with torch.no_grad():
        expected = net(*inputs).numpy()
    rtol = RTOL_BY_DTYPE[dtype]
    try:
        got = _run_on_cpu(path, feed, dtype)
    except Exception as exc:  # onnxruntime's and the evaluator's own exception types
        got, reason = None, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if got is not None:
        err = relative_error(got, expected)
        reason = f"relative error {err:.1e} vs torch (bound {rtol:g})"
        if err <= rtol:
            return
    shape = tuple(inputs[0].shape)
    raise ValueError(
        f"model: the exported graph does not run correctly at {shape} (traced at another shape): "
        f"{reason}. The model's code fixes a shape while tracing; export with a fixed --batch "
        "and --resolution instead")


def relative_error(got: Any, expected: Any) -> float:
    """max |got - expected| / max |expected|, in float64: the measure of every bound here."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def config_of(model: nn.Module) -> DeCoConfig:
    """The DeCoConfig of a deco.optimized model (TypeError for anything else)."""
    config = getattr(model, "config", None)
    if not isinstance(config, DeCoConfig):
        raise TypeError(
            f"model: expected a deco.optimized model with a DeCoConfig, got {type(model).__name__}")
    return config


def output_path(path: str | Path) -> Path:
    """An export's output path, whose folder must exist (FileNotFoundError otherwise)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output: folder {path.parent} does not exist")
    return path


def checkpoint_metadata(file: Path) -> dict[str, str]:
    """The metadata tracing a graph back to its weight file: absolute path and SHA-256."""
    return {"deco_checkpoint": str(file.resolve()), "deco_checkpoint_sha256": sha256_file(file)}


def load_checkpoint(checkpoint: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """A weight file loaded with `deco.optimized.load_model`, and its `checkpoint_metadata`."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint: no such file: {checkpoint}")
    return load_model(checkpoint), checkpoint_metadata(checkpoint)


def export_checkpoint(checkpoint: str | Path, path: str | Path, **options: Any) -> Path:
    """Load a weight file with `deco.optimized.load_model` and export it; the file's absolute
    path and SHA-256 go into the metadata so the graph can be traced back to its weights."""
    model, meta = load_checkpoint(checkpoint)
    return export_onnx(model, path, metadata=meta, **options)
