"""Caption datasets for the text-to-image model: (image (3, R, R) in [-1, 1], caption str) items.

Two layouts, those of the release:

* a caption folder (fine-tuning): every image `x.jpg` has its caption in `x.txt` beside it, at any
  depth below the root; items in sorted path order;
* WebDataset shards (pre-training): `.tar` (or `.tar.gz`) files of `key.jpg` + `key.txt` pairs, read with the
  `webdataset` package and split shard-wise over ranks (rank, world_size) and data-loader
  workers, so that every sample is read by exactly one (rank, worker).

Both use the ADM centre crop of the class-conditional image folders (`deco.data.center_crop`).
Captions are kept verbatim (as the release reads them, a trailing newline included); a caption
that is empty or only white space is an error, as is an image without a caption or a corrupt
shard: one line naming the file. The release's random caption prefixes ("A photo of ", ...)
are a training augmentation and not applied here.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from deco.data import IMAGE_SUFFIXES, center_crop, to_tensor
from deco.untrusted import UntrustedFileError, check_tar

#: Extensions of a WebDataset sample's image member, in order of preference.
SHARD_IMAGE_KEYS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
IMAGE_KEYS_TEXT = ", ".join(SHARD_IMAGE_KEYS)
#: File endings of WebDataset shards (the release globs .tar and .tar.gz).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Extension of the caption member of a WebDataset sample.
SHARD_CAPTION_KEY = "txt"
#: Largest caption file or member: a caption is a sentence or a paragraph (the text encoder keeps
#: its first T tokens); a larger one is refused before it is read.
MAX_CAPTION_BYTES = 1 << 20


class CaptionDataError(ValueError):
    """Bad caption data (missing or empty caption, unreadable image, corrupt shard); the message
    names the file."""


def decode_caption(data: bytes, where: str) -> str:
    """UTF-8 caption text, verbatim; empty or undecodable text is a CaptionDataError naming `where`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionDataError(f"data: caption {where} is not UTF-8 ({exc.reason})") from None
    if not text.strip():
        raise CaptionDataError(f"data: caption {where} is empty")
    return text


def read_caption(path: Path) -> bytes:
    """The bytes of a caption file, at most MAX_CAPTION_BYTES (checked before reading)."""
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise CaptionDataError(f"data: caption {path} has {size} bytes, more than the limit of "
                               f"{MAX_CAPTION_BYTES}")
    return path.read_bytes()


def decode_image(data: bytes | Path, resolution: int, where: str) -> Tensor:
    """Image bytes or file -> ADM centre crop -> float32 (3, R, R) in [-1, 1]."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            image = img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CaptionDataError(f"data: unreadable image {where} ({exc})") from None
    return to_tensor(center_crop(image, resolution))


def check_resolution(resolution: int) -> int:
    """`resolution` if it is a positive int, else a ValueError naming it."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected a positive int, got {resolution!r}")
    return resolution


# ------------------------------------------------------------------------------ caption folder
def scan_caption_folder(root: str | Path) -> list[tuple[Path, Path]]:
    """(image, caption file) pairs below `root`, sorted by path; an image without its `.txt` is
    a CaptionDataError naming the image."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data: no such folder: {root}")
    if not root.is_dir():
        raise ValueError(f"data: {root} is not a folder")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise ValueError(f"data: {root} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise CaptionDataError(f"data: image {image} has no caption file {caption.name} beside it")
        pairs.append((image, caption))
    return pairs


class CaptionFolderDataset(Dataset[tuple[Tensor, str]]):
    """A folder of images, each with a caption file beside it (`x.jpg` + `x.txt`).

    The captions are read (and checked) when the dataset is opened, the images on access."""

    def __init__(self, root: str | Path, resolution: int) -> None:
        self.resolution = check_resolution(resolution)
        self.pairs = scan_caption_folder(root)
        self.captions = [decode_caption(read_caption(c), str(c)) for _, c in self.pairs]
        self.description = f"{root} ({len(self.pairs)} captioned images, {resolution}x{resolution})"

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        image = self.pairs[index][0]
        return decode_image(image, self.resolution, str(image)), self.captions[index]

    def iter_captions(self) -> Iterator[str]:
        """The captions in dataset order (without decoding any image)."""
        return iter(self.captions)


# ------------------------------------------------------------------------------ webdataset
def list_shards(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shards of a folder (recursively, sorted), a single shard file, or a list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data: no such file or folder: {path}")
        shards = find_shards(path) if path.is_dir() else [path]
        if not shards:
            raise ValueError(f"data: {path} contains no shards ({', '.join(SHARD_SUFFIXES)})")
        return shards
    shards = [Path(s) for s in source]
    if not shards:
        raise ValueError("data: expected at least one shard, got an empty list")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"data: no such shard: {missing[0]}")
    return shards


def find_shards(folder: Path) -> list[Path]:
    """The shard files below `folder`, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES))


def read_shard(shard: Path, members: tuple[str, ...] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard (webdataset's grouping of members by key), each checked to
    have a caption; `members` restricts which extensions are read. A tar error is a
    CaptionDataError naming the shard."""
    from webdataset import tariterators  # here: webdataset is an optional extra (text)

    def select(name: str) -> bool:
        return members is None or name.rsplit(".", 1)[-1].lower() in members

    try:  # member sizes from their headers, before webdataset reads each one whole
        check_tar(shard, f"data: corrupt shard {shard}", max_by_suffix={SHARD_CAPTION_KEY: MAX_CAPTION_BYTES})
    except UntrustedFileError as exc:
        raise CaptionDataError(str(exc)) from None
    samples = tariterators.tarfile_samples(iter([{"url": str(shard)}]), select_files=select)
    try:
        for sample in samples:
            sample = {k.lower() if not k.startswith("__") else k: v for k, v in sample.items()}
            if SHARD_CAPTION_KEY not in sample:
                key = sample["__key__"]
                raise CaptionDataError(f"data: sample {key} in shard {shard} has no caption "
                                       f"({key}.{SHARD_CAPTION_KEY})")
            yield sample
    except CaptionDataError:
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, OSError, ...: all mean a bad shard
        reason = f"{type(exc).__name__}: {tar_reason(exc)}"
        raise CaptionDataError(f"data: corrupt shard {shard} ({reason})") from None


def tar_reason(exc: Exception) -> str:
    """The reason of a tar error, without the stream and url webdataset appends to its args."""
    reason = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return reason.split(" @ <", 1)[0]


def split_shards(shards: Sequence[Path], rank: int, world_size: int, worker: int,
                 workers: int) -> list[Path]:
    """The shards of data-loader worker `worker` (of `workers`) on rank `rank` (of `world_size`):
    every `world_size`-th shard from `rank` on goes to the rank, and the rank's shards are dealt
    out to its workers the same way. Disjoint and covering; every rank has a shard when there
    are at least `world_size` of them (even with more workers than shards)."""
    return list(shards[rank::world_size][worker::workers])


class WebDatasetCaptions(IterableDataset[tuple[Tensor, str]]):
    """WebDataset tar shards of image/caption pairs, split over ranks and data-loader workers.

    Shards are dealt out (in sorted order) to the ranks, then each rank's to its data-loader
    workers (`split_shards`), so the (rank, worker) pairs together read every sample exactly
    once. Each rank needs at least one shard; a worker without one yields nothing."""

    def __init__(self, source: str | Path | Sequence[str | Path], resolution: int, *,
                 rank: int = 0, world_size: int = 1) -> None:
        self.resolution = check_resolution(resolution)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
        self.shards = list_shards(source)
        if len(self.shards) < world_size:
            raise ValueError(f"data: {len(self.shards)} shards cannot be split over {world_size} ranks "
                             "(every rank needs at least one)")
        self.rank, self.world_size = rank, world_size
        self.description = f"{source} ({len(self.shards)} WebDataset shards, {resolution}x{resolution})"

    def my_shards(self) -> list[Path]:
        """The shards this (rank, data-loader worker) reads."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return split_shards(self.shards, self.rank, self.world_size, worker, workers)

    def __iter__(self) -> Iterator[tuple[Tensor, str]]:
        for shard in self.my_shards():
            for sample in read_shard(shard):
                key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
                where = f"{sample['__key__']} in shard {shard}"
                if key is None:
                    raise CaptionDataError(f"data: sample {where} has no image ({IMAGE_KEYS_TEXT})")
                caption = decode_caption(sample[SHARD_CAPTION_KEY], where)
                yield decode_image(sample[key], self.resolution, where), caption

    def iter_captions(self) -> Iterator[str]:
        """All captions of all shards, in shard order (for every rank; no image is decoded)."""
        for shard in self.shards:
            for sample in read_shard(shard, members=(*SHARD_IMAGE_KEYS, SHARD_CAPTION_KEY)):
                where = f"{sample['__key__']} in shard {shard}"
                if not any(k in sample for k in SHARD_IMAGE_KEYS):
                    raise CaptionDataError(f"data: sample {where} has no image ({IMAGE_KEYS_TEXT})")
                yield decode_caption(sample[SHARD_CAPTION_KEY], where)


CaptionDataset = CaptionFolderDataset | WebDatasetCaptions


def open_caption_dataset(source: str | Path, resolution: int, *, rank: int = 0,
                         world_size: int = 1) -> CaptionDataset:
    """WebDataset shards when `source` is a shard file or a folder holding shards, else a
    caption folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or folder: {path}")
    if path.is_file() or find_shards(path):
        return WebDatasetCaptions(path, resolution, rank=rank, world_size=world_size)
    return CaptionFolderDataset(path, resolution)
