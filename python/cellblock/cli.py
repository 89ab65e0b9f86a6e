"""The `cellblock` command line: `cellblock SUBCOMMAND ...` (see `cellblock --help`).

Each subcommand lives in `cellblock.commands.<name>` and exposes `register(subparsers)`.
Errors print one line, `cellblock: error: <Kind>: message`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import NoReturn

from cellblock._native import __version__
from cellblock.errors import CellblockError

#: Subcommand modules, in help order.
COMMANDS = ("run", "run_python", "shell", "batch", "eval", "agent", "memory", "report", "demo",
            "serve", "mcp", "worker", "vault")

#: Exit status for usage and setup errors (like most Unix tools).
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in cellblock's one-line format."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')")


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit 2."""
    one_line = " ".join(str(message).split())
    print(f"cellblock: error: {one_line}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _terminate(signum: int, frame: object) -> None:
    # Raised inside the run's supervisor loop: the sandbox is killed and cleaned up first.
    raise SystemExit(128 + signum)


def _module_name(command: str) -> str:
    return command.replace("-", "_")


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's module is imported (fast start-up: some
    subcommands pull in heavy libraries such as the anthropic SDK)."""
    parser = _Parser(prog="cellblock", description="Run untrusted code in a sandbox.")
    parser.add_argument("--version", action="version", version=f"cellblock {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    names = (_module_name(only),) if only and _module_name(only) in COMMANDS else COMMANDS
    for name in names:
        try:
            module = importlib.import_module(f"cellblock.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"cellblock.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cellblock` script."""
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = make_parser(only=first)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except CellblockError as e:
        fail(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print("cellblock: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
