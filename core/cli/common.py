"""What every `deco` sub-command module shares: the argparse types for its arguments, and the
defaults that `--help` shows, read from their homes (`default_of`, `shown`)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deco.errors import UsageError


def existing_file(text: str) -> Path:
    """argparse type: a path that must exist as a file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def default_of(home: Any, name: str) -> Any:
    """The default that `home` gives `name`: a dataclass's field default (a class) or value (an
    instance), a mapping's entry (e.g. `FOLDER_DEFAULTS`), or a function's parameter default.
    The command line shows and uses defaults through this, so that each is written once, at home."""
    if isinstance(home, Mapping):
        return home[name]
    if dataclasses.is_dataclass(home):
        if not isinstance(home, type):
            return getattr(home, name)
        field = {f.name: f for f in dataclasses.fields(home)}[name]
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise ValueError(f"{home.__name__}.{name} has no default")
    default = inspect.signature(home).parameters[name].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{getattr(home, '__name__', home)}({name}) has no default")
    return default


def shown(value: Any) -> str:
    """A default as `--help` prints it: numbers in the shortest form (1.0 -> 1, 1e-4 -> 0.0001),
    booleans on/off, sequences space-separated (as they are typed)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e-4 or value == 0 else repr(value)
    if isinstance(value, (tuple, list)):
        return " ".join(shown(v) for v in value)
    return str(value)


def with_adapter(model: Any, path: Path) -> Any:
    """The model with the LoRA adapter in `path` (deco.lora.load_adapter); errors name --lora."""
    from deco.lora import load_adapter

    try:
        return load_adapter(model, path)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--lora: {str(exc).removeprefix('lora: ')}") from None
