"""`cellblock run [options] -- CMD [ARGS...]`: one command in a fresh sandbox."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from typing import Any

from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.sandbox import run
from cellblock.terminal import raw_keyboard

#: Exit status on timeout, as `timeout(1)` uses.
EXIT_TIMEOUT = 124


def add_limit_options(p: argparse.ArgumentParser) -> None:
    """Options shared by commands that start sandboxes."""
    p.add_argument("--memory", metavar="SIZE", help="memory cap, e.g. 256M")
    p.add_argument("--pids", metavar="N", help="max processes/threads")
    p.add_argument("--cpus", metavar="F", help="CPU bandwidth, e.g. 0.5")
    p.add_argument("--timeout", metavar="S", help="wall-clock timeout in seconds")
    p.add_argument("--cpu-time", metavar="S", help="CPU-time budget in seconds")
    p.add_argument("--max-output", metavar="SIZE", help="bytes kept per output stream")
    p.add_argument("--disk", metavar="SIZE", help="size of /tmp + /workspace")
    p.add_argument("--env", metavar="K=V|NAME", action="append", default=[],
                   help="set a variable; a NAME without '=' runs in that built environment"
                   " (same as --environment)")
    p.add_argument("--environment", metavar="NAME",
                   help="run in a built environment (see 'cellblock env')")
    p.add_argument("--policy", metavar="FILE", help="TOML policy file")
    p.add_argument("--profile", metavar="NAME",
                   help="seccomp profile (python|node|shell|default|none)")
    p.add_argument("--allow-net", metavar="PATTERN", action="append", default=[],
                   help="allow egress to host[:port] (repeatable)")
    p.add_argument("--rootfs", metavar="DIR",
                   help="run on this root filesystem (read-only) instead of the host's")
    p.add_argument("--secret", metavar="NAME[=@FILE]", action="append", default=[],
                   help="inject a secret from cellblock's environment (or a file);"
                   " redacted from output")
    p.add_argument("--credential", metavar="NAME[@HOST[,HOST...][=@FILE]]", action="append",
                   default=[],
                   help="a credential from cellblock's environment (or a file), or the vault's"
                   " NAME: the sandbox sees a placeholder, the proxy sends the value to its hosts"
                   " only")


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The Policy the options describe (policy file first, options over it)."""
    from cellblock.cli import fail
    from cellblock.commands.secrets import credentials_from_args, secrets_from_args

    base = Policy.from_toml(args.policy) if args.policy else Policy()
    env: dict[str, str] = {}
    environment = getattr(args, "environment", None)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep and key and environment in (None, key):
            _check_environment(key)
            environment = key
            continue
        if not sep or not key:
            fail(f"--env expects KEY=VALUE or one environment NAME, got {item!r}")
        env[key] = value
    if getattr(args, "tty", False) and os.environ.get("TERM") and "TERM" not in base.env:
        # A terminal run shows on the caller's terminal: its type goes in (unless set).
        env = {"TERM": os.environ["TERM"], **env}
    fields: dict[str, Any] = {
        "memory": args.memory, "pids": args.pids, "cpus": args.cpus, "timeout": args.timeout,
        "cpu_time": args.cpu_time, "max_output": args.max_output, "disk": args.disk,
        "profile": args.profile,
        "env": {**base.env, **env} if env else None,
        "allow_net": args.allow_net or None,
        "rootfs": getattr(args, "rootfs", None),
        "environment": environment,
    }
    secrets = secrets_from_args(args.secret)
    if secrets:
        fields["secrets"] = {**base.secrets, **secrets}
    credentials = credentials_from_args(getattr(args, "credential", []))
    if credentials:
        fields["credentials"] = [*base.credentials, *credentials]
    return base.merged(**fields)


def _check_environment(name: str) -> None:
    """`--env NAME` names a built environment: one that does not exist may be a mistyped
    `--env KEY=VALUE`, and the error says both."""
    from cellblock.environments.runtime import resolve
    from cellblock.errors import EnvironmentNotFound

    try:
        resolve(name)
    except EnvironmentNotFound as e:
        raise EnvironmentNotFound(f"--env {name}: {e} (a variable is --env KEY=VALUE)") from None


def exit_status(result: RunResult) -> int:
    """Like `timeout`/`docker run`: the command's status, 128+N for signal N, 124 on timeout."""
    if result.reason == "timeout":
        return EXIT_TIMEOUT
    if result.exit_code is not None:
        return result.exit_code
    return 128 + (result.signal or signal.SIGKILL)


def _live(stream: int, data: bytes) -> None:
    out = sys.stdout.buffer if stream == 1 else sys.stderr.buffer
    out.write(data)
    out.flush()


def caller_window() -> tuple[int, int] | None:
    """(rows, cols) of the caller's terminal (stdout, stdin or stderr), if it has one."""
    for stream in (sys.stdout, sys.stdin, sys.stderr):
        try:
            size = os.get_terminal_size(stream.fileno())
        except (AttributeError, OSError, ValueError):
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    elif argv:
        fail("missing '--' before the command (usage: cellblock run [options] -- CMD [ARGS...])")
    if not argv:
        fail("no command given (usage: cellblock run [options] -- CMD [ARGS...])")
    policy = policy_from_args(args)
    keyboard = args.tty and sys.stdin is not None and sys.stdin.isatty() and not args.json
    stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    # -t: a pty of the sandbox's own (never the caller's), following the caller's window size;
    # from a terminal, keystrokes are typed into it as they come (like docker run -it).
    with raw_keyboard(sys.stdin.fileno()) if keyboard else contextlib.nullcontext():
        result = run(argv, policy=policy, stdin=stdin, on_output=None if args.json else _live,
                     tty=args.tty, tty_size=caller_window if args.tty else None,
                     tty_input=sys.stdin.fileno() if keyboard else None)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    return exit_status(result)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run one command in a fresh sandbox",
                       usage="cellblock run [options] -- CMD [ARGS...]")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("-t", "--tty", action="store_true",
                   help="give the command a pseudo-terminal (the sandbox's own; output merged);"
                   " from a terminal, keystrokes are typed into it as they come")
    add_limit_options(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)
