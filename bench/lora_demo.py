"""LoRA on the built-in digits demo: a fine-tune teaches the base model a class it never saw.

    python bench/lora_demo.py OUT [--base-steps 2000] [--steps 500] [--rank 8] [--lr 1e-3]
                                  [--lora-lr LR] [--targets qkv proj w1 w2 w3 adaln y_embed]

1. base: `deco train`'s digits run (DeCo-tiny/4, the digits defaults) on the digits *without any
   9*: label 9 exists in the model (10 classes) but its embedding never trains.
2. LoRA: `--init base --lora RANK --lora-targets TARGETS` on all ten classes, at --lora-lr
   (default: --lr). The default targets include `y_embed`, the class embedding (peft's
   embedding LoRA): the 9's row never trained in the base; without it (the targets before
   issue 27's follow-up) the adapter must map an untrained embedding to a 9.
3. full fine-tune: `--init base` (every weight trains), same data, steps and settings, at --lr.
Each model is scored by the demo's classifier (`deco.evaluate.digits`, the scikit-learn MLP
that `deco evaluate` uses) on 100 samples per class (seed 0, the run's sampler settings): the
accuracy on class 9 and on classes 0-8. Prints one JSON object and writes it to OUT/lora_demo.json.
Trainable parameters come from each run's metrics.json; step time and peak memory of the two
fine-tunes are measured separately, in fresh processes (`bench/finetune_probe.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deco.data import DigitsDataset
from deco.evaluate.digits import DigitsClassifier, score_samples
from deco.generate import class_labels, generate, load_for_sampling
from deco.optimized.trainer import TrainConfig
from deco.train.job import train
from deco.train.run_config import DIGITS_DEFAULTS, RunConfig

HELD_OUT = 9
TARGETS = ("qkv", "proj", "w1", "w2", "w3", "adaln", "y_embed")


class DigitsWithout(DigitsDataset):
    """The built-in digits without the images of one class (the model keeps all 10 labels)."""

    def __init__(self, held_out: int) -> None:
        super().__init__()
        keep = self.labels != held_out
        self.images, self.labels = self.images[keep], self.labels[keep]
        self.description = f"built-in digits without the {held_out}s ({len(self.labels)} images)"


def score(run: Path, classifier: DigitsClassifier, per_class: int) -> dict[str, float]:
    loaded = load_for_sampling(run, torch.device("cpu"))
    assert loaded.sample is not None
    labels = class_labels(10, per_class)
    images = generate(loaded.model, labels, loaded.sample, seed=0, resolution=32)
    y = torch.tensor(labels)
    held = score_samples(images[y == HELD_OUT], [HELD_OUT] * per_class, classifier)["accuracy"]
    rest = score_samples(images[y != HELD_OUT], [int(v) for v in y[y != HELD_OUT]], classifier)["accuracy"]
    return {"accuracy_9": held, "accuracy_0_8": rest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--base-steps", type=int, default=DIGITS_DEFAULTS["steps"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=DIGITS_DEFAULTS["train"].lr)
    parser.add_argument("--lora-lr", type=float, default=None, help="the LoRA run's (default: --lr)")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS))
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args()
    base, lora, full = args.out / "base", args.out / "lora", args.out / "full"
    if not (base / "model.safetensors").is_file():
        train(RunConfig(out=base, steps=args.base_steps, checkpoint_every=args.base_steps),
              dataset=DigitsWithout(HELD_OUT))
    def tuned(lr: float) -> TrainConfig:
        return TrainConfig(lr=lr, ema_decay=DIGITS_DEFAULTS["train"].ema_decay,
                           timeshift=DIGITS_DEFAULTS["train"].timeshift)

    common = {"init": base, "steps": args.steps, "checkpoint_every": args.steps}
    lora_lr = args.lr if args.lora_lr is None else args.lora_lr
    for out, extra in ((lora, {"lora_rank": args.rank, "lora_targets": tuple(args.targets),
                               "train": tuned(lora_lr)}), (full, {"train": tuned(args.lr)})):
        if not (out / "model.safetensors").is_file():
            train(RunConfig(out=out, **common, **extra))  # type: ignore[arg-type]
    classifier = DigitsClassifier()
    result: dict[str, object] = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                                 "targets": args.targets}
    for name, run in (("base", base), ("lora", lora), ("full", full)):
        metrics = json.loads((run / "metrics.json").read_text())
        result[name] = {**score(run, classifier, args.per_class),
                        "trainable_parameters": metrics["trainable_parameters"],
                        "train_seconds": metrics["train_seconds"]}
    text = json.dumps(result, indent=1)
    (args.out / "lora_demo.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
