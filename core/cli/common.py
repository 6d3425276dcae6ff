"""What every `deco` sub-command module shares: the argparse types for its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path


def existing_file(text: str) -> Path:
    """argparse type: a path that must exist as a file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path
