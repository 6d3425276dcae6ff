"""`deco export-onnx --dtype int8 [--generator]` (deco.deploy.quantize)."""

from __future__ import annotations

import argparse

from deco.errors import FieldError, UsageError

SAMPLER_FLAGS = ("solver", "steps", "guidance", "interval", "timeshift")


def export_int8(args: argparse.Namespace, batch: int | None) -> int:
    """Check the int8 export's options, then write the velocity, cfg or generator graph."""
    from deco.deploy.quantize import export_int8_checkpoint

    if args.external_data:
        raise UsageError("--external-data: an int8 graph keeps its weights inside (a quarter of "
                         "float32); drop --external-data or use --dtype float32/float16")
    if args.generator and args.cfg:
        raise UsageError("--cfg: a generator graph guides inside itself; give --generator or --cfg, not both")
    if not args.generator:
        for flag in SAMPLER_FLAGS:
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag}: a sampler option; it needs --generator")
    resolution = tuple(args.resolution) if args.resolution else None
    options = {"opset": args.opset, "batch": batch, "resolution": resolution}
    sampler = None
    if args.generator:
        interval = tuple(args.interval) if args.interval is not None else None
        sampler = {"steps": args.steps, "guidance": args.guidance, "interval": interval,
                   "timeshift": args.timeshift, "solver": args.solver}
    else:
        options["cfg"] = args.cfg
    try:
        path, settings = export_int8_checkpoint(args.checkpoint, args.output, generator=args.generator,
                                                sampler=sampler, **options)
    except FieldError as exc:
        raise UsageError(f"--{exc.field}: {exc.message}") from None
    if settings is None:
        kind = "cfg" if args.cfg else "velocity"
    else:
        kind = f"generator: {settings.solver}, {settings.steps} steps, guidance {settings.guidance:g}"
    print(f"wrote {path} ({kind} graph, opset {args.opset}, int8: onnxruntime dynamic quantisation)")
    return 0
