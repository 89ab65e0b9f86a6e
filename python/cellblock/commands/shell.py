"""`cellblock shell [--profile python|node|shell]`: an interactive session.

Each input goes to one session, so files persist; Python and Node inputs run in the session's
stateful kernel (variables persist too). Python inputs may span lines, as in the Python REPL;
Node and shell inputs are one line each. Prompts are shown only when stdin is a terminal, so
piped input works the same way (`printf 'x = 1\\nx + 1\\n' | cellblock shell`).

`--tty` instead runs one real shell (bash, else sh), Python or Node REPL on a pseudo-terminal
of the sandbox's own: line editing, history, job control, Ctrl-C for the foreground command,
full-screen programs; the window follows the caller's.
"""

from __future__ import annotations

import argparse
import codeop
import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

from cellblock.commands.run import add_limit_options, caller_window, exit_status, policy_from_args
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.session import Sandbox
from cellblock.terminal import raw_keyboard

PROMPTS = {"python": (">>> ", "... "), "node": ("> ", "> "), "shell": ("$ ", "$ ")}

#: What `--tty` runs per profile.
TTY_COMMANDS = {
    "python": ["python3", "-q"],
    "node": ["node"],
    "shell": ["sh", "-c", "command -v bash >/dev/null && exec bash -i || exec sh -i"],
}
#: Per-call timeout of a `--tty` shell unless --timeout says otherwise (an interactive
#: session is not a batch job).
TTY_TIMEOUT = 24 * 3600.0


def _write(stream: int, data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def tty_shell(language: str, policy: Policy) -> int:
    """One interactive program on the sandbox's terminal, fed from the caller's keyboard."""
    keyboard = sys.stdin is not None and sys.stdin.isatty()
    stdin = None if keyboard or sys.stdin is None else sys.stdin.buffer.read()
    with Sandbox(policy) as sandbox, (
            raw_keyboard(sys.stdin.fileno()) if keyboard else contextlib.nullcontext()):
        result = sandbox.run(TTY_COMMANDS[language], tty=True, tty_size=caller_window,
                             tty_input=sys.stdin.fileno() if keyboard else None, stdin=stdin,
                             timeout=policy.timeout or TTY_TIMEOUT, on_output=_write)
    return exit_status(result)


def python_inputs(lines: Iterator[str], prompt: Prompt) -> Iterator[str]:
    """Complete Python inputs: lines are gathered while the code so far is incomplete."""
    buf: list[str] = []
    for line in lines:
        buf.append(line.rstrip("\n"))
        source = "\n".join(buf)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the kernel shows warnings, once
                complete = codeop.compile_command(source, "<stdin>", "single") is not None
        except (SyntaxError, ValueError, OverflowError):
            complete = True  # the kernel reports the error
        if complete or (not line.strip() and len(buf) > 1):
            buf = []
            prompt.more = False
            if source.strip():
                yield source
        else:
            prompt.more = True
    if any(b.strip() for b in buf):
        yield "\n".join(buf)


class Prompt:
    """Writes prompts to stderr when the input is a terminal."""

    def __init__(self, profile: str, stream: TextIO) -> None:
        self.first, self.cont = PROMPTS[profile]
        self.show = stream.isatty()
        self.more = False

    def lines(self, stream: TextIO) -> Iterator[str]:
        while True:
            if self.show:
                sys.stderr.write(self.cont if self.more else self.first)
                sys.stderr.flush()
            line = stream.readline()
            if not line:
                return
            yield line


def show(result: RunResult) -> None:
    sys.stdout.buffer.write(result.stdout_bytes)
    value = getattr(result, "value", None)
    if value is not None:
        sys.stdout.write(value + "\n")
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr_bytes)
    if result.reason not in ("exited",):
        sys.stderr.write(f"[{result.reason}]\n")
    sys.stderr.flush()


def cmd_shell(args: argparse.Namespace) -> int:
    language = args.profile
    args.profile = None  # the seccomp profile is chosen per call, from what runs
    if args.tty:
        return tty_shell(language, policy_from_args(args))
    prompt = Prompt(language, sys.stdin)
    lines = prompt.lines(sys.stdin)
    with Sandbox(policy_from_args(args)) as sandbox:
        if language == "python":
            for source in python_inputs(lines, prompt):
                show(sandbox.run_python(source, stateful=True))
        elif language == "node":
            for line in lines:
                if line.strip():
                    show(sandbox.run_node(line, stateful=True))
        else:
            for line in lines:
                if line.strip():
                    show(sandbox.run_shell(line))
    if prompt.show:
        sys.stderr.write("\n")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("shell", help="interactive session: each input runs in one sandbox",
                       usage="cellblock shell [--profile python|node|shell] [options]",
                       conflict_handler="resolve")
    add_limit_options(p)
    p.add_argument("--profile", choices=sorted(PROMPTS), default="python",
                   help="what the inputs are: python (default), node or shell commands")
    p.add_argument("-t", "--tty", action="store_true",
                   help="one real shell or REPL on a terminal of the sandbox's own")
    p.set_defaults(func=cmd_shell)
