"""`deco train`: argument parsing only; the work is in deco.train.job.

Every option is a field of the run's config (`deco.train.run_config.RunConfig`, its `train` TrainConfig or
its `sample` SampleSettings), named in `OPTIONS` once: the flag, the field it sets, its type and
help. Options default to None so that the job can tell which ones the user gave: those fill in
the dataset's defaults on a fresh run and are checked against the checkpoint on --resume. A
config error names the field; `flag_of` turns it back into the flag the user typed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from deco.cli.common import default_of, shown
from deco.errors import UsageError
from deco.optimized.train_config import TrainConfig
from deco.text.job import T2I_DEFAULTS
from deco.train.run_config import FOLDER_DEFAULTS, RunConfig


def _train(name: str, home: Any = TrainConfig) -> str:
    """The default of TrainConfig's field `name` (or of a defaults table's TrainConfig), as shown."""
    return shown(default_of(home if isinstance(home, type) else home["train"], name))


def _run(name: str, home: Any = RunConfig) -> str:
    """The default of RunConfig's field `name` (or a dataset defaults table's entry), as shown."""
    return shown(default_of(home, name))


DIGITS_NOTE = "(default: the built-in digits' tuned value, or the release's for --data)"
BOOL = argparse.BooleanOptionalAction

#: (flag, field, argparse keywords). A field "train.x" is TrainConfig's x, "sample.x" the final
#: grid's SampleSettings' x, any other a field of RunConfig.
OPTIONS: list[tuple[str, str, dict[str, Any]]] = [
    ("--out", "out", {"type": Path, "help": "run folder (default: runs/<timestamp>)"}),
    ("--task", "task", {"choices": ["c2i", "t2i"], "help": "c2i: class-to-image (default); t2i: "
                        "text-to-image (without --data: the built-in digit-pairs demo)"}),
    ("--data", "data", {"type": Path, "help": "image folder (default: built-in digits); with --task t2i "
                        "a caption folder (x.jpg + x.txt) or WebDataset shards"}),
    ("--text-encoder", "text_encoder", {"type": Path, "help": "t2i: a Qwen3 folder (e.g. Qwen3-1.7B/), "
                                        "run on every batch's captions"}),
    ("--embeddings", "embeddings", {"type": Path, "help": "t2i: text embeddings of --data's captions "
                                    "written by deco embed-text"}),
    ("--accumulation", "accumulation", {
        "type": int, "help": "micro-batches per optimizer step (gradient accumulation; default "
        f"{_run('accumulation', FOLDER_DEFAULTS)}, t2i on --data: {_run('accumulation', T2I_DEFAULTS)})"}),
    ("--resolution", "resolution", {"type": int,
                                    "help": "training resolution for --data (ADM centre crop; default "
                                    f"{_run('resolution', FOLDER_DEFAULTS)})"}),
    ("--model", "model", {"help": "preset (e.g. DeCo-XL/16, DiT-tiny/4) or a .json file of DeCoConfig "
                          "fields; a field the file omits takes DeCoConfig's default, which is "
                          f"DeCo-XL/16's {DIGITS_NOTE}"}),
    ("--batch-size", "batch_size", {"type": int, "help": f"global batch size {DIGITS_NOTE}"}),
    ("--steps", "steps", {"type": int, "help": f"training steps {DIGITS_NOTE}"}),
    ("--lr", "train.lr", {"type": float, "help": f"AdamW learning rate {DIGITS_NOTE}"}),
    ("--ema-decay", "train.ema_decay", {"type": float, "help": f"EMA decay {DIGITS_NOTE}"}),
    ("--train-timeshift", "train.timeshift", {
        "type": float, "help": f"shift s of the training times, s > 1: more high-noise steps {DIGITS_NOTE}"}),
    ("--freq-weight", "train.freq_weight", {
        "type": float, "help": "weight of the frequency-aware loss (default "
        f"{_train('freq_weight')}; 0: plain flow matching)"}),
    ("--repa-encoder", "repa_encoder", {
        "type": Path, "help": "DINOv2 ViT-B/14 for REPA (the paper's recipe): the original "
        "dinov2_vitb14_pretrain.pth or a Hugging Face folder (facebook/dinov2-base layout); read "
        "locally, frozen. Default: no REPA"}),
    ("--repa-weight", "train.repa_weight", {
        "type": float, "help": f"REPA weight ({_train('repa_weight')}; needs --repa-encoder)"}),
    ("--repa-layer", "train.repa_layer", {
        "type": int, "help": f"1-based DiT block whose tokens REPA aligns ({_train('repa_layer')}, "
        f"t2i on --data: {_train('repa_layer', T2I_DEFAULTS)}; needs --repa-encoder)"}),
    ("--quality", "train.quality", {
        "type": int, "help": f"JPEG quality of the frequency weights ({_train('quality')})"}),
    ("--label-dropout", "train.label_dropout", {"type": float,
                                                "help": "null-label (t2i: null-caption) probability "
                                                f"({_train('label_dropout')})"}),
    ("--bf16", "train.bf16", {
        "action": BOOL, "help": f"bf16 autocast on CUDA (default {_train('bf16')}; ignored on the CPU)"}),
    ("--cpu-bf16", "train.cpu_bf16", {
        "action": BOOL, "help": "bf16 autocast on the CPU (default "
        f"{_train('cpu_bf16')}; fast only where the CPU has native bf16: AVX512-BF16, AMX)"}),
    ("--seed", "train.seed", {
        "type": int, "help": f"seed of weights, data order and noise ({_train('seed')})"}),
    ("--compile", "compile", {
        "action": BOOL, "help": f"torch.compile the model (default {_run('compile')})"}),
    ("--checkpoint-every", "checkpoint_every", {"type": int,
                                                "help": f"steps between checkpoints {DIGITS_NOTE}"}),
    ("--log-every", "log_every", {"type": int, "help": f"steps per log.jsonl record ({_run('log_every')})"}),
    ("--num-workers", "num_workers", {
        "type": int, "help": f"data-loading processes for --data ({_run('num_workers')})"}),
    ("--device", "device", {"choices": ["auto", "cpu", "cuda"], "help": f"default: {_run('device')}"}),
    ("--init", "init", {"type": Path, "metavar": "CHECKPOINT",
                        "help": "fine-tune: start from this trained model (run folder, training checkpoint "
                        "or .safetensors; its EMA weights and config)"}),
    ("--lora", "lora_rank", {
        "type": int, "metavar": "RANK", "help": "train only a LoRA adapter of this rank on the --init "
        "model (needs peft); writes pytorch_lora_weights.safetensors (diffusers' format) and the "
        "merged model"}),
    ("--lora-targets", "lora_targets", {
        "nargs": "+", "metavar": "NAME", "help": "layers the adapter wraps, by name suffix, e.g. qkv "
        "adaln, and y_embed (the class embedding: lets a new class train) (default: the attention "
        "and MLP products of the DiT blocks, deco.lora.DEFAULT_TARGETS)"}),
    ("--grad-checkpointing", "grad_checkpointing", {
        "action": BOOL, "help": "recompute each DiT block in backward instead of keeping its activations "
        f"(less memory, ~1 more forward; default {_run('grad_checkpointing')})"}),
    ("--sample-steps", "sample.steps", {"type": int, "help": "sampling steps of the final grid"}),
    ("--guidance", "sample.guidance", {"type": float, "help": "guidance scale of the final grid"}),
    ("--interval", "sample.interval", {"type": float, "nargs": 2, "metavar": ("LOW", "HIGH"),
                                       "help": "guidance interval of the final grid"}),
    ("--timeshift", "sample.timeshift", {"type": float, "help": "time shift of the final grid"}),
    ("--solver", "sample.solver", {"choices": ["euler", "heun", "adams"],
                                   "help": "solver of the final grid (t2i default: "
                                   f"{default_of(T2I_DEFAULTS['sample'], 'solver')})"}),
]
FLAGS = {field: flag for flag, field, _ in OPTIONS}


def flag_of(field: str) -> str:
    """The command-line flag of a config field ("train.lr" -> "--lr")."""
    return FLAGS.get(field, "--" + field.rsplit(".", 1)[-1].replace("_", "-"))


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train DeCo (default: class-conditional on the built-in digits, CPU, < 10 min; "
        "--task t2i: text-to-image, by default the built-in digit-pairs demo)",
        description="Train DeCo. Without --data: the built-in dataset (scikit-learn's 1797 "
        "handwritten digits, 32x32) and a small model whose samples are >= 90% recognisable. "
        "With --data: an ImageNet-style folder (one sub-folder per class). Writes a checkpoint, "
        "a sample grid, a loss curve, log.jsonl and metrics.json into the run folder. Under "
        "torchrun every process trains on its share of the global batch (DDP).",
    )
    for flag, field, options in OPTIONS:
        p.add_argument(flag, dest=field, default=None, **options)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (same settings, same trajectory)")
    p.set_defaults(handler=train)


def train(args: argparse.Namespace) -> int:
    from deco.errors import FieldError
    from deco.train.job import TrainingError
    from deco.train.job import train as run_training
    from deco.train.run_config import RunConfig, with_overrides

    given = {field: getattr(args, field) for _, field, _ in OPTIONS if getattr(args, field) is not None}
    for field in ("sample.interval", "lora_targets"):
        if field in given:
            given[field] = tuple(given[field])
    if args.resume and args.out is None:
        raise UsageError("--resume: give the run folder to continue with --out DIR")
    for field in ("train.repa_weight", "train.repa_layer"):
        if field in given and "repa_encoder" not in given and not args.resume:
            raise UsageError(f"{flag_of(field)}: REPA needs a pretrained image encoder; give it with "
                             f"--repa-encoder PATH (DINOv2 .pth or Hugging Face folder)")
    try:
        run = with_overrides(RunConfig(resume=args.resume), given)
        summary = run_training(run, explicit=set(given) - {"out"})
    except FieldError as exc:
        raise UsageError(f"{flag_of(exc.field)}: {exc.message}") from None
    except TrainingError as exc:
        print(f"deco train: error: {exc}", file=sys.stderr)
        return 1
    if summary:
        out = summary["run"]["out"]
        print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s; wrote {out}/")
    return 0
