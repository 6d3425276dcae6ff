"""`deco sample`, `deco evaluate` and `deco spectrum`: argument parsing only.

The work is in deco.generate (loading, sampling), deco.evaluate (scores, spectra) and
deco.outputs (what is written).
Sampler options start from the run's settings (a run folder or training checkpoint) or the spec's
defaults, and are validated once, by `deco.optimized.sampling.SampleSettings`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deco.cli import sample_text as cli_sample_text
from deco.cli.common import default_of, existing_file, shown, with_adapter
from deco.errors import UsageError
from deco.evaluate.sample_batches import ShardPlan
from deco.generate import generate
from deco.optimized.sampling import SampleSettings
from deco.output_policy import add_force, check_output, sample_output

#: What `deco sample` uses for a class model without a run's settings: the spec's defaults.
SPEC_SAMPLING = SampleSettings()
TEXT_SOLVER = cli_sample_text.RELEASE_T2I_SAMPLING.solver  # a text model's, without a run's settings


#: `deco spectrum`'s default times.
SPECTRUM_TIMES = (0.25, 0.5, 0.75)


def register(sub: Any) -> None:
    _register_sample(sub)
    _register_evaluate(sub)
    _register_spectrum(sub)


def _described(settings: SampleSettings) -> str:
    """Settings in words, e.g. "50 Euler steps, no guidance"."""
    guidance = "no guidance" if settings.guidance == 1.0 else f"guidance {shown(settings.guidance)}"
    return f"{settings.steps} {settings.solver.capitalize()} steps, {guidance}"


def _sampler_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps {what}")
    p.add_argument("--guidance", type=float, default=None, help=f"classifier-free guidance scale {what}")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help=f"guidance applies where LOW < t <= HIGH {what}")
    p.add_argument("--timeshift", type=float, default=None, help=f"time-grid shift s > 0 {what}")
    p.add_argument("--solver", choices=["euler", "heun", "adams"], default=None,
                   help=f"ODE solver {what} (text models: {TEXT_SOLVER})")


# ----------------------------------------------------------------------------- sample
def _register_sample(sub: Any) -> None:
    p = sub.add_parser(
        "sample",
        help="generate class-conditional images from a model",
        description="Generate images. CKPT: a run folder, a training checkpoint, a DeCo "
        ".safetensors model or a release .ckpt. Sampler settings default to the run's (for a run "
        f"folder or training checkpoint) or the spec's ({_described(SPEC_SAMPLING)}).",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--labels", type=int, nargs="+", default=None,
                   help="class of each image (default: the first 10 classes)")
    p.add_argument("--per-label", type=int, default=1,
                   help="images per label, one grid row each (%(default)s)")
    _sampler_options(p, "(default: the run's)")
    p.add_argument("--seed", type=int, default=default_of(generate, "seed"), help="noise seed (%(default)s)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training size)")
    p.add_argument("--batch-size", type=int, default=default_of(generate, "batch_size"),
                   help="images per forward pass (%(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--lora", type=existing_file, default=None, metavar="ADAPTER",
                   help="apply a LoRA adapter (pytorch_lora_weights.safetensors of deco train --lora, or "
                   "one saved by diffusers' save_lora_weights)")
    p.add_argument("--out", type=Path, default=Path("samples.png"),
                   help="an image grid (.png, .jpg or another image suffix), an .npz (uint8 NHWC "
                   "arr_0, labels arr_1) or a folder of PNGs (a path without a suffix). An existing "
                   "output is refused unless --force; with --count the shards resume instead (see "
                   "--restart) (default: %(default)s)")
    p.add_argument("--count", type=int, default=None,
                   help="generate COUNT class-balanced samples (50 per class for 50000: the ADM/DiT "
                   "protocol) into the ADM sample batch --out X.npz, in shards written as they "
                   "complete (resumable: a rerun skips finished shards); under torchrun each "
                   "process takes every WORLD-th shard")
    p.add_argument("--shard-size", type=int, default=default_of(ShardPlan, "shard_size"),
                   help="samples per shard with --count (%(default)s)")
    p.add_argument("--shard-dir", type=Path, default=None,
                   help="folder of the shards with --count (default: OUT without .npz + '.shards')")
    p.add_argument("--restart", action="store_true",
                   help="with --count: delete the shards of an earlier run of another plan (model or "
                   "settings) and start over, instead of refusing them")
    add_force(p)
    cli_sample_text.add_options(p)
    p.set_defaults(handler=sample)


def _device(name: str) -> Any:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device: cuda requested but torch sees no CUDA device")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _settings(args: argparse.Namespace, loaded: Any) -> Any:
    import dataclasses

    from deco.errors import FieldError

    default = cli_sample_text.RELEASE_T2I_SAMPLING if loaded.model.config.is_text else SPEC_SAMPLING
    base = loaded.sample if loaded.sample is not None else default
    changes = {k: getattr(args, k) for k in ("steps", "guidance", "timeshift", "solver")
               if getattr(args, k) is not None}
    if args.interval is not None:
        changes["interval"] = tuple(args.interval)
    try:
        return dataclasses.replace(base, **changes)
    except FieldError as exc:
        raise UsageError(f"--{exc.field}: {exc.message}") from None


def sample(args: argparse.Namespace) -> int:
    from deco.generate import load_for_sampling
    from deco.outputs import save_samples

    device = _device(args.device)
    loaded = load_for_sampling(args.checkpoint, device, text=True)
    if args.lora is not None:
        with_adapter(loaded.model, args.lora)
    if loaded.model.config.is_text:
        return cli_sample_text.sample(args, loaded, _settings(args, loaded), device)
    for flag in ("prompt", "prompts", "text_encoder"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')}: {args.checkpoint} is a class-conditional "
                             f"model; give --labels")
    k = loaded.model.config.num_classes
    labels = args.labels if args.labels is not None else list(range(min(k, 10)))
    bad = [y for y in labels if not 0 <= y < k]
    if bad:
        raise UsageError(f"--labels: {bad[0]} is out of range: the model has classes 0..{k - 1}")
    if args.per_label < 1:
        raise UsageError(f"--per-label: expected a positive int, got {args.per_label}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected a positive int, got {args.batch_size}")
    resolution = args.resolution or loaded.resolution
    p = loaded.model.config.patch_size
    if resolution < 1 or resolution % p:
        raise UsageError(f"--resolution: expected a positive multiple of the patch size {p}, "
                         f"got {resolution}")
    settings = _settings(args, loaded)
    if args.count is not None:
        return _sample_batch(args, loaded, settings, resolution)
    if args.restart:
        raise UsageError("--restart: only with --count (it deletes the shards of another plan)")
    sample_output(args.out, args.force)
    labels = [y for y in labels for _ in range(args.per_label)]
    images = generate(loaded.model, labels, settings, seed=args.seed, batch_size=args.batch_size,
                      resolution=resolution)
    columns = args.per_label if args.per_label > 1 else min(len(labels), 10)
    print(f"wrote {save_samples(images, labels, args.out, columns)}")
    return 0


def _sample_batch(args: argparse.Namespace, loaded: Any, settings: Any, resolution: int) -> int:
    """`deco sample --count N`: the sharded, resumable ADM sample batch (deco.evaluate.sample_batches)."""
    from deco.distributed import setup_distributed
    from deco.evaluate.sample_batches import generate_sample_batch
    from deco.outputs import to_uint8
    from deco.plan_identity import PlanMismatch

    if args.out.suffix.lower() != ".npz":
        raise UsageError(f"--out: --count writes an ADM sample batch; expected a .npz path, got {args.out}")
    check_output(args.out, args.force, "--out")
    try:
        plan = ShardPlan(count=args.count, num_classes=loaded.model.config.num_classes,
                         shard_size=args.shard_size, seed=args.seed)
    except ValueError as exc:
        field, _, message = str(exc).partition(":")
        raise UsageError(f"--{field.replace('_', '-')}:{message}") from None
    shards = args.shard_dir or args.out.with_suffix(".shards")
    if args.shard_dir is None:  # a folder we derive, not one the user named: never through a link
        from deco.paths_inside import refuse_symlinked_output

        refuse_symlinked_output(shards, what="--out")
    d = setup_distributed(args.device)
    model = loaded.model.to(d.device)

    def images(labels: Any, seed: int) -> Any:
        return to_uint8(generate(model, labels, settings, seed=seed, batch_size=args.batch_size,
                                 resolution=resolution))

    inputs = sampling_inputs(loaded.model, settings, resolution)
    try:
        out = generate_sample_batch(images, shards, args.out, plan, progress=d.is_main, inputs=inputs,
                                    restart=args.restart)
    except PlanMismatch as exc:
        where = "--shard-dir" if args.shard_dir else "--out"
        raise UsageError(f"{where}: {shards} holds shards of another plan ({exc.shown}); give --restart "
                         f"to delete them and start over, or choose another {where}") from None
    finally:
        if d.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if out is not None:
        print(f"wrote {out} ({args.count} samples, {resolution}x{resolution}; shards in {shards}/)")
    return 0


def sampling_inputs(model: Any, settings: Any, resolution: int) -> dict[str, Any]:
    """Everything besides the shard plan that decides the images of `deco sample --count`: the
    model (config and a hash of its weights, so another checkpoint of the same shape differs),
    the weights' dtype, the sampler settings and the resolution. Not the batch size or the
    device: they change how the images are computed, not which (deco.generate.generate draws
    the noise of a shard at once), so a rerun may use others, e.g. to fit another GPU."""
    from deco.plan_identity import tensors_sha256

    return {"model_sha256": tensors_sha256(model.state_dict()), "config": model.config.to_dict(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "sampler": settings.to_dict(), "resolution": resolution}


# ----------------------------------------------------------------------------- evaluate
def _register_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="class accuracy and Fréchet distance of a digits model's samples",
        description="Generate --per-class images of each digit, classify them with an MLP "
        "trained on real digits, and compute the Fréchet distance to real digits in the MLP's "
        "hidden-layer features. Writes an 'evaluation' section into --out.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--per-class", type=int, default=100, help="samples per class (%(default)s)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="text demo: the encoder folder (default: the run's built-in one)")
    p.add_argument("--limit", type=int, default=None,
                   help="text demo: at most this many prompts per held-out set (default: all)")
    _sampler_options(p, "(default: the run's)")
    p.add_argument("--seed", type=int, default=default_of(generate, "seed"), help="noise seed (%(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward pass (%(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: metrics.json in the run folder, else in the current "
                   "folder); its 'evaluation' section is replaced, other sections are kept")
    p.set_defaults(handler=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    import time

    from deco.evaluate.digits import DigitsClassifier, digits_compatible, score_samples
    from deco.generate import class_labels, load_for_sampling
    from deco.outputs import merge_json, metrics_in_run

    if args.per_class < 2:
        raise UsageError(f"--per-class: expected an int >= 2, got {args.per_class}")
    if args.out is None and args.checkpoint.is_dir():
        metrics_in_run(args.checkpoint)  # a metrics.json linking out is refused before the work
    device = _device(args.device)
    loaded = load_for_sampling(args.checkpoint, device, text=True)  # a LoRA run comes merged
    if loaded.model.config.is_text:
        return cli_sample_text.evaluate(args, loaded, _settings(args, loaded), device)
    digits_compatible(loaded.model.config)
    settings = _settings(args, loaded)
    labels = class_labels(10, args.per_class)
    t0 = time.perf_counter()
    images = generate(loaded.model, labels, settings, seed=args.seed, batch_size=args.batch_size,
                      resolution=32)
    seconds = time.perf_counter() - t0
    result = score_samples(images, labels, DigitsClassifier())
    result.update(checkpoint=str(args.checkpoint), sampler=settings.to_dict(), seed=args.seed,
                  sample_seconds=round(seconds, 2))
    out = args.out or (metrics_in_run(args.checkpoint) if args.checkpoint.is_dir() else Path("metrics.json"))
    merge_json(out, {"evaluation": result})
    print(f"class accuracy {result['accuracy']:.3f} (classifier's own held-out accuracy on real "
          f"digits {result['classifier_test_accuracy']:.3f}); Fréchet distance "
          f"{result['frechet_distance']:.3f} (real held-out: {result['frechet_distance_real_holdout']:.3f}); "
          f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- spectrum
def _register_spectrum(sub: Any) -> None:
    p = sub.add_parser(
        "spectrum",
        help="DCT energy per frequency band of the DiT output and the velocity (paper Fig. 4)",
        description="On noisy real images x_t, measure the 8x8 block-DCT energy per diagonal band "
        "u+v of the DiT's output (token grid) and of the predicted velocity, for CKPT and "
        "optionally a baseline. Writes spectrum.png and spectrum.json.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT")
    p.add_argument("--baseline", type=Path, default=None, metavar="CKPT2", help="a second model to compare")
    p.add_argument("--data", type=Path, default=None, help="image folder (default: built-in digits)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the training size)")
    p.add_argument("--count", type=int, default=256, help="number of images (%(default)s)")
    p.add_argument("--times", type=float, nargs="+", default=list(SPECTRUM_TIMES),
                   help=f"t values ({shown(SPECTRUM_TIMES)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for spectrum.png/json (default: the run folder, else the current "
                   "folder); existing ones are refused unless --force")
    add_force(p)
    p.set_defaults(handler=spectrum)


def spectrum(args: argparse.Namespace) -> int:
    from deco.evaluate.spectrum import spectrum_report
    from deco.generate import load_for_sampling

    if args.count < 1:
        raise UsageError(f"--count: expected a positive int, got {args.count}")
    if any(not 0.0 <= t <= 1.0 for t in args.times):
        raise UsageError(f"--times: expected values in [0, 1], got {args.times}")
    device = _device(args.device)
    models = {"model": load_for_sampling(args.checkpoint, device)}
    if args.baseline is not None:
        models["baseline"] = load_for_sampling(args.baseline, device)
    out = args.out or (args.checkpoint if args.checkpoint.is_dir() else Path("."))
    if not out.is_dir():
        raise FileNotFoundError(f"--out: no such folder: {out}")
    for name in ("spectrum.png", "spectrum.json"):
        check_output(out / name, args.force, "--out")
    report = spectrum_report(models, data=args.data, resolution=args.resolution, count=args.count,
                             times=args.times, seed=args.seed, out=out)
    for name, res in report["models"].items():
        print(f"{name}: high-frequency energy fraction (bands u+v >= 8): DiT output "
              f"{res['semantic_high_fraction']:.4f}, velocity {res['velocity_high_fraction']:.4f}")
    print(f"wrote {out / 'spectrum.png'} and {out / 'spectrum.json'}")
    return 0
