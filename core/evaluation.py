"""Evaluation on the built-in digits: class accuracy, Fréchet distance, frequency spectra.

Class accuracy: a scikit-learn MLP is trained on real digits (a fixed 70/30 split; its own
held-out accuracy is reported next to the result) and asked which class each generated image
shows; the score is the fraction recognised as the class it was generated for.

Fréchet distance: between Gaussians fitted to the MLP's hidden-layer activations of generated
and of real images (the FID recipe with this small classifier standing in for Inception). The
real reference set is the classifier's training split; the same distance for the held-out real
split is reported as the floor that a perfect generator would reach at that sample size.

Generated and real images go through the same path (32x32 -> 8x8 cell means), so the classifier
never sees a difference of preprocessing between the two.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from deco.optimized.sampling import SampleSettings

from .data import DIGITS_CLASSES, downsample_to_digits, load_digits_arrays, upsample_digits
from .outputs import finish_axis, save_figure, write_json

if TYPE_CHECKING:
    from deco.optimized import DiffusionTransformer

Array = NDArray[np.float64]


# ------------------------------------------------------------------------------ Fréchet
def gaussian_stats(features: Any) -> tuple[Array, Array]:
    """Mean (D,) and covariance (D, D) (unbiased, N - 1) of features (N, D), N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features: expected an (N >= 2, D) array, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """d² = |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½) between N(mu1, S1) and N(mu2, S2).

    (S1 S2)^½ comes from scipy.linalg.sqrtm. Rank-deficient covariances (dead ReLU units) can make
    it inaccurate or complex: then eps·I is added to both, as in the FID reference code; an
    imaginary part that is more than round-off is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,):
        raise ValueError(f"mu2: expected shape ({d},) like mu1, got {mu2.shape}")
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma: expected ({d}, {d}) covariances, got {s1.shape} and {s2.shape}")
    with warnings.catch_warnings():
        # sqrtm warns on singular products (dead units); the checks below catch real failures.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(d) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0.0, atol=1e-3):
            raise ValueError(f"sigma: sqrtm has a large imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ------------------------------------------------------------------------------ classifier
class DigitsClassifier:
    """An MLP (64 ReLU units) on 8x8 cell means of 32x32 digits, trained on a fixed split."""

    def __init__(self, seed: int = 0, test_fraction: float = 0.3) -> None:
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

        raw, labels = load_digits_arrays()
        features = downsample_to_digits(upsample_digits(raw))
        x_train, x_test, y_train, y_test = train_test_split(
            features, labels, test_size=test_fraction, random_state=seed, stratify=labels
        )
        self.mlp = MLPClassifier((64,), alpha=1e-3, max_iter=1000, random_state=seed)
        with threadpool_limits(1):  # tiny matrices: BLAS threads only contend
            self.mlp.fit(x_train / 16.0, y_train)
        self.test_accuracy = float(self.mlp.score(x_test / 16.0, y_test))
        self.real_stats = gaussian_stats(self.hidden(x_train))
        self.holdout_fd = frechet_distance(*gaussian_stats(self.hidden(x_test)), *self.real_stats)
        self.train_size, self.test_size = len(y_train), len(y_test)

    def hidden(self, cells: Array) -> Array:
        """(N, 64) cell intensities in [0, 16] -> (N, 64) hidden ReLU activations."""
        out: Array = np.maximum(cells / 16.0 @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0.0)
        return out

    def predict(self, images: Tensor | Array) -> NDArray[np.int64]:
        return np.asarray(self.mlp.predict(downsample_to_digits(images) / 16.0), dtype=np.int64)

    def features(self, images: Tensor | Array) -> Array:
        return self.hidden(downsample_to_digits(images))


def score_samples(images: Tensor | Array, labels: Any, classifier: DigitsClassifier) -> dict[str, Any]:
    """Accuracy (overall and per class) and Fréchet distance of generated digits (N, 3, H, W)."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = classifier.predict(images)
    correct = predicted == labels
    per_class = {int(c): float(correct[labels == c].mean()) for c in np.unique(labels)}
    fd = frechet_distance(*gaussian_stats(classifier.features(images)), *classifier.real_stats)
    return {
        "accuracy": float(correct.mean()),
        "accuracy_per_class": per_class,
        "frechet_distance": fd,
        "num_samples": len(labels),
        "classifier_test_accuracy": classifier.test_accuracy,
        "frechet_distance_real_holdout": classifier.holdout_fd,
        "real_reference_size": classifier.train_size,
        "real_holdout_size": classifier.test_size,
    }


# ------------------------------------------------------------------------------ sampling
@torch.no_grad()
def generate(model: nn.Module, labels: Sequence[int] | Tensor, settings: SampleSettings, *,
             seed: int = 0, batch_size: int = 256, resolution: int = 32) -> Tensor:
    """Images (N, C, R, R) in [-1, 1] (float32, CPU) for `labels`, N = len(labels).

    The noise of all N images is drawn at once from a generator seeded by `seed`, so an image
    depends on its seed and position, not on `batch_size`."""
    from deco.optimized import sample

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
        x = sample(model, noise[start : start + batch_size].to(param.device, param.dtype),
                   y[start : start + batch_size].to(param.device), **settings.options())
        assert isinstance(x, Tensor)
        out.append(x.float().cpu())
    return torch.cat(out) if out else noise


# ------------------------------------------------------------------------------ spectrum
BANDS = 15  # diagonal bands u + v = 0..14 of an 8x8 DCT


def band_energy(x: Tensor) -> Array:
    """Fraction of the 8x8-block-DCT energy of x (B, C, H, W) in each diagonal band u + v.

    H and W are cropped to multiples of 8 (at least 8 each). The energy is summed over batch,
    channels and blocks and normalised to sum to 1, so spectra of different quantities compare."""
    from deco.optimized.frequency import dct_matrix

    b, c, h, w = x.shape
    if h < 8 or w < 8:
        raise ValueError(f"x: the 8x8 block DCT needs a map of at least 8x8, got {h}x{w}")
    h8, w8 = h - h % 8, w - w % 8
    blocks = x[:, :, :h8, :w8].double().reshape(b, c, h8 // 8, 8, w8 // 8, 8)
    m = dct_matrix(8)
    coeffs = torch.einsum("ui,bcyixj,vj->bcyxuv", m, blocks, m)
    energy = coeffs.square().sum(dim=(0, 1, 2, 3))  # (8, 8)
    u, v = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    bands = torch.zeros(BANDS, dtype=torch.float64).index_add_(0, (u + v).reshape(-1), energy.reshape(-1))
    total = float(bands.sum())
    return (bands / total).numpy() if total > 0 else bands.numpy()


def high_fraction(bands: Array, start: int = 8) -> float:
    """Energy fraction in the bands u + v >= start (the upper half of the diagonal)."""
    return float(np.sum(bands[start:]))


@torch.no_grad()
def model_spectra(model: nn.Module, x: Tensor, y: Tensor, times: Sequence[float],
                  seed: int) -> dict[str, Any]:
    """Band energies of the DiT output on the token grid ("semantic") and of the predicted
    velocity (pixels), at each time in `times`, on x_t = t x + (1 - t) noise.

    DiT output: the tokens after the last DiT block, laid out as (B, D, H/p, W/p), the same
    quantity for both architectures (DeCo's decoder reads silu(t_emb + tokens), the baseline's
    linear head reads the tokens; the pointwise silu would only blur the comparison)."""
    model.eval()
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    config: Any = model.config
    p = config.patch_size
    per_t: dict[str, dict[str, list[float]]] = {}
    sem_total = np.zeros(BANDS)
    vel_total = np.zeros(BANDS)
    for t in times:
        noise = torch.randn(x.shape, generator=gen)
        x_t = (t * x + (1.0 - t) * noise).to(param.device, param.dtype)
        tt = torch.full((x.shape[0],), float(t), device=param.device, dtype=param.dtype)
        yy = y.to(param.device)
        xc, tc, yc = model.check_inputs(x_t, tt, yy)  # type: ignore[operator]
        tokens = model.trunk(xc, tc, yc)[0]  # type: ignore[operator]
        semantic = tokens.view(x.shape[0], x.shape[2] // p, x.shape[3] // p, -1).permute(0, 3, 1, 2)
        velocity = model(x_t, tt, yy)
        sem, vel = band_energy(semantic.float().cpu()), band_energy(velocity.float().cpu())
        per_t[f"{t:g}"] = {"semantic": sem.tolist(), "velocity": vel.tolist()}
        sem_total += sem / len(times)
        vel_total += vel / len(times)
    return {
        "architecture": config.architecture,
        "semantic": sem_total.tolist(),
        "velocity": vel_total.tolist(),
        "semantic_high_fraction": high_fraction(sem_total),
        "velocity_high_fraction": high_fraction(vel_total),
        "per_time": per_t,
    }


def plot_spectra(results: dict[str, dict[str, Any]], target: Sequence[float], path: Path) -> None:
    """Two panels (DiT output, predicted velocity), one curve per model, log energy per band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    bands = np.arange(BANDS)
    for ax, key, title in ((axes[0], "semantic", "DiT output (token grid)"),
                           (axes[1], "velocity", "predicted velocity (pixels)")):
        for name, res in results.items():
            ax.semilogy(bands, np.maximum(res[key], 1e-12), marker="o", label=name)
        if key == "velocity":
            ax.semilogy(bands, np.maximum(target, 1e-12), "k--", label="target velocity")
        ax.set_title(title)
        finish_axis(ax, "8x8 DCT band u + v (low → high frequency)", "fraction of energy")
    save_figure(fig, path)


def spectrum_inputs(count: int, resolution: int, seed: int) -> tuple[Tensor, Tensor]:
    """`count` real digits (a seeded random subset, all classes) at `resolution`."""
    raw, labels = load_digits_arrays()
    order = np.random.default_rng(seed).permutation(len(labels))[:count]
    return upsample_digits(raw[order], resolution), torch.as_tensor(labels[order])


def class_labels(num_classes: int, per_class: int) -> list[int]:
    """[0]*per_class + [1]*per_class + ...: rows of a grid, one per class."""
    return [c for c in range(num_classes) for _ in range(per_class)]


def digits_compatible(config: Any) -> None:
    """Evaluation on the digits needs a 10-class model (3 channels)."""
    if config.num_classes != DIGITS_CLASSES or config.in_channels != 3:
        raise ValueError(
            f"CKPT: evaluation on the built-in digits needs a 10-class RGB model, got "
            f"num_classes={config.num_classes}, in_channels={config.in_channels}"
        )


# ------------------------------------------------------------------------------ loading
@dataclass
class Loaded:
    """A model ready to sample, with what its run says about sampling (if it came from a run)."""

    model: DiffusionTransformer
    sample: SampleSettings | None
    resolution: int
    source: str
    run: dict[str, Any] | None = None  # the run's settings, for a run folder or training checkpoint


def load_for_sampling(path: Path, device: torch.device, text: bool = False) -> Loaded:
    """The EMA model of a run folder or training checkpoint, or a `.safetensors` / release `.ckpt`
    model (`deco.optimized.load_model`); text: whether a text-to-image model is accepted."""
    from deco.optimized import build_model, load_model

    from .checkpoint import find_checkpoint, is_checkpoint, load_checkpoint
    from .config import DeCoConfig

    path = Path(path)
    file = find_checkpoint(path)
    if is_checkpoint(file):
        state = load_checkpoint(file, only="trainer/ema")
        config = DeCoConfig.from_dict(state["config"])
        with torch.device("meta"):
            model = build_model(config)
        model.load_state_dict(state["trainer"]["ema"], strict=True, assign=True)
        run = state["run"]
        sample = run.get("sample")
        settings = None if sample is None else SampleSettings.from_dict(sample)
        loaded = Loaded(model.to(device).eval(), settings, int(run["resolution"]), str(file), run)
    else:
        model = load_model(file, device=device)
        loaded = Loaded(model, None, 32 if model.config.patch_size <= 8 else 256, str(file))
    if loaded.model.config.is_text and not text:
        raise ValueError(f"checkpoint: {file} holds a text-to-image model; this command takes "
                         f"class-conditional ones (deco sample and deco evaluate take text models)")
    return loaded


def spectrum_report(models: dict[str, Loaded], *, data: Path | None, resolution: int | None,
                    count: int, times: Sequence[float], seed: int, out: Path) -> dict[str, Any]:
    """Spectra of each model on the same noisy images; writes out/spectrum.png and .json."""
    from .data import ImageFolderDataset

    first = next(iter(models.values()))
    res = resolution or first.resolution
    for name, loaded in models.items():
        p = loaded.model.config.patch_size
        if res % p or res // p < 8:
            raise ValueError(f"--resolution: {res} px gives a {res // p}x{res // p} token grid for {name} "
                             f"(patch {p}); the 8x8 DCT needs a multiple of the patch of at least 8 tokens")
    if data is None:
        x, y = spectrum_inputs(count, res, seed)
    else:
        folder = ImageFolderDataset(data, res)
        order = np.random.default_rng(seed).permutation(len(folder))[:count]
        items = [folder[int(i)] for i in order]
        x, y = torch.stack([im for im, _ in items]), torch.as_tensor([lab for _, lab in items])
    for name, loaded in models.items():
        k = loaded.model.config.num_classes
        if int(y.max()) >= k:
            raise ValueError(f"{name}: the images have classes up to {int(y.max())}, the model only {k}")
    results = {}
    for name, loaded in models.items():
        results[name] = {**model_spectra(loaded.model, x, y, times, seed), "source": loaded.source}
    gen = torch.Generator().manual_seed(seed)
    target = np.mean([band_energy(x - torch.randn(x.shape, generator=gen)) for _ in times], axis=0)
    report = {"bands": "u+v of the 8x8 DCT, 0..14", "times": list(times), "count": len(y),
              "resolution": res, "data": "built-in digits" if data is None else str(data),
              "target_velocity": target.tolist(), "models": results}
    labels = {f"{name} ({r['architecture']})": r for name, r in results.items()}
    plot_spectra(labels, target.tolist(), out / "spectrum.png")
    write_json(out / "spectrum.json", report)
    return report
