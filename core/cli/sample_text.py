"""`deco sample` and `deco evaluate` for text-to-image models: prompts in, images out.

    deco sample runs/demo --prompt "a 3 to the left of a 7" --prompt "7 then 3"
    deco sample t2i_DeCo.ckpt --text-encoder Qwen3-1.7B/ --prompts prompts.txt --out grid.png

The text encoder: `--text-encoder DIR` (a Qwen3 folder), else the one the run recorded (the
built-in demo's tiny Qwen3 is rebuilt if its folder is gone: it is deterministic). Sampler
settings default to the run's, else the release's text-to-image ones (Adams, 25 steps, guidance
4, time shift 3).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from deco.errors import UsageError
from deco.optimized.sampling import SampleSettings

#: The release's text-to-image sampler (`deco.config.RELEASE_SAMPLING["t2i"]`).
RELEASE_T2I_SAMPLING = SampleSettings.release("t2i")


def add_options(p: argparse.ArgumentParser) -> None:
    """The text options of `deco sample`."""
    p.add_argument("--prompt", action="append", default=None,
                   help="a text model's prompt (repeat for several; one grid row each)")
    p.add_argument("--prompts", type=Path, default=None, help="a file of prompts, one a line")
    p.add_argument("--negative-prompt", default="",
                   help="the text guidance steers away from (default: \"\", the release's)")
    p.add_argument("--text-encoder", type=Path, default=None,
                   help="the Qwen3 folder of a text model (default: the one its run used)")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt (%(default)s)")


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the lines of --prompts (blank lines skipped)."""
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        try:
            lines = args.prompts.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--prompts: cannot read {args.prompts} ({exc.strerror})") from None
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UsageError("--prompt: a text-to-image model needs prompts (--prompt TEXT or --prompts FILE)")
    return prompts


def encoder_for(loaded: Any, folder: Path | None, device: Any) -> Any:
    """The Qwen3TextEncoder of a text model: `folder`, or the one its run recorded."""
    from deco.extras import missing_module
    from deco.paths_inside import resolve_inside
    from deco.text.demo_encoder import DemoEncoderConfig, train_demo_encoder
    from deco.text.encoder import Qwen3TextEncoder
    from deco.text.job import DEMO_ENCODER_DIR

    config = loaded.model.config
    run = loaded.run or {}
    flag = "--text-encoder"
    # A folder the checkpoint names is a path read from a file: it must lie inside the
    # checkpoint's folder (a run folder shipping its encoder); elsewhere, the user names it.
    home, recorded = Path(loaded.source).parent, f"{loaded.source}: run.text_encoder"
    hint = ""  # for a folder the checkpoint names: how to name another
    if folder is None and run.get("task") == "t2i" and run.get("data") is None:
        folder = resolve_inside(home, DEMO_ENCODER_DIR, what=f"the run folder {home}")
        if not (folder / "config.json").is_file():  # deterministic: rebuild it
            folder = train_demo_encoder(Path(tempfile.mkdtemp(prefix="deco-tiny-qwen3-")) / "enc",
                                        DemoEncoderConfig(length=config.text_length))
    elif folder is None and run.get("text_encoder") is not None:
        hint = f" (recorded in {loaded.source}); give {flag} DIR to name the encoder yourself"
        try:
            folder = resolve_inside(home, run["text_encoder"], what=recorded)
        except ValueError as exc:
            raise UsageError(f"{exc}; give {flag} DIR to name the encoder yourself") from None
    if folder is None:
        raise UsageError(f"{flag}: {loaded.source} is a text-to-image model; give the Qwen3 folder "
                         f"of its text encoder (e.g. --text-encoder Qwen3-1.7B/)")
    try:
        return Qwen3TextEncoder(folder, config.text_length, config.text_dim, device=device)
    except (OSError, ValueError, ImportError) as exc:
        if isinstance(exc, ImportError) and missing_module(exc) is not None:
            raise  # deco.cli.main names the extra to install
        message = str(exc).removeprefix("text_encoder: ").removeprefix("folder: ")
        raise UsageError(f"{flag}: {message}{hint}") from None


def image_size(loaded: Any, resolution: int | None) -> tuple[int, int]:
    """(H, W): --resolution (square), else the run's images (the demo's are 32x64)."""
    p = loaded.model.config.patch_size
    run = loaded.run or {}
    if resolution is not None:
        size = (resolution, resolution)
    elif run.get("task") == "t2i" and run.get("data") is None:
        from deco.text.digit_pairs import DEMO_HEIGHT, DEMO_WIDTH

        size = (DEMO_HEIGHT, DEMO_WIDTH)
    else:
        size = (loaded.resolution, loaded.resolution)
    if min(size) < 1 or size[0] % p or size[1] % p:
        raise UsageError(f"--resolution: expected a positive multiple of the patch size {p}, got {size[0]}")
    return size


def sample(args: argparse.Namespace, loaded: Any, settings: SampleSettings, device: Any) -> int:
    """`deco sample` for a text model: a grid (one row per prompt), an .npz or one PNG per image,
    with prompts.txt beside it."""
    import torch

    from deco.output_policy import image_format, sample_output, write_folder
    from deco.outputs import grid_image, save_png, save_samples, to_uint8
    from deco.text.sampling import PROMPTS_NAME, generate_text, write_prompts

    if args.labels is not None:
        raise UsageError("--labels: this is a text-to-image model; give --prompt TEXT instead")
    if args.count is not None:
        raise UsageError("--count: the sharded sample batch is for class-conditional models")
    kind = sample_output(args.out, args.force)
    if args.per_prompt < 1:
        raise UsageError(f"--per-prompt: expected a positive int, got {args.per_prompt}")
    prompts = read_prompts(args)
    size = image_size(loaded, args.resolution)
    encoder = encoder_for(loaded, args.text_encoder, device)
    rows = [p for p in prompts for _ in range(args.per_prompt)]
    text = torch.cat([encoder.encode(rows[i : i + 64]) for i in range(0, len(rows), 64)])
    images = generate_text(loaded.model, text, encoder.null(args.negative_prompt), settings,
                           seed=args.seed, size=size, batch_size=args.batch_size)
    out: Path = args.out
    if kind == "image":
        save_png(grid_image(to_uint8(images), args.per_prompt), out, image_format(out) or "PNG")
        written, beside = f"a {len(rows)}-image grid {out}", out.parent / PROMPTS_NAME
    elif kind == "npz":
        written = save_samples(images, [i // args.per_prompt for i in range(len(rows))], out, args.per_prompt)
        beside = out.with_suffix(".prompts.txt")
    else:
        def fill(folder: Path) -> None:
            for i, image in enumerate(to_uint8(images)):
                save_png(image, folder / f"{i // args.per_prompt:04d}_{i % args.per_prompt:02d}.png")
            write_prompts(folder / PROMPTS_NAME, prompts)

        write_folder(out, fill)
        written, beside = f"{len(rows)} PNGs in {out}/ (PROMPT_SAMPLE.png)", out / PROMPTS_NAME
    if kind != "folder":
        write_prompts(beside, prompts)
    print(f"wrote {written} and {beside}")
    return 0


def evaluate(args: argparse.Namespace, loaded: Any, settings: SampleSettings, device: Any) -> int:
    """`deco evaluate` for the text demo: prompt accuracy on held-out pairs and wordings."""
    from deco.evaluate.digits import DigitsClassifier
    from deco.outputs import merge_json, metrics_in_run
    from deco.text.sampling import prompt_accuracy

    if image_size(loaded, None) != (32, 64) or loaded.model.config.in_channels != 3:
        raise UsageError(f"CKPT: prompt accuracy is for the built-in text demo (32x64 digit pairs), "
                         f"got {loaded.source}")
    encoder = encoder_for(loaded, args.text_encoder, device)
    classifier = DigitsClassifier()
    t0 = time.perf_counter()
    result = prompt_accuracy(loaded.model, encoder.encode, encoder.null(), settings,
                             classifier=classifier, seed=args.seed, limit=args.limit)
    result.update(checkpoint=str(args.checkpoint), sampler=settings.to_dict(), seed=args.seed,
                  classifier_test_accuracy=classifier.test_accuracy,
                  sample_seconds=round(time.perf_counter() - t0, 2))
    out = args.out or (metrics_in_run(args.checkpoint) if args.checkpoint.is_dir() else Path("metrics.json"))
    merge_json(out, {"evaluation": result})
    total = result["held_out"]
    print(f"prompt accuracy on held-out prompts {total['guided']:.3f} with guidance {settings.guidance:g}, "
          f"{total['unguided']:.3f} without; swapped prompts {total['swapped_prompts']:.3f} (digits "
          f"drawn in the reverse order: {total['reversed']:.3f}); wrote {out}")
    return 0
