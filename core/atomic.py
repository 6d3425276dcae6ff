"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Shared by the weight writers of `deco.reference` and `deco.optimized` and by training
checkpoints. Standard library only (the reference must not import torch)."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UMASK_LOCK = threading.Lock()
_PROC_STATUS = "/proc/self/status"  # Linux: has a "Umask:\t0022" line


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    Linux (>= 4.7) reports it in /proc/self/status. Elsewhere the only way is to set a mask and
    restore it; that briefly leaves a mask of 0o077 (never 0) in force, so a file another thread
    creates meanwhile is too private rather than world-writable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path` and fsync the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), so a
        # checkpoint or weight file in a shared folder is as readable as one `torch.save` writes.
        os.chmod(tmp, 0o666 & ~current_umask())
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
