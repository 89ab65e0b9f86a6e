"""Environment isolation: a run sees only PATH, HOME, LANG and what `env=` gives it.

Each caller carries a canary in its own environment (this process through os.environ, the
uid-65534 worker from its start); no trace of it may be readable inside.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import Runner

#: Reads every environ and cmdline of other processes the sandbox can open under /proc
#: (payload prefix; the payload's own are left out: they hold the payload's text).
PROC_TEXT = textwrap.dedent("""\
    seen = []
    mine = {"self", "thread-self", str(os.getpid())}
    for p in set(os.listdir("/proc")) - mine:
        for f in ("environ", "cmdline"):
            try:
                seen.append(open(f"/proc/{p}/{f}", "rb").read().decode("utf-8", "replace"))
            except OSError:
                pass
""")


def test_environment_is_exactly_the_default(sandbox: Runner) -> None:
    binds = sandbox.stats()["ro_binds"]
    out = sandbox.probe("report(env=dict(os.environ))")
    env = out["env"]
    assert set(env) == {"PATH", "HOME", "LANG"}, env
    assert env["HOME"] == "/workspace" and env["LANG"] == "C.UTF-8"
    path = env["PATH"].split(":")
    assert "/usr/bin" in path and "/bin" in path
    # Interpreter prefixes outside /usr come first, so `python3` is the caller's.
    assert path[: len(binds)] == [f"{b}/bin" for b in binds]


def test_env_adds_and_overrides(sandbox: Runner) -> None:
    extra = {"FOO": "bar baz", "EMPTY": "", "UNICODE": "ünï", "HOME": "/tmp"}
    out = sandbox.probe("report(env=dict(os.environ))", env=extra)
    assert set(out["env"]) == {"PATH", "HOME", "LANG", "FOO", "EMPTY", "UNICODE"}
    assert {k: out["env"][k] for k in extra} == extra


def test_callers_variables_are_invisible(sandbox: Runner, canary: str) -> None:
    # Spelled backwards so the payload's own command line does not contain it.
    out = sandbox.probe(PROC_TEXT + f"canary = {canary[::-1]!r}[::-1]\n"
                        "report(env=dict(os.environ), leaks=[t for t in seen if canary in t],"
                        " files=len(seen))\n")
    assert "CELLBLOCK_TEST_CANARY" not in out["env"]
    assert out["leaks"] == [] and out["files"] > 0


def test_callers_command_line_is_invisible(sandbox: Runner) -> None:
    # PID 1 is a fork of the caller: it must not show the caller's arguments (which may hold
    # host paths or secrets).
    caller = Path(f"/proc/{sandbox.stats()['pid']}/cmdline").read_bytes()
    args = [a.decode() for a in caller.split(b"\0") if len(a) > 3]
    assert args
    out = sandbox.probe(PROC_TEXT + "report(seen=seen)")
    assert not [t for t in out["seen"] for a in args if a in t]


def test_argv_is_passed_exactly(sandbox: Runner) -> None:
    args = ["a b", "", "ünïcödé", "--flag=1", "$HOME", "*", "'\"", "\\n"]
    res = sandbox.run(["python3", "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *args])
    assert json.loads(res.stdout) == args
