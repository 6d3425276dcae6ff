"""`deco embed-text` and `EmbeddingStore`: the stored rows against the encoder called caption by
caption (another batching, another call), resume, changed settings, corrupt shards, the CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from deco.cli import main
from deco.text.embeddings import EmbeddingStore, embed_captions

CAPTIONS = [f"caption number {i}" + " long" * (i % 4) for i in range(7)]


class FakeEncoder:
    """A `TextEncoder` whose rows are bytes of the caption's sha256 (so each is distinct and
    known), counting the captions it encodes and failing after `fail_after` calls when set."""

    def __init__(self, length: int = 4, width: int = 3, tag: str = "fake") -> None:
        self.length, self.width = length, width
        self.identity = f"{tag}:T{length}:E{width}"
        self.encoded: list[str] = []
        self.calls = 0
        self.fail_after: int | None = None

    def row(self, prompt: str) -> torch.Tensor:
        digest = hashlib.sha256(prompt.encode()).digest()[: self.length * self.width]
        return torch.tensor(list(digest), dtype=torch.float32).reshape(self.length, self.width) / 8

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("interrupted")
        self.calls += 1
        self.encoded += list(prompts)
        return torch.stack([self.row(p) for p in prompts])

    def null(self, negative: str = "") -> torch.Tensor:
        return self.row(negative)


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from deco.text.encoder import build_tiny_qwen3

    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "tiny", seed=0)


# ------------------------------------------------------------------------------ store
def test_store_matches_the_qwen3_encoder(tiny: Path, tmp_path: Path) -> None:
    from deco.text.encoder import Qwen3TextEncoder

    enc = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    index = embed_captions(CAPTIONS, enc, tmp_path, dtype="float32", shard_size=3, batch_size=2,
                           progress=False)
    assert index["complete"] and index["count"] == 7 and [s["rows"] for s in index["shards"]] == [3, 3, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json", "null.safetensors", "shard-00000.safetensors", "shard-00001.safetensors",
        "shard-00002.safetensors"]
    store = EmbeddingStore(tmp_path, length=8, width=48)
    assert len(store) == 7
    fresh = Qwen3TextEncoder(tiny, 8, 48, device="cpu")
    for i, caption in enumerate(CAPTIONS):
        torch.testing.assert_close(store[i], fresh.encode([caption])[0], rtol=1e-5, atol=1e-5)
        assert store.caption_matches(i, caption) and not store.caption_matches(i, caption + "!")
    torch.testing.assert_close(store[-1], store[6], rtol=0, atol=0)
    torch.testing.assert_close(store.null, fresh.null(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_storage_dtype(tmp_path: Path, dtype: str) -> None:
    enc = FakeEncoder()
    embed_captions(CAPTIONS, enc, tmp_path, dtype=dtype, shard_size=4, progress=False)
    store = EmbeddingStore(tmp_path)
    want = getattr(torch, dtype)
    for i, caption in enumerate(CAPTIONS):
        assert store[i].dtype == want and store[i].shape == (4, 3)
        assert torch.equal(store[i], enc.row(caption).to(want))
    assert torch.equal(store.null, enc.row("").to(want))


def test_store_checks_the_model_shape(tmp_path: Path) -> None:
    embed_captions(CAPTIONS, FakeEncoder(4, 3), tmp_path, progress=False)
    EmbeddingStore(tmp_path, length=4, width=3).check(4, 3)
    with pytest.raises(ValueError, match=r"^embeddings: .*\(T, E\) = \(4, 3\).*text_length = 5"):
        EmbeddingStore(tmp_path, length=5)
    with pytest.raises(ValueError, match=r"^embeddings: .*text_dim = 48"):
        EmbeddingStore(tmp_path, width=48)


def test_lookup_by_caption(tmp_path: Path) -> None:
    captions = [*CAPTIONS, CAPTIONS[2]]  # a repeated caption
    enc = FakeEncoder()
    embed_captions(captions, enc, tmp_path, dtype="float32", shard_size=3, progress=False)
    store = EmbeddingStore(tmp_path)
    for i, caption in enumerate(CAPTIONS):
        assert store.row_of(caption) == i
        assert torch.equal(store.embedding_of(caption), enc.row(caption))
    assert torch.equal(store[7], store[2])
    with pytest.raises(ValueError, match=r"^caption: 'missing' is not among the embeddings"):
        store.row_of("missing")
    with pytest.raises(TypeError, match=r"^caption:"):
        store.row_of(3)  # type: ignore[arg-type]


def test_store_pickles_for_workers(tmp_path: Path) -> None:
    embed_captions(CAPTIONS, FakeEncoder(), tmp_path, shard_size=2, progress=False)
    store = EmbeddingStore(tmp_path)
    first = store[5]
    clone = pickle.loads(pickle.dumps(store))
    assert torch.equal(clone[5], first)


def test_store_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^embeddings: .* has no index.json"):
        EmbeddingStore(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"^embeddings: .* is not valid JSON"):
        EmbeddingStore(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match=r"^embeddings: .* is not a deco-text-embeddings index"):
        EmbeddingStore(tmp_path)
    out = tmp_path / "ok"
    embed_captions(CAPTIONS, FakeEncoder(), out, progress=False)
    store = EmbeddingStore(out)
    with pytest.raises(IndexError, match=r"^index: 7 out of range"):
        store[7]
    with pytest.raises(TypeError, match=r"^index:"):
        store[1.0]  # type: ignore[index]


# ------------------------------------------------------------------------------ resume
def test_rerun_skips_finished_shards(tmp_path: Path) -> None:
    enc = FakeEncoder()
    embed_captions(CAPTIONS, enc, tmp_path, shard_size=3, batch_size=2, progress=False)
    assert enc.encoded == CAPTIONS
    before = folder_bytes(tmp_path)
    again = FakeEncoder()
    logs: list[str] = []
    embed_captions(CAPTIONS, again, tmp_path, shard_size=3, batch_size=2, progress=False, log=logs.append)
    assert again.encoded == [] and logs == ["resuming: 3 of 3 shards already done"]
    assert folder_bytes(tmp_path) == before


def test_interrupted_run_resumes(tmp_path: Path) -> None:
    enc = FakeEncoder()
    enc.fail_after = 2  # two batches of 2: the first shard (3 rows) is written, then it stops
    with pytest.raises(RuntimeError, match=r"interrupted"):
        embed_captions(CAPTIONS, enc, tmp_path / "a", shard_size=3, batch_size=2, progress=False)
    assert (tmp_path / "a" / "shard-00000.safetensors").is_file()
    assert not (tmp_path / "a" / "shard-00001.safetensors").exists()
    assert not any(p.suffix == ".tmp" for p in (tmp_path / "a").iterdir())
    with pytest.raises(ValueError, match=r"^embeddings: .* is incomplete \(1 of 3 shards readable\)"):
        EmbeddingStore(tmp_path / "a")
    rest = FakeEncoder()
    embed_captions(CAPTIONS, rest, tmp_path / "a", shard_size=3, batch_size=2, progress=False)
    assert rest.encoded == CAPTIONS[3:]
    embed_captions(CAPTIONS, FakeEncoder(), tmp_path / "b", shard_size=3, batch_size=2, progress=False)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


@pytest.mark.parametrize(("captions", "encoder", "dtype", "shard_size", "what"), [
    (CAPTIONS, FakeEncoder(tag="other"), "bfloat16", 3, "encoder"),
    (CAPTIONS, FakeEncoder(length=5), "bfloat16", 3, "encoder"),  # T and E are in the identity
    (CAPTIONS, FakeEncoder(), "float32", 3, "dtype"),
    (CAPTIONS, FakeEncoder(), "bfloat16", 2, "shard_size"),
    ([*CAPTIONS[:-1], "another"], FakeEncoder(), "bfloat16", 3, "the captions"),
    (CAPTIONS[:-1], FakeEncoder(), "bfloat16", 3, "the captions"),
])
def test_a_changed_run_is_an_error(tmp_path: Path, captions: list[str], encoder: FakeEncoder, dtype: str,
                                   shard_size: int, what: str) -> None:
    embed_captions(CAPTIONS, FakeEncoder(), tmp_path, shard_size=3, progress=False)
    before = folder_bytes(tmp_path)
    with pytest.raises(ValueError, match=f"^out: .* holds embeddings made with a different {what} "):
        embed_captions(captions, encoder, tmp_path, dtype=dtype, shard_size=shard_size, progress=False)
    assert folder_bytes(tmp_path) == before


def test_width_change_is_caught_without_the_identity(tmp_path: Path) -> None:
    """Even an encoder whose identity forgets T and E cannot resume with other T or E."""
    embed_captions(CAPTIONS, FakeEncoder(), tmp_path, progress=False)
    wider = FakeEncoder(width=4)
    wider.identity = FakeEncoder().identity
    with pytest.raises(ValueError, match=r"different width"):
        embed_captions(CAPTIONS, wider, tmp_path, progress=False)


def test_corrupt_shard(tmp_path: Path) -> None:
    enc = FakeEncoder()
    embed_captions(CAPTIONS, enc, tmp_path, shard_size=3, progress=False)
    good = folder_bytes(tmp_path)
    (tmp_path / "shard-00001.safetensors").write_bytes(good["shard-00001.safetensors"][:40])
    store = EmbeddingStore(tmp_path)
    assert torch.equal(store[0], enc.row(CAPTIONS[0]).to(torch.bfloat16))  # other shards still read
    with pytest.raises(ValueError, match=r"^embeddings: corrupt shard .*shard-00001\.safetensors"):
        store[4]
    again = FakeEncoder()
    logs: list[str] = []
    embed_captions(CAPTIONS, again, tmp_path, shard_size=3, progress=False, log=logs.append)
    assert again.encoded == CAPTIONS[3:6] and logs == ["resuming: 2 of 3 shards already done"]
    assert folder_bytes(tmp_path) == good
    (tmp_path / "shard-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"^embeddings: missing shard .*shard-00002"):
        EmbeddingStore(tmp_path)[6]


def test_bad_arguments(tmp_path: Path) -> None:
    enc = FakeEncoder()
    with pytest.raises(ValueError, match=r"^dtype:"):
        embed_captions(CAPTIONS, enc, tmp_path, dtype="int8")
    with pytest.raises(ValueError, match=r"^shard_size:"):
        embed_captions(CAPTIONS, enc, tmp_path, shard_size=0)
    with pytest.raises(ValueError, match=r"^batch_size:"):
        embed_captions(CAPTIONS, enc, tmp_path, batch_size=-1)
    with pytest.raises(ValueError, match=r"^data: the dataset has no captions"):
        embed_captions([], enc, tmp_path)
    (tmp_path / "unrelated.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"^out: .* is not empty and has no index.json"):
        embed_captions(CAPTIONS, enc, tmp_path)
    with pytest.raises(ValueError, match=r"^out: .*unrelated.txt is a file"):
        embed_captions(CAPTIONS, enc, tmp_path / "unrelated.txt")

    class Liar(FakeEncoder):
        """Claims E = 3 and returns E = 2."""

        def encode(self, prompts: Sequence[str]) -> torch.Tensor:
            return super().encode(prompts)[..., :2]

    shapes = r"\(2, 4, 3\), got \(2, 4, 2\)"
    with pytest.raises(ValueError, match=rf"^text_encoder: expected embeddings of shape {shapes}"):
        embed_captions(CAPTIONS, Liar(), tmp_path / "liar", batch_size=2, progress=False)

    class NullLiar(FakeEncoder):
        def null(self, negative: str = "") -> torch.Tensor:
            return super().null(negative)[:3]

    shapes = r"\(1, 4, 3\), got \(1, 3, 3\)"
    with pytest.raises(ValueError, match=rf"^text_encoder: expected embeddings of shape {shapes}"):
        embed_captions(CAPTIONS, NullLiar(), tmp_path / "null-liar", progress=False)


# ------------------------------------------------------------------------------ CLI
def write_caption_folder(root: Path, captions: list[str]) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir()
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(root / f"{i:03d}.jpg")
        (root / f"{i:03d}.txt").write_text(caption)
    return root


def test_cli_embed_text(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deco.text.encoder import Qwen3TextEncoder

    data = write_caption_folder(tmp_path / "data", CAPTIONS)
    out = tmp_path / "emb"
    argv = ["embed-text", str(data), str(out), "--text-encoder", str(tiny), "--length", "8",
            "--width", "40", "--dtype", "float32", "--shard-size", "4", "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    assert "wrote 7 embeddings (8 x 40, float32) in 2 shards" in capsys.readouterr().out
    store = EmbeddingStore(out, length=8, width=40)
    enc = Qwen3TextEncoder(tiny, 8, 40, device="cpu")
    for i, caption in enumerate(CAPTIONS):
        torch.testing.assert_close(store[i], enc.encode([caption])[0], rtol=1e-5, atol=1e-5)
    assert main(argv) == 0  # resumed: nothing to do
    assert "resuming: 2 of 2 shards already done" in capsys.readouterr().out

    changed = [*argv[:8], "48", *argv[9:]]  # --width 48
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deco embed-text: error: ") and "different encoder" in err and "\n" not in err


def test_cli_embed_text_from_shards(tiny: Path, tmp_path: Path) -> None:
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    data = write_caption_folder(tmp_path / "data", CAPTIONS)
    for s, names in enumerate((range(0, 4), range(4, 7))):
        with tarfile.open(shards / f"{s:03d}.tar", "w") as tar:
            for i in names:
                for ext in ("jpg", "txt"):
                    blob = (data / f"{i:03d}.{ext}").read_bytes()
                    info = tarfile.TarInfo(f"{i:03d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    common = ["--text-encoder", str(tiny), "--length", "8", "--width", "40", "--no-progress",
              "--device", "cpu"]
    assert main(["embed-text", str(shards), str(tmp_path / "a"), *common]) == 0
    assert main(["embed-text", str(data), str(tmp_path / "b"), *common]) == 0
    a, b = EmbeddingStore(tmp_path / "a"), EmbeddingStore(tmp_path / "b")
    assert all(torch.equal(a[i], b[i]) for i in range(7))


def expect_usage_error(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deco embed-text: error: ") and message in err and "\n" not in err, err


def test_cli_user_errors(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_caption_folder(tmp_path / "data", CAPTIONS[:2])
    out = str(tmp_path / "o")
    shape = ["--length", "8", "--width", "40"]
    expect_usage_error(["embed-text", str(data), out, "--text-encoder", str(tmp_path / "none"), *shape],
                       "text_encoder: no such folder", capsys)
    expect_usage_error(["embed-text", str(tmp_path / "nodata"), out, "--text-encoder", str(tiny), *shape],
                       "data: no such file or folder", capsys)
    expect_usage_error(["embed-text", str(data), out, "--text-encoder", str(tiny), "--length", "0",
                        "--width", "40"], "--length: expected a positive int", capsys)
    expect_usage_error(["embed-text", str(data), out, "--text-encoder", str(tiny), *shape,
                        "--device", "gpu0"], "device: not a torch device", capsys)
    (data / "001.txt").unlink()
    expect_usage_error(["embed-text", str(data), out, "--text-encoder", str(tiny), *shape],
                       "has no caption file 001.txt", capsys)


def test_cli_without_the_text_extra(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    data = write_caption_folder(tmp_path / "data", CAPTIONS[:1])
    expect_usage_error(["embed-text", str(data), str(tmp_path / "o"), "--text-encoder", str(tmp_path),
                        "--length", "8", "--width", "40"], "pip install 'deco-diffusion[text]'", capsys)
