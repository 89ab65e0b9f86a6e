"""Background processes on a terminal: `Sandbox.start(..., tty=True)`.

Scenarios run as root and, through setpriv, as uid 65534 (see test_processes_api.scenario).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_processes_api import WHO, scenario

from cellblock import InvalidSpec, Sandbox, SandboxIOError

SECRET = "s3cr3t-tty-value"


@pytest.fixture(params=WHO)
def who(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path | None]]:
    if request.param == "nobody":
        yield "nobody", request.getfixturevalue("nobody_dir")
    else:
        yield request.param, None


TERMINAL = """
code = '''
import os, signal, subprocess, sys
seen = []
signal.signal(signal.SIGWINCH, lambda *_: seen.append(1))
print("isatty", os.isatty(0), os.isatty(1), os.isatty(2), os.environ["TOKEN"])
print("first", subprocess.run(["stty", "size"], capture_output=True, text=True).stdout.strip())
print("READY", flush=True)
line = input()
print("second", subprocess.run(["stty", "size"], capture_output=True, text=True).stdout.strip())
print("winch", len(seen), "line", line, flush=True)
'''
with Sandbox() as sb:
    p = sb.start(["python3", "-c", code], tty=True, tty_size=(30, 100),
                 secrets={"TOKEN": PARAMS["secret"]}, timeout=60)
    seen = b""
    for chunk in p.iter_output(timeout=30):
        seen += chunk.data
        if b"READY" in seen:
            break
    p.resize(50, 132)
    p.write_stdin("go on\\n")
    res = p.wait(60)
    out["chunks"] = [c.stream for c in p.iter_output()]
    out["reason"], out["exit_code"] = res.reason, res.exit_code
    out["stdout"], out["stderr"] = res.stdout, res.stderr
    out["redactions"] = res.redactions
    try:
        p.resize(10, 10)
        out["resize_after_end"] = "accepted"
    except cellblock.SandboxIOError as e:
        out["resize_after_end"] = type(e).__name__
"""


def test_a_started_process_gets_a_terminal_that_resizes(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], TERMINAL, who[1], secret=SECRET)
    assert (out["reason"], out["exit_code"]) == ("exited", 0), out
    stdout = out["stdout"]
    # Merged on the terminal: stdin, stdout and stderr are the pty; nothing goes to stderr.
    assert "isatty True True True [REDACTED:TOKEN]\r\n" in stdout, stdout
    assert SECRET not in stdout and out["redactions"]["TOKEN"] >= 1
    assert out["stderr"] == "" and set(out["chunks"]) == {"stdout"}
    assert "first 30 100\r\n" in stdout, stdout
    # resize() set the window the command reads and sent it SIGWINCH.
    assert "second 50 132\r\n" in stdout, stdout
    assert "winch 1 line go on\r\n" in stdout, stdout
    # The terminal echoed the typed line.
    assert "go on\r\n" in stdout.split("READY", 1)[1], stdout
    assert out["resize_after_end"] == "SandboxIOError"


REPL = """
def until(p, marker, seen):
    # The whole output once `marker` shows up after the first len(seen) bytes.
    got, i, deadline = b"", 0, time.monotonic() + 30
    while True:
        chunks = p.read_output(i, timeout=1)
        i += len(chunks)
        got += b"".join(c.data for c in chunks)
        if marker in got[len(seen):]:
            return got
        if (not chunks and not p.running) or time.monotonic() > deadline:
            raise AssertionError(got)

with Sandbox() as sb:
    p = sb.start(["python3", "-q", "-i"], tty=True, timeout=60)
    seen = until(p, b">>> ", b"")  # typed at the prompt, as by a user
    p.write_stdin("print(6 * 7)\\n")
    seen = until(p, b"42\\r\\n>>> ", seen)
    out["after_first"] = seen.decode()
    p.write_stdin("import sys; sys.stdout.isatty()\\n")
    seen = until(p, b"True", seen)
    p.close_stdin()  # Ctrl-D at the prompt: the REPL exits
    res = p.wait(60)
    out["reason"], out["exit_code"], out["stdout"] = res.reason, res.exit_code, res.stdout
    try:
        p.write_stdin("more\\n")
        out["write_after_close"] = "accepted"
    except cellblock.SandboxIOError as e:
        out["write_after_close"] = type(e).__name__
"""


def test_an_interactive_repl_is_driven_by_write_stdin(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], REPL, who[1])
    # The answer came while the REPL was still running, echoed line first.
    assert ">>> print(6 * 7)\r\n42\r\n" in out["after_first"], out["after_first"]
    assert (out["reason"], out["exit_code"]) == ("exited", 0), out
    assert ">>> import sys; sys.stdout.isatty()\r\nTrue\r\n>>> " in out["stdout"], out["stdout"]
    assert out["write_after_close"] == "SandboxIOError"


def test_bad_terminal_arguments_are_typed_errors() -> None:
    with Sandbox() as sb:
        with pytest.raises(InvalidSpec, match="tty_size"):
            sb.start(["true"], tty_size=(10, 10))
        with pytest.raises(InvalidSpec, match="tty_size"):
            sb.start(["true"], tty=True, tty_size=(0, 80))
        p = sb.start(["cat"])
        with pytest.raises(InvalidSpec, match="no terminal"):
            p.resize(10, 10)
        t = sb.start(["cat"], tty=True)
        with pytest.raises(InvalidSpec, match="tty_size"):
            t.resize(24, 0)
        p.close_stdin()
        # A partial last line: end-of-file is typed twice (once ends the line), as at a keyboard.
        t.write_stdin("partial")
        t.close_stdin()
        assert p.wait(30).exit_code == 0
        res = t.wait(30)
        assert (res.exit_code, res.stdout) == (0, "partialpartial"), res
        with pytest.raises(SandboxIOError):
            t.write_stdin("late\n")
