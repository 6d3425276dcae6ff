"""The built-in text demo's encoder (`deco.text.demo_encoder`): a tiny Qwen3 taught the demo's language.

Oracle: the meaning of each caption, known from how it was written ((left, right) digits of
`deco.text.digit_pairs`). The taught encoder must give two wordings of the same pair nearly the same
final state, and the untaught random one of `build_tiny_qwen3` must not (so the check can fail)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deco.text import demo_encoder
from deco.text.demo_encoder import DemoEncoderConfig, train_demo_encoder
from deco.text.digit_pairs import ALL_PAIRS, HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, prompts
from deco.text.encoder import Qwen3TextEncoder, build_tiny_qwen3

pytest.importorskip("transformers")

FAST = DemoEncoderConfig(steps=3, batch=8)


@pytest.fixture(scope="module")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_demo_encoder(tmp_path_factory.mktemp("enc") / "taught")


def _nearest_meaning_accuracy(folder: Path) -> float:
    """Share of held-out-wording captions whose final state is nearest (Euclidean) to the final
    state of a training-wording caption of the same (left, right) pair."""
    encoder = Qwen3TextEncoder(folder, 24, 32, device="cpu")
    known = prompts(TRAIN_TEMPLATES, ALL_PAIRS)
    new = prompts(HELD_OUT_TEMPLATES, ALL_PAIRS)
    a = encoder.encode([p.text for p in known])[:, -1]  # (N, E): the last (padding) position
    b = encoder.encode([p.text for p in new])[:, -1]
    nearest = torch.cdist(b, a).argmin(dim=1)
    meaning = [(known[int(j)].left, known[int(j)].right) for j in nearest]
    right = [m == (p.left, p.right) for p, m in zip(new, meaning, strict=True)]
    return sum(right) / len(right)


def test_taught_encoder_gives_wordings_of_a_pair_the_same_meaning(taught: Path, tmp_path: Path) -> None:
    assert _nearest_meaning_accuracy(taught) >= 0.99
    assert _nearest_meaning_accuracy(build_tiny_qwen3(tmp_path / "random", seed=0)) < 0.5


def test_same_recipe_gives_the_same_files(tmp_path: Path) -> None:
    a = train_demo_encoder(tmp_path / "a", FAST)
    b = train_demo_encoder(tmp_path / "b", FAST)
    c = train_demo_encoder(tmp_path / "c", DemoEncoderConfig(steps=3, batch=8, seed=1))
    weights = [(f / "model.safetensors").read_bytes() for f in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_training_leaves_the_torch_state_as_it_was(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    before = torch.get_rng_state()
    train_demo_encoder(tmp_path / "e", FAST)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads


def test_a_failed_build_keeps_the_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = train_demo_encoder(tmp_path / "enc", FAST)
    old = (folder / "model.safetensors").read_bytes()

    def fail(*args: object) -> float:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(demo_encoder, "fit_to_language", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        train_demo_encoder(folder, DemoEncoderConfig(steps=3, batch=8, seed=2))
    assert (folder / "model.safetensors").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]  # no temporary folder left
