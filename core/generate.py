"""Loading a model to sample from (a run folder, a training checkpoint, a `.safetensors` or a
release `.ckpt`), and generating a seeded batch of class-conditional images from it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deco.checkpoint import check_training_state, find_checkpoint, is_checkpoint, load_checkpoint
from deco.config import DeCoConfig
from deco.lora import add_lora, merge_adapter, resolve_targets
from deco.optimized import DiffusionTransformer, build_model, load_model
from deco.optimized.sampling import SampleSettings, sample_with


@torch.no_grad()
def generate(model: nn.Module, labels: Sequence[int] | Tensor, settings: SampleSettings, *,
             seed: int = 0, batch_size: int = 256, resolution: int = 32) -> Tensor:
    """Images (N, C, R, R) in [-1, 1] (float32, CPU) for `labels`, N = len(labels).

    The noise of all N images is drawn at once from a generator seeded by `seed`, so an image
    depends on its seed and position, not on `batch_size`."""
    config: Any = model.config
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= config.num_classes):
        raise ValueError(f"labels: expected classes in 0..{config.num_classes - 1}, "
                         f"got values in {int(y.min())}..{int(y.max())}")
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(y), config.in_channels, resolution, resolution, generator=gen)
    model.eval()
    out = []
    for start in range(0, len(y), batch_size):
        # The settings were validated once, by SampleSettings: `sample_with` checks only the batch.
        x = sample_with(model, noise[start : start + batch_size].to(param.device, param.dtype),
                        y[start : start + batch_size].to(param.device), settings)
        out.append(x.float().cpu())
    return torch.cat(out) if out else noise


def class_labels(num_classes: int, per_class: int) -> list[int]:
    """[0]*per_class + [1]*per_class + ...: rows of a grid, one per class."""
    return [c for c in range(num_classes) for _ in range(per_class)]


@dataclass
class Loaded:
    """A model ready to sample, with what its run says about sampling (if it came from a run)."""

    model: DiffusionTransformer
    sample: SampleSettings | None
    resolution: int
    source: str
    run: dict[str, Any] | None = None  # the run's settings, for a run folder or training checkpoint


def load_for_sampling(path: Path, device: torch.device, text: bool = False) -> Loaded:
    """The EMA model of a run folder or training checkpoint (a LoRA run's with its adapter
    merged), or a `.safetensors` / release `.ckpt` model (`deco.optimized.load_model`); text:
    whether a text-to-image model is accepted."""
    path = Path(path)
    file = find_checkpoint(path)
    if is_checkpoint(file):
        state = load_checkpoint(file, only="trainer/ema",
                                validate=check_training_state(file, ("trainer/ema",)))
        config = DeCoConfig.from_dict(state["config"])
        run = state["run"]
        if run.get("lora_rank") is not None:  # a LoRA fine-tune: its layers, then merged
            model = build_model(config)
            add_lora(model, int(run["lora_rank"]), resolve_targets(model, run.get("lora_targets")))
            model.load_state_dict(state["trainer"]["ema"], strict=True)
            model = merge_adapter(model)
        else:
            with torch.device("meta"):
                model = build_model(config)
            model.load_state_dict(state["trainer"]["ema"], strict=True, assign=True)
        sample = run.get("sample")
        settings = None if sample is None else SampleSettings.from_dict(sample)
        resolution = run.get("resolution")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"checkpoint: {file} records no valid resolution (got {resolution!r})")
        loaded = Loaded(model.to(device).eval(), settings, resolution, str(file), run)
    else:
        model = load_model(file, device=device)
        loaded = Loaded(model, None, 32 if model.config.patch_size <= 8 else 256, str(file))
    if loaded.model.config.is_text and not text:
        raise ValueError(f"checkpoint: {file} holds a text-to-image model; this command takes "
                         f"class-conditional ones (deco sample and deco evaluate take text models)")
    return loaded
