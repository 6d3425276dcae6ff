"""One overwrite rule for every command that writes an output the user names.

The rule: an output that already exists (a file, or a folder that is not empty) is refused, in
one line that names it and the flag that allows it; with `--force` it is replaced, atomically:
the new output is written under a temporary name beside it and renamed over it, so a reader
sees the old output or the new one, never a mixture.

Outputs that a command continues rather than replaces have their own rule, stated in their
help: a training run folder (`deco train --resume`), the shards of `deco sample --count` and an
embedding folder of `deco embed-text` resume when their plan is the same and are refused
otherwise (`--restart` starts over); `deco evaluate` merges its section into a metrics.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from deco.atomic import default_modes, fsync_dir, make_temporary_folder, writing
from deco.errors import UsageError

FORCE_HELP = "replace an existing output, atomically; without it, an existing output is refused"


def add_force(parser: argparse.ArgumentParser) -> None:
    """The `--force` flag of a command that writes a user-named output."""
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def exists(path: Path) -> bool:
    """Whether `path` counts as an existing output: a file (or link), or a non-empty folder."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return os.path.lexists(path)


def check_output(path: Path, force: bool, flag: str = "output", *, folder: bool = False) -> None:
    """Refuse (UsageError) an existing output unless `force`, and an output whose folder is
    missing; `folder`: the output is a folder (a file in its place is refused even with force)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag}: folder {parent} does not exist")
    if folder and os.path.lexists(path) and not path.is_dir():
        raise UsageError(f"{flag}: {path} is a file, expected a folder")
    if not folder and path.is_dir():
        raise UsageError(f"{flag}: {path} is a folder, expected a file")
    if exists(path) and not force:
        raise UsageError(f"{flag}: {path} already exists; give --force to replace it")


def write_folder(out: Path, fill: Callable[[Path], object]) -> None:
    """Write the folder `out` as a whole: `fill(tmp)` writes into a temporary folder beside it,
    which then gets the modes mkdir/open give and takes `out`'s place; an earlier `out` is
    moved aside first and removed after (two renames: a crash between them leaves the new
    folder under its temporary name and the old one under `.NAME.*.old`, never a mixture)."""
    tmp = make_temporary_folder(out)
    old: Path | None = None
    try:
        with writing(out, tmp):
            fill(tmp)
            default_modes(tmp)
            if os.path.lexists(out):
                old = make_temporary_folder(out.with_name(out.name + ".old"))
                os.replace(out, old / out.name)
            os.replace(tmp, out)
        fsync_dir(out.parent if str(out.parent) else Path("."))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.lexists(out):
            os.replace(old / out.name, out)  # put the earlier output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def image_format(path: Path) -> str | None:
    """The Pillow format that writes `path`'s suffix (".jpg" -> "JPEG"), None if none does."""
    Image.init()
    name = Image.registered_extensions().get(path.suffix.lower())
    return name if name is not None and name in Image.SAVE else None


def sample_output(out: Path, force: bool) -> str:
    """What `deco sample --out OUT` writes, checked against the overwrite rule: "image" (a grid,
    any image suffix Pillow writes), "npz" (an ADM sample batch) or "folder" (one PNG per image:
    a path without a suffix, or an existing folder). Any other suffix is refused, so that no
    folder is ever named like a file."""
    if out.suffix.lower() == ".npz":
        kind = "npz"
    elif out.is_dir() or not out.suffix:
        kind = "folder"
    elif image_format(out) is not None:
        kind = "image"
    else:
        raise UsageError(f"--out: unknown suffix {out.suffix!r} in {out}; expected an image file "
                         "(.png, .jpg, ...), an .npz or a folder (a path without a suffix)")
    check_output(out, force, "--out", folder=kind == "folder")
    return kind
