"""Terminals: a private devpts instance per sandbox, `tty=True` runs on a pty of the sandbox's own,
and the caller's terminal out of reach (no TIOCSTI injection, cf. bubblewrap CVE-2017-5226).

Every claim runs as root (this process) and as uid 65534 (setpriv), through the `sandbox` and
`cli` fixtures or through `caller`, which runs a Python script as either identity.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cellblock
from conftest import (
    IS_ROOT,
    PRELUDE,
    SETPRIV,
    TTY_IS_COLD,
    WORKER_DEADLINE,
    Cli,
    Runner,
    processes_with_argv,
)

SECRET = "tty-secret-" + "8f3a91c2d7e4"

#: What a sandboxed program learns about its stdio and terminal.
TERMINAL_FACTS = '''
import fcntl, termios
def facts():
    out = {"isatty": [os.isatty(fd) for fd in (0, 1, 2)],
           "pts": sorted(os.listdir("/dev/pts")),
           "ptmx_link": os.readlink("/dev/ptmx"),
           "pts_dev": os.stat("/dev/pts").st_dev,
           "dev_tty": attempt(lambda: os.close(os.open("/dev/tty", os.O_RDWR)))}
    if out["isatty"][0]:
        out["ttyname"] = os.ttyname(0)
        out["session_leader"] = os.getsid(0) == os.getpid()
        out["foreground"] = os.tcgetpgrp(0) == os.getpgrp()
        out["size"] = list(os.get_terminal_size(0))
    return out
'''


def host_pts_dev() -> int:
    return os.stat("/dev/pts").st_dev


@pytest.fixture
def host_pty() -> Any:
    """A pty of the host's devpts held open during the test: the sandbox must not see it."""
    master, slave = os.openpty()
    yield os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_openpty_works_inside_on_a_private_instance(sandbox: Runner, host_pty: str) -> None:
    got = sandbox.probe(f"HOST_PTY = {host_pty!r}\n" + TERMINAL_FACTS + '''
import pty
before = sorted(os.listdir("/dev/pts"))
host = attempt(os.open, HOST_PTY, os.O_RDWR | os.O_NOCTTY)
m, s = pty.openpty()
name = os.ttyname(s)
os.write(m, b"ping\\n")
line = os.read(s, 100)
m2, s2 = os.openpty()
report(before=before, name=name, line=line.decode(), name2=os.ttyname(s2), host=host,
       **facts())
''')
    # Before any pty is opened, the sandbox's /dev/pts holds only its ptmx: none of the host's
    # terminals (the test holds one open) is listed, and its path does not open.
    assert got["before"] == ["ptmx"], got
    assert got["host"] == "ENOENT", got
    assert got["pts_dev"] != host_pts_dev(), "the sandbox's /dev/pts is the host's instance"
    assert got["ptmx_link"] == "pts/ptmx"
    assert got["name"] == "/dev/pts/0" and got["name2"] == "/dev/pts/1", got
    assert got["line"] == "ping\n"
    assert got["pts"] == ["0", "1", "ptmx"], got
    # Without tty=True the command has pipes and no controlling terminal.
    assert got["isatty"] == [False, False, False]
    assert got["dev_tty"] == "ENXIO", got


def test_a_sandbox_cannot_exhaust_the_hosts_ptys(sandbox: Runner) -> None:
    # Every devpts instance draws on the kernel's one pty pool: opening terminals until refused
    # stops at the instance's own cap, far below the pool (kernel.pty.max).
    got = sandbox.probe('''
import errno
held, err = [], None
try:
    for _ in range(2000):
        held.append(os.openpty())
except OSError as e:
    err = errno.errorcode.get(e.errno, str(e.errno))
report(opened=len(held), err=err)
''')
    assert got["opened"] == 256, got
    assert got["err"] == "ENOSPC", got


@TTY_IS_COLD
def test_tty_run_gets_its_own_controlling_terminal(sandbox: Runner, host_pty: str) -> None:
    res = sandbox.run(["python3", "-c", PRELUDE + TERMINAL_FACTS + "report(**facts())"],
                      tty=True, tty_size=[31, 97])
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stdout)
    # Output comes from the terminal: stdout and stderr merged, with the tty's CRLF.
    assert res.stderr == ""
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["isatty"] == [True, True, True]
    assert got["ttyname"] == "/dev/pts/0", got
    assert got["pts"] == ["0", "ptmx"], got
    assert got["pts_dev"] != host_pts_dev()
    assert got["session_leader"] and got["foreground"], got
    assert got["dev_tty"] == "OK", got
    assert got["size"] == [97, 31], got
    assert "\r\n" in res.stdout


@TTY_IS_COLD
def test_stderr_is_merged_and_secrets_are_redacted(sandbox: Runner) -> None:
    code = "import os, sys; print(os.environ['TOKEN']); print('E:' + os.environ['TOKEN'], " \
           "file=sys.stderr)"
    res = sandbox.run(["python3", "-c", code], tty=True, secrets={"TOKEN": SECRET})
    assert res.exit_code == 0, res.stdout
    assert SECRET not in res.stdout and SECRET not in json.dumps(vars(res))
    assert res.stdout.count("[REDACTED:TOKEN]") == 2, res.stdout
    assert "E:[REDACTED:TOKEN]" in res.stdout and res.stderr == ""


@TTY_IS_COLD
def test_tty_output_is_capped(sandbox: Runner) -> None:
    res = sandbox.run(["python3", "-c", "import sys\nwhile True: sys.stdout.write('x' * 4096)"],
                      tty=True, max_output=100_000, timeout=30)
    assert res.reason == "output_limit", res.reason
    assert res.stdout_truncated and len(res.stdout) == 100_000


@TTY_IS_COLD
def test_input_is_typed_into_an_interactive_repl(sandbox: Runner) -> None:
    # python3 reads a terminal interactively: prompt, echo of the typed line, its result.
    res = sandbox.run(["python3", "-q"], tty=True, stdin="print(6 * 7)\nexit()\n", timeout=30)
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stdout)
    assert ">>> print(6 * 7)\r\n42\r\n>>> exit()" in res.stdout, res.stdout
    # A line-reading program gets the Ctrl-D typed after the input: end of file.
    res = sandbox.run(["cat"], tty=True, stdin="one line\n", timeout=30)
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stdout)
    assert res.stdout == "one line\r\none line\r\n"


@TTY_IS_COLD
def test_tty_runs_take_the_cold_path_with_a_cell_ready(sandbox: Runner) -> None:
    from test_cells import ready_cell

    before = ready_cell(sandbox)
    res = sandbox.run(["sh", "-c", "tty"], tty=True)
    after = sandbox.cells()
    # Built now: a cell neither opens a terminal nor passes its master out.
    assert (res.exit_code, res.stdout) == (0, "/dev/pts/0\r\n"), res.stdout
    assert after["hits"] == before["hits"] and after["ready"] >= 1, (before, after)
    # The cell is still there for a run without a terminal (and has its devpts too).
    res = sandbox.run(["python3", "-c", "import pty, os; print(os.ttyname(pty.openpty()[1]))"])
    assert sandbox.cells()["hits"] == before["hits"] + 1 and res.stdout == "/dev/pts/0\n"


def test_bad_window_sizes_are_refused() -> None:
    with pytest.raises(cellblock.InvalidSpec, match="tty_size"):
        cellblock.run(["true"], tty=True, tty_size=(0, 80))
    with pytest.raises(cellblock.InvalidSpec, match="tty_size"):
        cellblock.run(["true"], tty=True, tty_size=(24, 70000))
    with pytest.raises(cellblock.InvalidSpec, match="tty_size"):
        cellblock.run(["true"], tty_size=(24, 80))
    with pytest.raises(cellblock.InvalidSpec, match="tty_input"):
        cellblock.run(["true"], tty_input=0)
    with cellblock.Sandbox() as sb, pytest.raises(cellblock.InvalidSpec, match="tty_size"):
        sb.run(["true"], tty=True, tty_size=(24, -1))


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def caller(request: pytest.FixtureRequest) -> Callable[[str], list[str]]:
    """argv running a Python script (cellblock importable) as this process's user or 65534."""
    if request.param == "nobody":
        pkgdir = request.getfixturevalue("nobody_dir")
        return lambda code: [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin",
                             f"PYTHONPATH={pkgdir}", "/usr/bin/python3", "-c", code]
    return lambda code: [sys.executable, "-c", code]


def run_caller(argv: list[str]) -> dict[str, Any]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_DEADLINE, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_session_calls_get_a_terminal(caller: Callable[[str], list[str]]) -> None:
    got = run_caller(caller(textwrap.dedent('''\
        import json, cellblock
        probe = "import os, sys; print(os.isatty(0), os.ttyname(0), sorted(os.listdir('/dev/pts')))"
        with cellblock.Sandbox() as sb:
            a = sb.run(["python3", "-c", probe], tty=True)
            b = sb.run(["python3", "-c", probe + "\\nimport pty; pty.openpty()"], tty=True)
            c = sb.run(["python3", "-c", "import os; print(os.isatty(0))"])
        print(json.dumps({"a": a.to_dict(), "b": b.to_dict(), "c": c.to_dict()}))
    ''')))
    a, b, c = got["a"], got["b"], got["c"]
    assert a["exit_code"] == 0 and a["stdout"].startswith("True /dev/pts/"), a
    assert b["exit_code"] == 0 and b["stdout"].startswith("True /dev/pts/"), b
    # One devpts instance per session: the calls' terminals are the session's, each call has
    # its own, and the first call's is gone with it.
    assert a["stdout"].split()[2:] == ["['0',", "'ptmx']"], a
    assert c["stdout"].strip() == "False", c


@pytest.mark.parametrize("module, least", [("test_pty", 5), ("test_tty", 2)])
def test_cpython_test_pty_and_test_tty_pass_inside(
        caller: Callable[[str], list[str]], module: str, least: int) -> None:
    # CPython's own test_pty and test_tty (tty.setraw/setcbreak on a pty opened inside),
    # inside the sandbox, with and without a terminal as stdio. A python3 without its test
    # suite (Debian's, which uid 65534 uses) runs this interpreter's test source with its own
    # test.support; between patch releases one test differs: test_pty's test__copy_to_each
    # mocks select() and asserts the order of pty._copy's fds (a pure Python detail that
    # changed in 3.11.x), so it is left out when the versions differ.
    import importlib

    source = Path(importlib.import_module(f"test.{module}").__file__ or "").read_text()
    version = ".".join(map(str, sys.version_info[:3]))
    script = textwrap.dedent('''\
        import importlib.util, json, sys, cellblock
        name = sys.argv[3]
        if importlib.util.find_spec("test." + name):
            argv = ["python3", "-m", "test", "-v", name]
        else:
            argv = ["python3", "-c", "import sys, types, unittest\\n"
                    "m = types.ModuleType(sys.argv[3]); sys.modules[sys.argv[3]] = m\\n"
                    "exec(compile(sys.argv[1], sys.argv[3] + '.py', 'exec'), m.__dict__)\\n"
                    "if '.'.join(map(str, sys.version_info[:3])) != sys.argv[2] and "
                    "hasattr(m, 'SmallPtyTests'):\\n"
                    "    del m.SmallPtyTests.test__copy_to_each\\n"
                    "unittest.main(module=m, argv=[sys.argv[3]], verbosity=2)", *sys.argv[1:]]
        out = {}
        for tty in (False, True):
            r = cellblock.run(argv, tty=tty, timeout=120, memory="1G", pids=512)
            out[str(tty)] = r.to_dict()
        print(json.dumps(out))
    ''')
    got = run_caller([*caller(script), source, version, module])
    for tty, res in got.items():
        text = res["stdout"] + res["stderr"]
        failure = re.search(r"^(FAIL|ERROR):", text, re.M)
        assert (res["reason"], res["exit_code"]) == ("exited", 0), (
            tty, text[failure.start():][:3000] if failure else text[-3000:])
        ran = re.search(r"^Ran (\d+) tests", text, re.M)
        assert ran and int(ran.group(1)) >= least, text[-3000:]
        assert re.search(r"^OK\b", text, re.M), text[-3000:]
        assert "skipped" not in text, text[-3000:]
        assert ("test_master_read" if module == "test_pty" else "test_setraw") in text, text


# ---- the caller's terminal -----------------------------------------------------------------

#: Runs argv[2:] with the pty on fds 0-2 as this process's controlling terminal, then reads
#: (raw mode) what is waiting in the terminal's input queue and writes it to the file argv[1].
#: With argv[2] == "--control" it injects a line itself first: the detector's own check.
CTTY_WRAPPER = textwrap.dedent('''\
    import fcntl, json, os, select, subprocess, sys, termios, tty
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    result_path, argv = sys.argv[1], sys.argv[2:]
    status = None
    if argv == ["--control"]:
        for ch in b"CONTROL-INJECTED\\n":
            fcntl.ioctl(0, termios.TIOCSTI, bytes([ch]))
    else:
        status = subprocess.run(argv).returncode
    tty.setraw(0, termios.TCSANOW)  # TCSAFLUSH would drop the queue we look at
    got = b""
    while select.select([0], [], [], 0.5)[0]:
        got += os.read(0, 4096)
    with open(result_path, "w") as f:
        json.dump({"status": status, "pending": got.decode(errors="replace")}, f)
''')

#: The attack: push a command line into every terminal within reach.
INJECT = PRELUDE + textwrap.dedent('''\
    import fcntl, termios
    line = bytes([73, 78, 74]) + b"-ECTED-BY-SANDBOX\\n"   # not printed as one literal
    def inject(fd):
        for ch in line:
            fcntl.ioctl(fd, termios.TIOCSTI, bytes([ch]))
    out = {str(fd): attempt(inject, fd) for fd in (0, 1, 2)}
    out["tty"] = attempt(lambda: inject(os.open("/dev/tty", os.O_RDWR)))
    # TIOCLINUX (virtual consoles only) subcode 3: paste the console selection as input.
    out["linux"] = [attempt(fcntl.ioctl, fd, 0x541C, bytes([3])) for fd in (0, 1, 2)]
    out["isatty"] = os.isatty(0)
    report(**out)
''')


def under_ctty(argv: list[str], tmp_path: Path, rows: int = 24, cols: int = 80,
               react: Callable[[bytes, int], None] | None = None, limit: float = WORKER_DEADLINE
               ) -> tuple[dict[str, Any], str]:
    """Runs `argv` with a pty made here as its controlling terminal and stdio; returns what was
    left in that terminal's input queue afterwards, and everything it displayed. `react` is
    called with the output so far and the master at every turn (at least every 0.2 s)."""
    master, slave = os.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    result = tmp_path / "ctty.json"
    proc = subprocess.Popen([sys.executable, "-c", CTTY_WRAPPER, str(result), *argv],
                            stdin=slave, stdout=slave, stderr=slave, cwd="/")
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    shown += os.read(master, 65536)
                except OSError:  # EIO: every slave fd is closed
                    break
            elif proc.poll() is not None:
                break
            if react is not None:
                react(shown, master)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    assert result.exists(), shown.decode(errors="replace")[-3000:]
    return json.loads(result.read_text()), shown.decode(errors="replace")


def tiocsti_allowed() -> bool:
    path = Path("/proc/sys/dev/tty/legacy_tiocsti")
    return not path.exists() or path.read_text().strip() == "1"


@pytest.mark.parametrize("tty", [False, True], ids=["pipes", "tty"])
def test_tiocsti_cannot_reach_the_callers_terminal(cli: Cli, tmp_path: Path, tty: bool) -> None:
    if not tiocsti_allowed():
        pytest.skip("dev.tty.legacy_tiocsti=0: this kernel refuses TIOCSTI to everyone")
    # The detector works: an injection into the caller's terminal is found in its queue.
    control, _ = under_ctty(["--control"], tmp_path)
    assert "CONTROL-INJECTED" in control["pending"], control
    # --json: the CLI itself reads no keystrokes, so whatever reached the caller's terminal
    # stays in its queue for the detector.
    args = ["run", "--json", *(["-t"] if tty else []), "--", "python3", "-c", INJECT]
    got, shown = under_ctty(cli.argv(args), tmp_path)
    assert got["status"] == 0, shown[-3000:]
    assert "INJECTED-BY-SANDBOX" not in got["pending"], (got, shown)
    run = json.loads([ln for ln in shown.splitlines() if ln.startswith("{")][-1])
    report = json.loads(run["stdout"].strip().splitlines()[-1])
    assert "OK" not in report["linux"], report
    if tty:
        # Its own terminal only: injecting there types into the sandbox's own input.
        assert report["isatty"] and report["0"] == "OK" and report["tty"] == "OK", report
    else:
        # Pipes, and no controlling terminal: nothing to inject into.
        assert not report["isatty"], report
        assert [report[k] for k in ("0", "1", "2")] == ["ENOTTY"] * 3, report
        assert report["tty"] == "ENXIO", report


def test_cli_run_t_uses_the_callers_window_size(cli: Cli, tmp_path: Path) -> None:
    code = "import os; print('tty', os.isatty(0), os.isatty(1), *os.get_terminal_size(1))"
    got, shown = under_ctty(cli.argv(["run", "-t", "--", "python3", "-c", code]), tmp_path,
                            rows=33, cols=101)
    assert got["status"] == 0, shown[-3000:]
    assert "tty True True 101 33" in shown, shown
    got, shown = under_ctty(cli.argv(["run", "--", "python3", "-c", code.replace(
        ", *os.get_terminal_size(1)", "")]), tmp_path)
    assert "tty False False" in shown, shown


def test_cli_run_t_forwards_window_changes(cli: Cli, tmp_path: Path) -> None:
    code = textwrap.dedent("""\
        import os, signal
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH])
        print("ready", *os.get_terminal_size(1), flush=True)
        got = signal.sigtimedwait([signal.SIGWINCH], 30)
        print("winch" if got else "no-winch", *os.get_terminal_size(1), flush=True)
    """)
    resized = []

    def resize(shown: bytes, master: int) -> None:
        # Once the command is up, the caller's window changes as a user would resize it.
        if b"ready 90 20" in shown and not resized:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 132, 0, 0))
            resized.append(True)
    got, shown = under_ctty(cli.argv(["run", "-t", "--", "python3", "-c", code]), tmp_path,
                            rows=20, cols=90, react=resize)
    assert got["status"] == 0 and resized, shown[-3000:]
    assert "winch 132 45" in shown, shown


def test_cli_run_t_types_keystrokes_and_ctrl_c_stops_only_the_foreground(
        cli: Cli, tmp_path: Path, marker: str) -> None:
    # An interactive shell on the sandbox's terminal, driven from the caller's keyboard: the
    # shell's state persists between lines, and Ctrl-C (typed as a byte, the caller's terminal
    # being raw) interrupts the foreground command through the sandbox's own line discipline.
    steps: list[Step] = [(b"$ ", b"cd /tmp && export MARK=kept\r"),
                         (b"$ ", f"sleep {marker}\r".encode()),
                         (sleeping(marker), b"\x03"),
                         (b"$ ", b"echo status=$? in $(pwd) $MARK\r"),
                         (b"status=130 in /tmp kept", b"exit\r")]
    react, done = drive(steps)
    argv = cli.argv(["run", "-t", "--timeout", "60", "--", "sh", "-c", "PS1='$ ' exec sh -i"])
    got, shown = under_ctty(argv, tmp_path, react=react, limit=90)
    assert len(done) == len(steps), (done, shown[-3000:])
    assert "status=130 in /tmp kept" in shown, shown[-3000:]
    assert got["status"] == 0, shown[-3000:]


#: (what to wait for: text shown after the previous step's, or a condition; keys to type).
Step = tuple[bytes | Callable[[], bool], bytes]


def sleeping(marker: str) -> Callable[[], bool]:
    """True once `sleep <marker>` runs (seen in the host's /proc): Ctrl-C then reaches it."""
    return lambda: bool(processes_with_argv(["sleep", marker]))


def drive(steps: list[Step]) -> tuple[Callable[[bytes, int], None], list[bytes]]:
    """A `react` for `under_ctty` typing each step's keys once its condition holds or its text
    has been shown (after the point where the previous step typed)."""
    done: list[bytes] = []
    mark = [0]

    def react(shown: bytes, master: int) -> None:
        if len(done) == len(steps):
            return
        wait_for, keys = steps[len(done)]
        if callable(wait_for):
            if not wait_for():
                return
        else:
            at = shown.find(wait_for, mark[0])
            if at < 0:
                return
            mark[0] = at + len(wait_for)
        os.write(master, keys)
        done.append(keys)
    return react, done


@pytest.mark.parametrize("profile, steps, expect", [
    # bash's prompt (from /etc/bash.bashrc) ends in "# " for uid 0 inside.
    # SLEEP: `sleep <marker>`; b"" waits until it runs.
    ("shell", [(b"# ", b"cd /tmp; export MARK=kept; SLEEP\r"), (b"", b"\x03"),
               (b"# ", b"echo status=$? in $(pwd) $MARK; tty\r"), (b"/dev/pts/0", b"exit\r")],
     "status=130 in /tmp kept"),
    ("python", [(b">>> ", b"x = 6 * 7\r"), (b">>> ", b"import time; time.sleep(120)\r"),
                (b"sleep(120)\r\n", b"\x03"), (b"KeyboardInterrupt", b"print('x is', x)\r"),
                (b"x is 42", b"exit()\r")],
     "x is 42"),
    # A full-screen editor: vi draws its screen (TERM is set), inserts, writes, quits.
    ("shell", [(b"# ", b"vi /tmp/note.txt\r"), (b"~", b"ihello from vi\x1b:wq\r"),
               (b"# ", b"cat /tmp/note.txt; exit\r")],
     "hello from vi\r\nexit\r\n"),  # cat, then bash saying exit: not vi's screen
], ids=["shell", "python", "vi"])
def test_cli_shell_tty_is_one_interactive_session(cli: Cli, tmp_path: Path, marker: str,
                                                  profile: str, steps: list[tuple[bytes, bytes]],
                                                  expect: str) -> None:
    react, done = drive([(sleeping(marker) if w == b"" else w,
                          k.replace(b"SLEEP", f"sleep {marker}".encode())) for w, k in steps])
    got, shown = under_ctty(cli.argv(["shell", "--tty", "--profile", profile]), tmp_path,
                            react=react, limit=90)
    assert len(done) == len(steps), (done, shown[-3000:])
    assert expect in shown and got["status"] == 0, shown[-3000:]
