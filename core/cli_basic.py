"""`deco convert` and `deco check-fixtures`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli import existing_file


def register(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a release checkpoint (.ckpt) to a DeCo .safetensors file",
        description="Convert a checkpoint of the public DeCo release (Lightning layout) to the "
        "portable safetensors format. The config is inferred from the tensor shapes; the file "
        "is read with torch.load(weights_only=True).",
    )
    p.add_argument("checkpoint", type=existing_file, help="release .ckpt file")
    p.add_argument("output", type=Path, help="output .safetensors file")
    p.add_argument("--weights", choices=["ema", "online"], default="ema",
                   help="which weight set to convert (default: ema)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="storage dtype of the output (default: float32, as trained)")
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
    import numpy as np

    from .reference.weights import save_weights
    from .release import read_release_checkpoint

    config, state = read_release_checkpoint(args.checkpoint, args.weights)
    if not args.output.parent.is_dir():
        raise FileNotFoundError(f"output: folder {args.output.parent} does not exist")
    weights = {k: v.detach().cpu().numpy() for k, v in state.items()}
    save_weights(args.output, config, weights, dtype=np.dtype(args.dtype))
    print(f"wrote {args.output} ({config.architecture}, {len(weights)} tensors, {args.weights})")
    return 0


def check_fixtures(args: argparse.Namespace) -> int:
    from .fixtures import format_table, reference_checks

    checks = reference_checks(args.fixtures)
    print(format_table(checks))
    return 0 if all(c.passed for c in checks) else 1
