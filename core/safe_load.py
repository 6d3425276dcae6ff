"""`torch.load(weights_only=True)` with one-line errors, for every file a command reads with it.

torch's own errors on a file that is not a checkpoint are unhelpful to a user: a text file
gives a bare `KeyError: 101`, and a pickle holding code gives a paragraph that suggests loading
it again unsafely. `load_weights_only` says "not a checkpoint (...)" in one line instead.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from deco.untrusted import UntrustedFileError, check_zip


def _kind_of(head: bytes, data: Path | io.BytesIO) -> bool:
    """Whether the bytes can be a torch.load file: a zip archive (torch.save), a pickle (the
    legacy format: 0x80 + protocol) or safetensors (a JSON header after an 8-byte length)."""
    return zipfile.is_zipfile(data) or head[:1] == b"\x80" or head[8:9] == b"{"


def load_weights_only(source: str | Path | bytes, name: str | None = None) -> Any:
    """torch.load(source, map_location="cpu", weights_only=True); a ValueError "NAME is not a
    checkpoint (...)" in one line for anything it cannot or will not load (no field prefix: the
    caller adds its own). name: what to call `source` (default: its path)."""
    import torch  # here: deco.release (and so deco.reference) reads through this module without torch

    data: Path | io.BytesIO
    if isinstance(source, bytes):
        name, data, head = name or "the data", io.BytesIO(source), source[:9]
    else:
        name, data = name or str(source), Path(source)
        with open(source, "rb") as f:
            head = f.read(9)
    if not _kind_of(head, data):
        raise ValueError(f"{name} is not a checkpoint (neither a torch zip archive nor a pickle; it "
                         f"starts with {head[:4]!r})")
    if zipfile.is_zipfile(data):
        # torch allocates each record's declared size: a zip bomb is refused from its directory
        try:
            check_zip(data, name)
        except UntrustedFileError as exc:
            raise ValueError(str(exc)) from None
        finally:
            if isinstance(data, io.BytesIO):
                data.seek(0)
    if isinstance(data, io.BytesIO):
        data.seek(0)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for a user
            warnings.simplefilter("ignore")
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler's message: a paragraph suggesting an unsafe reload, with the
        # refused object ("Unsupported global: GLOBAL os.system") on a line of its own.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported")),
                      "it holds objects other than tensors")
        raise ValueError(f"{name} is not a checkpoint of tensors ({detail[:200]}); refused, "
                         "nothing in it was run") from None
    except Exception as exc:  # torch raises several kinds (zip, runtime, key) on a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{name} is not a readable checkpoint (truncated or corrupt?): "
                         f"{first[:200]}") from None
