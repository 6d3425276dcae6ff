"""Training data: the built-in digits dataset and ImageNet-style image folders.

Both datasets return images as float32 (3, H, W) tensors in [-1, 1] and integer class labels.
The data order is part of the training state (so that `--resume` replays the exact batches an
uninterrupted run would have seen): `BatchStream` draws each epoch's permutation from
`DistributedSampler(seed=seed, epoch=epoch)` and the random flips from a generator seeded by
(seed, epoch), so a position (epoch, batch) fully determines every batch that follows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

#: File endings read from an image folder (compared lower-case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Side of the built-in digits images after upsampling (the 8x8 originals).
DIGITS_RESOLUTION = 32
DIGITS_CLASSES = 10


class UnreadableImageError(ValueError):
    """An image file of `--data` that PIL cannot decode; the message names the path."""


# ------------------------------------------------------------------------------ digits
def load_digits_arrays() -> tuple[np.ndarray[Any, np.dtype[np.float64]], np.ndarray[Any, np.dtype[np.int64]]]:
    """scikit-learn's handwritten digits: (1797, 8, 8) intensities in [0, 16] and labels 0..9.

    The data ship with scikit-learn (no download)."""
    from sklearn.datasets import load_digits  # here: importing scikit-learn takes seconds

    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


def upsample_digits(images: np.ndarray[Any, Any], resolution: int = DIGITS_RESOLUTION) -> Tensor:
    """(N, 8, 8) intensities in [0, 16] -> (N, 3, R, R) float32 in [-1, 1].

    Bicubic upsampling (antialias off: it only matters when shrinking) makes smooth strokes; it
    overshoots slightly at edges, so the result is clamped back into [-1, 1]. Gray is repeated
    over three channels because the model (and the frequency loss's YCbCr) expects RGB."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 8.0 - 1.0)[:, None]
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return x.clamp(-1.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def downsample_to_digits(images: Tensor | np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    """(N, 3, R, R) images in [-1, 1] (R a multiple of 8) -> (N, 64) gray 8x8 intensities in [0, 16].

    Channel mean, then the average over each (R/8 x R/8) cell: the inverse direction of
    `upsample_digits`, used to put generated images in the classifier's input space."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float64))
    if x.ndim != 4 or x.shape[2] % 8 or x.shape[3] % 8:
        raise ValueError(f"images: expected (N, C, H, W) with H, W multiples of 8, got {tuple(x.shape)}")
    gray = x.mean(dim=1, keepdim=True)
    small = F.adaptive_avg_pool2d(gray, (8, 8))
    return ((small.reshape(x.shape[0], 64).numpy() + 1.0) * 8.0).clip(0.0, 16.0)


class DigitsDataset(Dataset[tuple[Tensor, int]]):
    """The built-in dataset: 1797 digits upsampled to 32x32, 3 channels, [-1, 1], 10 classes."""

    num_classes = DIGITS_CLASSES
    resolution = DIGITS_RESOLUTION
    flip = False  # a mirrored digit is a different glyph

    def __init__(self) -> None:
        raw, labels = load_digits_arrays()
        self.images = upsample_digits(raw)
        self.labels = torch.as_tensor(labels)
        self.description = f"built-in digits ({len(self.labels)} images, 10 classes, 32x32)"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, int]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        image = self.images[index]
        return (image.flip(-1) if flip else image), int(self.labels[index])

    def batch(self, indices: Sequence[int], flips: Sequence[bool]) -> tuple[Tensor, Tensor]:
        """Gather a batch directly (in memory: no DataLoader needed)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self.images[idx]
        if any(flips):
            mask = torch.as_tensor(list(flips), dtype=torch.bool)
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx]


# ------------------------------------------------------------------------------ folders
def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's centre crop: halve with BOX filtering while the short side is >= 2x the target, then
    resize BICUBIC so the short side equals the target, then crop the centre square.

    The BOX halvings are a cheap anti-aliasing for large downscales (bicubic alone would alias)."""
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return Image.fromarray(arr[top : top + resolution, left : left + resolution])


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def scan_image_folder(root: str | Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(files with their class index, class names) of a folder with one sub-folder per class.

    Classes are the sub-folder names in sorted order (ImageNet's train layout). A missing or
    empty folder, a folder without sub-folders or a class without images is a ValueError naming
    `--data`."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--data: no such folder: {root}")
    if not root.is_dir():
        raise ValueError(f"--data: {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"--data: {root} has no class sub-folders (expected one sub-folder of images per class)"
        )
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(f"--data: class folder {root / name} contains no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        samples.extend((f, label) for f in files)
    return samples, classes


class ImageFolderDataset(Dataset[tuple[Tensor, int]]):
    """An ImageNet-style folder: ADM centre crop to `resolution`, optional horizontal flip (the
    flip decision comes with the index, from `BatchStream`, so it is reproducible)."""

    flip = True

    def __init__(self, root: str | Path, resolution: int) -> None:
        if not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"--resolution: expected a positive int, got {resolution!r}")
        self.samples, self.classes = scan_image_folder(root)
        self.num_classes = len(self.classes)
        self.resolution = resolution
        self.description = (f"{root} ({len(self.samples)} images, {self.num_classes} classes, "
                            f"{resolution}x{resolution})")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Tensor:
        path, _ = self.samples[index]
        try:
            with Image.open(path) as img:
                img.load()
                image = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise UnreadableImageError(f"--data: unreadable image {path} ({exc})") from None
        return to_tensor(center_crop(image, self.resolution))

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, int]:
        index, flip = key if isinstance(key, tuple) else (key, False)
        image = self.load(index)
        return (image.flip(-1) if flip else image), self.samples[index][1]


class CaptionItems(Dataset[tuple[Tensor, Any]]):
    """A map-style dataset of (image, caption) pairs (e.g. `deco.text.captions.CaptionFolderDataset`)
    as `BatchStream` reads it: keys (index, flip) with no flips (a caption may say "left"), no
    classes."""

    flip = False
    num_classes = 0

    def __init__(self, items: Any) -> None:
        self.items = items
        self.resolution: int = items.resolution
        self.description: str = items.description

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, bool] | int) -> tuple[Tensor, Any]:
        index = key[0] if isinstance(key, tuple) else key
        item: tuple[Tensor, Any] = self.items[index]
        return item


TrainDataset = DigitsDataset | ImageFolderDataset | CaptionItems


# ------------------------------------------------------------------------------ batches
@dataclass
class Position:
    """Where the data stream stands: the next batch is batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0


class BatchStream:
    """An endless, resumable stream of this rank's batches.

    Each epoch, `DistributedSampler` (with `seed`) permutes the dataset and gives this rank its
    shard; batches are consecutive slices of `batch_size` from the shard and an incomplete last
    batch is dropped. Flips are drawn per epoch from a generator seeded by (seed, epoch), over
    the whole permutation, so every rank sees the flips a single process would. With world size
    1 this is a plain shuffled epoch loop.
    """

    def __init__(self, dataset: TrainDataset, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"--batch-size: expected a positive int, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        # From the global batch, not the shard: DistributedSampler pads the shards to equal
        # length, which could add a batch; this way every world size has the same epochs.
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"--batch-size: {batch_size * world_size} (global) is larger than the dataset "
                f"({len(dataset)} images)"
            )
        self.position = Position()

    def epoch_keys(self, epoch: int) -> list[tuple[int, bool]]:
        """This rank's (index, flip) list for `epoch`, in order."""
        self.sampler.set_epoch(epoch)
        indices = list(self.sampler)
        if not self.dataset.flip:
            return [(i, False) for i in indices]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        flips = torch.rand(len(self.dataset), generator=gen) < 0.5
        return [(i, bool(flips[i])) for i in indices]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from `self.position` on, forever; `self.position` always names the next one."""
        while True:
            pos, n = self.position, self.batches_per_epoch
            keys = self.epoch_keys(pos.epoch)[pos.batch * self.batch_size : n * self.batch_size]
            for i, batch in enumerate(self._batches(keys), start=pos.batch + 1):
                self.position = Position(pos.epoch, i) if i < n else Position(pos.epoch + 1, 0)
                yield batch
            if self.position == pos:  # loaded at the very end of an epoch
                self.position = Position(pos.epoch + 1, 0)

    def _batches(self, keys: list[tuple[int, bool]]) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(self.dataset, DigitsDataset):
            for start in range(0, len(keys), self.batch_size):
                chunk = keys[start : start + self.batch_size]
                yield self.dataset.batch([k[0] for k in chunk], [k[1] for k in chunk])
            return
        loader: DataLoader[tuple[Tensor, int]] = DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=keys,
            num_workers=self.num_workers, drop_last=True, persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        try:
            yield from loader
        except UnreadableImageError as exc:
            # From a worker process it arrives re-raised with the worker's traceback in the
            # message; keep the last line, ours ("--data: unreadable image PATH (...)").
            last = str(exc).strip().splitlines()[-1]
            if last == str(exc):
                raise
            raise UnreadableImageError(last.split("UnreadableImageError: ", 1)[-1]) from None

    def state(self) -> dict[str, int]:
        return {"epoch": self.position.epoch, "batch": self.position.batch}

    def load_state(self, state: dict[str, Any]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"checkpoint: invalid data position epoch={epoch} batch={batch}")
        self.position = Position(epoch, batch)


def open_dataset(data: str | Path | None, resolution: int | None) -> TrainDataset:
    """The built-in digits (`data` None) or an image folder at `resolution` (default 256)."""
    if data is None:
        if resolution not in (None, DIGITS_RESOLUTION):
            raise ValueError(f"--resolution: the built-in digits are {DIGITS_RESOLUTION}x"
                             f"{DIGITS_RESOLUTION}, got {resolution}")
        return DigitsDataset()
    return ImageFolderDataset(data, 256 if resolution is None else resolution)

