"""`deco fid`: FID, sFID, Inception Score, precision and recall of an ADM sample batch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from deco.cli.common import default_of, existing_file
from deco.errors import UsageError
from deco.evaluate.adm import evaluate_sample_batches
from deco.extras import missing_module
from deco.output_policy import add_force, check_output


def register(sub: Any) -> None:
    p = sub.add_parser(
        "fid",
        help="FID, sFID, IS, precision and recall of a sample batch, as ADM's evaluator",
        description="Score SAMPLES (.npz, arr_0: N x H x W x 3 uint8, e.g. written by the sharded "
        "sampler) against REFERENCE (.npz with arr_0 images and/or precomputed mu, sigma, mu_s, "
        "sigma_s, e.g. ADM's VIRTUAL_imagenet256_labeled.npz) with torch-fidelity's port of the "
        "TensorFlow Inception-v3 ADM uses, read from a local weights file (nothing is downloaded). "
        "Precision and recall need reference images.",
    )
    p.add_argument("samples", type=existing_file, help="sample batch .npz")
    p.add_argument("reference", type=existing_file, help="reference batch .npz")
    p.add_argument("--inception-weights", type=existing_file, required=True, metavar="FILE",
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=int, default=default_of(evaluate_sample_batches, "batch_size"),
                   help="images per Inception batch (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--ignore-reference-stats", action="store_true",
                   help="recompute the reference statistics from its images instead of using mu/sigma")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON "
                   "(an existing FILE is refused unless --force)")
    add_force(p)
    p.set_defaults(handler=fid)


def fid(args: argparse.Namespace) -> int:
    import torch

    from deco.evaluate.adm import load_inception
    from deco.optimized.gemm import full_float32_products
    from deco.outputs import write_json

    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive int, got {args.batch_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no CUDA device")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.json is not None:
        check_output(args.json, args.force, "--json")
    try:
        inception = load_inception(args.inception_weights, device)
    except ImportError as exc:
        if missing_module(exc) is not None:
            raise  # deco.cli.main names the extra, as for every command
        raise UsageError(str(exc)) from exc
    # TensorFlow's evaluator computes convolutions in float32; TF32 would move the features.
    with full_float32_products():
        result = evaluate_sample_batches(args.samples, args.reference, inception, batch_size=args.batch_size,
                                         device=device, ignore_reference_stats=args.ignore_reference_stats)
    print(f"Inception Score: {result.inception_score:.6g}")
    print(f"FID: {result.fid:.6g}")
    print(f"sFID: {result.sfid:.6g}")
    for name, value in (("Precision", result.precision), ("Recall", result.recall)):
        print(f"{name}: {'n/a (no reference images)' if value is None else f'{value:.6g}'}")
    print(f"({result.num_samples} samples, reference statistics {result.reference_stats})")
    if not result.standard_inception:
        print(f"warning: {args.inception_weights} (sha256 {result.inception_sha256[:12]}...) is not the "
              "standard Inception weights file: not comparable to published numbers", file=sys.stderr)
    if args.json is not None:
        write_json(args.json, result.to_dict())
    return 0
