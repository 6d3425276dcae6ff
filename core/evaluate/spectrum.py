"""Frequency spectra of a model's outputs (`deco spectrum`, the paper's Fig. 4): the 8x8-block-DCT
energy per diagonal band of the DiT output on the token grid and of the predicted velocity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from deco.data import ImageFolderDataset, load_digits_arrays, upsample_digits
from deco.generate import Loaded
from deco.optimized.frequency import dct_matrix
from deco.outputs import finish_axis, save_figure, write_json

Array = NDArray[np.float64]


BANDS = 15  # diagonal bands u + v = 0..14 of an 8x8 DCT


def band_energy(x: Tensor) -> Array:
    """Fraction of the 8x8-block-DCT energy of x (B, C, H, W) in each diagonal band u + v.

    H and W are cropped to multiples of 8 (at least 8 each). The energy is summed over batch,
    channels and blocks and normalised to sum to 1, so spectra of different quantities compare."""
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
    import matplotlib  # here: importing matplotlib takes 1-2 s, paid only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: importing matplotlib takes 1-2 s

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


def spectrum_report(models: dict[str, Loaded], *, data: Path | None, resolution: int | None,
                    count: int, times: Sequence[float], seed: int, out: Path) -> dict[str, Any]:
    """Spectra of each model on the same noisy images; writes out/spectrum.png and .json."""
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
