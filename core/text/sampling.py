"""Sampling a text-to-image model from prompts, and the built-in demo's prompt accuracy.

    images = generate_text(model, text, null, settings, seed=0, size=(32, 64))

`generate_text` draws all N noises at once from a generator seeded by `seed` (an image depends on
its seed and position, not on the batch size) and samples with classifier-free guidance against
the null embedding. `prompt_accuracy` scores a demo model: for each prompt set of
`deco.text.digit_pairs.evaluation_prompts` (held-out pairs and wordings) the fraction of samples whose
two halves the digits classifier reads as the asked digits, in the asked places, with guidance
and without, and the same for the prompts with the digits swapped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deco.atomic import atomic_write
from deco.optimized.sampling import SampleSettings, sample_with
from deco.outputs import grid_image, save_png, to_uint8
from deco.text.digit_pairs import Prompt, evaluation_prompts, read_pairs, score_pairs, swap

PROMPTS_NAME = "prompts.txt"


@torch.no_grad()
def generate_text(model: nn.Module, text: Tensor, null: Tensor, settings: SampleSettings, *,
                  seed: int = 0, size: tuple[int, int] = (32, 32), batch_size: int = 256) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] (float32, CPU) for text embeddings (N, T, E) and the null
    embedding (T, E). The settings were validated by `SampleSettings`; each batch checks only
    its noise and text (`sample_with`)."""
    config: Any = model.config
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(text.shape[0], config.in_channels, *size, generator=gen)
    model.eval()
    out = []
    for start in range(0, text.shape[0], batch_size):
        part = slice(start, start + batch_size)
        x = sample_with(model, noise[part].to(param.device, param.dtype),
                        text[part].to(param.device, param.dtype), settings,
                        null.to(param.device, param.dtype))
        out.append(x.float().cpu())
    return torch.cat(out) if out else noise


def write_prompts(path: Path, prompts: Sequence[str]) -> None:
    """One prompt a line (new lines inside a prompt become spaces), atomically."""
    text = "".join(" ".join(p.split()) + "\n" for p in prompts)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def text_grid(model: nn.Module, source: Any, settings: SampleSettings, out: Path, *, seed: int,
              size: tuple[int, int], per_prompt: int = 4) -> None:
    """The final grid of a text run: one row of `per_prompt` samples per prompt of the
    `TextSource`, and the prompts beside it (prompts.txt, row order)."""
    prompts = [p for p in source.prompts for _ in range(per_prompt)]
    images = generate_text(model, source.encode_prompts(prompts), source.null, settings, seed=seed, size=size)
    save_png(grid_image(to_uint8(images), per_prompt), out)
    write_prompts(out.parent / PROMPTS_NAME, source.prompts)


def score_prompts(model: nn.Module, encode: Any, null: Tensor, asked: Sequence[Prompt],
                  settings: SampleSettings, classifier: Any, *, seed: int) -> dict[str, float]:
    """Generate one image per prompt and score it (`deco.text.digit_pairs.score_pairs`)."""
    if not asked:
        return {"accuracy": 0.0, "swapped": 0.0, "left": 0.0, "right": 0.0, "count": 0.0}
    text = encode([p.text for p in asked])
    images = generate_text(model, text, null, settings, seed=seed, size=(32, 64))
    return score_pairs(read_pairs(images, classifier), asked)


def prompt_accuracy(model: nn.Module, encode: Any, null: Tensor, settings: SampleSettings, *,
                    classifier: Any, seed: int = 0, limit: int | None = None) -> dict[str, Any]:
    """The demo's prompt accuracy, per held-out prompt set, with `settings`' guidance and without
    (guidance 1), and for the swapped prompts. `limit`: at most this many prompts per set (spread
    evenly), for quick checks."""
    result: dict[str, Any] = {}
    unguided = dataclasses.replace(settings, guidance=1.0)
    for name, asked in evaluation_prompts().items():
        if limit is not None and len(asked) > limit:
            keep = np.linspace(0, len(asked) - 1, limit).round().astype(int)
            asked = [asked[i] for i in keep]
        result[name] = {
            "guided": score_prompts(model, encode, null, asked, settings, classifier, seed=seed),
            "unguided": score_prompts(model, encode, null, asked, unguided, classifier, seed=seed),
            "swapped_prompts": score_prompts(model, encode, null, swap(asked), settings, classifier,
                                             seed=seed + 1),
        }
    result["held_out"] = overall(result)
    return result


def overall(result: dict[str, Any]) -> dict[str, float]:
    """Accuracies over all held-out prompt sets (weighted by their sizes); `reversed`: the
    fraction of swapped prompts whose digits came out in the original order."""
    def mean(run: str, key: str = "accuracy") -> float:
        parts = [r[run] for r in result.values()]
        return float(sum(p[key] * p["count"] for p in parts) / max(1.0, sum(p["count"] for p in parts)))

    return {"guided": mean("guided"), "unguided": mean("unguided"),
            "swapped_prompts": mean("swapped_prompts"), "reversed": mean("swapped_prompts", "swapped")}
