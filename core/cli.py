"""The `deco` command line. Each sub-command lives in a module with `register(subparsers)`.

User errors (bad arguments, missing or malformed files, invalid values) exit with status 2 and a
single line on stderr, never a traceback. Heavy imports (torch) happen inside the commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Modules that contribute sub-commands, in the order `deco --help` lists them.
COMMAND_MODULES = [
    "deco.cli_convert",
    "deco.cli_deploy",
    "deco.cli_train",
    "deco.cli_sample",
    "deco.cli_text",
    "deco.cli_metrics",
]


class UsageError(Exception):
    """A user error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`deco CMD: error: ...`), exit status 2."""

    def error(self, message: str) -> Any:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deco",
        description="DeCo: frequency-decoupled pixel diffusion (arXiv 2511.19365).",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def existing_file(text: str) -> Path:
    """argparse type: a path that must exist as a file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Any = args.handler
    try:
        return int(handler(args) or 0)
    except (UsageError, ValueError, TypeError) as exc:
        print(f"deco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # every command: no permission, a full disk, a missing file, ...
        from .atomic import describe_os_error

        print(f"deco {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deco {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
