"""`deco train --task t2i`, `deco sample --prompt` and the demo's scoring, end to end (tiny).

Oracles: the built-in digits with known labels (the scoring must read a pair of real digits as
those digits); an uninterrupted run (resume must continue it exactly); the encoder itself (a run
on `deco embed-text` embeddings must follow the run with the encoder in the loop)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deco.cli import main
from deco.evaluate.digits import DigitsClassifier
from deco.optimized import TrainConfig
from deco.optimized.sampling import SampleSettings
from deco.text.digit_pairs import GRID_PROMPTS, Prompt, read_pairs, score_pairs, swap
from deco.train.job import RunConfig, train

pytest.importorskip("transformers")

FAST = SampleSettings(steps=2, guidance=2.0, solver="adams")
DEMO: dict[str, Any] = {"task": "t2i", "batch_size": 8, "checkpoint_every": 100, "log_every": 1,
                        "device": "cpu", "sample": FAST}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "demo"
    train(RunConfig(out=out, steps=3, **DEMO))
    return out


def test_demo_run_writes_grid_prompts_and_encoder(demo_run: Path) -> None:
    assert (demo_run / "text_encoder" / "config.json").is_file()
    assert (demo_run / "prompts.txt").read_text().splitlines() == list(GRID_PROMPTS)
    grid = Image.open(demo_run / "samples.png")
    pad = 2  # one row of 4 samples (32x64) per prompt
    assert grid.size == (4 * (64 + pad) + pad, len(GRID_PROMPTS) * (32 + pad) + pad)
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["run"]["task"] == "t2i" and metrics["config"]["architecture"] == "t2i"


def test_sample_from_prompts_with_the_remembered_encoder(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    prompts = tmp_path / "p.txt"
    prompts.write_text("seven then one\n\n2 and 9\n")
    assert main(["sample", str(demo_run), "--prompt", "3 then 7", "--prompts", str(prompts),
                 "--per-prompt", "2", "--steps", "2", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * 66 + 2, 3 * 34 + 2)
    assert (tmp_path / "prompts.txt").read_text().splitlines() == ["3 then 7", "seven then one", "2 and 9"]
    folder = tmp_path / "each"
    assert main(["sample", str(demo_run), "--prompt", "3 then 7", "--negative-prompt", "blurry",
                 "--steps", "2", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["0000_00.png", "prompts.txt"]


def test_sample_rebuilds_a_missing_demo_encoder_identically(demo_run: Path, tmp_path: Path) -> None:
    # Oracle: the run's own encoder folder; the rebuild must give the same samples.
    moved = tmp_path / "run"
    shutil.copytree(demo_run, moved)
    shutil.rmtree(moved / "text_encoder")
    images = []
    for run in (demo_run, moved):
        out = tmp_path / f"{run.name}.png"
        assert main(["sample", str(run), "--prompt", "3 then 7", "--steps", "2", "--out", str(out)]) == 0
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(images[0], images[1])


def test_evaluate_scores_prompt_accuracy(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert main(["evaluate", str(demo_run), "--limit", "2", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["evaluation"]
    assert set(result["held_out"]) == {"guided", "unguided", "swapped_prompts", "reversed"}
    assert result["held_out_pairs"]["guided"]["count"] == 2


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--labels", "3"], "--labels"),
        (["--prompt", "3 then 7", "--text-encoder", "/nonexistent/qwen"], "--text-encoder"),
        ([], "--prompt"),
    ],
    ids=["labels", "encoder-folder", "no-prompt"],
)
def test_sample_bad_input_is_one_line(demo_run: Path, args: list[str], flag: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["sample", str(demo_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_demo_resume_continues_the_exact_trajectory(demo_run: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out in (straight, split):  # the demo reuses a run folder's encoder (saves training it)
        shutil.copytree(demo_run / "text_encoder", out / "text_encoder")
    train(RunConfig(out=straight, steps=4, **DEMO))
    train(RunConfig(out=split, steps=2, **DEMO))
    train(RunConfig(out=split, steps=4, resume=True), explicit={"steps"})
    assert _losses(split) == _losses(straight)
    a, b = _weights(split), _weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- caption data
@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A caption folder of 8 random 16x16 images and the tiny Qwen3 (E = 32)."""
    from deco.text.encoder import build_tiny_qwen3

    root = tmp_path_factory.mktemp("captions")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a photo of {i} cats")
    return data, build_tiny_qwen3(root / "qwen", seed=0)


def _caption_run(out: Path, data: Path, **extra: Any) -> RunConfig:
    settings: dict[str, Any] = {"model": "DeCo-T2I-demo/8", "resolution": 16, "batch_size": 4, "steps": 2,
                                "accumulation": 2, "checkpoint_every": 100, "log_every": 1, "device": "cpu",
                                "train": TrainConfig(lr=1e-3), "sample": FAST, **extra}
    return RunConfig(out=out, task="t2i", data=data, **settings)


def test_embedding_store_run_follows_the_encoder_in_the_loop(captioned: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    from deco.text.captions import CaptionFolderDataset
    from deco.text.embeddings import embed_captions
    from deco.text.encoder import Qwen3TextEncoder

    data, qwen = captioned
    train(_caption_run(tmp_path / "live", data, text_encoder=qwen))
    store = tmp_path / "store"
    captions = list(CaptionFolderDataset(data, 16).iter_captions())
    embed_captions(captions, Qwen3TextEncoder(qwen, 24, 32, device="cpu"), store, dtype="float32",
                   progress=False)
    train(_caption_run(tmp_path / "stored", data, embeddings=store))
    live, stored = _losses(tmp_path / "live"), _losses(tmp_path / "stored")
    assert len(live) == 2 and np.allclose(live, stored, rtol=1e-5, atol=0), (live, stored)
    assert (tmp_path / "stored" / "prompts.txt").read_text().splitlines() == captions[:4]


def test_embedding_shape_mismatch_is_one_line(captioned: tuple[Path, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from deco.text.captions import CaptionFolderDataset
    from deco.text.embeddings import embed_captions
    from deco.text.encoder import Qwen3TextEncoder

    data, qwen = captioned
    captions = list(CaptionFolderDataset(data, 16).iter_captions())
    embed_captions(captions, Qwen3TextEncoder(qwen, 8, 32, device="cpu"), tmp_path / "e", progress=False)
    capsys.readouterr()
    code = main(["train", "--task", "t2i", "--data", str(data), "--embeddings", str(tmp_path / "e"),
                 "--model", "DeCo-T2I-demo/8", "--resolution", "16", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--embeddings" in err[0] and "text_length = 24" in err[0], err


# ------------------------------------------------------------------------ scoring
@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return DigitsClassifier()


def _known_digits(classifier: DigitsClassifier) -> dict[int, torch.Tensor]:
    """One real digit image (3, 32, 32) per class that the classifier reads correctly."""
    from deco.data import DigitsDataset

    digits = DigitsDataset()
    right = classifier.predict(digits.images) == digits.labels.numpy()
    return {d: digits.images[int(np.nonzero(right & (digits.labels.numpy() == d))[0][0])] for d in range(10)}


def test_scoring_reads_both_halves_in_place(classifier: DigitsClassifier) -> None:
    known = _known_digits(classifier)
    asked = [Prompt("3 then 7", 3, 7), Prompt("0 then 9", 0, 9), Prompt("5 then 5", 5, 5)]
    images = torch.stack([torch.cat([known[p.left], known[p.right]], -1) for p in asked])
    assert read_pairs(images, classifier).tolist() == [[3, 7], [0, 9], [5, 5]]
    assert score_pairs(read_pairs(images, classifier), asked)["accuracy"] == 1.0
    # The same images judged against the swapped prompts: wrong, and counted as reversed.
    reverse = swap(asked)
    assert [p.text for p in reverse] == ["7 then 3", "9 then 0"]  # a pair of equal digits has no swap
    score = score_pairs(read_pairs(images[:2], classifier), reverse)
    assert score["accuracy"] == 0.0 and score["swapped"] == 1.0
    # one half wrong: not right
    half = torch.cat([known[3], known[8]], -1)[None]
    assert score_pairs(read_pairs(half, classifier), asked[:1]) == {
        "accuracy": 0.0, "swapped": 0.0, "left": 1.0, "right": 0.0, "count": 1.0}


def test_read_pairs_refuses_square_images(classifier: DigitsClassifier) -> None:
    with pytest.raises(ValueError, match=r"^images: expected \(N, 3, 32, 64\)"):
        read_pairs(torch.zeros(1, 3, 32, 32), classifier)


def test_webdataset_shards_train_and_resume_exactly(captioned: tuple[Path, Path], tmp_path: Path) -> None:
    """Shards stream in a fixed order; a resumed run skips the batches already taken."""
    from test_captions import pair, write_shard

    _, qwen = captioned
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        members = [m for i in range(6) for m in pair(f"{s}-{i}", 10 * s + i, f"shard {s} item {i}")]
        write_shard(shards / f"{s:05d}.tar", members)
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = {"text_encoder": qwen, "checkpoint_every": 2}
    train(dataclasses.replace(_caption_run(straight, shards, **base), steps=4))
    train(dataclasses.replace(_caption_run(split, shards, **base), steps=2))
    train(RunConfig(out=split, steps=4, resume=True), explicit={"steps"})
    assert len(_losses(straight)) == 4 and _losses(split) == _losses(straight)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--task", "t2i", "--data", "DATA", "--text-encoder", "/nonexistent/qwen"], "--text-encoder"),
        (["--task", "t2i", "--data", "DATA"], "--text-encoder"),  # neither encoder nor embeddings
        (["--text-encoder", "/nonexistent/qwen"], "--text-encoder"),  # a class run
        (["--task", "t2i", "--model", "DeCo-tiny/4"], "--model"),
    ],
    ids=["encoder-folder", "no-encoder", "c2i-encoder", "class-model"],
)
def test_train_bad_text_input_is_one_line(args: list[str], flag: str, tmp_path: Path,
                                          captioned: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = [str(captioned[0]) if a == "DATA" else a for a in args]
    assert main(["train", *args, "--resolution", "16", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err


def test_sample_a_release_text_checkpoint(captioned: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The release's own text checkpoint format (../shared/fixtures/T.ckpt, T = 8, E = 48): the
    encoder must be given; the tiny Qwen3's 32 features are zero-padded to 48 as the release does."""
    from helpers import release_fixture

    ckpt = release_fixture("T.ckpt")
    out = tmp_path / "g.png"
    capsys.readouterr()
    assert main(["sample", str(ckpt), "--prompt", "a cat", "--steps", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--text-encoder" in err[0], err
    assert main(["sample", str(ckpt), "--text-encoder", str(captioned[1]), "--prompt", "a cat",
                 "--prompt", "a dog", "--steps", "2", "--resolution", "16", "--out", str(out)]) == 0
    assert Image.open(out).size == (16 + 4, 2 * 18 + 2)
