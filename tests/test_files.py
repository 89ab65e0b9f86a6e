"""The session files API (`Sandbox.read_file`, `write_file`, `iter_file`, `list_dir`, ...).

The host never does the sandbox's file work with the host's privileges or view: every attempt
below is planted by code inside the sandbox (links into /proc and /dev, fifos, files on
read-only binds) and then aimed at the files API, which must refuse it the way the sandbox
itself would be refused, or better. Each scenario runs as a fresh caller process, as root and
as uid 65534, bounded in time (a hang is a failure, not a stuck test run) and, where a payload
aims at the caller's memory, in address space.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import cellblock
from cellblock.agent.tools import Toolbox
from cellblock.session import Sandbox
from conftest import IS_ROOT, SETPRIV, Caller

#: Put in front of every scenario: helpers that turn outcomes into JSON.
PRELUDE = textwrap.dedent('''\
    import io, json, os, resource, sys, threading, time
    import cellblock
    from cellblock.session import Sandbox
    out = {}
    def attempt(fn):
        """{"ok": value} or {"error": class name, "message": text} of a cellblock error."""
        try:
            value = fn()
        except cellblock.CellblockError as e:
            return {"error": type(e).__name__, "message": str(e)}
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if isinstance(value, list):
            value = [v.model_dump() if hasattr(v, "model_dump") else v for v in value]
        return {"ok": value}
    def bounded(fn, limit=15.0):
        """attempt(fn) in a thread; {"hung": True} if it has not returned after `limit` s."""
        box = {}
        t = threading.Thread(target=lambda: box.update(attempt(fn)), daemon=True)
        started = time.monotonic()
        t.start()
        t.join(limit)
        if t.is_alive():
            return {"hung": True}
        return {**box, "seconds": time.monotonic() - started}
    def sh(sb, script):
        r = sb.run(["sh", "-c", script])
        assert r.exit_code == 0, (r.stdout, r.stderr)
        return r.stdout
    def done():
        print(json.dumps(out), flush=True)
        os._exit(0)  # a hung call must not keep the scenario alive
''')

Scenario = Callable[..., dict[str, Any]]


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    """Runs a scenario script as a fresh caller process: this user, or uid 65534."""
    if request.param == "nobody":
        pkgdir = request.getfixturevalue("nobody_dir")
        prefix = [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={pkgdir}",
                  "/usr/bin/python3", "-c"]
        env = {"PATH": "/usr/bin:/bin"}
    else:
        prefix = [sys.executable, "-c"]
        env = dict(os.environ)

    def run(code: str, *, timeout: float = 60.0, tty_input: bytes | None = None
            ) -> dict[str, Any]:
        argv = [*prefix, PRELUDE + textwrap.dedent(code) + "\ndone()\n"]
        if tty_input is None:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                 env=env, cwd="/", check=False)
            stdout, stderr, code_ = res.stdout, res.stderr, res.returncode
        else:
            stdout, stderr, code_ = run_on_terminal(argv, env, tty_input, timeout)
        assert code_ == 0, stderr[-3000:]
        lines = stdout.strip().splitlines()
        assert lines, f"scenario reported nothing; stderr: {stderr[-3000:]}"
        result: dict[str, Any] = json.loads(lines[-1])
        return result
    return run


def run_on_terminal(argv: list[str], env: dict[str, str], typed: bytes, timeout: float
                    ) -> tuple[str, str, int]:
    """Runs argv with a pseudo-terminal as its controlling terminal, on which `typed` has
    already been typed (a read of /dev/tty by the caller would return it at once)."""
    master, slave = pty.openpty()
    os.write(master, typed)
    try:
        # setsid --ctty: a new session whose controlling terminal is the pty on stdin.
        proc = subprocess.Popen(["setsid", "--wait", "--ctty", *argv], stdin=slave,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd="/")
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
            proc.wait()
    finally:
        os.close(slave)
        os.close(master)
    return stdout, stderr, proc.returncode


def refused(outcome: dict[str, Any], *classes: str) -> bool:
    """The call returned promptly with one of the error classes."""
    return not outcome.get("hung") and outcome.get("error") in classes


# ---- the host's privileges and view never serve the sandbox ---------------------------------

def test_planted_link_to_kallsyms_is_refused(scenario: Scenario) -> None:
    out = scenario('''
        with Sandbox() as sb:
            sh(sb, "ln -s /proc/kallsyms report.txt; ln -s /proc/1/status status.txt")
            out["read"] = bounded(lambda: sb.read_file("report.txt"))
            out["iter"] = bounded(lambda: b"".join(sb.iter_file("report.txt")))
            out["direct"] = bounded(lambda: sb.read_file("/proc/kallsyms"))
            out["status"] = bounded(lambda: sb.read_file("status.txt"))
    ''')
    for key in ("read", "iter", "direct", "status"):
        assert refused(out[key], "PathEscape"), (key, out[key])


def test_write_to_proc_autogroup_is_refused(scenario: Scenario) -> None:
    out = scenario('''
        with Sandbox() as sb:
            sleeper = threading.Thread(target=lambda: sb.run(["python3", "-c",
                "import os, time; open('/tmp/pid', 'w').write(os.readlink('/proc/self'));"
                "time.sleep(30)"], timeout=20), daemon=True)
            sleeper.start()
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    pid = sb.read_file("/tmp/pid").decode()
                    if pid:
                        break
                except cellblock.SandboxIOError:
                    pass
                time.sleep(0.05)
            sh(sb, f"ln -s /proc/{pid}/autogroup ag")
            out["direct"] = bounded(lambda: sb.write_file(f"/proc/{pid}/autogroup", "-20"))
            out["link"] = bounded(lambda: sb.write_file("ag", "-20"))
            out["self_attempt"] = sb.run(["sh", "-c",
                f"echo -20 > /proc/{pid}/autogroup"]).exit_code
            out["nice"] = sh(sb, f"cat /proc/{pid}/autogroup").split()[-1]
    ''')
    assert out["self_attempt"] != 0, "the sandbox itself may not renice (EPERM)"
    assert refused(out["direct"], "PathEscape"), out["direct"]
    assert refused(out["link"], "PathEscape"), out["link"]
    assert out["nice"] == "0"


def test_planted_link_to_the_callers_terminal_is_refused(scenario: Scenario) -> None:
    out = scenario('''
        with Sandbox() as sb:
            sh(sb, "ln -s /dev/tty notes.txt")
            out["read"] = bounded(lambda: sb.read_file("notes.txt"), 10)
            out["write"] = bounded(lambda: sb.write_file("/dev/tty", "typed by the host"), 10)
    ''', tty_input=b"keystroke-of-the-caller\n")
    assert refused(out["read"], "PathEscape"), out["read"]
    assert refused(out["write"], "PathEscape"), out["write"]
    assert "keystroke" not in json.dumps(out)


def test_link_to_dev_zero_does_not_grow_the_caller(scenario: Scenario) -> None:
    out = scenario('''
        # A read that grows without bound fails here, not on the host.
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        with Sandbox() as sb:
            sh(sb, "ln -s /dev/zero z; ln -s /dev/urandom u")
            out["zero"] = bounded(lambda: sb.read_file("z", max_size="10G"))
            out["iter"] = bounded(lambda: sum(len(c) for c in sb.iter_file("u")))
            out["list"] = bounded(lambda: sb.list_dir("/dev"))
        out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ''')
    for key in ("zero", "iter", "list"):
        assert refused(out[key], "PathEscape"), (key, out[key])
    assert out["maxrss_kb"] < 400_000


def test_fifo_never_blocks_a_call_nor_close(scenario: Scenario) -> None:
    out = scenario('''
        sb = Sandbox()
        sh(sb, "mkfifo /workspace/f /tmp/g; ln -s /tmp/g link")
        out["read"] = bounded(lambda: sb.read_file("f"))
        out["link"] = bounded(lambda: sb.read_file("link"))
        out["write"] = bounded(lambda: sb.write_file("f", "x"))
        out["iter"] = bounded(lambda: list(sb.iter_file("/tmp/g")))
        out["list"] = bounded(lambda: sb.list_dir("f"))
        out["after"] = bounded(lambda: sb.run(["true"]).exit_code)
        out["close"] = bounded(sb.close)
    ''')
    for key in ("read", "link", "write", "iter", "list"):
        assert refused(out[key], "SandboxIOError"), (key, out[key])
    assert "fifo" in out["read"]["message"]
    assert out["after"]["ok"] == 0 and "ok" in out["close"]


def test_read_only_binds_proc_sys_and_dev_are_out_of_reach(scenario: Scenario) -> None:
    out = scenario('''
        with Sandbox() as sb:
            sh(sb, "ln -s /usr/lib lib; ln -s /etc/passwd pw; ln -s /proc/sys/kernel k;"
                   "echo inside > /tmp/t; ln -s /tmp/t ok; ln -s /dev/shm shm; echo s > /dev/shm/s")
            calls = {
                "etc": lambda: sb.read_file("/etc/passwd"),
                "etc_link": lambda: sb.read_file("pw"),
                "usr_link": lambda: sb.list_dir("lib"),
                "proc_sys": lambda: sb.read_file("k/hostname"),
                "root_dir": lambda: sb.list_dir("/"),
                "write_etc": lambda: sb.write_file("/etc/motd", "x"),
                "write_root": lambda: sb.write_file("/new", "x"),
                "write_dev": lambda: sb.write_file("/dev/null", "x"),
                "mkdir_usr": lambda: sb.make_dirs("/usr/lib/cellblock-x"),
                "mkdir_via_link": lambda: sb.make_dirs("lib/cellblock-x"),
                "remove_etc": lambda: sb.remove("/etc/hostname"),
                "remove_workspace": lambda: sb.remove("/workspace"),
                "write_via_link": lambda: sb.write_file("lib/x.txt", "x"),
            }
            out["refused"] = {k: bounded(f) for k, f in calls.items()}
            # Links that stay on the scratch mounts keep working.
            out["tmp_link"] = attempt(lambda: sb.read_file("ok"))
            out["shm_link"] = attempt(lambda: sb.read_file("shm/s"))
            out["hostname"] = sh(sb, "cat /etc/hostname")
    ''')
    for key, outcome in out["refused"].items():
        assert refused(outcome, "PathEscape"), (key, outcome)
    assert out["tmp_link"] == {"ok": "inside\n"}
    assert out["shm_link"] == {"ok": "s\n"}
    assert out["hostname"] == "cellblock\n"


def test_files_are_read_and_written_with_the_sandboxs_own_credentials(
    scenario: Scenario
) -> None:
    out = scenario('''
        with Sandbox() as sb:
            # A file the sandbox made unreadable to itself (no capabilities inside).
            sh(sb, "echo private > locked; chmod 000 locked; mkdir ro; chmod 555 ro")
            out["self_read"] = sb.run(["cat", "locked"]).exit_code
            out["read"] = bounded(lambda: sb.read_file("locked"))
            out["self_write"] = sb.run(["sh", "-c", "echo x > ro/f"]).exit_code
            out["write"] = bounded(lambda: sb.write_file("ro/f", "x"))
            sb.write_file("made/by/host.txt", "h")
            out["owner"] = sh(sb, "stat -c '%u:%g %a' made made/by/host.txt")
            out["append"] = sb.run(["sh", "-c", "echo more >> made/by/host.txt"]).exit_code
    ''')
    assert out["self_read"] != 0 and out["self_write"] != 0
    assert refused(out["read"], "SandboxIOError") and "denied" in out["read"]["message"]
    assert refused(out["write"], "SandboxIOError") and "denied" in out["write"]["message"]
    assert out["owner"].split("\n")[:2] == ["0:0 755", "0:0 644"]
    assert out["append"] == 0


# ---- secrets, sizes, streaming and bad input ------------------------------------------------

@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory both callers (root and uid 65534) can write to."""
    path = Path(tempfile.mkdtemp(prefix="cellblock-files-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_reads_and_listings_are_redacted(scenario: Scenario, shared_dir: Path) -> None:
    host_dir = shared_dir
    out = scenario(f'''
        with Sandbox(secrets={{"TOKEN": "tok-9f8e7d6c5b4a3921"}}) as sb:
            sh(sb, 'printf "key=%s\\\\n" "$TOKEN" > t.txt; mkdir d; touch "d/name-$TOKEN"')
            out["read"] = attempt(lambda: sb.read_file("t.txt"))
            out["iter"] = attempt(lambda: b"".join(sb.iter_file("t.txt", chunk_size=3)))
            out["list"] = attempt(lambda: sb.list_dir("d"))
            sb.download("t.txt", "{host_dir}/t.txt")
    ''')
    assert out["read"] == {"ok": "key=[REDACTED:TOKEN]\n"}
    assert out["iter"] == out["read"]
    assert out["list"]["ok"][0]["name"] == "name-[REDACTED:TOKEN]"
    assert (host_dir / "t.txt").read_text() == "key=[REDACTED:TOKEN]\n"
    assert "tok-9f8e7d6c5b4a3921" not in json.dumps(out)


def test_size_cap_and_streaming(scenario: Scenario) -> None:
    out = scenario('''
        import hashlib
        with Sandbox(disk="128M") as sb:
            sh(sb, "head -c 3145728 /dev/urandom > big")
            inside = sh(sb, "sha256sum big").split()[0]
            out["capped"] = attempt(lambda: sb.read_file("big", max_size="1M"))
            out["is_io"] = issubclass(cellblock.FileTooLarge, cellblock.SandboxIOError)
            h, n = hashlib.sha256(), 0
            for chunk in sb.iter_file("big", chunk_size=65536):
                assert len(chunk) <= 65536
                h.update(chunk)
                n += 1
            out["streamed"] = (h.hexdigest() == inside, n)
            out["iter_capped"] = attempt(lambda: list(sb.iter_file("big", max_size=1000)))
            # Writes stream from a generator and from a file object.
            chunks = (bytes([i]) * (1 << 20) for i in range(20))
            sb.write_file("gen.bin", chunks)
            out["gen"] = sh(sb, "wc -c < gen.bin; od -An -tu1 -j 20971519 gen.bin")
            sb.write_file("obj.bin", io.BytesIO(b"abc" * 1000))
            out["obj"] = sh(sb, "wc -c < obj.bin")
            out["disk_full"] = attempt(lambda: sb.write_file("huge", (b"x" * (1 << 20)
                                                                     for _ in range(200))))
    ''')
    assert out["capped"]["error"] == "FileTooLarge" and "max_size" in out["capped"]["message"]
    assert out["is_io"] is True
    assert out["streamed"] == [True, 48]
    assert out["iter_capped"]["error"] == "FileTooLarge"
    assert out["gen"].split() == ["20971520", "19"]
    assert out["obj"].strip() == "3000"
    assert out["disk_full"]["error"] == "SandboxIOError"
    assert "No space left" in out["disk_full"]["message"]


def test_bad_input_is_a_typed_error_and_changes_nothing(scenario: Scenario) -> None:
    out = scenario('''
        with Sandbox() as sb:
            sb.write_file("n", "kept")
            calls = {
                "int": lambda: sb.write_file("n", 5),
                "none": lambda: sb.write_file("n", None),
                "float": lambda: sb.write_file("n", 1.5),
                "bad_chunk": lambda: sb.write_file("n", [3]),
                "text_file": lambda: sb.write_file("n", io.StringIO("text")),
                "path_type": lambda: sb.write_file(5, "x"),
                "max_size": lambda: sb.read_file("n", max_size="lots"),
                "chunk_size": lambda: sb.iter_file("n", chunk_size=0),
            }
            out["errors"] = {k: attempt(f) for k, f in calls.items()}
            out["content"] = sh(sb, "cat n; ls")
    ''')
    for key, outcome in out["errors"].items():
        assert outcome.get("error") == "InvalidSpec", (key, outcome)
    assert "not int" in out["errors"]["int"]["message"]
    assert "NoneType" in out["errors"]["none"]["message"]
    assert "'rb'" in out["errors"]["text_file"]["message"]
    assert out["content"] == "kept" + "n\n"


def test_a_slow_reader_blocks_neither_close_nor_calls(scenario: Scenario) -> None:
    out = scenario('''
        sb = Sandbox()
        sh(sb, "head -c 8388608 /dev/zero > big")
        chunks = sb.iter_file("big", chunk_size=4096)
        out["first"] = len(next(chunks))
        out["call"] = bounded(lambda: sb.run(["true"]).exit_code, 10)
        out["other_read"] = bounded(lambda: len(sb.read_file("big")), 10)
        out["pause"] = bounded(lambda: (sb.pause(), sb.resume()) and "paused", 10)
        out["close"] = bounded(sb.close, 10)
        out["after_close"] = attempt(lambda: sb.read_file("big"))
    ''')
    assert out["first"] == 4096
    assert out["call"]["ok"] == 0 and out["other_read"]["ok"] == 8 << 20
    # pause needs a freezer cgroup: root only (uid 65534 gets a clear SetupError).
    assert out["pause"].get("ok") == "paused" or out["pause"].get("error") == "SetupError"
    assert not out["close"].get("hung") and "ok" in out["close"], out["close"]
    assert out["after_close"]["error"] == "SessionClosed"


def test_errors_name_the_path(caller: Caller) -> None:
    caller.run("""
        with Sandbox() as sb:
            with raises(cellblock.SandboxIOError) as e:
                sb.read_file("missing/file.txt")
            text = str(e.value)
            assert "missing/file.txt" in text and "No such file" in text, text
            assert e.value.errno == errno.ENOENT and "missing/file.txt" in e.value.filename
            with raises(cellblock.SandboxIOError) as e:
                sb.list_dir("nope")
            assert "nope" in str(e.value) and "nope" in e.value.filename, e.value
    """)


def test_the_callers_credentials_are_restored_after_each_operation() -> None:
    def creds() -> tuple[int, int, str]:
        status = Path("/proc/thread-self/status").read_text().splitlines()
        cap_eff = next(line.split()[1] for line in status if line.startswith("CapEff:"))
        return os.geteuid(), os.getegid(), cap_eff
    before = creds()
    with Sandbox() as sb:
        sb.write_file("a/b.txt", "x")
        assert sb.read_file("a/b.txt") == b"x" and [e.name for e in sb.list_dir("a")] == ["b.txt"]
        with pytest.raises(cellblock.PathEscape):
            sb.read_file("/etc/passwd")
        sb.remove("a/b.txt")
        assert creds() == before
    assert creds() == before


# ---- callers of the files API ---------------------------------------------------------------

def test_agent_file_tools_are_refused_the_hosts_files() -> None:
    with Sandbox(secrets={"API_KEY": "ak-1234567890abcdef"}) as sb:
        assert sb.run(["sh", "-c", "ln -s /proc/kallsyms k; mkfifo f; echo $API_KEY > key"]).ok
        tools = Toolbox(sb)
        for path in ("/workspace/k", "/workspace/f", "/etc/passwd"):
            outcome = tools.call("read_file", {"path": path})
            assert outcome.is_error and not outcome.fatal, (path, outcome)
        key = tools.call("read_file", {"path": "/workspace/key"})
        assert key.content == "[REDACTED:API_KEY]\n"
        wrote = tools.call("write_file", {"path": "/proc/1/autogroup", "content": "-20"})
        assert wrote.is_error and "PathEscape" in wrote.content
        ok = tools.call("write_file", {"path": "notes/a.txt", "content": "hi"})
        assert not ok.is_error and sb.read_file("notes/a.txt") == b"hi"


def test_upload_and_download_stream_large_trees(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    blob = os.urandom(3 << 20)
    (src / "d" / "blob.bin").write_bytes(blob)
    (src / "small.txt").write_text("s")
    with Sandbox(disk="64M") as sb:
        sb.upload(src, "/tmp/up")
        assert sb.run(["sh", "-c", "wc -c < /tmp/up/d/blob.bin"]).stdout.strip() == str(len(blob))
        sb.download("/tmp/up", tmp_path / "back")
        sb.download("/workspace", tmp_path / "ws")
    assert (tmp_path / "back" / "d" / "blob.bin").read_bytes() == blob
    assert (tmp_path / "back" / "small.txt").read_text() == "s"
    assert (tmp_path / "ws").is_dir()
