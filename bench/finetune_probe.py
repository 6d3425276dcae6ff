"""Peak memory and step time of a training step: plain, with activation checkpointing (`ckpt`),
LoRA-only (`lora`, rank 8 on deco.lora's default targets; `lora-demo`, rank 8 on
bench/lora_demo.py's targets, the class embedding included) and LoRA with checkpointing (issue
27). Each variant runs in a fresh process (the kernel's resident-set high-water mark, reset
before the step as in `bench/memory_probe.py`), variants alternating:

    python bench/finetune_probe.py MODEL RESOLUTION BATCH [--variants plain ckpt lora] [--rounds 2]
    python bench/finetune_probe.py --worker VARIANT MODEL RESOLUTION BATCH STEPS

MODEL: a preset (DeCo-tiny/4, DeCo-S/16, ...) or "XXL:D" = DeCo-XXL/16's width (hidden 1536, 24
heads, text width 2048, 128 text tokens) at DiT depth D and one text refine block. The step is
the project's `Trainer.step` (flow matching + frequency loss, AdamW, EMA, clipping), float32,
random weights and data. op_mib: the peak during the second step above the resident size
before it (after a warm-up step, so AdamW's state is already there, as in a long run: what a
step adds is its activations and gradients); peak_mib: the process's peak resident size in that
step (weights, EMA, AdamW's state and the step). Both: the minimum over rounds. step_s: median
of STEPS later steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from deco.config import DeCoConfig
from deco.optimized import build_model
from deco.optimized.trainer import TrainConfig, Trainer

VARIANTS = ("plain", "ckpt", "lora", "lora-ckpt", "lora-demo")


def config_of(name: str) -> DeCoConfig:
    if name.startswith("XXL:"):
        return dataclasses.replace(DeCoConfig.preset("DeCo-XXL/16"), depth=int(name[4:]), text_depth=1)
    return DeCoConfig.preset(name)


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(variant: str, name: str, resolution: int, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = config_of(name)
    model = build_model(config)
    if variant.startswith("lora"):
        from lora_demo import TARGETS

        from deco.lora import add_lora, resolve_targets

        add_lora(model, 8, resolve_targets(model, TARGETS if variant == "lora-demo" else None))
    model.set_gradient_checkpointing(variant.endswith("ckpt"))
    null = torch.zeros(config.text_length, config.text_dim) if config.is_text else None
    trainer = Trainer(model, TrainConfig(bf16=False), null_text=null)
    x = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    y = (torch.randn(batch, config.text_length, config.text_dim) if config.is_text
         else torch.arange(batch) % config.num_classes)
    trainer.step(x, y)  # warm-up: AdamW's state exists from here on, as in a long run
    Path("/proc/self/clear_refs").write_text("5")
    before = status_mib("VmRSS")
    trainer.step(x, y)
    peak = status_mib("VmHWM")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(x, y)
        times.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_s = round(statistics.median(times), 3) if times else 0.0
    return {"op_mib": round(peak - before, 1), "peak_mib": round(peak, 1), "step_s": step_s,
            "trainable": trainable, "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        variant, name, res, b, steps = sys.argv[2:7]
        print(json.dumps(worker(variant, name, int(res), int(b), int(steps))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("resolution", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:  # alternating: each variant sees the same load on average
            out = subprocess.run([sys.executable, __file__, "--worker", v, args.model, str(args.resolution),
                                  str(args.batch), str(args.steps)], capture_output=True, text=True,
                                 check=True)
            results[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.model} {args.resolution}x{args.resolution} batch {args.batch}")
    print("| variant | trainable | step's peak above its start, MiB | process peak, MiB | step s (median) |")
    print("| --- | --- | --- | --- | --- |")
    for v, rows in results.items():
        print(f"| {v} | {int(rows[0]['trainable']):,} of {int(rows[0]['parameters']):,} | "
              f"{min(r['op_mib'] for r in rows):.0f} | {min(r['peak_mib'] for r in rows):.0f} | "
              f"{statistics.median(r['step_s'] for r in rows):.3f} |")


if __name__ == "__main__":
    main()
