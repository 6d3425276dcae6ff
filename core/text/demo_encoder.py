"""The text encoder of the built-in text-to-image demo: the tiny offline Qwen3, taught the
demo's language.

Why not the random tiny Qwen3 of `build_tiny_qwen3` alone: a text-to-image model can only follow
a wording it has not been trained on when its text encoder already maps that wording to what it
means, which Qwen3-1.7B has learnt from its pretraining corpus. A randomly initialised 2-layer
Qwen3 knows nothing: its states for "left three, right six" are unrelated to those for
"left 3, right 6", and with it the demo scored 16% (bench/RESULTS_training.md). Downloading a
pretrained LM is not allowed, so the demo gives its tiny Qwen3 the little English it needs, on
text alone: `train_demo_encoder` fits the random model, for a few hundred Adam steps, to tell
from every caption of the demo's language (all wordings of `deco.text.digit_pairs`, held-out ones
included, and all digit pairs) which digit it puts on the left and which on the right. No image
is involved: the held-out wordings and pairs are still unseen by the image model, which is what
the demo's score measures.

The objective reads the hidden states from the caption's last token on (the last token and the
padding after it, whose causal attention has seen the whole caption): two linear heads (left and
right digit, discarded afterwards) and a cross-entropy at each of those positions. The result is
saved, weights and tokenizer, as a Hugging Face folder and loads through `Qwen3TextEncoder` like a
downloaded Qwen3. Training runs on one thread from fixed seeds, so the same arguments give the
same weights on the same platform (torch version and CPU instruction set).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from deco.errors import quiet_transformers
from deco.text.digit_pairs import ALL_PAIRS, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, Prompt, prompts
from deco.text.encoder import build_tiny_qwen3, load_tokenizer


@dataclass(frozen=True)
class DemoEncoderConfig:
    """The demo encoder's recipe: the random tiny Qwen3 (seed, width, depth), then `steps` Adam
    steps of `batch` captions at learning rate `lr` on captions padded to `length` tokens (the
    image model's T: the demo run passes its model's, 24 for DeCo-T2I-demo/8)."""

    seed: int = 0
    hidden: int = 32
    layers: int = 2
    length: int = 24
    steps: int = 400
    batch: int = 128
    lr: float = 3e-3


def demo_language() -> list[Prompt]:
    """Every caption of the demo's language: all wordings (training and held out) x all pairs."""
    return prompts(TRAIN_TEMPLATES + HELD_OUT_TEMPLATES, ALL_PAIRS)


def train_demo_encoder(folder: str | Path, config: DemoEncoderConfig = DemoEncoderConfig(), *,
                       language: Sequence[Prompt] | None = None) -> Path:
    """Write the demo's trained tiny Qwen3 (Hugging Face layout) to `folder`, atomically: it is
    built in a sibling temporary folder and renamed into place. `language`: the captions it is
    taught, `demo_language()` by default. Returns the folder."""
    from transformers import Qwen3ForCausalLM  # here: transformers is an optional extra (text)

    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".deco-encoder-", dir=out.parent))
    try:
        build_tiny_qwen3(work, seed=config.seed, hidden=config.hidden, layers=config.layers)
        with quiet_transformers():
            model = Qwen3ForCausalLM.from_pretrained(str(work), local_files_only=True, dtype=torch.float32)
        tokenizer = load_tokenizer(work)
        with torch.random.fork_rng(devices=[]), _one_thread():
            torch.manual_seed(config.seed)
            fit_to_language(model.model, tokenizer, language or demo_language(), config)
        with quiet_transformers():
            model.save_pretrained(str(work))
        # Swap by renames, so that a crash leaves the old folder or the new one, never half.
        old = work.with_name(work.name + "-old")
        if out.exists():
            out.rename(old)
        work.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def fit_to_language(qwen: nn.Module, tokenizer: object, language: Sequence[Prompt],
                    config: DemoEncoderConfig) -> float:
    """Fit `qwen` (a `Qwen3Model`) in place so that its states from each caption's last token on
    name the caption's (left, right) digits; returns the last batch's loss."""
    ids, mask = _tokenize(tokenizer, [p.text for p in language], config.length)
    digits = torch.tensor([(p.left, p.right) for p in language])  # (N, 2)
    heads = nn.Linear(config.hidden, 2 * 10)
    params = list(qwen.parameters()) + list(heads.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    qwen.train().requires_grad_(True)
    loss = torch.zeros(())
    for _ in range(config.steps):
        pick = torch.randint(len(language), (config.batch,))
        loss = _slot_loss(qwen, heads, ids[pick], mask[pick], digits[pick])
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
    qwen.eval().requires_grad_(False)
    return float(loss.detach())


def _slot_loss(qwen: nn.Module, heads: nn.Module, ids: Tensor, mask: Tensor, digits: Tensor) -> Tensor:
    """Mean cross-entropy of both digits at every position from the last token on."""
    b, t = ids.shape
    states = qwen(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, E)
    logits = heads(states).view(b, t, 2, 10)  # (B, T, side, digit)
    last = mask.sum(dim=1) - 1  # (B,)
    keep = (torch.arange(t)[None, :] >= last[:, None]).float()  # (B, T)
    target = digits[:, None, :].expand(b, t, 2)  # (B, T, 2)
    ce = nn.functional.cross_entropy(logits.reshape(-1, 10), target.reshape(-1), reduction="none")
    return (ce.view(b, t, 2).sum(dim=-1) * keep).sum() / keep.sum()


def _tokenize(tokenizer: object, texts: list[str], length: int) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), (N, T): right-padded and truncated as `Qwen3TextEncoder` does."""
    batch = tokenizer(texts, truncation=True, max_length=length,  # type: ignore[operator]
                      padding="max_length", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


class _one_thread:
    """Run a block on one intra-op thread (reductions then add in a fixed order)."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)
