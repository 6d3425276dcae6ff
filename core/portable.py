"""The portable weight file's header (spec/05-weights.md §2), shared by both implementations.

A DeCo `.safetensors` file carries `deco_format` = "1" and the model's `config` JSON in its
header metadata. Reading the header needs neither NumPy nor torch arrays, so
`deco.reference.weights` and `deco.optimized.weights` both use this one reader.
"""

from __future__ import annotations

from pathlib import Path

from deco.untrusted import SafetensorsHeader, UntrustedFileError, read_safetensors_header

FORMAT_KEY = "deco_format"
FORMAT_VERSION = "1"


def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked safetensors header (deco.untrusted) of a DeCo weight file, read before any
    tensor: a caller compares its shapes with the recorded config before loading (a few bytes of
    metadata must not choose how much memory a load takes); ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file: {path}")
    try:
        header = read_safetensors_header(path)
    except UntrustedFileError as exc:
        raise ValueError(f"path: {exc}") from None
    meta = header.metadata
    if meta.get(FORMAT_KEY) != FORMAT_VERSION or "config" not in meta:
        raise ValueError(f"path: {path} is a safetensors file without DeCo metadata")
    return header


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a DeCo weight file; ValueError if it is not one."""
    return read_header(path).metadata
