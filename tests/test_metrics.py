"""The ADM-suite metrics (deco.evaluate.adm) and `deco fid`.

Oracles: closed forms (Fréchet distance of Gaussians with commuting covariances; a general one
through eigendecomposition square roots), the Inception Score of a planted classifier, precision
and recall of point clouds worked out by hand, brute-force NumPy k-NN, and torch-fidelity's own
extractor (the wrapped library) on a randomly initialised Inception-v3 saved to a file."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import torch
from helpers import missing_extra
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from torch import nn

from deco.cli import main
from deco.evaluate.adm import (
    _fidelity_inception_class,
    image_batches,
    inception_score,
    load_inception,
    manifold_radii,
    precision_recall,
)
from deco.evaluate.frechet import frechet_distance, gaussian_stats


# ------------------------------------------------------------------ Fréchet distance
def psd_sqrt(s: NDArray[np.float64]) -> NDArray[np.float64]:
    w, v = np.linalg.eigh(s)
    out: NDArray[np.float64] = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return out


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_commuting_closed_form(dim: int, seed: int) -> None:
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: d² = |mu1 - mu2|² + Σ (√a - √b)²."""
    rng = np.random.default_rng(seed)
    q = scipy.stats.ortho_group.rvs(dim, random_state=rng) if dim > 1 else np.ones((1, 1))
    a, b = rng.uniform(0.1, 4.0, dim), rng.uniform(0.1, 4.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert abs(got - expected) <= 1e-9 * max(1.0, expected)


@settings(max_examples=15, deadline=None)
@given(dim=st.integers(2, 10), seed=st.integers(0, 2**31 - 1))
def test_frechet_distance_general_gaussians(dim: int, seed: int) -> None:
    """tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½) with symmetric square roots from eigh (no sqrtm)."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    r1 = psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * psd_sqrt(r1 @ s2 @ r1))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert abs(got - expected) <= 1e-8 * max(1.0, expected)


def test_statistics_are_mean_and_unbiased_covariance() -> None:
    x = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
    mu, sigma = gaussian_stats(x)
    np.testing.assert_allclose(mu, [2.0, 2.0])
    np.testing.assert_allclose(sigma, [[4.0, 3.0], [3.0, 3.0]])  # sums of products / (N - 1)


# ------------------------------------------------------------------ Inception Score
def planted_is(k: int, c: float) -> float:
    """IS of a classifier with logit c on the true class, 0 elsewhere, classes balanced."""
    top = np.exp(c) / (np.exp(c) + k - 1)
    other = 1 / (np.exp(c) + k - 1)
    return float(np.exp(top * np.log(top * k) + (k - 1) * other * np.log(other * k)))


@pytest.mark.parametrize(("k", "c"), [(10, 0.0), (10, 3.0), (1008, 40.0), (7, 1.5)])
def test_inception_score_planted_classifier(k: int, c: float) -> None:
    n = 4 * k  # below ADM's 5000-sample split: one split, every class 4 times
    logits = np.zeros((n, k))
    logits[np.arange(n), np.arange(n) % k] = c
    assert abs(inception_score(logits) - planted_is(k, c)) < 1e-9 * planted_is(k, c)
    if c == 40.0:
        assert abs(inception_score(logits) - k) < 1e-6 * k  # confident and diverse: IS = #classes


def test_inception_score_averages_splits() -> None:
    """First split: one class only (IS 1); second: 4 classes balanced and certain (IS 4)."""
    logits = np.zeros((8, 4))
    logits[:4, 0] = 100.0
    logits[np.arange(4, 8), np.arange(4)] = 100.0
    assert abs(inception_score(logits, split_size=4) - 2.5) < 1e-9
    # one split of all 8: marginal (5/8, 1/8, 1/8, 1/8); KL is log(8/5) for 5 samples, log 8 for 3
    one_split = np.exp((5 * np.log(8 / 5) + 3 * np.log(8)) / 8)
    assert abs(inception_score(logits, split_size=8) - one_split) < 1e-9


# ------------------------------------------------------------------ precision / recall
def on_axis(values: list[float], dim: int = 3) -> NDArray[np.float64]:
    out = np.zeros((len(values), dim))
    out[:, 0] = values
    return out


def test_precision_recall_by_hand() -> None:
    """References 0..5: 3rd-NN radii 3, 2, 2, 2, 2, 3. Samples 0, .5, 1, 1.5 (radii 1.5, 1, 1, 1.5)
    and 100..103 (far). Precision: the 4 near samples of 8 lie in reference balls = 0.5. Recall:
    references 0, 1, 2 and 3 (|3 - 1.5| = 1.5, on the boundary, counts) of 6 = 2/3."""
    ref = on_axis([0, 1, 2, 3, 4, 5])
    gen = on_axis([0, 0.5, 1, 1.5, 100, 101, 102, 103])
    np.testing.assert_array_equal(np.sqrt(manifold_radii(ref)), [3, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(np.sqrt(manifold_radii(gen))[:4], [1.5, 1, 1, 1.5])
    for block in (1024, 3):  # whole and row-blocked
        precision, recall = precision_recall(ref, gen, block=block)
        assert precision == 0.5 and recall == pytest.approx(4 / 6, abs=0)


def brute_force_pr(ref: NDArray[np.float64], gen: NDArray[np.float64], k: int = 3) -> tuple[float, float]:
    def radii(x: NDArray[np.float64]) -> NDArray[np.float64]:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    d = np.sqrt(((gen[:, None] - ref[None]) ** 2).sum(-1))  # (gen, ref)
    precision = (d <= radii(ref)[None, :]).any(1).mean()
    recall = (d.T <= radii(gen)[None, :]).any(1).mean()
    return float(precision), float(recall)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shift=st.floats(0.0, 3.0))
def test_precision_recall_against_brute_force(seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(40, 5))
    gen = rng.normal(size=(30, 5)) * 1.5 + shift
    got = precision_recall(ref, gen, block=7)
    assert got == pytest.approx(brute_force_pr(ref, gen), abs=1e-12)
    assert precision_recall(ref, ref) == (1.0, 1.0)


def test_bad_feature_shapes() -> None:
    with pytest.raises(ValueError, match=r"^samples: expected \(N, D\)"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"^features: expected \(N > 3, D\)"):
        manifold_radii(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"^logits: expected"):
        inception_score(np.zeros(5))


# ------------------------------------------------------------------ ADM batches
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_image_batches_stream_arr_0(tmp_path: Path, save: Any) -> None:
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    save(tmp_path / "b.npz", arr_0=images, arr_1=np.arange(7))
    n, batches = image_batches(tmp_path / "b.npz", 3)
    parts = list(batches)
    assert n == 7 and [len(p) for p in parts] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(parts), images)


def test_image_batches_refuses_non_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8 images"):
        image_batches(tmp_path / "f.npz", 2)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        image_batches(tmp_path / "junk.npz", 2)


# ------------------------------------------------------------------ Inception and `deco fid`
@pytest.fixture(scope="module")
def fidelity() -> Any:
    """torch-fidelity's Inception (the `metrics` extra), which the tests below need."""
    try:
        return _fidelity_inception_class()
    except ImportError as exc:
        missing_extra(f"torch-fidelity is not installed ({exc}); pip install 'deco-diffusion[metrics]'")


def random_extractor(seed: int = 0) -> nn.Module:
    """torch-fidelity's Inception-v3 with random weights that keep activations O(1) (He init)."""
    cls = _fidelity_inception_class()
    torch.manual_seed(seed)
    # build the network without weights: no file is read, the (empty) state is not loaded
    with mock.patch("torch.load", return_value={}), \
            mock.patch.object(cls, "load_state_dict", lambda self, state: None):
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"],
                  feature_extractor_weights_path=io.BytesIO(b""))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.bias.normal_(0.0, 0.1)
        net.fc.weight.normal_(0.0, 2048**-0.5)
        net.fc.bias.normal_(0.0, 1.0)
    return net.eval()


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory, fidelity: Any) -> Path:
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(random_extractor().state_dict(), path)
    return path


def library_features(path: Path, images: NDArray[np.uint8]) -> dict[str, NDArray[np.float64]]:
    """The oracle: torch-fidelity's extractor called directly, and the input of its Mixed_6d block
    captured here to compute mixed_6/conv (Mixed_6d.branch1x1) from it."""
    net = _fidelity_inception_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(path))
    captured: list[torch.Tensor] = []
    net.Mixed_6d.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        pool, logits = net(x)
        spatial = net.Mixed_6d.branch1x1(captured[0].clone())[:, :7]
    assert spatial.shape[1:] == (7, 17, 17)
    return {"pool": pool.double().numpy(), "logits": logits.double().numpy(),
            "spatial": spatial.flatten(1).double().numpy()}


def test_inception_features_are_the_librarys(inception_file: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    inception = load_inception(inception_file)
    pool, spatial, logits = inception(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    expected = library_features(inception_file, images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and logits.shape == (2, 1008)
    np.testing.assert_allclose(pool.numpy(), expected["pool"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial.numpy(), expected["spatial"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits.numpy(), expected["logits"], rtol=1e-5, atol=1e-5)
    # ADM's softmax input: the logits without the fc bias
    np.testing.assert_allclose(logits.double().numpy(), pool.double().numpy() @ inception.extractor.fc.weight
                               .detach().double().numpy().T, rtol=1e-5, atol=1e-5)
    assert spatial.min() >= 0  # after the block's ReLU


def structured_images(seed: int, n: int, size: int = 32) -> NDArray[np.uint8]:
    """Smooth random colour blobs (not white noise), so the features vary between images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        colour = rng.uniform(0, 255, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.2 * r))[..., None]
        out[i] = np.clip(blob * colour + (1 - blob) * rng.uniform(0, 255, 3), 0, 255).astype(np.uint8)
    return out


def frechet_low_rank(gen: NDArray[np.float64], ref: NDArray[np.float64],
                     sigma_ref: NDArray[np.float64] | None = None) -> float:
    """FID of few points in many dimensions without sqrtm: with centred rows A, B the nonzero
    eigenvalues of S1 S2 are the squared singular values of A B^T / sqrt((n1 - 1)(n2 - 1)), so
    tr (S1 S2)^½ is a nuclear norm. sigma_ref = c·S2 scales that trace by √c."""
    a, b = gen - gen.mean(0), ref - ref.mean(0)
    n1, n2 = len(a), len(b)
    nuclear = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    tr1, tr2 = (a * a).sum() / (n1 - 1), (b * b).sum() / (n2 - 1)
    scale = 1.0
    if sigma_ref is not None:
        scale = float(np.trace(sigma_ref) / tr2)
    diff = gen.mean(0) - ref.mean(0)
    return float(diff @ diff + tr1 + scale * tr2 - 2 * np.sqrt(scale) * nuclear)


@pytest.mark.slow
def test_deco_fid_end_to_end(inception_file: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """One run (each 2048-d sqrtm takes ~25 s on one shared core): the reference holds images and
    statistics; its mu/sigma are its images', its sigma_s is doubled, so the sFID shows that the
    stored statistics are the ones used, and precision/recall come from its images."""
    samples, reference = structured_images(0, 6), structured_images(1, 5)
    gen, ref = library_features(inception_file, samples), library_features(inception_file, reference)
    mu, sigma = gaussian_stats(ref["pool"])
    mu_s, sigma_s = gaussian_stats(ref["spatial"])
    np.savez(tmp_path / "samples.npz", arr_0=samples, arr_1=np.arange(6) % 3)
    np.savez(tmp_path / "ref.npz", arr_0=reference, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=2 * sigma_s)
    out = tmp_path / "metrics.json"
    code = main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"),
                 "--inception-weights", str(inception_file), "--batch-size", "4", "--device", "cpu",
                 "--json", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "is not the standard Inception weights file" in captured.err  # random weights
    assert all(f"{name}:" in printed for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"))
    got = json.loads(out.read_text())

    fid = frechet_low_rank(gen["pool"], ref["pool"])
    sfid = frechet_low_rank(gen["spatial"], ref["spatial"], sigma_ref=2 * sigma_s)
    z = gen["logits"] - gen["logits"].max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    is_ = float(np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0, keepdims=True))), 1))))
    precision, recall = brute_force_pr(ref["pool"], gen["pool"])
    assert got["num_samples"] == 6 and got["num_reference"] == 5
    assert got["reference_stats"] == "precomputed"
    assert got["inception_sha256"] == hashlib.sha256(inception_file.read_bytes()).hexdigest()
    assert got["fid"] == pytest.approx(fid, rel=1e-4) and fid > 0
    assert got["sfid"] == pytest.approx(sfid, rel=1e-4)
    assert sfid > frechet_low_rank(gen["spatial"], ref["spatial"])  # the doubled sigma_s counted
    assert got["inception_score"] == pytest.approx(is_, rel=1e-5)
    assert (got["precision"], got["recall"]) == (precision, recall)


def test_deco_fid_user_errors(inception_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "s.npz", arr_0=structured_images(0, 4))
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=np.eye(2023))
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "notinception.pth")
    cases = [
        ([str(tmp_path / "s.npz"), str(tmp_path / "empty.npz"), "--inception-weights", str(inception_file)],
         "reference:"),
        ([str(tmp_path / "s.npz"), str(tmp_path / "stats.npz"), "--inception-weights", str(inception_file),
          "--ignore-reference-stats"], "reference: .* has no images \\(arr_0\\), as --ignore"),
        ([str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--inception-weights",
          str(tmp_path / "notinception.pth")], "inception_weights:"),
        ([str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), "--inception-weights", str(inception_file),
          "--batch-size", "0"], "--batch-size:"),
    ]
    for argv, prefix in cases:
        capsys.readouterr()
        assert main(["fid", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(f"error: {prefix}", err), err
    with pytest.raises(SystemExit) as info:
        main(["fid", str(tmp_path / "missing.npz"), str(tmp_path / "s.npz"),
              "--inception-weights", str(inception_file)])
    assert info.value.code == 2


def test_stats_only_reference_has_no_precision(inception_file: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference of statistics only: FID/sFID use them, precision and recall are None. (The
    distances themselves are checked end to end above; here they are recorded, not computed,
    to skip two 2048-d sqrtm.)"""
    import deco.evaluate.adm as M

    calls: list[tuple[int, float]] = []

    def record(mu1: Any, s1: Any, mu2: Any, s2: Any) -> float:
        calls.append((len(mu2), float(s2[0, 0])))
        return 0.0

    monkeypatch.setattr(M, "frechet_distance", record)
    np.savez(tmp_path / "s.npz", arr_0=structured_images(0, 4))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=3 * np.eye(2048), mu_s=np.zeros(2023),
             sigma_s=5 * np.eye(2023))
    result = M.evaluate_sample_batches(tmp_path / "s.npz", tmp_path / "stats.npz",
                                       load_inception(inception_file))
    assert calls == [(2048, 3.0), (2023, 5.0)]
    assert result.precision is None and result.recall is None and result.num_reference is None
    assert result.reference_stats == "precomputed" and result.num_samples == 4
