"""Checked readers for files deco did not write itself: every file and folder a command reads is
hostile until checked (SECURITY.md). Each reader bounds the memory it will spend by what it has
checked, not by what the file claims, and fails with an `UntrustedFileError` (a ValueError:
one line, exit status 2 from the `deco` command) naming the file and what was expected.

* JSON (`parse_json`, `read_json`): a size limit, a nesting-depth limit checked by a flat scan
  before the (recursive) parser runs, finite numbers only (no NaN, Infinity or 1e400), no
  duplicate keys.
* safetensors (`read_safetensors_header`): the header alone, parsed and checked (dtype, shape,
  byte ranges inside the file) before any tensor is read, so a caller compares shapes with what it
  expects and checks the bytes against `MEMORY_BUDGET` before allocating.
* archives: zip files (`check_zip`: torch's .ckpt, NumPy's .npz) by their central directory
  (declared sizes against the file's size and a compression-ratio limit), .npy members
  (`read_npz`) by their headers, tar shards (`check_tar`) by their member headers.

Only the content is checked here; where paths read from files point is checked where they are
opened (SECURITY.md).
Importing this module imports neither NumPy nor torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: Largest JSON document read from a file (configs, plans, indexes, headers' metadata).
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of JSON arrays and objects (deco's own files nest at most 8 deep).
MAX_JSON_DEPTH = 64
#: Largest safetensors header: the limit of the safetensors library itself.
MAX_HEADER_BYTES = 100_000_000
#: Most bytes one checked reader allocates for data a file declares (tensors, arrays, archive
#: members): a file claiming more is refused before anything is read. 16 GiB: larger than any
#: model or shard deco makes at paper scale on one machine, far below what a header can claim.
MEMORY_BUDGET = 16 << 30
#: Largest uncompressed/compressed ratio accepted for a compressed archive member. Weights and
#: images compress by less than 2x; a zip or gzip bomb by 1000x.
MAX_COMPRESSION_RATIO = 50
#: Largest member of a tar shard (an image or a caption).
MAX_TAR_MEMBER_BYTES = 256 << 20

#: Bytes per element of the safetensors dtypes.
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}

#: The safetensors dtypes NumPy reads (safetensors' numpy backend has no bfloat16 or float8).
NUMPY_DTYPES = frozenset(SAFETENSORS_DTYPES) - {"BF16", "F8_E4M3", "F8_E5M2"}


class UntrustedFileError(ValueError):
    """A file that is not what a command expected: one line naming the file."""


# ------------------------------------------------------------------------------ numbers
def finite_float(text: str) -> float:
    """json's parse_float: a float that stays finite (1e400 would become inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (not a finite float)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {twice[:60]!r} appears twice in one object")
    return data


def checked_product(dims: Any, where: str, limit: int = MEMORY_BUDGET) -> int:
    """The product of a shape's dims (non-negative ints), refused once it exceeds `limit`, so
    that a claimed shape never becomes an overflowing or gigantic number downstream."""
    total = 1
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise UntrustedFileError(f"{where}: expected a shape of non-negative ints, got {list(dims)[:8]}")
        total *= d
        if total > limit:
            raise UntrustedFileError(f"{where}: the shape {list(dims)[:8]} has more than {limit} elements")
    return total


def check_budget(nbytes: int, where: str, budget: int = MEMORY_BUDGET) -> int:
    """`nbytes` if it is within the memory budget, else an UntrustedFileError naming `where`."""
    if nbytes > budget:
        raise UntrustedFileError(f"{where}: declares {nbytes} bytes, more than the memory budget "
                                 f"of {budget} bytes; refused before reading")
    return nbytes


# ------------------------------------------------------------------------------ JSON
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text, by a flat scan (no recursion);
    an approximation for invalid JSON, which the parser then refuses."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(text: str | bytes, where: str, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text parsed with limits: at most `max_bytes` long and `max_depth` deep, finite
    numbers only, no duplicate keys. UntrustedFileError "WHERE: ..." otherwise."""
    if len(text) > max_bytes:
        raise UntrustedFileError(f"{where}: {len(text)} bytes of JSON, more than the limit of {max_bytes}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UntrustedFileError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise UntrustedFileError(f"{where}: JSON nested {depth} deep, more than the limit of {max_depth}")
    try:
        return json.loads(text, parse_float=finite_float, parse_constant=_no_constant,
                          object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise UntrustedFileError(f"{where} is not valid JSON ({exc})") from None
    except (ValueError, RecursionError) as exc:  # the hooks' refusals; int(>4300 digits)
        raise UntrustedFileError(f"{where}: invalid JSON value ({str(exc)[:200]})") from None


def read_json(path: str | Path, where: str | None = None, **limits: Any) -> Any:
    """The JSON document in the file `path` (`parse_json`'s limits, checked on the file's size
    before reading it). `where`: how to name it in errors (default: the path)."""
    path = Path(path)
    where = where or str(path)
    size = path.stat().st_size
    limit = limits.get("max_bytes", MAX_JSON_BYTES)
    if size > limit:
        raise UntrustedFileError(f"{where}: {size} bytes of JSON, more than the limit of {limit}")
    return parse_json(path.read_bytes(), where, **limits)


def json_object(value: Any, where: str) -> dict[str, Any]:
    """`value` if it is a JSON object, else an UntrustedFileError."""
    if not isinstance(value, dict):
        raise UntrustedFileError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------ safetensors
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype ("F32", ...), shape and byte size."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: metadata (str -> str) and the tensors, by name."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def read_safetensors_header(path: str | Path, where: str | None = None,
                            budget: int = MEMORY_BUDGET) -> SafetensorsHeader:
    """The header of a safetensors file, checked before any tensor is read: a header length
    inside the file, a JSON object within the limits, every tensor with a known dtype, a shape of
    non-negative ints whose byte size equals its byte range, ranges inside the file, and all the
    tensors together within `budget` bytes."""
    path = Path(path)
    where = where or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UntrustedFileError(f"{where}: not a safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise UntrustedFileError(f"{where}: not a safetensors file (header length {length} "
                                     f"does not fit the file's {size} bytes)")
        raw = f.read(length)
    header = json_object(parse_json(raw, f"{where} (safetensors header)",
                                    max_bytes=MAX_HEADER_BYTES, max_depth=4), where)
    data_size = size - 8 - length
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UntrustedFileError(f"{where}: the header's __metadata__ must map strings to strings")
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        tensors[name] = _tensor_entry(info, f"{where}: tensor {name[:80]!r}", data_size)
    check_budget(sum(t.nbytes for t in tensors.values()), where, budget)
    return SafetensorsHeader(metadata, tensors)


def _tensor_entry(info: Any, where: str, data_size: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise UntrustedFileError(f"{where}: expected dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise UntrustedFileError(f"{where}: unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or len(shape) > 16:
        raise UntrustedFileError(f"{where}: expected a shape of at most 16 dims")
    nbytes = checked_product(shape, where) * SAFETENSORS_DTYPES[dtype]
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size or offsets[1] - offsets[0] != nbytes):
        raise UntrustedFileError(f"{where}: data_offsets {str(offsets)[:60]} do not hold its "
                                 f"{nbytes} bytes inside the file's {data_size} data bytes")
    return TensorEntry(dtype, tuple(shape), nbytes)


# ------------------------------------------------------------------------------ archives
def check_zip(path: str | Path | IO[bytes], where: str | None = None, *, budget: int = MEMORY_BUDGET,
              max_ratio: int = MAX_COMPRESSION_RATIO) -> list[zipfile.ZipInfo]:
    """The members of a zip archive (a torch .ckpt, a NumPy .npz), checked from its central
    directory before anything is decompressed: each compressed member at most `max_ratio` times
    its compressed size, all together within `budget` bytes. A reader that trusts the declared
    sizes (torch's, NumPy's) then allocates at most that. `path`: a file or a binary file object."""
    where = where or str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as exc:
        # NotImplementedError: a zip "version" or compression the zipfile module does not read
        raise UntrustedFileError(f"{where}: not a readable zip archive ({exc})") from None
    total = 0
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED and member.file_size > max(
                max_ratio * member.compress_size, 1 << 20):
            raise UntrustedFileError(
                f"{where}: member {member.filename[:80]!r} inflates {member.compress_size} bytes to "
                f"{member.file_size} (more than {max_ratio}x: a zip bomb?); refused")
        total += member.file_size
    check_budget(total, where, budget)
    return members


def read_npz(path: str | Path, names: tuple[str, ...] | None = None, where: str | None = None,
             budget: int = MEMORY_BUDGET) -> dict[str, Any]:
    """Arrays `names` (default: all) of a NumPy .npz file, each .npy header checked against its
    member's size (NumPy allocates what the header declares before reading), no pickled objects."""
    import numpy as np  # here: this module stays free of NumPy for the readers that need none

    path = Path(path)
    where = where or str(path)
    members = {m.filename: m for m in check_zip(path, where, budget=budget)}
    if names is None:
        names = tuple(n[:-4] for n in members if n.endswith(".npy"))
    arrays: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in names:
                info = members.get(f"{name}.npy")
                if info is None:
                    raise UntrustedFileError(f"{where}: no array {name!r} (has {sorted(members)[:8]})")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise UntrustedFileError(f"{where}: {name} has .npy format {version}; "
                                                 "expected 1.0 or 2.0")
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(member)  # NumPy limits its size
                    if dtype.hasobject:
                        raise UntrustedFileError(f"{where}: {name} holds Python objects; refused")
                    nbytes = checked_product(shape, f"{where}: {name}") * dtype.itemsize
                    if nbytes != info.file_size - member.tell():
                        raise UntrustedFileError(
                            f"{where}: {name} declares shape {shape} {dtype} ({nbytes} bytes) but "
                            f"holds {info.file_size - member.tell()} bytes")
                    array = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
                    view = array.reshape(-1, order="A").view(np.uint8).data
                    if nbytes and member.readinto(view) != nbytes:  # type: ignore[attr-defined]
                        raise UntrustedFileError(f"{where}: {name} is truncated")
                arrays[name] = array
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
        if isinstance(exc, UntrustedFileError):
            raise
        raise UntrustedFileError(f"{where}: not a readable .npz ({str(exc)[:200]})") from None
    return arrays


def check_tar(path: str | Path, where: str | None = None, max_member: int = MAX_TAR_MEMBER_BYTES,
              max_by_suffix: dict[str, int] | None = None) -> int:
    """The number of members of a tar shard (plain or gzip), each checked from its header to be
    at most `max_member` bytes (`max_by_suffix`: tighter limits by file extension, e.g. "txt")
    before a reader loads it into memory. Streams: only one block is held at a time, however
    large the archive inflates."""
    path = Path(path)
    where = where or str(path)
    count = 0
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                suffix = member.name.rsplit(".", 1)[-1].lower()
                if member.size > (max_by_suffix or {}).get(suffix, max_member):
                    raise UntrustedFileError(
                        f"{where}: member {member.name[:80]!r} declares {member.size} bytes, more "
                        f"than the limit of {(max_by_suffix or {}).get(suffix, max_member)} for a "
                        f".{suffix[:10]} member; refused")
                count += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UntrustedFileError(f"{where} (not a readable tar archive: {str(exc)[:200]})") from None
    return count

