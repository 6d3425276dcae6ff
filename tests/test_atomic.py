"""`deco.atomic.atomic_write`: the written file gets the permissions a plain `open()` would give
under the same umask (not mkstemp's private 0600), and the umask is read without being changed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import umask_fixture

from deco import atomic

umask = umask_fixture(0o022, 0o077, 0o002)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_mode_is_what_open_gives(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")  # the oracle: what open(..., "w") / torch.save / cp produce
    out = tmp_path / "atomic.bin"
    atomic.atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"payload"))
    assert out.read_bytes() == b"payload"
    assert _mode(out) == _mode(plain) == 0o666 & ~umask
    assert {0o022: 0o644, 0o077: 0o600, 0o002: 0o664}[umask] == _mode(out)


def test_overwrite_takes_the_new_mode(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "f.bin"
    out.write_bytes(b"old")
    out.chmod(0o400)
    atomic.atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"new"))
    assert out.read_bytes() == b"new"
    assert _mode(out) == 0o666 & ~umask


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert atomic.current_umask() == umask
    assert atomic.current_umask() == umask  # reading did not change it


def test_current_umask_fallback_without_proc(tmp_path: Path, umask: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "_PROC_STATUS", str(tmp_path / "missing"))
    assert atomic.current_umask() == umask
    out = tmp_path / "g.bin"
    atomic.atomic_write(out, lambda tmp: Path(tmp).write_bytes(b"y"))
    assert _mode(out) == 0o666 & ~umask
    assert os.umask(umask) == umask  # the fallback restored the mask


def test_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.atomic_write(tmp_path / "h.bin", fail)
    assert list(tmp_path.iterdir()) == []
