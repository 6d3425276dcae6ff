"""Caption datasets: caption folders and WebDataset shards, written here with PIL and `tarfile`.

Images exactly R x R pass the ADM centre crop unchanged, so their tensors are checked against
PIL's own decoding of the file (x / 127.5 - 1); larger images against `deco.data`'s crop, which
tests/test_data.py checks on its own."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from deco.data import center_crop, to_tensor
from deco.text.captions import (
    CaptionDataError,
    CaptionFolderDataset,
    WebDatasetCaptions,
    open_caption_dataset,
    split_shards,
)

R = 16


def jpeg_bytes(seed: int, size: tuple[int, int] = (R, R)) -> bytes:
    """A real JPEG of random colours, `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def decoded(data: bytes) -> torch.Tensor:
    """PIL's decoding of JPEG bytes as (3, H, W) in [-1, 1], computed by hand."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1).float()


def write_folder(root: Path, items: dict[str, tuple[bytes, str]]) -> Path:
    for name, (jpg, caption) in items.items():
        path = root / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpg)
        path.with_suffix(".txt").write_text(caption)
    return root


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar of (member name, bytes) in the given order (WebDataset's layout: key.ext)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pair(key: str, seed: int, caption: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", jpeg_bytes(seed)), (f"{key}.txt", caption.encode())]


# ------------------------------------------------------------------------------ caption folder
def test_caption_folder(tmp_path: Path) -> None:
    items = {"b/cat": (jpeg_bytes(1), "a cat\n"), "a/dog": (jpeg_bytes(2), "a dog on grass"),
             "wide": (jpeg_bytes(3, (40, 24)), "a wide picture")}
    ds = CaptionFolderDataset(write_folder(tmp_path, items), R)
    assert len(ds) == 3
    order = ["a/dog", "b/cat", "wide"]  # sorted paths
    assert list(ds.iter_captions()) == [items[k][1] for k in order]  # verbatim, newline kept
    for i, key in enumerate(order[:2]):
        image, caption = ds[i]
        assert caption == items[key][1]
        assert image.shape == (3, R, R) and image.dtype == torch.float32
        torch.testing.assert_close(image, decoded(items[key][0]), rtol=0, atol=1e-6)
    image, _ = ds[2]
    want = to_tensor(center_crop(Image.open(io.BytesIO(items["wide"][0])).convert("RGB"), R))
    assert image.shape == (3, R, R) and torch.equal(image, want)
    assert float(image.min()) >= -1 and float(image.max()) <= 1


def test_caption_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^data: no such folder"):
        CaptionFolderDataset(tmp_path / "nope", R)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^data: .* contains no images"):
        CaptionFolderDataset(tmp_path / "empty", R)
    root = write_folder(tmp_path / "a", {"x": (jpeg_bytes(0), "ok")})
    (root / "y.jpg").write_bytes(jpeg_bytes(1))
    with pytest.raises(CaptionDataError, match=r"^data: image .*y\.jpg has no caption file y\.txt"):
        CaptionFolderDataset(root, R)
    root = write_folder(tmp_path / "b", {"x": (jpeg_bytes(0), " \n")})
    with pytest.raises(CaptionDataError, match=r"^data: caption .*x\.txt is empty"):
        CaptionFolderDataset(root, R)
    root = write_folder(tmp_path / "c", {"x": (jpeg_bytes(0), "ok")})
    (root / "x.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(CaptionDataError, match=r"^data: caption .*x\.txt is not UTF-8"):
        CaptionFolderDataset(root, R)
    root = write_folder(tmp_path / "d", {"x": (b"not a jpeg", "ok")})
    ds = CaptionFolderDataset(root, R)
    with pytest.raises(CaptionDataError, match=r"^data: unreadable image .*x\.jpg"):
        ds[0]
    with pytest.raises(ValueError, match=r"^resolution:"):
        CaptionFolderDataset(root, 0)


# ------------------------------------------------------------------------------ webdataset
def test_webdataset_reads_pairs(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "s.tar", pair("000", 1, "one") + pair("001", 2, "two"))
    ds = WebDatasetCaptions(shard, R)
    items = list(ds)
    assert [c for _, c in items] == ["one", "two"]
    torch.testing.assert_close(items[0][0], decoded(jpeg_bytes(1)), rtol=0, atol=1e-6)
    torch.testing.assert_close(items[1][0], decoded(jpeg_bytes(2)), rtol=0, atol=1e-6)
    assert list(ds.iter_captions()) == ["one", "two"]


def test_webdataset_crops_like_the_folders(tmp_path: Path) -> None:
    big = jpeg_bytes(5, (50, 34))
    shard = write_shard(tmp_path / "s.tar", [("k.jpg", big), ("k.txt", b"big")])
    folder = write_folder(tmp_path / "f", {"k": (big, "big")})
    (image, _), = list(WebDatasetCaptions(shard, R))
    assert torch.equal(image, CaptionFolderDataset(folder, R)[0][0])


SHARD_SIZES = [3, 2, 4, 1, 3]


def make_shards(root: Path) -> list[str]:
    captions = []
    for s, n in enumerate(SHARD_SIZES):
        members = []
        for j in range(n):
            caption = f"shard {s} sample {j}"
            captions.append(caption)
            members += pair(f"{s:02d}{j:03d}", 10 * s + j, caption)
        write_shard(root / f"part-{s:03d}.tar", members)
    return captions


def test_sharding_over_ranks_and_workers(tmp_path: Path) -> None:
    """2 ranks x 2 data-loader workers: every sample exactly once."""
    everything = make_shards(tmp_path)
    seen: list[str] = []
    per_rank = []
    for rank in range(2):
        ds = WebDatasetCaptions(tmp_path, R, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        captions = [c for _, c in loader]
        per_rank.append(set(captions))
        seen += captions
    assert sorted(seen) == sorted(everything)
    assert not per_rank[0] & per_rank[1] and all(per_rank)
    # Without workers, the ranks alone still split everything.
    alone = [c for r in range(2) for _, c in WebDatasetCaptions(tmp_path, R, rank=r, world_size=2)]
    assert sorted(alone) == sorted(everything)
    # iter_captions is the whole dataset in shard order, whatever the rank.
    assert list(WebDatasetCaptions(tmp_path, R, rank=1, world_size=2).iter_captions()) == everything


@pytest.mark.parametrize(("shards", "world", "workers"), [(5, 2, 2), (2, 2, 3), (7, 3, 2), (1, 1, 4)])
def test_split_shards(shards: int, world: int, workers: int) -> None:
    names = [Path(f"{i}.tar") for i in range(shards)]
    parts = {(r, w): split_shards(names, r, world, w, workers) for r in range(world) for w in range(workers)}
    dealt = [s for part in parts.values() for s in part]
    assert sorted(dealt) == sorted(names)  # each shard exactly once
    for r in range(world):
        assert any(parts[r, w] for w in range(workers))  # no rank without data


def test_webdataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^data: no such file or folder"):
        WebDatasetCaptions(tmp_path / "nope.tar", R)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match=r"^data: .* contains no shards \(\.tar, "):
        WebDatasetCaptions(tmp_path / "none", R)
    shard = write_shard(tmp_path / "one.tar", pair("a", 0, "x"))
    with pytest.raises(ValueError, match=r"^data: 1 shards cannot be split over 2 ranks"):
        WebDatasetCaptions(shard, R, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"^rank:"):
        WebDatasetCaptions(shard, R, rank=2, world_size=2)

    no_caption = write_shard(tmp_path / "nc.tar", [*pair("a", 0, "x"), ("b.jpg", jpeg_bytes(1))])
    message = r"^data: sample b in shard .*nc\.tar has no caption \(b\.txt\)"
    for read in (lambda d: list(d), lambda d: list(d.iter_captions())):
        with pytest.raises(CaptionDataError, match=message):
            read(WebDatasetCaptions(no_caption, R))
    no_image = write_shard(tmp_path / "ni.tar", [("a.txt", b"lonely")])
    with pytest.raises(CaptionDataError, match=r"^data: sample a in shard .*ni\.tar has no image"):
        list(WebDatasetCaptions(no_image, R).iter_captions())
    empty = write_shard(tmp_path / "ec.tar", pair("a", 0, "  "))
    with pytest.raises(CaptionDataError, match=r"^data: caption a in shard .*ec\.tar is empty"):
        list(WebDatasetCaptions(empty, R))
    bad_jpeg = write_shard(tmp_path / "bj.tar", [("a.jpg", b"garbage"), ("a.txt", b"x")])
    with pytest.raises(CaptionDataError, match=r"^data: unreadable image a in shard .*bj\.tar"):
        list(WebDatasetCaptions(bad_jpeg, R))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_shard(tmp_path: Path, damage: str) -> None:
    good = write_shard(tmp_path / "g.tar", pair("a", 0, "x") + pair("b", 1, "y") + pair("c", 2, "z"))
    data = good.read_bytes()
    bad = tmp_path / "bad.tar"
    # Cut inside a.jpg's data (512-byte header, then 800+ bytes): a cut between members with
    # the end-of-archive blocks gone would read as a valid, shorter tar.
    bad.write_bytes(b"\x00garbage" * 200 if damage == "garbage" else data[:1000])
    for read in (lambda d: list(d), lambda d: list(d.iter_captions())):
        with pytest.raises(CaptionDataError, match=r"^data: corrupt shard .*bad\.tar \("):
            read(WebDatasetCaptions(bad, R))


def test_gzipped_shards(tmp_path: Path) -> None:
    plain = write_shard(tmp_path / "p.tar", pair("a", 1, "one") + pair("b", 2, "two"))
    gz = tmp_path / "gz" / "p.tar.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    got = list(WebDatasetCaptions(gz.parent, R))
    want = list(WebDatasetCaptions(plain, R))
    assert [c for _, c in got] == ["one", "two"]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True))


def test_worker_errors_name_the_shard(tmp_path: Path) -> None:
    (tmp_path / "bad.tar").write_bytes(b"\x00garbage" * 200)
    loader = DataLoader(WebDatasetCaptions(tmp_path, R), batch_size=None, num_workers=1)
    with pytest.raises(CaptionDataError, match=r"data: corrupt shard .*bad\.tar"):
        list(loader)


def test_open_caption_dataset(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "f", {"x": (jpeg_bytes(0), "cap")})
    shards = tmp_path / "w"
    write_shard(shards / "a.tar", pair("x", 0, "cap"))
    assert isinstance(open_caption_dataset(folder, R), CaptionFolderDataset)
    assert isinstance(open_caption_dataset(shards, R), WebDatasetCaptions)
    assert isinstance(open_caption_dataset(shards / "a.tar", R), WebDatasetCaptions)
    with pytest.raises(FileNotFoundError, match=r"^data:"):
        open_caption_dataset(tmp_path / "nope", R)
