"""`cellblock run-python [options] FILE|-`: run a Python program in a fresh sandbox."""

from __future__ import annotations

import argparse
import json
import sys

from cellblock.commands.run import add_limit_options, exit_status, policy_from_args
from cellblock.session import Sandbox


def cmd_run_python(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    if args.file == "-":
        code = sys.stdin.buffer.read()
        stdin = None
    else:
        try:
            with open(args.file, "rb") as f:
                code = f.read()
        except OSError as e:
            fail(f"cannot read {args.file}: {e.strerror}")
        stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    with Sandbox(policy_from_args(args)) as sandbox:
        result = sandbox.run_python(code.decode("utf-8", "replace"), stdin=stdin)
    if args.json:
        print(json.dumps({**result.to_dict(), "value": result.value, "error": result.error}))
        return 0
    sys.stdout.buffer.write(result.stdout_bytes)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    sys.stderr.flush()
    return exit_status(result)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run-python", usage="cellblock run-python [options] FILE|-",
                       help="run a Python program (FILE, or - for stdin) in a sandbox")
    p.add_argument("--json", action="store_true",
                   help="print the report (with value and error) as one JSON object")
    add_limit_options(p)
    p.add_argument("file", metavar="FILE|-", help="the program; - reads it from stdin")
    p.set_defaults(func=cmd_run_python)
