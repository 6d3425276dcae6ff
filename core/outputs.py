"""What the commands write: sample grids and files, JSON, loss curves (all written atomically).

Images arrive as (N, C, H, W) tensors in [-1, 1] and are stored as uint8 NHWC, the layout of
ADM's sample batches and FID tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor

from deco.atomic import atomic_write
from deco.output_policy import image_format, sample_output, write_folder
from deco.paths_inside import resolve_inside
from deco.untrusted import UntrustedFileError, parse_json, read_json


def to_uint8(images: Tensor) -> NDArray[np.uint8]:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, as ADM's FID tools expect."""
    x = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return np.ascontiguousarray(x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def grid_image(images: NDArray[np.uint8], columns: int, pad: int = 2) -> NDArray[np.uint8]:
    """(N, H, W, C) uint8 -> one (rows·(H+pad)+pad, columns·(W+pad)+pad, C) image, row-major."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_png(array: NDArray[np.uint8], path: Path, format: str = "PNG") -> None:
    """Write an (H, W, C) uint8 image; `format` a Pillow format name (PNG, JPEG, ...)."""
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    options = {"quality": 95} if format == "JPEG" else {}
    atomic_write(path, lambda tmp: image.save(tmp, format=format, **options))


def save_samples(images: Tensor, labels: Sequence[int], out: Path, columns: int) -> str:
    """Write samples as an image grid (an image suffix Pillow writes: .png, .jpg, ...), an
    ADM-style `.npz` (uint8 NHWC `arr_0`, labels in `arr_1`) or a folder of PNGs (a path without
    a suffix), replacing `out` atomically (the caller applies deco.output_policy's rule first).
    Returns a description of what was written."""
    arrays = to_uint8(images)
    kind = sample_output(out, force=True)
    if kind == "image":
        save_png(grid_image(arrays, columns), out, image_format(out) or "PNG")
        return f"a {len(arrays)}-image grid {out}"
    if kind == "npz":
        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arrays, arr_1=np.asarray(labels, dtype=np.int64))

        atomic_write(out, write_npz)
        return f"{out} (arr_0 {arrays.shape} uint8)"

    def fill(folder: Path) -> None:
        for i, (image, label) in enumerate(zip(arrays, labels, strict=True)):
            save_png(image, folder / f"{i:06d}_class{int(label)}.png")

    write_folder(out, fill)
    return f"{len(arrays)} PNGs in {out}/"


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))



def metrics_in_run(folder: Path) -> Path:
    """FOLDER/metrics.json, into which `deco evaluate` merges its section. Its earlier content is
    copied into the new file, so a link out of the run folder is refused (deco.paths_inside)."""
    return resolve_inside(folder, "metrics.json", what=f"evaluate: the run folder {folder}")


def merge_json(path: Path, update: dict[str, Any]) -> None:
    """Write `update`'s keys into the JSON object at `path` (created if absent)."""
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = read_json(path)
        except (OSError, UntrustedFileError):  # unreadable: replaced, like a missing file
            loaded = None
        if isinstance(loaded, dict):
            data = loaded
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out: folder {path.parent} does not exist")
    write_json(path, {**data, **update})




def plot_loss(records: list[dict[str, float]], path: Path) -> None:
    """Loss terms against step (log scale), raw and smoothed."""
    import matplotlib  # here: importing matplotlib takes 1-2 s

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # here: importing matplotlib takes 1-2 s

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    steps = np.array([r["step"] for r in records])
    for key, colour in (("loss", "C0"), ("fm", "C1"), ("freq", "C2"), ("repa", "C3")):
        values = np.array([r.get(key, np.nan) for r in records], dtype=np.float64)
        if len(values) == 0 or not np.any(values > 0):
            continue
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        width = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(width) / width, mode="valid")
        ax.plot(steps[width - 1 :], smooth, color=colour, label=key)
    ax.set_yscale("log")
    finish_axis(ax, "step", "loss")
    save_figure(fig, path)


def finish_axis(ax: Any, xlabel: str, ylabel: str) -> None:
    """The house style of a plot's axis: labels, a light grid, a legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt  # here: importing matplotlib takes 1-2 s

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ----------------------------------------------------------------------------- logs
def read_log(path: Path, up_to_step: int | None = None) -> list[dict[str, float]]:
    """The records of log.jsonl (step <= up_to_step); a torn last line (killed run) is skipped.
    Any other line that is not a JSON object with an int `step` and finite numbers is a
    ValueError naming the file and line: the records are plotted and written back."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = parse_json(line, f"{path} line {number}")
        except UntrustedFileError:
            if number == len(lines):
                continue  # torn by a kill
            raise
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values()):
            raise UntrustedFileError(f"{path} line {number}: expected a log record (an int step and "
                                     f"numbers), got {line[:80]!r}")
        if up_to_step is None or step <= up_to_step:
            records.append(record)
    return records


def write_log(path: Path, records: list[dict[str, float]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
