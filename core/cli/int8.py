"""`deco export-onnx --dtype int8 [--generator]` (deco.deploy.quantize)."""

from __future__ import annotations

import argparse
from typing import Any

from deco.errors import FieldError, UsageError


def export_int8(args: argparse.Namespace, batch: int | None, sampler: dict[str, Any] | None) -> int:
    """Check the int8 export's own options, then write the velocity, cfg or generator graph
    (`sampler`: the generator's options, checked by deco.cli.deploy, or None)."""
    from deco.deploy.quantize import export_int8_checkpoint

    if args.external_data:
        raise UsageError("--external-data: an int8 graph keeps its weights inside (a quarter of "
                         "float32); drop --external-data or use --dtype float32/float16")
    resolution = tuple(args.resolution) if args.resolution else None
    options: dict[str, Any] = {"opset": args.opset, "batch": batch, "resolution": resolution}
    if sampler is None:
        options["cfg"] = args.cfg
    try:
        path, settings = export_int8_checkpoint(args.checkpoint, args.output, generator=sampler is not None,
                                                sampler=sampler, **options)
    except FieldError as exc:
        raise UsageError(f"--{exc.field}: {exc.message}") from None
    if settings is None:
        kind = "cfg" if args.cfg else "velocity"
    else:
        kind = f"generator: {settings.solver}, {settings.steps} steps, guidance {settings.guidance:g}"
    print(f"wrote {path} ({kind} graph, opset {args.opset}, int8: onnxruntime dynamic quantisation)")
    return 0
