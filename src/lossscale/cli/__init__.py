"""The ``lossscale`` command line: argument parsing only; every computation lives in the library.

Each subcommand is a module of this package with ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit code). The list below is explicit on purpose.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import traceback
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
    parser.add_argument("--debug", action="store_true", default=False, help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    for sub in subparsers.choices.values():
        # Accepted after the subcommand too; SUPPRESS keeps a --debug given before it.
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return parser


_DEBUG_HELP = "on an error, print the full traceback as well as the one-line message"


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""

    exit_code = 2


class UserCodeError(CLIError):
    """A failure inside the user's own code (``--model``'s module, factory, loss or batches): printed as one
    line summarising the user's exception (the full traceback with ``--debug``), exit code 1. Raise it
    ``from`` the user's exception."""

    exit_code = 1


def one_line(text: object) -> str:
    """``text`` on one line: its first non-empty line, with `` ...`` when more followed."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")


def describe(err: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    msg = one_line(err)
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def prepare_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> str:
    """Create the output folder ``path`` (parents too) and check that files can be written in it, before any
    long computation; a :class:`CLIError` naming ``flag`` and the reason otherwise."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{flag} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {path}: cannot write there ({err.strerror or describe(err)})") from None
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _join_negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--value -1e-8`` -> ``--value=-1e-8``: argparse takes a value that starts with ``-`` for an option
    unless it looks like ``-3`` or ``-.5`` (not ``-1e-8``, ``-inf``), so a negative number given as the
    next word of an option that takes one value is joined to it first."""
    takes_value: set[str] = set()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            if action.option_strings and action.nargs is None:
                takes_value.update(action.option_strings)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        if tok in takes_value and i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 1 (an error inside the user's own code), 2 (any
    other error: one ``error:`` line on stderr), 130 (interrupted). ``--debug`` adds the traceback."""
    parser = build_parser()
    args_list = _join_negative_values(parser, list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exit_:  # argparse has printed its usage line and its one error line (or --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prefix = f"lossscale {args.command}: error:"
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        if debug and err.__cause__ is not None:
            traceback.print_exception(err.__cause__)
        hint = " (--debug shows the traceback)" if isinstance(err, UserCodeError) and not debug else ""
        print(f"{prefix} {one_line(err)}{hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{prefix} out of memory", file=sys.stderr)
        return 2
    except (Exception, SystemExit) as err:  # noqa: BLE001 - a bug of ours: still one line unless --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; --debug shows the traceback"
        print(f"{prefix} internal error, please report it: {describe(err)}{hint}", file=sys.stderr)
        return 2
