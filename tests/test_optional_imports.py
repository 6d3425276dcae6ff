"""diffusers is an optional extra: nothing but deco.diffusers may import it."""

from __future__ import annotations

import subprocess
import sys


def test_core_modules_do_not_import_diffusers() -> None:
    """Import deco, deco.optimized, deco.reference and the whole CLI (every command registered)
    in a fresh interpreter; diffusers must not be among the loaded modules."""
    script = (
        "import sys, deco, deco.optimized, deco.reference, deco.cli\n"
        "deco.cli.build_parser()\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers' "
        "or m.startswith('deco.diffusers'))\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
