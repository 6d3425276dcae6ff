"""`deco export-onnx`, `deco onnx-check` and `deco conformance`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deco.cli.common import default_of, existing_file
from deco.deploy import export as deploy_export
from deco.deploy.check import check_onnx
from deco.deploy.export import DEFAULT_OPSET
from deco.errors import FieldError, UsageError
from deco.output_policy import add_force, check_output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model's velocity (or guided velocity) to ONNX",
        description="Export the velocity model (x, t, y) -> v of a DeCo weight file to ONNX "
        "(a text-to-image model: (x, t, text) -> v, text the (B, T, E) text-encoder states), "
        "with dynamic batch, height and width unless fixed. With --cfg the graph also takes the "
        "guidance scale g (a text model: first the null text embedding `null` (B, T, E)) and "
        "returns u + g (c - u), both branches in one batch.",
    )
    p.add_argument("checkpoint", type=existing_file, help="weight file (as deco.optimized.load_model reads)")
    p.add_argument("output", type=Path, help="output .onnx file (an existing one is refused unless --force)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help="ONNX opset, 17..20 (default %(default)s)")
    p.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="fix the image size (default: dynamic height and width)")
    p.add_argument("--cfg", action="store_true", help="export the classifier-free-guided velocity")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "int8"], default="float32",
                   help="weight and compute dtype; inputs and output stay float32. float16/bfloat16 "
                   "are for GPU runtimes (onnxruntime-gpu, TensorRT) and agree with the float32 "
                   "model to a relative 1e-2 / 5e-2 (float32: 1e-4). onnxruntime's CPU provider "
                   "cannot run bfloat16, so the export checks such a graph with onnx's reference "
                   "evaluator, and onnx-check needs a GPU provider for it. int8: onnxruntime's "
                   "dynamic quantisation of the linear layers, for CPUs, see deco.deploy.quantize")
    p.add_argument("--external-data", action="store_true", default=None,
                   help="always write the weights to one external file OUTPUT.data beside the "
                   "graph (default: only when they exceed 1 GiB, as protobuf cannot hold 2 GiB)")
    p.add_argument("--decoder-chunks", type=int, metavar="ROWS",
                   default=default_of(deploy_export.export_onnx, "decoder_chunk_rows"),
                   help="pixels per iteration of the pixel decoder's ONNX Scan (default %(default)s), "
                   "which onnxruntime's CPU provider runs from cache (bench/RESULTS.md §6); 0 writes "
                   "the straight-line decoder, one pass over all pixels, e.g. for GPU runtimes, where "
                   "chunks only add small kernels. int8 exports always write the straight-line one")
    p.add_argument("--generator", action="store_true",
                   help="export the whole sampler instead: noise and condition in, `sample` in [-1, 1] "
                   "and uint8 `image` out (spec/04 §7); the sampler options below default to the "
                   "checkpoint's recorded settings (deco sample's); excludes --cfg")
    _generator_options(p)
    add_force(p)
    p.set_defaults(handler=export_onnx)

    p = sub.add_parser(
        "onnx-check",
        help="run an exported graph in onnxruntime against torch and the float64 reference",
        description="Run the graph on random inputs in onnxruntime (CUDA where available, else "
        "CPU), in deco.optimized (float32) and in the float64 reference, rebuilt from the weight "
        "file recorded in the graph's metadata (or --checkpoint; its SHA-256 must match). Prints "
        "the errors; exit status 1 when any relative error exceeds its bound (1e-4; for a float16 / "
        "bfloat16 graph 1e-2 / 5e-2 on the rows involving onnxruntime). A graph with external "
        "data needs its .data file beside it.",
    )
    p.add_argument("model", type=existing_file, help=".onnx file written by deco export-onnx")
    p.add_argument("--checkpoint", type=existing_file, default=None,
                   help="the weight file it was exported from (default: the path in its metadata)")
    p.add_argument("--batch", type=int, default=default_of(check_onnx, "batch"),
                   help="batch for a dynamic-batch graph (default %(default)s)")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="image size for a dynamic-size graph (default 2p x 3p)")
    p.add_argument("--guidance", type=float, default=default_of(check_onnx, "guidance"),
                   help="guidance scale for a --cfg graph or a guided generator graph")
    p.add_argument("--seed", type=int, default=default_of(check_onnx, "seed"))
    p.set_defaults(handler=onnx_check)

    p = sub.add_parser(
        "conformance",
        help="run the spec's test vectors against a port, or regenerate them",
        description="Run the test vectors of spec/vectors on a Python port (an object with the "
        "protocol functions of spec/vectors/README.md), on an ONNX file (forward vectors "
        "only) or on the output files of a port in any language (--outputs), print a table with "
        "a diagnosis of each failure, and exit with status 1 on any failure. Or list, export or "
        "regenerate the vectors, or export the forward vectors' model to ONNX.",
    )
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--python", metavar="MODULE:OBJECT",
                        help="a port object (a class is instantiated without arguments)")
    action.add_argument("--onnx", type=existing_file, metavar="FILE",
                        help="a graph exported from a forward vector's weights (forward and "
                        "t2i_forward vectors only)")
    action.add_argument("--write", type=Path, metavar="DIR", help="regenerate the vectors into DIR "
                        "(a non-empty DIR is refused unless --force)")
    action.add_argument("--export-vector-model", type=Path, metavar="OUT",
                        help="export the forward vector's model to OUT.onnx (see --architecture; an "
                        "existing OUT is refused unless --force)")
    action.add_argument("--outputs", type=Path, metavar="DIR",
                        help="check the outputs a port in any language wrote: DIR/<vector>.safetensors "
                        "with the tensor `out` (spec/vectors/README.md, File protocol)")
    action.add_argument("--list", action="store_true",
                        help="list every vector: component, inputs, arguments, output, tolerance")
    action.add_argument("--audit", type=Path, nargs="?", const=Path("-"), metavar="FILE",
                        help="run every catalogued convention variant of the reference over the "
                        "vectors and print the matrix variant x vector (also written as Markdown "
                        "to FILE if given); exit 1 if a variant fails no vector or is not named by "
                        "the diagnosis where it fails")
    action.add_argument("--export-vectors", type=Path, metavar="DIR",
                        help="copy the vectors and their README into DIR (refused if DIR is not "
                        "empty, unless --force)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON report (one record per vector, with the diagnosis) instead "
                   "of the table; with --list, the list as JSON")
    p.add_argument("--junit", type=Path, metavar="FILE", default=None,
                   help="also write the run's report as JUnit XML to FILE")
    p.add_argument("--force", action="store_true",
                   help="--write, --export-vector-model: replace an existing output atomically; "
                   "--export-vectors: overwrite the vector files in a non-empty DIR")
    p.add_argument("--vectors", type=Path, default=None,
                   help="vector folder (default: $DECO_VECTORS or spec/vectors of the checkout)")
    p.add_argument("--precision", choices=["float32", "float64"], default=None,
                   help="tolerance to apply (default: the port's `precision`, else float32)")
    p.add_argument("--architecture", choices=["deco", "baseline", "t2i"], default="deco",
                   help="which forward vector --export-vector-model exports (default %(default)s)")
    p.set_defaults(handler=conformance)


def _generator_options(p: argparse.ArgumentParser) -> None:
    what = "(--generator; default: the checkpoint's)"
    p.add_argument("--solver", default=None, help=f"euler, heun or adams {what}")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps {what}")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"default guidance scale {what}; the graph takes the scale as an input, "
                   "except with 1, which exports a graph without the null branch")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help=f"guidance interval {what}")
    p.add_argument("--timeshift", type=float, default=None, help=f"time-grid shift {what}")


SAMPLER_FLAGS = ("solver", "steps", "guidance", "interval", "timeshift")


def _batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--batch: expected 'dynamic' or a positive int, got {text!r}") from None
    if value < 1:
        raise UsageError(f"--batch: expected 'dynamic' or a positive int, got {value}")
    return value


def _decoder_chunks(rows: int) -> int | None:
    if rows < 0:
        raise UsageError(f"--decoder-chunks: expected 0 (the straight-line decoder) or a positive "
                         f"number of pixels, got {rows}")
    return rows or None


def export_onnx(args: argparse.Namespace) -> int:
    from deco.deploy.export import export_checkpoint
    from deco.deploy.onnx_file import data_file

    check_output(args.output, args.force)
    chunks = _decoder_chunks(args.decoder_chunks)
    sampler = _sampler(args)
    if args.dtype == "int8":
        from deco.cli.int8 import export_int8

        return export_int8(args, _batch(args.batch), sampler)
    if sampler is not None:
        return _export_generator(args, chunks, sampler)
    resolution = tuple(args.resolution) if args.resolution else None
    path = export_checkpoint(args.checkpoint, args.output, opset=args.opset,
                             batch=_batch(args.batch), resolution=resolution, cfg=args.cfg,
                             dtype=args.dtype, external_data=args.external_data,
                             decoder_chunk_rows=chunks)
    shape = f"batch {args.batch}, " + (f"{resolution[0]}x{resolution[1]}" if resolution else
                                       "dynamic height/width")
    data = data_file(path)
    extra = f"; weights in {data}" if data.is_file() else ""
    print(f"wrote {path} ({'cfg' if args.cfg else 'velocity'} graph, opset {args.opset}, {shape}, "
          f"{args.dtype}{extra})")
    return 0


def _sampler(args: argparse.Namespace) -> dict[str, Any] | None:
    """The sampler options given to `export-onnx --generator` (None entries: the checkpoint's
    recorded ones), or None without --generator, where no sampler option may be given."""
    if not args.generator:
        for flag in SAMPLER_FLAGS:
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag}: a sampler option; it needs --generator")
        return None
    if args.cfg:
        raise UsageError("--cfg: a generator graph guides inside itself; give --generator or --cfg, not both")
    options = {flag: getattr(args, flag) for flag in SAMPLER_FLAGS}
    options["interval"] = tuple(args.interval) if args.interval is not None else None
    return options


def _export_generator(args: argparse.Namespace, chunks: int | None, sampler: dict[str, Any]) -> int:
    """`deco export-onnx --generator`: every setting checked before anything is written."""
    from deco.deploy.generator import export_generator_checkpoint
    from deco.deploy.onnx_file import data_file
    resolution = tuple(args.resolution) if args.resolution else None
    try:
        path, settings = export_generator_checkpoint(
            args.checkpoint, args.output, **sampler, opset=args.opset, batch=_batch(args.batch),
            resolution=resolution, dtype=args.dtype, external_data=args.external_data,
            decoder_chunk_rows=chunks)
    except FieldError as exc:
        raise UsageError(f"--{exc.field}: {exc.message}") from None
    guided = f"guidance {settings.guidance:g} (an input)" if settings.guidance != 1 else "no guidance"
    data = data_file(path)
    extra = f"; weights in {data}" if data.is_file() else ""
    print(f"wrote {path} (generator graph: {settings.solver}, {settings.steps} steps, {guided}, interval "
          f"{settings.interval[0]:g}..{settings.interval[1]:g}, time shift {settings.timeshift:g}; opset "
          f"{args.opset}, {args.dtype}{extra})")
    return 0


def onnx_check(args: argparse.Namespace) -> int:
    from deco.deploy.check import format_check

    rows, providers = check_onnx(args.model, checkpoint=args.checkpoint, batch=args.batch,
                                 resolution=tuple(args.resolution) if args.resolution else None,
                                 guidance=args.guidance, seed=args.seed)
    print(f"onnxruntime providers: {', '.join(providers)}")
    print(format_check(rows))
    if all(r.max_rel <= r.bound for r in rows):
        print("PASS: every relative error within its bound")
        return 0
    print("FAIL: a relative error exceeds its bound")
    return 1


def _audit(vectors: Any, target: Path) -> int:
    from deco.atomic import atomic_write
    from deco.conformance.audit import audit, matrix, passed

    rows = audit(vectors)
    text = matrix(rows, vectors)
    print(text, end="")
    if str(target) != "-":
        atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return 0 if passed(rows) else 1


def conformance(args: argparse.Namespace) -> int:
    from deco import conformance as kit

    if args.write is not None:
        from deco.conformance.vectors import write_vectors

        check_output(args.write, args.force, "--write", folder=True)
        paths = write_vectors(args.write)
        size = sum(p.stat().st_size for p in paths)
        print(f"wrote {len(paths)} vectors to {args.write} ({size / 1024:.0f} KiB)")
        return 0
    if args.export_vectors is not None:
        from deco.conformance.outputs import export_vectors

        written = export_vectors(args.export_vectors, args.vectors, force=args.force)
        print(f"copied {len(written)} files to {args.export_vectors}")
        return 0
    vectors = kit.load_vectors(args.vectors)
    if args.audit is not None:
        return _audit(vectors, args.audit)
    if args.list:
        from deco.conformance.outputs import list_json, list_text

        print(list_json(vectors) if args.json else list_text(vectors))
        return 0
    if args.export_vector_model is not None:
        from deco.deploy.check import export_vector_model

        check_output(args.export_vector_model, args.force, "--export-vector-model")
        path = export_vector_model(vectors, args.architecture, args.export_vector_model)
        print(f"wrote {path} (forward vector of the {args.architecture} model; run "
              f"deco conformance --onnx {path})")
        return 0
    from deco.conformance.report import report

    if args.outputs is not None:
        from deco.conformance.outputs import run_outputs

        return report(run_outputs(args.outputs, vectors, args.precision), as_json=args.json,
                      junit=args.junit)
    if args.onnx is not None:
        from deco.deploy.runtime import OnnxVelocityModel

        port: Any = kit.OnnxPort(OnnxVelocityModel(args.onnx))
    else:
        port = kit.load_port(args.python)
    return report(kit.run_port(port, vectors, args.precision), as_json=args.json, junit=args.junit)
