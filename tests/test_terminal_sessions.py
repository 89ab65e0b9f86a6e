"""Interactive terminals as users drive them: pexpect (which opens its own pty) driving python3
inside the sandbox, and `cellblock shell --tty` in a real terminal emulator (tmux) with line
editing, history, Ctrl-C stopping the foreground command but not the shell, and full-screen
programs (`top`, `vi`). As root and as uid 65534 (the `caller` and `cli` fixtures)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pexpect
import ptyprocess
import pytest

from conftest import IS_ROOT, SETPRIV, WORKER_DEADLINE, Cli, processes_with_argv, wait_for

#: Run inside the sandbox: pexpect spawns python3 on a pty of the sandbox's devpts and
#: drives a REPL session (state across lines, Ctrl-C, window size, end of file).
PEXPECT_DRIVER = textwrap.dedent('''\
    import json, os, pexpect
    child = pexpect.spawn("python3", ["-q"], encoding="utf-8", timeout=30, dimensions=(24, 80))
    child.expect_exact(">>> ")
    child.sendline("x = 6 * 7; import os, sys, time")
    child.expect_exact(">>> ")
    child.sendline("print('tty', sys.stdin.isatty(), os.ttyname(0), x)")
    child.expect(r"tty True (/dev/pts/\\d+) 42")
    pts = child.match.group(1)
    child.sendline("print('sleep' + 'ing', flush=True); time.sleep(120)")
    child.expect("\\r\\nsleeping\\r\\n")
    child.sendintr()
    child.expect_exact("KeyboardInterrupt")
    child.expect_exact(">>> ")
    child.setwinsize(40, 120)
    child.sendline("print('size', *os.get_terminal_size(), 'x', x)")
    child.expect_exact("size 120 40 x 42")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    print(json.dumps({"pts": pts, "exit": child.exitstatus, "signal": child.signalstatus,
                      "host_ptys": sorted(os.listdir("/dev/pts"))}))
''')


def package_sources(*modules: Any) -> dict[str, str]:
    """{relative path: source} of pure-Python packages, to copy into a sandbox."""
    files = {}
    for module in modules:
        root = Path(module.__file__).parent
        for path in root.rglob("*.py"):
            files[f"{root.name}/{path.relative_to(root)}"] = path.read_text()
    return files


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def caller(request: pytest.FixtureRequest) -> Callable[[str], list[str]]:
    """argv running a Python script (cellblock importable) as this process's user or 65534."""
    if request.param == "nobody":
        pkgdir = request.getfixturevalue("nobody_dir")
        return lambda code: [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin",
                             f"PYTHONPATH={pkgdir}", "/usr/bin/python3", "-c", code]
    return lambda code: [sys.executable, "-c", code]


def test_pexpect_drives_python3_inside(caller: Callable[[str], list[str]]) -> None:
    script = textwrap.dedent('''\
        import json, sys, cellblock
        files, driver = json.load(sys.stdin)
        with cellblock.Sandbox() as sb:
            for path, text in files.items():
                sb.write_file("/workspace/lib/" + path, text)
            r = sb.run(["python3", "-c", driver], env={"PYTHONPATH": "/workspace/lib"},
                       timeout=120)
        print(json.dumps(r.to_dict()))
    ''')
    stdin = json.dumps([package_sources(pexpect, ptyprocess), PEXPECT_DRIVER])
    out = subprocess.run(caller(script), input=stdin, capture_output=True, text=True,
                         timeout=WORKER_DEADLINE, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert (res["reason"], res["exit_code"]) == ("exited", 0), res["stdout"] + res["stderr"]
    got = json.loads(res["stdout"].strip().splitlines()[-1])
    # The REPL ended by end-of-file (status 0), on a pty of the sandbox's own devpts: its
    # only terminals are the ones made inside (the run itself has none: pipes).
    assert (got["exit"], got["signal"]) == (0, None), got
    assert got["pts"] == "/dev/pts/0" and got["host_ptys"] == ["ptmx"], got


class Tmux:
    """A tmux server of this test's own (its socket in the test's directory), one window."""

    def __init__(self, socket: Path, env: dict[str, str]) -> None:
        self.base = ["tmux", "-S", str(socket), "-f", "/dev/null"]
        self.env = env

    def __call__(self, *args: str) -> str:
        out = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env,
                             timeout=30, check=True)
        return out.stdout

    def screen(self) -> str:
        """The visible screen and the scrollback, lines joined."""
        return self("capture-pane", "-p", "-J", "-S", "-200", "-t", "t")

    def type(self, text: str, *keys: str) -> None:
        if text:
            self("send-keys", "-t", "t", "-l", text)
        if keys:
            self("send-keys", "-t", "t", *keys)

    def at_prompt(self) -> bool:
        """Whether the shell waits for a command (its prompt is the last line shown): keys
        typed while a full-screen program exits could be flushed by its terminal reset."""
        lines = [ln for ln in self.screen().splitlines() if ln.strip()]
        return bool(lines) and lines[-1].rstrip().endswith("#")

    def alternate(self) -> bool:
        """Whether the program shows the alternate screen (full-screen mode)."""
        return self("display-message", "-p", "-t", "t", "#{alternate_on}").strip() == "1"

    def shows(self, text: str, what: str, limit: float = 30.0) -> None:
        try:
            wait_for(lambda: text in self.screen(), f"{what} ({text!r})", limit)
        except AssertionError:
            raise AssertionError(f"{what}: {text!r} not shown in\n{self.screen()}") from None


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_cli_shell_in_tmux_edits_recalls_interrupts_and_runs_full_screen(
        cli: Cli, tmp_path: Path, marker: str) -> None:
    tmux = Tmux(tmp_path / "tmux.sock", {**cli.env, "TERM": "xterm"})
    status = tmp_path / "status"
    # The CLI's exit status is written by the pane's shell once the CLI ends.
    command = (shlex.join(cli.argv(["shell", "--tty", "--profile", "shell"]))
               + f"; echo $? > {shlex.quote(str(status))}")
    tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", command)
    try:
        tmux("set-option", "-t", "t", "remain-on-exit", "on")
        tmux.shows("# ", "the shell's prompt", 60)
        # Line editing and history (readline): the recalled line, edited at its start.
        tmux.type("echo first-$((6 * 7))", "Enter")
        tmux.shows("\nfirst-42", "the first command's output")
        tmux.type("", "Up", "C-a")
        tmux.type("echo again; ", "Enter")
        tmux.shows("again\nfirst-42", "the recalled and edited command's output")
        # Ctrl-C stops the foreground command, not the shell, whose state persists.
        tmux.type(f"cd /tmp; export MARK=kept; sleep {marker}", "Enter")
        wait_for(lambda: processes_with_argv(["sleep", marker]), "the sleep to run")
        tmux.type("", "C-c")
        wait_for(lambda: not processes_with_argv(["sleep", marker]), "Ctrl-C to stop it")
        tmux.type("echo status=$? in $(pwd) $MARK", "Enter")
        tmux.shows("status=130 in /tmp kept", "the shell after Ctrl-C")
        # Full-screen programs: top draws and quits on q; vi edits and writes a file.
        tmux.type("top -d 0.5", "Enter")
        wait_for(lambda: "load average" in (s := tmux.screen()) and "PID" in s, "top's screen")
        tmux.type("q")
        wait_for(tmux.at_prompt, "top to quit")
        tmux.type("echo after-$((1 + 1))", "Enter")
        tmux.shows("after-2", "the shell after top")
        tmux.type("vi /tmp/note.txt", "Enter")
        wait_for(lambda: tmux.alternate() and tmux.screen().count("\n~") >= 10, "vi's screen")
        tmux.type("ihello from vi")
        tmux.shows("hello from vi", "the inserted text")
        tmux.type("", "Escape")
        # Escape, then ':' at once would read as one key (Alt-:): the mode change is awaited.
        wait_for(lambda: "INSERT" not in tmux.screen().splitlines()[-1], "vi's command mode")
        tmux.type(":wq", "Enter")
        wait_for(lambda: not tmux.alternate() and tmux.at_prompt(), "vi to quit")
        tmux.type('echo "[$(cat /tmp/note.txt)]"', "Enter")
        tmux.shows("[hello from vi]", "the file vi wrote")
        tmux.type("exit", "Enter")
        # The CLI's own exit status (the shell exited 0).
        wait_for(lambda: status.exists() and status.read_text().endswith("\n"),
                 "the CLI to exit")
        assert status.read_text() == "0\n", (status.read_text(), tmux.screen()[-3000:])
    finally:
        subprocess.run([*tmux.base, "kill-server"], capture_output=True, timeout=30)
