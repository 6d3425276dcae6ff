"""Training data: the built-in digits, image folders (ADM centre crop, flips, errors), and the
resumable, shardable batch stream.

Oracles: scikit-learn's raw digits, images built with known content, and the single-process
stream that the sharded streams must partition exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco.data import (
    BatchStream,
    DigitsDataset,
    ImageFolderDataset,
    Position,
    UnreadableImageError,
    center_crop,
    downsample_to_digits,
    load_digits_arrays,
    open_dataset,
    scan_image_folder,
    upsample_digits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> DigitsDataset:
    return DigitsDataset()


# ----------------------------------------------------------------------------- digits
def test_digits_are_sklearns_digits_upsampled(digits: DigitsDataset) -> None:
    raw, labels = load_digits_arrays()
    assert raw.shape == (1797, 8, 8) and set(labels.tolist()) == set(range(10))
    assert digits.images.shape == (1797, 3, 32, 32) and digits.images.dtype == torch.float32
    assert float(digits.images.min()) == -1.0 and float(digits.images.max()) == 1.0
    assert torch.equal(digits.images[:, 0], digits.images[:, 2])  # gray repeated
    assert torch.equal(digits.labels, torch.as_tensor(labels))
    # 4x4 cell means of the upsampled image recover the 8x8 original (intensities 0..16).
    back = downsample_to_digits(digits.images).reshape(-1, 8, 8)
    assert np.abs(back - raw).mean() < 1.0
    assert np.corrcoef(back.ravel(), raw.ravel())[0, 1] > 0.97


def test_upsampling_maps_the_intensity_range_onto_minus_one_to_one() -> None:
    x = upsample_digits(np.stack([np.zeros((8, 8)), np.full((8, 8), 16.0), np.full((8, 8), 8.0)]))
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))
    assert torch.allclose(x[2], torch.tensor(0.0), atol=1e-6)


def test_open_dataset_rejects_a_resolution_for_the_digits() -> None:
    with pytest.raises(ValueError, match="--resolution"):
        open_dataset(None, 64)


# ----------------------------------------------------------------------------- folders
def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_center_crop_keeps_the_middle_of_a_wide_image() -> None:
    """An 800x200 image, red | green | blue bands at x < 200, 200..600, >= 600: the centre crop
    (x in 300..500) is all green, with a margin of 4 output pixels for the bicubic's ringing."""
    arr = np.zeros((200, 800, 3), np.uint8)
    arr[:, :200, 0] = 255
    arr[:, 200:600, 1] = 255
    arr[:, 600:, 2] = 255
    out = np.asarray(center_crop(Image.fromarray(arr), 32))
    assert out.shape == (32, 32, 3)
    assert (out[..., 1] > 250).all() and (out[..., [0, 2]] < 5).all()


def test_center_crop_of_an_image_at_the_target_size_is_the_identity() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (48, 48, 3)).astype(np.uint8)
    assert np.array_equal(np.asarray(center_crop(Image.fromarray(arr), 48)), arr)


def test_center_crop_box_halves_first() -> None:
    """A 4x downscale of a fine checkerboard: ADM's BOX halvings average it to flat gray, where
    a direct bicubic resize would alias. (1-pixel checkerboard: any 2x2 box is exactly 127.5.)"""
    board = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = np.asarray(center_crop(Image.fromarray(board).convert("RGB"), 64)).astype(float)
    assert out.shape == (64, 64, 3) and np.abs(out - 127.5).max() <= 1.0


def test_image_folder_classes_sorted_and_images_in_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("b_cat", 2), ("a_dog", 3)):
        for i in range(n):
            _save(tmp_path / cls / f"{i}.png", rng.integers(0, 256, (40, 50, 3)))
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, 16)
    assert ds.classes == ["a_dog", "b_cat"] and len(ds) == 5 and ds.num_classes == 2
    x, y = ds[(4, False)]
    assert x.shape == (3, 16, 16) and y == 1 and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    flipped, _ = ds[(4, True)]
    assert torch.equal(flipped, x.flip(-1))


def test_grayscale_and_rgba_images_become_rgb(tmp_path: Path) -> None:
    _save(tmp_path / "c" / "g.png", np.full((20, 20), 255))
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(tmp_path / "c" / "a.png")
    ds = ImageFolderDataset(tmp_path, 8)
    assert torch.allclose(ds[1][0], torch.ones(3, 8, 8))  # g.png (sorted after a.png)
    assert torch.allclose(ds[0][0][2], torch.ones(8, 8)) and torch.allclose(ds[0][0][0], -torch.ones(8, 8))


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("empty", "no class sub-folders"),
    ("files_only", "no class sub-folders"),
    ("empty_class", "contains no images"),
    ("a_file", "is not a folder"),
])
def test_malformed_folders_are_reported(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir() if layout != "a_file" else root.write_text("x")
    if layout == "files_only":
        _save(root / "x.png", np.zeros((4, 4, 3)))
    if layout == "empty_class":
        _save(root / "ok" / "x.png", np.zeros((4, 4, 3)))
        (root / "nothing").mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        scan_image_folder(root)
    assert "--data" in str(info.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_reported_by_path(tmp_path: Path, workers: int) -> None:
    for i in range(4):
        _save(tmp_path / "c" / f"{i}.png", np.zeros((8, 8, 3)))
    bad = tmp_path / "c" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    stream = BatchStream(ImageFolderDataset(tmp_path, 8), 4, seed=0, num_workers=workers)
    with pytest.raises(UnreadableImageError, match="unreadable image") as info:
        next(iter(stream))
    message = str(info.value)
    assert str(bad) in message and "\n" not in message


# ----------------------------------------------------------------------------- batch stream
def _take(stream: BatchStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_an_epoch_visits_every_image_once(digits: DigitsDataset) -> None:
    stream = BatchStream(digits, 100, seed=0)
    assert stream.batches_per_epoch == 17
    keys = stream.epoch_keys(0)
    assert sorted(i for i, _ in keys) == list(range(1797))  # a permutation of the dataset
    batches = _take(stream, 17)
    used = [i for i, _ in keys[:1700]]  # the 97 left over are dropped
    assert torch.equal(torch.cat([x for x, _ in batches]), digits.images[used])
    assert torch.equal(torch.cat([y for _, y in batches]), digits.labels[used])
    assert stream.position == Position(1, 0)


def test_epochs_are_reshuffled_and_seeds_reproduce(digits: DigitsDataset) -> None:
    a = BatchStream(digits, 64, seed=1).epoch_keys(0)
    assert a == BatchStream(digits, 64, seed=1).epoch_keys(0)
    assert a != BatchStream(digits, 64, seed=1).epoch_keys(1)
    assert a != BatchStream(digits, 64, seed=2).epoch_keys(0)


def test_stream_resumes_from_its_position(digits: DigitsDataset) -> None:
    """Position (epoch, batch) after 30 batches (past an epoch end) -> the same next batches."""
    straight = BatchStream(digits, 64, seed=3)
    first = _take(straight, 30)
    assert straight.position == Position(1, 30 - 28)
    resumed = BatchStream(digits, 64, seed=3)
    resumed.load_state({"epoch": 1, "batch": 2})
    following = _take(straight, 5)
    again = _take(resumed, 5)
    for (xa, ya), (xb, yb) in zip(following, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(first[0][0], following[0][0])


@pytest.mark.parametrize("world", [2, 3])
def test_shards_partition_the_single_process_batch(digits: DigitsDataset, world: int) -> None:
    """Rank r's batch k is exactly elements r, r + W, r + 2W, ... of the one-process batch k of
    W times the size (what makes DDP equal to one process); flips included."""
    local = 8
    single = BatchStream(digits, local * world, seed=5)
    ranks = [BatchStream(digits, local, seed=5, rank=r, world_size=world) for r in range(world)]
    keys = single.epoch_keys(0)
    for r, stream in enumerate(ranks):
        assert stream.epoch_keys(0)[: 10 * local] == keys[r :: world][: 10 * local]
    shards = [_take(stream, 3) for stream in ranks]
    for k, (x, y) in enumerate(_take(single, 3)):
        for r in range(world):
            xr, yr = shards[r][k]
            assert torch.equal(xr, x[r::world]) and torch.equal(yr, y[r::world])


def test_flips_come_with_the_index_and_are_reproducible(tmp_path: Path) -> None:
    for i in range(8):
        _save(tmp_path / "c" / f"{i}.png", np.random.default_rng(i).integers(0, 256, (8, 8, 3)))
    ds = ImageFolderDataset(tmp_path, 8)
    keys = BatchStream(ds, 4, seed=0).epoch_keys(0)
    assert keys == BatchStream(ds, 4, seed=0).epoch_keys(0)
    assert any(flip for _, flip in keys) and not all(flip for _, flip in keys)
    x, _ = next(iter(BatchStream(ds, 4, seed=0)))
    for row, (index, flip) in zip(x, keys[:4], strict=True):
        assert torch.equal(row, ds[(index, flip)][0])


def test_batch_larger_than_the_dataset_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path / "c" / "0.png", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="--batch-size"):
        BatchStream(ImageFolderDataset(tmp_path, 8), 2, seed=0)
