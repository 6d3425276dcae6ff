"""The built-in text-to-image demo: two handwritten digits side by side, captioned in words.

Images are 32x64: the left and right halves are two of scikit-learn's digits (`deco.data`),
upsampled to 32x32 each. A caption names both digits and their order, in one of several
wordings, with the digits as numerals ("3") or words ("three"):

    "a 3 to the left of a 7", "seven on the right, three on the left", "3 then 7", ...

Some wordings and some (left, right) digit pairs are HELD OUT of training, so that the demo's
score (`prompt_accuracy`) measures whether the model follows prompts it has never seen, not
whether it memorised captions. The finite caption set is embedded once by the text encoder
(`caption_table`); the dataset's condition is the caption's row in that table.

The score: the digits classifier of `deco.evaluate.digits` reads each 32x32 half of a generated image;
a sample is right when both digits are right and in the right places.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deco.data import DigitsDataset

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Wordings seen in training; {a}/{b}: left/right digit as a numeral, {A}/{B}: as a word.
TRAIN_TEMPLATES = (
    "a {a} to the left of a {b}",
    "a {b} to the right of a {a}",
    "{a} then {b}",
    "{A} then {B}",
    "{A} on the left, {B} on the right",
    "{B} on the right, {A} on the left",
    "left {a}, right {b}",
    "the digits {a} and {b}",
    "{a} and {b}",
    "a {A} to the left of a {B}",
)
#: Wordings held out of training (new combinations of seen words and orders).
HELD_OUT_TEMPLATES = (
    "a {B} to the right of a {A}",
    "{a} on the left, {b} on the right",
    "{b} on the right, {a} on the left",
    "left {A}, right {B}",
)
#: (left, right) pairs held out of training: every digit still appears on both sides.
HELD_OUT_PAIRS = tuple((d, (d + 3) % 10) for d in range(10))
ALL_PAIRS = tuple(itertools.product(range(10), range(10)))
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
#: Prompts of the final sample grid (held-out wordings and pairs among them).
GRID_PROMPTS = (
    "a 3 to the left of a 7", "7 then 3", "seven on the right, three on the left", "1 and 8",
    "left 0, right 5", "nine then two", "a four to the left of a six", "5 on the left, 8 on the right",
)

DEMO_WIDTH = 64  # two 32x32 digits side by side
DEMO_HEIGHT = 32


def caption(template: str, left: int, right: int) -> str:
    """The caption of a (left, right) pair in a wording."""
    return template.format(a=left, b=right, A=WORDS[left], B=WORDS[right])


@dataclass(frozen=True)
class Prompt:
    """A caption with the digits it asks for."""

    text: str
    left: int
    right: int


def prompts(templates: Sequence[str], pairs: Sequence[tuple[int, int]]) -> list[Prompt]:
    """Every (wording, pair) caption, wording-major."""
    return [Prompt(caption(t, a, b), a, b) for t in templates for a, b in pairs]


def all_captions() -> list[str]:
    """The finite caption set of the demo (training and held-out), each once, in a fixed order:
    the rows of the caption table."""
    seen: dict[str, None] = {}
    for p in prompts(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES, ALL_PAIRS):
        seen.setdefault(p.text, None)
    return list(seen)


def evaluation_prompts() -> dict[str, list[Prompt]]:
    """Prompt sets of the score: seen wordings on held-out pairs, held-out wordings on seen and
    on held-out pairs."""
    return {
        "held_out_pairs": prompts(TRAIN_TEMPLATES, HELD_OUT_PAIRS),
        "held_out_wordings": prompts(HELD_OUT_TEMPLATES, TRAIN_PAIRS),
        "held_out_both": prompts(HELD_OUT_TEMPLATES, HELD_OUT_PAIRS),
    }


class DigitPairsDataset(DigitsDataset):
    """Training items of the demo: (image (3, 32, 64), caption row). Item i combines two digit
    images and a training wording, all drawn once from a generator seeded by `seed`; the
    condition is the caption's row in `all_captions()` (a long tensor in batches)."""

    resolution = DEMO_HEIGHT
    width = DEMO_WIDTH
    num_classes = 0

    def __init__(self, items: int = 20_000, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        by_class = [torch.nonzero(self.labels == d).flatten() for d in range(10)]
        pair = torch.randint(len(TRAIN_PAIRS), (items,), generator=gen)
        template = torch.randint(len(TRAIN_TEMPLATES), (items,), generator=gen)
        picks = torch.rand(items, 2, generator=gen)
        rows = {text: i for i, text in enumerate(all_captions())}
        left, right, caption_row = [], [], []
        for k in range(items):
            a, b = TRAIN_PAIRS[int(pair[k])]
            left.append(int(by_class[a][int(picks[k, 0] * len(by_class[a]))]))
            right.append(int(by_class[b][int(picks[k, 1] * len(by_class[b]))]))
            caption_row.append(rows[caption(TRAIN_TEMPLATES[int(template[k])], a, b)])
        self.left, self.right = torch.tensor(left), torch.tensor(right)
        self.caption_rows = torch.tensor(caption_row)
        self.description = (f"built-in digit pairs ({items} captioned 32x64 images from "
                            f"{len(self.labels)} digits, {len(TRAIN_TEMPLATES)} wordings, "
                            f"{len(TRAIN_PAIRS)} pairs; {len(HELD_OUT_TEMPLATES)} wordings and "
                            f"{len(HELD_OUT_PAIRS)} pairs held out)")

    def __len__(self) -> int:
        return int(self.caption_rows.shape[0])

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, int]:
        index = key[0] if isinstance(key, tuple) else key
        image = torch.cat([self.images[self.left[index]], self.images[self.right[index]]], dim=-1)
        return image, int(self.caption_rows[index])

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> tuple[Tensor, Tensor]:
        """(x (B, 3, 32, 64), caption rows (B,)); no flips (they would swap the digits)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = torch.cat([self.images[self.left[idx]], self.images[self.right[idx]]], dim=-1)
        return x, self.caption_rows[idx]


# ------------------------------------------------------------------------------ scoring
def read_pairs(images: Tensor | np.ndarray[Any, Any], classifier: Any) -> np.ndarray[Any, Any]:
    """(N, 2) digits the classifier reads in the left and right 32x32 halves of images
    (N, 3, 32, 64)."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[2] != DEMO_HEIGHT or x.shape[3] != DEMO_WIDTH:
        raise ValueError(f"images: expected (N, 3, {DEMO_HEIGHT}, {DEMO_WIDTH}), got {tuple(x.shape)}")
    left = classifier.predict(x[..., :DEMO_HEIGHT])
    right = classifier.predict(x[..., DEMO_HEIGHT:])
    return np.stack([np.asarray(left), np.asarray(right)], axis=1)


def score_pairs(read: np.ndarray[Any, Any], asked: Sequence[Prompt]) -> dict[str, float]:
    """accuracy: both digits right and in place; swapped: the two digits read in the opposite
    order (for pairs of different digits); per-side accuracies."""
    want = np.array([(p.left, p.right) for p in asked], dtype=np.int64).reshape(-1, 2)
    read = np.asarray(read).reshape(-1, 2)
    if read.shape != want.shape:
        raise ValueError(f"read: expected shape {want.shape}, got {read.shape}")
    distinct = want[:, 0] != want[:, 1]
    swapped = (read[:, 0] == want[:, 1]) & (read[:, 1] == want[:, 0]) & distinct
    return {
        "accuracy": float(np.mean(np.all(read == want, axis=1))),
        "swapped": float(swapped.sum() / max(1, distinct.sum())),
        "left": float(np.mean(read[:, 0] == want[:, 0])),
        "right": float(np.mean(read[:, 1] == want[:, 1])),
        "count": float(len(want)),
    }


def swap(asked: Sequence[Prompt]) -> list[Prompt]:
    """The prompts asking for the same digits in the opposite order (same wording), for pairs
    of different digits: "7 then 3" for "3 then 7"."""
    out = []
    for p in asked:
        if p.left == p.right:
            continue
        for template in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES:
            if caption(template, p.left, p.right) == p.text:
                out.append(Prompt(caption(template, p.right, p.left), p.right, p.left))
                break
    return out
