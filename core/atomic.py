"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Shared by the weight writers of `deco.reference` and `deco.optimized` and by training
checkpoints. Standard library only (the reference must not import torch)."""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def as_os_error(exc: BaseException, path: str | Path) -> OSError | None:
    """`exc` as an OSError naming `path` (the user's output, not a temporary beside it), or None
    when it is not an operating-system error. Writers wrap these differently: Python raises an
    OSError without a file name from write(), safetensors a SafetensorError "... (os error 28)"."""
    if isinstance(exc, OSError) and exc.errno is not None:
        number = exc.errno
    elif isinstance(exc, (ValueError, TypeError, LookupError)):
        return None  # a message of our own (e.g. a shard that cannot be read), already in words
    else:
        match = _OS_ERROR_IN_TEXT.search(str(exc)) if isinstance(exc, Exception) else None
        if match is None:
            return None
        number = int(match.group(1) or match.group(2))
    kind = {errno.EACCES: PermissionError, errno.EPERM: PermissionError, errno.ENOENT: FileNotFoundError,
            errno.EISDIR: IsADirectoryError}.get(number, OSError)
    return kind(number, os.strerror(number), str(path))


@contextmanager
def writing(path: str | Path, *temporaries: str | Path) -> Iterator[None]:
    """Report an operating-system error (no permission, a full disk, a read-only filesystem)
    raised inside the block as an OSError naming `path`, whatever the writer raised, unless it
    names another file than `path` and its `temporaries` (files, or folders and all below)."""
    try:
        yield
    except Exception as exc:
        named = getattr(exc, "filename", None)
        ours = [Path(path), *map(Path, temporaries)]
        if named is not None and not any(Path(os.fsdecode(named)).is_relative_to(p) for p in ours):
            raise
        error = as_os_error(exc, path)
        if error is None:
            raise
        raise error from exc


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path` and fsync the folder."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:  # it names a random temporary; the user wants to hear of `path`
        raise as_os_error(exc, path) or exc from None
    os.close(fd)
    try:
        with writing(path, tmp):
            write(tmp)
            # mkstemp makes the file 0600; give it the mode open() would (0666 less the umask), so
            # a checkpoint or weight file in a shared folder is as readable as one `torch.save`
            # writes. After the writer, not before: some writers (safetensors >= 0.8's save_file)
            # replace the file they are given, which would drop an earlier chmod.
            os.chmod(tmp, 0o666 & ~current_umask())
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def default_modes(root: Path) -> None:
    """Give a folder written under a private temporary name (mkdtemp's 0700, writers' 0600) the
    modes mkdir and open() would: 0777 / 0666 less the umask, for `root` and all below it."""
    mask = current_umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


#: Errors that can only come from writing.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def describe_os_error(exc: OSError) -> str:
    """One line for a user: "cannot write out/b.onnx: Permission denied" (or read, access),
    or the message itself for an error raised with a sentence rather than an errno."""
    if exc.errno is None or exc.filename is None:
        return str(exc)
    path = os.fsdecode(exc.filename)
    if exc.errno in _WRITE_ERRNOS:
        verb = "write"
    elif exc.errno == errno.ENOENT:
        verb = "access"
    elif os.path.exists(path) and not os.access(path, os.R_OK):
        verb = "read"
    else:
        verb = "write"
    return f"cannot {verb} {path}: {exc.strerror}"


def make_temporary_folder(path: Path) -> Path:
    """A new private folder `.NAME.XXXX.tmp` beside `path`, where a folder or a set of files is
    staged before being renamed into place; an OSError names `path`, not the random name."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise as_os_error(exc, path) or exc from None
