"""The `deco` command line. Each sub-command family lives in a module with `register(subparsers)`.

User errors (bad arguments, missing or malformed files, invalid values) exit with status 2 and a
single line on stderr, never a traceback. The defaults that `--help` shows are read from their
homes (the config dataclasses, the defaults tables, the functions that use them) through
`deco.cli.common.default_of`, so the command modules import those at module level; the work
itself, and any optional dependency, is imported inside the handlers, so that `deco --help` and a
usage error do not load every command's machinery (scikit-learn, matplotlib, the ONNX exporter,
the text encoder's packages).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from deco.atomic import describe_os_error
from deco.cli import convert, deploy, metrics, sample, text, train
from deco.errors import UsageError
from deco.extras import missing_extra

#: Modules that contribute sub-commands, in the order `deco --help` lists them.
COMMAND_MODULES = [convert, deploy, train, sample, text, metrics]


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
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Any = args.handler
    try:
        return int(handler(args) or 0)
    except ImportError as exc:  # an optional extra is missing (also below, wrapped by a library)
        message = missing_extra(exc, _extra_key(args))
        if message is None:
            raise
        print(f"deco {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (UsageError, ValueError, TypeError) as exc:
        print(f"deco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # every command: no permission, a full disk, a missing file, ...

        print(f"deco {args.command}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deco {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # e.g. torch.onnx's OnnxExporterError raised from onnx's ImportError
        message = missing_extra(exc, _extra_key(args))
        if message is None:
            raise
        print(f"deco {args.command}: error: {message}", file=sys.stderr)
        return 2


def _extra_key(args: argparse.Namespace) -> str:
    """What decides the extra of a missing module (deco.extras.COMMAND_EXTRAS): the command,
    or "repa" for a class-conditional training run with REPA (transformers then comes from [repa])."""
    if getattr(args, "repa_encoder", None) is not None and getattr(args, "task", None) != "t2i":
        return "repa"
    return str(args.command)
