"""Paths stay where they belong: one rule for every path deco reads from a file, and for every
output a command writes inside a folder it did not name itself.

The rule (SECURITY.md):

* A path read from a file (an `index.json` shard, the text encoder a checkpoint records, a run
  folder's `checkpoint.safetensors` or `log.jsonl`, the shards of a plan folder) is relative to
  the folder it was read from and stays inside it: an absolute path, a `..` part, or a name that
  is a symbolic link resolving outside the folder is refused (`resolve_inside`), in one line
  naming the file and the entry. The folder itself may be a link: the user named it. A path the
  user names on the command line is the user's choice and is followed as given.
* An output a command derives from the one the user named (the shard folder `s.shards` of
  `deco sample --count --out s.npz`) is never written through a symbolic link the command did
  not create (`refuse_symlinked_output`): a link there is refused rather than followed, because
  writing through it would put files wherever it points. Single files are already safe: deco
  writes them atomically (deco.atomic), which replaces a link by a file and never writes
  through it.

Standard library only, like deco.atomic: the reference's loaders may use it without torch.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


class OutsideFolder(ValueError):
    """A path read from a file points outside the folder it belongs to (exit 2 on the CLI)."""


def _is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` resolves (following every link) to `folder`'s resolved path or below it."""
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def resolve_inside(folder: str | Path, relative: object, *, what: str) -> Path:
    """`folder / relative`, where `relative` is a path read from a file, checked to stay inside
    `folder`: a non-empty relative string, no `..` part, and, where it exists, not a link that
    resolves outside `folder`. Returns the joined path (not resolved, so messages stay readable);
    an OutsideFolder naming `what` (the file and its entry, e.g. "emb/index.json: shards[3].file")
    otherwise. Works for a name the code chose as well (`log.jsonl` in a run folder): only the
    link check can refuse it."""
    folder = Path(folder)
    if not isinstance(relative, str) or not relative:
        raise OutsideFolder(f"{what}: expected a path relative to {folder}, got {relative!r}")
    if "\x00" in relative:
        raise OutsideFolder(f"{what}: {relative!r} is not a file name (it holds a NUL byte)")
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or relative.startswith(("/", "\\")):
        raise OutsideFolder(f"{what}: {relative!r} is an absolute path; a path in a file must be "
                            f"relative to {folder} and stay inside it")
    if ".." in posix.parts or ".." in windows.parts:
        raise OutsideFolder(f"{what}: {relative!r} climbs out of {folder} ('..'); a path in a file "
                            "must stay inside its folder")
    path = folder / relative
    if not _is_inside(path, folder):  # realpath resolves the links of the part that exists
        raise OutsideFolder(f"{what}: {path} is a link to {os.path.realpath(path)}, outside {folder}; "
                            "refused: a folder's files are read from inside it (name a file elsewhere "
                            "on the command line)")
    return path


def refuse_symlinked_output(path: str | Path, *, what: str) -> Path:
    """`path`, an output the command derives (not the one the user named), checked not to be a
    symbolic link: writing into a linked folder, or appending to a linked file, would write
    wherever the link points. An OutsideFolder naming `what` (the flag it derives from) if it is."""
    path = Path(path)
    if path.is_symlink():
        raise OutsideFolder(f"{what}: {path} is a symbolic link (to {os.readlink(path)}); deco does not "
                            "write through a link it did not create: remove it or choose another output")
    return path
