"""`deco train`, `deco sample`, `deco evaluate`, `deco spectrum`: outputs, formats, user errors,
and the evaluation maths (Fréchet distance, classifier, DCT bands) against closed forms.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
from helpers import random_weights, tiny_config
from PIL import Image

from deco.cli import main
from deco.data import DigitsDataset
from deco.evaluate.digits import DigitsClassifier, score_samples
from deco.evaluate.frechet import frechet_distance, gaussian_stats
from deco.evaluate.spectrum import BANDS, band_energy
from deco.outputs import to_uint8

FAST = ["--batch-size", "16", "--lr", "1e-3", "--sample-steps", "2", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step DeCo-tiny/4 run on the built-in digits, via the CLI."""
    out = tmp_path_factory.mktemp("cli") / "run"
    torch.set_num_threads(1)
    assert main(["train", "--out", str(out), "--steps", "4", "--checkpoint-every", "2", "--log-every", "1",
                 *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def classifier() -> DigitsClassifier:
    return DigitsClassifier()


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, *needles: str,
                    last: bool = False) -> str:
    """Exit status 2 and a one-line error, without traceback. last: the error is the last line
    (the run had started: its banner and progress bar came first)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    if last:
        lines = lines[-1:]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- train
def test_train_writes_the_run_folder(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {"checkpoint.safetensors", "model.safetensors", "samples.png", "loss.png", "metrics.json",
            "log.jsonl"} <= names
    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (10 * 34 + 2, 10 * 34 + 2)  # 10 classes (rows) x 10 samples, 32 px + 2 px gaps
    assert Image.open(run_dir / "loss.png").format == "PNG"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["model"] == "DeCo-tiny/4" and metrics["world_size"] == 1
    assert set(metrics["final_loss"]) == {"loss", "fm", "freq"} and metrics["train_seconds"] > 0
    assert metrics["cpu_gemm"] in ("onednn", "aten")
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(abs(r["loss"] - (r["fm"] + r["freq"])) < 1e-5 for r in log)  # freq weight 1, no REPA


def test_train_shows_a_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "2", "--model", "DiT-tiny/4",
                 "--log-every", "1", *FAST]) == 0
    captured = capsys.readouterr()
    assert "step/s" in captured.err or "s/step" in captured.err
    assert "loss=" in captured.err and "fm=" in captured.err and "2/2" in captured.err
    assert "trained 2 steps" in captured.out


def test_train_on_an_image_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("ants", "bees", "cats"):
        for i in range(3):
            (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.jpg")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--resolution", "16", "--model", "DeCo-tiny/4",
                 "--steps", "2", "--out", str(out), "--batch-size", "4", "--sample-steps", "2",
                 "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["num_classes"] == 3 and "9 images, 3 classes, 16x16" in metrics["dataset"]
    assert Image.open(out / "samples.png").size == (10 * 18 + 2, 3 * 18 + 2)  # one row per class


def test_train_with_a_json_model_config(tmp_path: Path) -> None:
    """--model also takes a .json file of DeCoConfig fields (num_classes comes from the data)."""
    cfg = tmp_path / "dit2.json"
    cfg.write_text(json.dumps({"architecture": "baseline", "patch_size": 4, "hidden_size": 32,
                               "num_heads": 2, "depth": 2, "decoder_depth": 0, "decoder_width": 0}))
    out = tmp_path / "run"
    assert main(["train", "--model", str(cfg), "--steps", "1", "--out", str(out), *FAST]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["depth"] == 2 and config["hidden_size"] == 32 and config["num_classes"] == 10


# ----------------------------------------------------------------------------- sample
def test_sample_formats_and_sources_agree(run_dir: Path, tmp_path: Path) -> None:
    """The run folder, its checkpoint and its model.safetensors give the same images, equal to
    deco.optimized.sample on the documented noise (generator seeded by --seed, one draw)."""
    from deco.optimized import load_model, sample

    labels = ["3", "3", "7", "0"]
    arrays: list[np.ndarray] = []
    for source in (run_dir, run_dir / "checkpoint.safetensors", run_dir / "model.safetensors"):
        out = tmp_path / f"{len(arrays)}.npz"
        assert main(["sample", str(source), "--labels", *labels, "--steps", "3", "--seed", "5",
                     "--guidance", "2", "--out", str(out)]) == 0
        with np.load(out) as f:
            arrays.append(f["arr_0"])
            assert f["arr_1"].tolist() == [3, 3, 7, 0]
    assert arrays[0].dtype == np.uint8 and arrays[0].shape == (4, 32, 32, 3)
    assert all(np.array_equal(a, arrays[0]) for a in arrays)
    model = load_model(run_dir / "model.safetensors")
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = sample(model, noise, torch.tensor([3, 3, 7, 0]), steps=3, guidance=2.0, interval=(0.0, 1.0))
    assert isinstance(expected, torch.Tensor)
    assert np.abs(to_uint8(expected).astype(int) - arrays[0].astype(int)).max() <= 1


def test_sample_count_writes_a_balanced_resumable_sample_batch(run_dir: Path, tmp_path: Path) -> None:
    """`deco sample --count`: class-balanced labels (i mod 10), shard s drawn with seed + s and
    equal to sampling that shard's labels directly, and a rerun that reuses the shards."""
    from deco.optimized import load_model, sample

    out = tmp_path / "batch.npz"
    args = ["sample", str(run_dir), "--count", "13", "--shard-size", "5", "--steps", "2", "--seed", "3",
            "--out", str(out)]
    assert main(args) == 0
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (13, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [i % 10 for i in range(13)]
    model = load_model(run_dir / "model.safetensors")
    start, seed = 10, 3 + 2  # shard 2 holds samples 10..12
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    expected = sample(model, noise, torch.tensor([0, 1, 2]), steps=2, guidance=3.0, interval=(0.0, 1.0))
    assert isinstance(expected, torch.Tensor)
    assert np.abs(to_uint8(expected).astype(int) - images[start:].astype(int)).max() <= 1
    shards = sorted((tmp_path / "batch.shards").glob("shard_*.npz"))
    assert len(shards) == 3
    stamps = [p.stat().st_mtime_ns for p in shards]
    out.unlink()
    assert main(args) == 0  # resumed: the shards are reused, the batch is assembled again
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], images)


def test_sample_from_a_release_checkpoint(fixtures_dir: Path, tmp_path: Path) -> None:
    """A release .ckpt samples like its EMA weights loaded by deco.optimized.load_model."""
    from deco.optimized import load_model, sample

    out = tmp_path / "r.npz"
    assert main(["sample", str(fixtures_dir / "A.ckpt"), "--labels", "1", "2", "--steps", "2",
                 "--seed", "1", "--out", str(out)]) == 0
    model = load_model(fixtures_dir / "A.ckpt")
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = sample(model, noise, torch.tensor([1, 2]), steps=2)
    assert isinstance(expected, torch.Tensor)
    with np.load(out) as f:
        assert np.abs(f["arr_0"].astype(int) - to_uint8(expected).astype(int)).max() <= 1


def test_sample_png_grid_and_folder(run_dir: Path, tmp_path: Path) -> None:
    assert main(["sample", str(run_dir), "--labels", "1", "2", "--per-label", "3", "--steps", "2",
                 "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size == (3 * 34 + 2, 2 * 34 + 2)
    assert main(["sample", str(run_dir), "--labels", "4", "5", "--steps", "2", "--solver", "heun",
                 "--out", str(tmp_path / "folder")]) == 0
    files = sorted(p.name for p in (tmp_path / "folder").iterdir())
    assert files == ["000000_class4.png", "000001_class5.png"]
    assert Image.open(tmp_path / "folder" / files[0]).size == (32, 32)


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_writes_metrics(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(run_dir), "--per-class", "3", "--steps", "2"]) == 0
    result = json.loads((run_dir / "metrics.json").read_text())["evaluation"]
    assert 0.0 <= result["accuracy"] <= 1.0 and result["num_samples"] == 30
    assert result["classifier_test_accuracy"] > 0.9 and result["frechet_distance"] >= 0.0
    assert set(result["accuracy_per_class"]) == {str(c) for c in range(10)}
    assert "class accuracy" in capsys.readouterr().out
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4  # merged, not replaced


def test_scores_recognise_real_digits_and_reject_noise(classifier: DigitsClassifier) -> None:
    """Real digits score like the classifier's held-out accuracy and sit near the real-vs-real
    Fréchet floor; uniform noise scores near chance with a far larger distance."""
    digits = DigitsDataset()
    idx = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))[:500]
    real = score_samples(digits.images[idx], digits.labels[idx].numpy(), classifier)
    noise = score_samples(torch.rand(500, 3, 32, 32) * 2 - 1, digits.labels[idx].numpy(), classifier)
    assert real["accuracy"] > 0.95 and noise["accuracy"] < 0.35
    assert real["frechet_distance"] < 3 * max(classifier.holdout_fd, 0.1)
    assert noise["frechet_distance"] > 10 * real["frechet_distance"]


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_of_diagonal_gaussians_matches_the_closed_form() -> None:
    """Commuting covariances: d² = |mu1 - mu2|² + sum (sqrt(a) - sqrt(b))²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_non_commuting_2d_gaussians_matches_the_closed_form() -> None:
    """For 2x2 M = S1 S2 with positive eigenvalues, tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))."""
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
        s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        got = frechet_distance(np.zeros(2), s1, np.zeros(2), s2)
        assert got == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_frechet_distance_with_rank_deficient_covariances() -> None:
    """Like dead ReLU units: zero rows/columns. Oracle: the symmetric form
    tr (S1 S2)^½ = sum sqrt(eig(A S2 A)), A = S1^½ by eigendecomposition (no sqrtm)."""
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.3
    f1[:, :2] = 0.0  # two units never active on the first set
    (mu1, s1), (mu2, s2) = gaussian_stats(f1), gaussian_stats(f2)
    w, q = np.linalg.eigh(s1)
    a = q @ np.diag(np.sqrt(np.clip(w, 0, None))) @ q.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(a @ s2 @ a), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_identical_samples_is_zero_and_input_is_checked() -> None:
    f = np.random.default_rng(2).normal(size=(200, 4))
    assert abs(frechet_distance(*gaussian_stats(f), *gaussian_stats(f))) < 1e-8
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(np.zeros((1, 3)))


# ----------------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("u, v", [(0, 0), (1, 0), (0, 3), (2, 5), (7, 7)])
def test_band_energy_of_a_dct_basis_image_is_one_band(u: int, v: int) -> None:
    """An image whose every 8x8 block is the (u, v) DCT basis function (scipy's orthonormal
    inverse DCT of a delta) has all its energy in band u + v."""
    delta = np.zeros((8, 8))
    delta[u, v] = 1.0
    block = scipy.fft.idctn(delta, norm="ortho")
    image = torch.as_tensor(np.tile(block, (2, 3, 2, 3)))  # (B=2, C=3, 16, 24)
    bands = band_energy(image)
    expected = np.zeros(BANDS)
    expected[u + v] = 1.0
    assert np.allclose(bands, expected, atol=1e-12)


def test_spectrum_writes_plot_and_numbers(run_dir: Path, tmp_path: Path) -> None:
    from deco.reference.weights import save_weights

    baseline = tmp_path / "baseline.safetensors"
    config = tiny_config("baseline")
    save_weights(baseline, config, random_weights(config, seed=3, scale=0.5))
    out = tmp_path / "spec"
    out.mkdir()
    assert main(["spectrum", str(run_dir), "--baseline", str(baseline), "--count", "8", "--times", "0.5",
                 "--out", str(out)]) == 0
    report = json.loads((out / "spectrum.json").read_text())
    assert set(report["models"]) == {"model", "baseline"}
    assert report["models"]["baseline"]["architecture"] == "baseline"
    for res in report["models"].values():
        for key in ("semantic", "velocity"):
            assert len(res[key]) == BANDS and sum(res[key]) == pytest.approx(1.0)
    assert sum(report["target_velocity"]) == pytest.approx(1.0)
    assert Image.open(out / "spectrum.png").format == "PNG"


# ----------------------------------------------------------------------------- user errors
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "b" / "9.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


@pytest.mark.parametrize("case, needles", [
    ("empty_folder", ["--data", "no class sub-folders"]),
    ("no_images", ["--data", "contains no images"]),
    ("missing_folder", ["--data", "no such folder"]),
    ("corrupt_image", ["--data", "unreadable image", "9.jpg"]),
    ("unknown_preset", ["--model", "DeCo-huge/3"]),
    ("missing_json", ["--model", "nope.json"]),
    ("zero_steps", ["--steps"]),
    ("resume_without_out", ["--resume"]),
    ("resume_nothing", ["--resume", "no checkpoint"]),
    ("repa", ["--repa-weight"]),
    ("bad_lr", ["--lr"]),
    ("bad_grid_interval", ["--interval"]),
    ("bad_grid_steps", ["--sample-steps"]),
    ("bad_train_timeshift", ["--train-timeshift", "positive"]),
    ("bad_quality", ["--quality", "[1, 100]"]),
    ("bad_log_every", ["--log-every"]),
    ("json_of_defaults_too_big", ["--model", "GiB", "free"]),
])
def test_train_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                        needles: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the machine had 8 GiB free, whatever this one has: {} means DeCo-XL/16, which needs more.
    monkeypatch.setattr("deco.train.memory.free_bytes", lambda device: 8 * 1024**3)
    out = ["--out", str(tmp_path / "run")]
    data = tmp_path / "data"
    if case == "empty_folder":
        data.mkdir()
    if case == "no_images":
        (data / "x").mkdir(parents=True)
    args = {
        "empty_folder": lambda: ["--data", str(data)],
        "no_images": lambda: ["--data", str(data)],
        "missing_folder": lambda: ["--data", str(data)],
        "corrupt_image": lambda: ["--data", str(_image_folder(data, corrupt=True)), "--resolution", "8",
                                  "--batch-size", "9", "--steps", "1", "--model", "DiT-tiny/4"],
        "unknown_preset": lambda: ["--model", "DeCo-huge/3"],
        "missing_json": lambda: ["--model", str(tmp_path / "nope.json")],
        "zero_steps": lambda: ["--steps", "0"],
        "resume_without_out": lambda: ["--resume"],
        "resume_nothing": lambda: ["--resume", *out],
        "repa": lambda: ["--repa-weight", "0.5"],
        "bad_lr": lambda: ["--lr", "-1"],
        "bad_grid_interval": lambda: ["--interval", "0.9", "0.1"],
        "bad_grid_steps": lambda: ["--sample-steps", "0"],
        "bad_train_timeshift": lambda: ["--train-timeshift", "0"],
        "bad_quality": lambda: ["--quality", "101"],
        "bad_log_every": lambda: ["--log-every", "0"],
        "json_of_defaults_too_big": lambda: ["--model", str(_write(tmp_path / "all.json", "{}"))],
    }[case]()
    if "--out" not in args and case != "resume_without_out":
        args += out
    code = main(["train", *args, "--device", "cpu"])
    _one_line_error(capsys, code, *needles, last=case == "corrupt_image")


@pytest.mark.parametrize("case, needles", [
    ("missing", ["no such file or folder"]),
    ("not_a_model", ["junk.safetensors"]),
    ("label_high", ["--labels", "10"]),
    ("label_negative", ["--labels", "-1"]),
    ("interval", ["--interval"]),
    ("zero_steps", ["--steps"]),
    ("count_to_png", ["--out", ".npz"]),
    ("count_zero", ["--count", "positive"]),
    ("shard_size_zero", ["--shard-size", "positive"]),
])
def test_sample_user_errors_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         case: str, needles: list[str]) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    ckpt, extra = {
        "missing": (tmp_path / "missing.ckpt", []),
        "not_a_model": (junk, []),
        "label_high": (run_dir, ["--labels", "1", "10"]),
        "label_negative": (run_dir, ["--labels", "-1"]),
        "interval": (run_dir, ["--interval", "0.8", "0.2"]),
        "zero_steps": (run_dir, ["--steps", "0"]),
        "count_to_png": (run_dir, ["--count", "4"]),
        "count_zero": (run_dir, ["--count", "0", "--out", str(tmp_path / "s.npz")]),
        "shard_size_zero": (run_dir, ["--count", "4", "--shard-size", "0", "--out", str(tmp_path / "s.npz")]),
    }[case]
    if "--out" not in extra:
        extra = [*extra, "--out", str(tmp_path / "s.png")]
    code = main(["sample", str(ckpt), *extra])
    _one_line_error(capsys, code, *needles)
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("command", ["evaluate", "spectrum"])
def test_missing_checkpoint_for_evaluate_and_spectrum(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      command: str) -> None:
    _one_line_error(capsys, main([command, str(tmp_path / "nope")]), "nope")


def test_evaluate_rejects_a_model_that_is_not_a_digits_model(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from deco.reference.weights import save_weights

    config = tiny_config("deco", num_classes=7)
    save_weights(tmp_path / "m.safetensors", config, random_weights(config))
    _one_line_error(capsys, main(["evaluate", str(tmp_path / "m.safetensors")]), "10-class")


def test_errors_from_a_real_process_exit_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "deco.cli", "sample", str(tmp_path / "nope.ckpt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.ckpt" in proc.stderr
