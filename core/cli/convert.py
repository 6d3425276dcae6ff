"""`deco convert` and `deco check-fixtures`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deco.cli.common import existing_file, with_adapter
from deco.errors import UsageError
from deco.output_policy import add_force, check_output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a release checkpoint (.ckpt) to a DeCo .safetensors file or a diffusers folder",
        description="Convert a checkpoint of the public DeCo release (Lightning layout) to the "
        "portable safetensors format. The config is inferred from the tensor shapes; the file "
        "is read with torch.load(weights_only=True). With --to diffusers (needs the diffusers "
        "extra), write a pipeline folder for DeCoPipeline / DeCoTextPipeline.from_pretrained "
        "from a release .ckpt or a DeCo .safetensors file instead.",
    )
    p.add_argument("checkpoint", type=existing_file, help="release .ckpt file (or, with --to "
                   "diffusers, a DeCo .safetensors file)")
    p.add_argument("output", type=Path, help="output .safetensors file (--to diffusers: a folder); an "
                   "existing one is refused unless --force")
    p.add_argument("--weights", choices=["ema", "online"], default="ema",
                   help="which weight set to convert (default: %(default)s)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="storage dtype of the output (default: %(default)s, as trained)")
    p.add_argument("--to", choices=["safetensors", "diffusers"], default="safetensors",
                   help="output format (default: %(default)s)")
    p.add_argument("--text-encoder", type=Path, default=None, metavar="DIR",
                   help="--to diffusers, text-to-image: the text encoder's transformers folder "
                   "(model and tokenizer; the release: Qwen3-1.7B), copied into the pipeline")
    p.add_argument("--labels", type=existing_file, default=None, metavar="FILE",
                   help="--to diffusers: class names, one per line (default: the ImageNet names "
                   "for 1000 classes, none otherwise)")
    p.add_argument("--sample-size", type=int, default=256,
                   help="--to diffusers: the pipeline's default image side in pixels (default: %(default)s)")
    p.add_argument("--lora", type=existing_file, default=None, metavar="ADAPTER",
                   help="merge this LoRA adapter into the model (CKPT: any model deco sample reads) and "
                   "write the plain result, e.g. for deco export-onnx")
    add_force(p)
    p.set_defaults(handler=convert)

    p = sub.add_parser(
        "check-fixtures",
        help="check the NumPy reference against the release's outputs and print a table",
        description="Recompute every output stored in the release fixtures (A.npz, and T.npz "
        "where present, as rows T.*) with the "
        "float64 reference and compare. Exit status 1 when any comparison fails.",
    )
    p.add_argument("--fixtures", type=Path, default=None,
                   help="fixture folder (default: $DECO_FIXTURES or ../shared/fixtures)")
    p.set_defaults(handler=check_fixtures)


def convert(args: argparse.Namespace) -> int:
    check_output(args.output, args.force, folder=args.to == "diffusers")
    if args.lora is not None:
        return convert_with_adapter(args)
    if args.to == "diffusers":
        return convert_to_diffusers(args)
    for flag, value in (("--text-encoder", args.text_encoder), ("--labels", args.labels)):
        if value is not None:
            raise UsageError(f"{flag}: only with --to diffusers")
    import numpy as np

    from deco.reference.weights import save_weights
    from deco.release import read_release_checkpoint

    config, state = read_release_checkpoint(args.checkpoint, args.weights)
    weights = {k: v.detach().cpu().numpy() for k, v in state.items()}
    save_weights(args.output, config, weights, dtype=np.dtype(args.dtype))
    print(f"wrote {args.output} ({config.architecture}, {len(weights)} tensors, {args.weights})")
    return 0


def convert_with_adapter(args: argparse.Namespace) -> int:
    """`deco convert CKPT OUT.safetensors --lora ADAPTER`: the model with the adapter merged into
    its weights (deco.lora.merge_adapter), a plain DeCo .safetensors file."""
    import torch

    from deco.generate import load_for_sampling
    from deco.lora import merge_adapter

    if args.to != "safetensors":
        raise UsageError("--lora: only with --to safetensors (in diffusers: pipe.load_lora_weights, "
                         "then pipe.fuse_lora)")
    if args.weights != "ema":
        raise UsageError("--lora: the adapter is merged into the model's EMA weights; drop --weights")
    try:
        loaded = load_for_sampling(args.checkpoint, torch.device("cpu"), text=True)
    except ValueError as exc:
        raise UsageError(f"checkpoint: {exc}") from None
    model = merge_adapter(with_adapter(loaded.model, args.lora))
    model.save(args.output, dtype=getattr(torch, args.dtype))
    print(f"wrote {args.output} ({model.config.architecture}, {args.checkpoint} with {args.lora} merged)")
    return 0


def convert_to_diffusers(args: argparse.Namespace) -> int:
    """`deco convert CKPT DIR --to diffusers`: a pipeline folder (deco.diffusers.write_pipeline)."""
    import torch

    from deco.diffusers.convert import read_id2label, write_pipeline  # [diffusers]: deco.cli.main names it

    pipe = write_pipeline(args.checkpoint, args.output, weights=args.weights,
                          dtype=getattr(torch, args.dtype), overwrite=args.force,
                          text_encoder=args.text_encoder, sample_size=args.sample_size,
                          id2label=read_id2label(args.labels) if args.labels else None)
    print(f"wrote {args.output} ({type(pipe).__name__}, {pipe.transformer.deco_config.architecture})")
    return 0


def check_fixtures(args: argparse.Namespace) -> int:
    from deco.conformance.fixtures import format_table, reference_checks

    checks = reference_checks(args.fixtures)
    print(format_table(checks))
    return 0 if all(c.passed for c in checks) else 1
