"""int8 exports for CPU deployment (`deco export-onnx --dtype int8 [--generator]`).

onnxruntime's *dynamic* quantisation (`onnxruntime.quantization.quantize_dynamic`) of the float32
velocity (or cfg) graph that `deco.deploy.export.export_onnx` writes: every MatMul/Gemm with a
constant weight becomes MatMulInteger on int8 weights, quantised per output channel
(symmetric), and uint8 activations whose scale and zero point are computed from each call's own
tensor at run time. Everything else (norms, RoPE, the DCT features, attention's activation x
activation products, the sampler) stays float32, and so does the interface: the same inputs,
outputs and metadata as the float32 export, plus `deco_quantization`; `deco_dtype` is "int8".

Why dynamic and not static (calibrated) quantisation: a diffusion model sees activations whose
range changes with the time t over the sampling run (and with guidance); a static scale per
tensor, calibrated once, has to cover all of them, whereas a dynamic one fits each evaluation.
Dynamic needs no calibration data either, so it serves any checkpoint (class or text, digits or
an image folder) the same way. The measurement on the digits demo is in bench/RESULTS.md.

Why per channel, no reduce_range: on two random tiny models per-channel weights lowered the worst
velocity error from 0.084 / 0.049 to 0.055 / 0.048 (for 4% more file); `reduce_range` (7-bit
weights, for CPUs without VNNI where u8 x s8 products can saturate) raised it 1.2-1.7x.

The generator graph is built around the *quantised* velocity graph (`deco.deploy.generator_graph.
build_generator`). Quantising a finished generator does not work: with onnxruntime 1.32 the
quantizer walks into the Loop body but, the weights being outer-scope values, quantises none of
its 39 MatMuls and copies float32 (transposed) weights into the body instead (a 1.28 MB graph
from a 1.22 MB one, no int8). Built this way the int8 weights stay initializers of the main
graph, read by the body from the outer scope, stored once.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deco.atomic import make_temporary_folder, writing
from deco.deploy.export import (
    DEFAULT_OPSET,
    RTOL_BY_DTYPE,
    _check_options,
    _check_other_shapes,
    _cpu_copy,
    _properties,
    config_of,
    export_onnx,
    guided,
    load_checkpoint,
    output_path,
)
from deco.deploy.onnx_file import _install, data_file, save_checked

INT8 = "int8"
#: The operators whose constant weights are quantised.
QUANTIZED_OPS = ["MatMul", "Gemm"]


def quantization_label() -> str:
    """The `deco_quantization` metadata: method and the quantizer's version."""
    import onnxruntime

    return (f"dynamic int8 (onnxruntime {onnxruntime.__version__} quantize_dynamic): MatMul/Gemm "
            "weights int8 per output channel, activations uint8 per tensor at run time")


def quantize_graph(source: Path, target: Path) -> Any:
    """Quantise the float32 graph at `source` into `target` and return the loaded ModelProto
    (weights included)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer suggests its shape-inference pre-processing on every call: it only helps
    # operators we do not quantise, so the warning is noise here.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        quantize_dynamic(source, target, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                         reduce_range=False, weight_type=QuantType.QInt8)
    finally:
        logger.setLevel(level)
    return onnx.load(str(target))


def export_int8(
    model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, batch: int | None = None,
    resolution: tuple[int, int] | None = None, cfg: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export the int8 velocity (or, with `cfg`, guided velocity) graph of `model` to `path`.

    The interface is the float32 export's (`deco.deploy.export.export_onnx`). Built in a
    temporary folder beside `path` and moved into place only after the ONNX checker passes and the
    graph agrees with the float32 torch model at a second shape to `RTOL_BY_DTYPE["int8"]`
    (ValueError otherwise); nothing is left on failure. The weights stay in the graph: int8 is a
    quarter of float32, and a model whose int8 graph would pass 2 GiB is not a CPU model.
    """
    config = config_of(model)
    _check_options(config, opset, batch, resolution)
    path = output_path(path)
    folder = make_temporary_folder(path)
    try:
        with writing(path, folder, data_file(path)):
            # The straight-line decoder: onnxruntime's quantizer leaves the chunked decoder's
            # products in float32 (their weights are outer-scope values of its Scan body).
            velocity = export_onnx(model, folder / "float32.onnx", opset=opset, batch=batch,
                                   resolution=resolution, cfg=cfg, decoder_chunk_rows=None)
            proto = quantize_graph(velocity, folder / "quantized.onnx")
            props = _properties(config, cfg, batch, resolution, INT8, metadata)
            props["deco_quantization"] = quantization_label()
            del proto.metadata_props[:]  # the float graph's; save_checked adds the int8 set
            staged = folder / path.name
            save_checked(proto, staged, props, False)
            reference = _cpu_copy(model, torch.float32)
            _check_other_shapes(guided(reference, config) if cfg else reference, staged, config, cfg,
                                batch, resolution, INT8)
            _install(staged, path, False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def export_int8_generator(
    model: nn.Module, path: str | Path, settings: Any, *, guided_graph: bool | None = None,
    opset: int = DEFAULT_OPSET, batch: int | None = None, resolution: tuple[int, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export the int8 generator graph of `model` sampling with `settings` (a SampleSettings):
    the generator of `deco.deploy.generator` around the quantised velocity graph, checked against
    `deco.optimized.sample` (float32) to `GENERATOR_RTOL_BY_DTYPE["int8"]` (the error compounds
    over the steps); atomic like `export_int8`."""
    from deco.deploy.generator import generator_properties
    from deco.deploy.generator_check import check_export
    from deco.deploy.generator_graph import build_generator
    from deco.optimized.sampling import SampleSettings

    config = config_of(model)
    if not isinstance(settings, SampleSettings):
        raise TypeError(f"settings: expected a SampleSettings, got {type(settings).__name__}")
    _check_options(config, opset, batch, resolution)
    is_guided = settings.guidance != 1.0 if guided_graph is None else bool(guided_graph)
    path = output_path(path)
    folder = make_temporary_folder(path)
    try:
        with writing(path, folder, data_file(path)):
            # The velocity graph keeps a dynamic batch: a guided step evaluates 2B.
            velocity = export_onnx(model, folder / "float32.onnx", opset=opset, resolution=resolution,
                                   decoder_chunk_rows=None)  # straight-line: see export_int8
            quantized = quantize_graph(velocity, folder / "quantized.onnx")
            proto = build_generator(quantized, config, settings, is_guided, batch, resolution)
            props = generator_properties(config, settings, is_guided, "loop", batch, resolution, INT8,
                                         metadata)
            props["deco_quantization"] = quantization_label()
            staged = folder / path.name
            save_checked(proto, staged, props, False)
            check_export(model, staged, settings, is_guided, batch, resolution, INT8)
            _install(staged, path, False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def export_int8_checkpoint(checkpoint: str | Path, path: str | Path, *, generator: bool = False,
                           sampler: dict[str, Any] | None = None, **options: Any) -> tuple[Path, Any]:
    """The int8 export of a weight file (velocity/cfg graph) or, with `generator`, of a weight
    file, training checkpoint or run folder sampling with its recorded settings overridden by
    `sampler` (steps, guidance, interval, timeshift, solver; None entries ignored). Returns the
    path and the generator's SampleSettings (None for a velocity graph). The weight file's path
    and SHA-256 go into the metadata. An invalid sampler setting raises deco.errors.FieldError."""
    if not generator:
        model, meta = load_checkpoint(checkpoint)
        return export_int8(model, path, metadata=meta, **options), None
    from deco.deploy.generator import load_for_generator

    model, settings, meta = load_for_generator(checkpoint, sampler or {})
    return export_int8_generator(model, path, settings, metadata=meta, **options), settings


__all__ = ["INT8", "RTOL_BY_DTYPE", "export_int8", "export_int8_checkpoint", "export_int8_generator",
           "quantization_label", "quantize_graph"]
