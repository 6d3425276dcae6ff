"""Precomputed text embeddings: run a text encoder once over a caption dataset, read them back.

Layout of an embedding folder OUT:

* `index.json`: the format, the encoder's identity, T (length), E (width), the storage dtype,
  the number of captions and, per shard, its file name, row count and the sha256 of its
  captions; `complete` turns true once every shard is written;
* `shard-00000.safetensors`, ...: `embeddings` (n, T, E) in the storage dtype and
  `caption_sha256` (n, 32) uint8, the sha256 of each row's caption (UTF-8), rows in dataset order;
* `null.safetensors`: `embeddings` (1, T, E), the null (unconditional) embedding of the empty
  negative prompt, for classifier-free guidance dropout without the encoder.

Every file is written atomically. A rerun skips the shards whose file is already there and
holds the expected captions, rewrites a shard it cannot read, and refuses to mix: a different
encoder, T, E, dtype, shard size or caption list is an error (start a new folder).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from deco.atomic import atomic_write
from deco.paths_inside import resolve_inside
from deco.text.encoder import TextEncoder
from deco.untrusted import UntrustedFileError, read_json

FORMAT = "deco-text-embeddings"
VERSION = 1
INDEX = "index.json"
NULL_FILE = "null.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Index fields that must agree between a run and the folder it resumes.
_HEADER_FIELDS = ("format", "version", "encoder", "length", "width", "dtype", "shard_size", "count",
                  "captions_sha256")


def caption_digests(captions: Sequence[str]) -> Tensor:
    """(n, 32) uint8: the sha256 of each caption's UTF-8 bytes."""
    if not captions:
        return torch.zeros(0, 32, dtype=torch.uint8)
    # One bytes buffer, not nested lists: pre-training sets have tens of millions of captions.
    joined = b"".join(hashlib.sha256(c.encode("utf-8")).digest() for c in captions)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8).reshape(len(captions), 32)


def digest_of(digests: Tensor) -> str:
    """Hex sha256 over a (n, 32) table of caption digests (the identity of a caption list)."""
    return hashlib.sha256(digests.numpy().tobytes()).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its file, the dataset rows [start, stop) and their caption digests."""

    file: str
    start: int
    stop: int
    digests: Tensor

    def entry(self) -> dict[str, Any]:
        return {"file": self.file, "rows": self.stop - self.start, "captions_sha256": digest_of(self.digests)}


def plan_shards(digests: Tensor, shard_size: int) -> list[ShardPlan]:
    """Consecutive shards of `shard_size` rows (the last may be shorter), from the (n, 32)
    caption digests of the whole dataset."""
    n = digests.shape[0]
    return [ShardPlan(shard_name(i), start, min(start + shard_size, n), digests[start : start + shard_size])
            for i, start in enumerate(range(0, n, shard_size))]


def member(out: Path, name: object, what: str) -> Path:
    """OUT/name for a file of the folder (a shard named by index.json, or one of ours), kept
    inside OUT: no absolute path, no `..`, no link out of it (deco.paths_inside)."""
    return resolve_inside(out, name, what=f"embeddings: {what}")


def read_index(out: Path) -> dict[str, Any]:
    """OUT/index.json, checked to be an embedding index whose shard files lie inside OUT."""
    path = member(out, INDEX, str(out))
    if not path.is_file():
        raise FileNotFoundError(f"embeddings: {out} has no {INDEX} (not made by deco embed-text?)")
    try:
        index = read_json(path)
    except UntrustedFileError as exc:
        raise ValueError(f"embeddings: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"embeddings: {path} is not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise ValueError(f"embeddings: {path} has version {index.get('version')}, expected {VERSION}")
    check_index_fields(index, path)
    for k, entry in enumerate(index["shards"]):  # a list of dicts with a str "file": checked above
        member(out, entry["file"], f"{path}: shards[{k}].file")
    return index


def check_index_fields(index: dict[str, Any], path: Path) -> None:
    """The fields the store reads, with their types (the content only: where the shard files
    point is checked where they are opened)."""
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40

    bad = [k for k in ("length", "width", "count") if not count(index.get(k))]
    shards = index.get("shards")
    if not isinstance(shards, list):
        bad.append("shards")
    else:
        bad += [f"shards[{i}]" for i, s in enumerate(shards) if not (
            isinstance(s, dict) and isinstance(s.get("file"), str) and count(s.get("rows"))
            and isinstance(s.get("captions_sha256", ""), str))][:1]
    if bad:
        raise ValueError(f"embeddings: {path} has no valid {bad[0]} (expected a count, or shards: "
                         "a list of {file, rows, captions_sha256})")


def write_json(path: Path, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=1) + "\n")

    atomic_write(path, write)


def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def open_shard(path: Path) -> Any:
    """A safetensors handle on a shard file (rows are read lazily: a shard of 1024 captions at
    T = 128, E = 2048 in bfloat16 is 512 MiB); a missing or unreadable file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"embeddings: missing shard {path}")
    try:
        handle: Any = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"embeddings: corrupt shard {path} ({exc})") from None
    missing = {"embeddings", "caption_sha256"} - set(handle.keys())
    if missing:
        raise ValueError(f"embeddings: corrupt shard {path} (no tensor {sorted(missing)[0]!r})")
    return handle


def shard_digests(path: Path) -> Tensor | None:
    """The caption digests (n, 32) of a readable shard file, None when it is missing or corrupt."""
    try:
        return open_shard(path).get_tensor("caption_sha256")  # type: ignore[no-any-return]
    except (FileNotFoundError, ValueError):
        return None


def shard_done(out: Path, plan: ShardPlan) -> bool:
    """Whether the shard file exists, is readable and holds exactly the planned captions."""
    digests = shard_digests(member(out, plan.file, str(out)))
    if digests is None or digests.shape != plan.digests.shape:
        return False
    return bool(torch.equal(digests, plan.digests))


def embed_captions(captions: Iterable[str], encoder: TextEncoder, out: str | Path, *,
                   dtype: str = "bfloat16", shard_size: int = 1024, batch_size: int = 32,
                   progress: bool = True, log: Callable[[str], None] = print,
                   restart: bool = False) -> dict[str, Any]:
    """Encode `captions` (in order) into the folder `out`; resumable. Returns the index.
    restart: delete an earlier run's index and shards in `out` first (else a different encoder,
    setting or caption list is refused)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    texts = list(captions)
    if not texts:
        raise ValueError("data: the dataset has no captions")
    out = prepare_output(Path(out))
    if restart:
        for pattern in (INDEX, "shard-*.safetensors", NULL_FILE, ".*.tmp"):
            for path in out.glob(pattern):
                path.unlink()
    digests = caption_digests(texts)
    plans = plan_shards(digests, shard_size)
    index = {"format": FORMAT, "version": VERSION, "encoder": encoder.identity, "length": encoder.length,
             "width": encoder.width, "dtype": dtype, "shard_size": shard_size, "count": len(texts),
             "captions_sha256": digest_of(digests), "shards": [p.entry() for p in plans],
             "complete": False}
    if (out / INDEX).exists():
        check_resume(out, read_index(out), index)
    write_json(out / INDEX, index)

    todo = [p for p in plans if not shard_done(out, p)]
    if len(todo) < len(plans):
        log(f"resuming: {len(plans) - len(todo)} of {len(plans)} shards already done")
    null_plan = ShardPlan(NULL_FILE, 0, 1, caption_digests([""]))
    if not shard_done(out, null_plan):
        null = check_embeddings(encoder.null("")[None], 1, encoder)  # (1, T, E)
        write_tensors(out / NULL_FILE, {"embeddings": null.to("cpu", DTYPES[dtype]),
                                        "caption_sha256": null_plan.digests})

    with tqdm(total=sum(p.stop - p.start for p in todo), unit="caption", disable=not progress,
              desc="embed-text") as bar:
        for plan in todo:
            rows = encode_rows(texts[plan.start : plan.stop], encoder, batch_size, DTYPES[dtype], bar.update)
            write_tensors(out / plan.file, {"embeddings": rows, "caption_sha256": plan.digests})
    index["complete"] = True
    write_json(out / INDEX, index)
    return index


def prepare_output(out: Path) -> Path:
    """`out`, created if needed; an existing file, or a non-empty folder that is not an
    embedding folder, is an error (so a mistyped path never fills an unrelated folder)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} is a file, expected a folder")
    for stale in out.glob(".*.tmp"):  # temporaries of a write cut short by a kill
        stale.unlink(missing_ok=True)
    if out.is_dir() and not (out / INDEX).exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is not empty and has no {INDEX}; expected a new folder or one "
                         "made by deco embed-text")
    out.mkdir(parents=True, exist_ok=True)
    return out


def encode_rows(texts: Sequence[str], encoder: TextEncoder, batch_size: int, dtype: torch.dtype,
                advance: Callable[[int], object]) -> Tensor:
    """(n, T, E) embeddings of `texts` on the CPU in `dtype`, in batches of `batch_size`."""
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        parts.append(check_embeddings(encoder.encode(batch), len(batch), encoder).to("cpu", dtype))
        advance(len(batch))
    return torch.cat(parts)


def check_embeddings(x: Tensor, batch: int, encoder: TextEncoder) -> Tensor:
    """The encoder's output, checked to be (batch, T, E): a wrong encoder must not be stored."""
    expected = (batch, encoder.length, encoder.width)
    if tuple(x.shape) != expected:
        raise ValueError(f"text_encoder: expected embeddings of shape {expected}, got {tuple(x.shape)}")
    return x


def check_resume(out: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A ValueError unless the folder was made by the same encoder, settings and captions."""
    for field in _HEADER_FIELDS:
        if old.get(field) != new[field]:
            what = "the captions" if field in ("count", "captions_sha256") else field
            raise ValueError(f"out: {out} holds embeddings made with a different {what} "
                             f"({old.get(field)!r}, now {new[field]!r}); give --restart to delete "
                             "them and start over, or use a new output folder")


class EmbeddingStore:
    """The embeddings of a folder written by `embed_captions`, by row: store[i] -> (T, E).

    Rows follow the caption dataset's order; `null` is the null embedding (T, E). Shards are
    opened (memory-mapped) on first use and a row read on its own, so random access is cheap.
    An incomplete folder, a corrupt shard or a mismatch with the model's T and E is a ValueError."""

    def __init__(self, out: str | Path, *, length: int | None = None, width: int | None = None) -> None:
        self.out = Path(out)
        self.index = read_index(self.out)
        if not self.index.get("complete"):
            done = sum(shard_digests(member(self.out, s["file"], str(self.out))) is not None
                       for s in self.index["shards"])
            raise ValueError(f"embeddings: {self.out} is incomplete ({done} of {len(self.index['shards'])} "
                             "shards readable); rerun deco embed-text to finish it")
        self.length, self.width = int(self.index["length"]), int(self.index["width"])
        self.check(length, width)
        self.starts: list[int] = []
        total = 0
        for shard in self.index["shards"]:
            self.starts.append(total)
            total += int(shard["rows"])
        if total != self.index["count"]:
            raise ValueError(f"embeddings: {self.out / INDEX} lists {total} rows in its shards, "
                             f"expected {self.index['count']}")
        self._handles: dict[int, Any] = {}
        self._rows: dict[bytes, int] | None = None

    def check(self, length: int | None = None, width: int | None = None) -> None:
        """A ValueError unless the embeddings have T = `length` and E = `width` (when given),
        e.g. the model config's `text_length` and `text_dim`."""
        for name, want, have in (("text_length", length, self.length), ("text_dim", width, self.width)):
            if want is not None and want != have:
                raise ValueError(f"embeddings: {self.out} holds (T, E) = ({self.length}, {self.width}) "
                                 f"embeddings, but the model expects {name} = {want}")

    def __len__(self) -> int:
        return int(self.index["count"])

    def _shard(self, k: int) -> Any:
        """The open handle of shard k, checked against the index on first use."""
        if k not in self._handles:
            entry = self.index["shards"][k]
            path = member(self.out, entry["file"], f"{self.out / INDEX}: shards[{k}].file")
            handle = open_shard(path)
            shape = tuple(handle.get_slice("embeddings").get_shape())
            want = (int(entry["rows"]), self.length, self.width)
            if shape != want:
                raise ValueError(f"embeddings: shard {path} holds {shape} embeddings, expected {want}")
            if digest_of(handle.get_tensor("caption_sha256")) != entry["captions_sha256"]:
                raise ValueError(f"embeddings: shard {path} holds other captions than {INDEX} lists")
            self._handles[k] = handle
        return self._handles[k]

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, row in the shard) of dataset row i (negative i counts from the end)."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"index: expected an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index: {i} out of range for {n} embeddings")
        i %= n
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def __getitem__(self, i: int) -> Tensor:
        """Row i's embedding (T, E), in the storage dtype."""
        k, row = self._locate(i)
        return self._shard(k).get_slice("embeddings")[row]  # type: ignore[no-any-return]

    def caption_matches(self, i: int, caption: str) -> bool:
        """Whether row i was computed from `caption` (to check a dataset lines up with the store)."""
        k, row = self._locate(i)
        stored = self._shard(k).get_slice("caption_sha256")[row]
        return bool(torch.equal(stored, caption_digests([caption])[0]))

    def row_of(self, caption: str) -> int:
        """The row of `caption` (the first, if it occurs more than once): for datasets whose
        order is not the store's (shuffled WebDataset streams). A ValueError if it is absent."""
        if not isinstance(caption, str):
            raise TypeError(f"caption: expected a str, got {type(caption).__name__}")
        if self._rows is None:
            rows: dict[bytes, int] = {}
            for k, start in enumerate(self.starts):
                digests = self._shard(k).get_tensor("caption_sha256").numpy()
                for j, digest in enumerate(digests):
                    rows.setdefault(digest.tobytes(), start + j)
            self._rows = rows
        key = hashlib.sha256(caption.encode("utf-8")).digest()
        if key not in self._rows:
            raise ValueError(f"caption: {caption[:60]!r} is not among the embeddings in {self.out}")
        return self._rows[key]

    def embedding_of(self, caption: str) -> Tensor:
        """The embedding (T, E) of `caption`, looked up by its sha256."""
        return self[self.row_of(caption)]

    @property
    def null(self) -> Tensor:
        """The null embedding (T, E) of the empty negative prompt."""
        emb: Tensor = open_shard(member(self.out, NULL_FILE, str(self.out))).get_tensor("embeddings")
        if tuple(emb.shape) != (1, self.length, self.width):
            raise ValueError(f"embeddings: {self.out / NULL_FILE} holds {tuple(emb.shape)}, "
                             f"expected (1, {self.length}, {self.width})")
        return emb[0]

    def __getstate__(self) -> dict[str, Any]:
        # safetensors handles do not pickle: data-loader workers open their own (and rebuild
        # the caption lookup if they need it, rather than receive a copy of a large dict).
        return {**self.__dict__, "_handles": {}, "_rows": None}
