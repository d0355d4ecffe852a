"""The ``lossscale`` command line: argument parsing only; every computation lives in the library.

Each subcommand is a module of this package with ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit code). The list below is explicit on purpose.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Subcommand modules, in the order `lossscale --help` lists them.
_COMMANDS: tuple[str, ...] = ("formats", "study", "diagnose")

_EPILOG = """\
examples:
  lossscale formats                      table of every preset format
  lossscale formats --value 1e-8         how 1e-8 rounds in each format
  lossscale formats --value 70000 --format fp16
"""


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="lossscale",
        description="Low-precision training for PyTorch: number formats, loss scaling, diagnostics, studies.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lossscale {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"lossscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
