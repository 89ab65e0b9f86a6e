"""Sessions (`cellblock.Sandbox`): one sandbox serving many calls until closed.

Every isolation claim is made by code inside the sandbox that attempts the crossing: files
and processes of another session, escapes through the files API (traversal, planted symlinks,
magic links, host paths), a call outliving its timeout, a frozen loop making progress.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import cellblock
import cellblock.cells
from cellblock.session import Sandbox
from conftest import IS_ROOT, SETPRIV, own_cellblock_cgroups, processes_with_argv, wait_for


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Temp files go to a directory of this test's own, where leftovers are seen."""
    tmp = tmp_path / "tempdir"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))


@pytest.fixture
def sb() -> Any:
    with Sandbox() as sandbox:
        yield sandbox


def descendants() -> set[int]:
    """Host pids of every process below this one, without what other cellblock processes
    started (the unprivileged worker of the `sandbox` fixture keeps its own cells and fork
    server, which come and go with its own runs)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    out, todo = set(), [os.getpid()]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            if not worker(k):
                todo.append(k)
    return out


def worker(pid: int) -> bool:
    """Whether `pid` is the unprivileged worker of the `sandbox` fixture (see conftest)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1].endswith(b"/worker.py")
    except (OSError, IndexError):
        return False


def footprint() -> dict[str, Any]:
    """What a session could leave behind in this process and on the host. Ready cells and
    queued teardowns of earlier one-shot runs are the pool's standing state: drained first."""
    assert cellblock.cells.drain(30), "the cell pool did not drain"
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": sorted(t.name for t in threading.enumerate()),
        "processes": descendants(),
        "cgroups": own_cellblock_cgroups(),
        "mounts": Path("/proc/self/mountinfo").read_text(),
        "tmp": sorted(os.listdir(tempfile.gettempdir())),
    }


def settled_footprint(before: dict[str, Any]) -> dict[str, Any]:
    """The footprint once exiting processes are gone (bounded wait; equal or not)."""
    now: dict[str, Any] = {}

    def same() -> bool:
        now.update(footprint())
        return now == before
    try:
        wait_for(same, "the footprint to settle", limit=10)
    except AssertionError:
        pass
    return now


# ---- calls and the workspace -----------------------------------------------------------------

def test_workspace_and_tmp_persist_between_calls(sb: Sandbox) -> None:
    assert sb.run_shell("echo one > /workspace/a.txt; echo two > /tmp/b.txt").ok
    res = sb.run(["cat", "a.txt", "/tmp/b.txt"])
    assert res.ok and res.stdout == "one\ntwo\n"
    assert sb.read_file("a.txt") == b"one\n"
    sb.write_file("/workspace/dir/c.txt", "three")
    assert sb.run(["cat", "dir/c.txt"]).stdout == "three"


def test_run_reports_like_cellblock_run(sb: Sandbox) -> None:
    res = sb.run(["sh", "-c", "cat; echo err >&2; exit 3"], stdin="in\n")
    assert (res.reason, res.exit_code, res.stdout, res.stderr) == ("exited", 3, "in\n", "err\n")
    assert res.seccomp_profile == "shell"
    assert sb.run(["python3", "-c", "pass"]).seccomp_profile == "python"


def test_sessions_are_isolated_from_each_other(marker: str) -> None:
    with Sandbox() as a, Sandbox() as b:
        a.write_file("/tmp/only-a", "a")
        a.write_file("only-a", "a")
        # A process and a listening socket alive in a...
        assert a.run_python(textwrap.dedent(f"""\
            import socket, subprocess
            srv = socket.socket(); srv.bind(("127.0.0.1", 8765)); srv.listen()
            sleeper = subprocess.Popen(["sleep", "{marker}"])
        """), stateful=True).ok
        # ...are not visible from b, nor are its files.
        probe = b.run_python(textwrap.dedent(f"""\
            import os, socket
            cmdlines = [open(f"/proc/{{p}}/cmdline", "rb").read()
                        for p in os.listdir("/proc") if p.isdigit()]
            s = socket.socket()
            print(s.connect_ex(("127.0.0.1", 8765)), any(b"{marker}" in c for c in cmdlines),
                  os.path.exists("/tmp/only-a"), os.path.exists("/workspace/only-a"))
        """))
        # ECONNREFUSED, no such process, no such files.
        assert probe.stdout.split() == ["111", "False", "False", "False"], probe.stderr
        with pytest.raises(cellblock.SandboxIOError):
            b.read_file("/tmp/only-a")
        # Within a, the same probe sees its own socket and process.
        same = a.run_python("import socket; print(socket.socket().connect_ex(('127.0.0.1', 8765)))")
        assert same.stdout.strip() == "0"
    assert not processes_with_argv(["sleep", marker])


def test_call_timeout_kills_only_that_call(sb: Sandbox, marker: str) -> None:
    waiting: dict[str, cellblock.RunResult] = {}
    other = threading.Thread(target=lambda: waiting.setdefault("r", sb.run(
        ["sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo survived"], timeout=120)))
    other.start()
    res = sb.run(["sh", "-c", f"sleep {marker} & sleep {marker}"], timeout=1)
    assert res.reason == "timeout"
    assert not processes_with_argv(["sleep", marker])
    sb.write_file("/tmp/go", "")
    other.join(timeout=120)
    assert waiting["r"].ok and waiting["r"].stdout == "survived\n"
    assert sb.run(["true"]).ok


def test_per_call_limits(sb: Sandbox) -> None:
    res = sb.run(["sh", "-c", "yes | head -c 100000"], max_output=1000)
    assert res.reason == "output_limit" and len(res.stdout_bytes) == 1000
    res = sb.run(["python3", "-c", "while True: pass"], cpu_time=1, timeout=60)
    assert res.reason == "cpu_time"
    assert sb.run(["true"]).ok


@pytest.mark.skipif(not IS_ROOT, reason="session cgroups need root (or a delegated subtree)")
def test_session_memory_limit_covers_its_calls() -> None:
    with Sandbox(memory="64M") as sb:
        res = sb.run(["python3", "-c", "b = bytearray(200 << 20); print('allocated')"])
        assert res.reason == "memory" and "allocated" not in res.stdout
        warm = sb.run_python("b = bytearray(200 << 20); print('allocated')")
        assert warm.reason != "exited" and "allocated" not in warm.stdout
        assert sb.run(["true"]).ok


def test_session_env_and_secrets() -> None:
    token = "tok-" + secrets.token_hex(12)
    with Sandbox(env={"GREETING": "hello"}, secrets={"API_TOKEN": token}) as sb:
        res = sb.run(["sh", "-c", 'echo "$GREETING $API_TOKEN"'])
        assert res.stdout == "hello [REDACTED:API_TOKEN]\n" and res.redactions == {"API_TOKEN": 1}
        res = sb.run(["sh", "-c", 'echo "$X"'], env={"X": "per-call"})
        assert res.stdout == "per-call\n"
        warm = sb.run_python("import os; print(os.environ['GREETING'], os.environ['API_TOKEN'])")
        assert warm.stdout == "hello [REDACTED:API_TOKEN]\n"
        assert token not in sb.run_node("process.env.API_TOKEN").value  # type: ignore[operator]
    with Sandbox() as other:
        assert other.run(["sh", "-c", 'echo "[$API_TOKEN]"']).stdout == "[]\n"


# ---- life: pause, idle, close ----------------------------------------------------------------

COUNTER = textwrap.dedent("""\
    import os
    n = 0
    while not os.path.exists("stop"):
        n += 1
        with open("c.tmp", "w") as f:
            f.write(str(n))
        os.replace("c.tmp", "counter")
""")


@pytest.mark.skipif(not IS_ROOT, reason="the cgroup freezer needs root")
def test_pause_freezes_and_resume_continues(sb: Sandbox) -> None:
    done: dict[str, cellblock.RunResult] = {}
    loop = threading.Thread(target=lambda: done.setdefault(
        "r", sb.run(["python3", "-c", COUNTER], timeout=120)))
    loop.start()
    def count():
        return int(sb.read_file("counter") or b"0")
    wait_for(lambda: any(e.name == "counter" for e in sb.list_dir()) and count() > 10,
             "the loop to run")
    sb.pause()
    frozen = count()
    time.sleep(0.5)
    assert count() == frozen, "a paused session made progress"
    sb.resume()
    wait_for(lambda: count() > frozen, "the loop to continue after resume")
    sb.write_file("stop", "")
    loop.join(timeout=120)
    assert done["r"].ok


def test_pause_needs_a_freezer(sb: Sandbox) -> None:
    # Root has the freezer cgroup; unprivileged (no writable cgroup) pausing is a clear error.
    if IS_ROOT:
        sb.pause()
        sb.resume()
        assert sb.run(["true"]).ok
    else:
        with pytest.raises(cellblock.SetupError):
            sb.pause()


def test_idle_timeout_closes_a_forgotten_session() -> None:
    sb = Sandbox(idle_timeout=0.5)
    assert sb.run(["sleep", "1"]).ok  # a call longer than the idle timeout is not idle time
    wait_for(lambda: not sb.is_open, "the idle timeout to close the session")
    with pytest.raises(cellblock.SessionClosed):
        sb.run(["true"])
    sb.close()  # returns once the idle watcher's close has freed everything


def test_close_waits_for_a_close_under_way() -> None:
    """A close() racing another returns only when the session is gone (nothing left)."""
    assert cellblock.cells.drain(30)
    before = own_cellblock_cgroups()
    sb = Sandbox(warm=("python",))
    closers = [threading.Thread(target=sb.close) for _ in range(2)]
    for t in closers:
        t.start()
    sb.close()
    assert not sb.is_open
    assert cellblock.cells.drain(30)  # ready cells are the pool's, not the session's
    assert own_cellblock_cgroups() == before
    for t in closers:
        t.join()


def test_use_after_close_is_a_clear_error() -> None:
    sb = Sandbox()
    sb.close()
    sb.close()  # idempotent
    assert not sb.is_open
    calls = [
        lambda: sb.run(["true"]), lambda: sb.run_shell("true"), lambda: sb.run_python("1"),
        lambda: sb.run_node("1"), lambda: sb.read_file("x"), lambda: sb.write_file("x", "y"),
        lambda: sb.list_dir("."), lambda: sb.remove("x"), lambda: sb.make_dirs("d"),
        lambda: sb.pause(), lambda: sb.resume(), lambda: sb.open(),
    ]
    for call in calls:
        with pytest.raises(cellblock.SessionClosed):
            call()


@pytest.mark.usefixtures("private_tempdir")
def test_close_leaves_nothing_behind(marker: str) -> None:
    before = footprint()
    with Sandbox(warm=("python", "node")) as sb:
        sb.run_python("x = 1", stateful=True)
        sb.run_node("let y = 2", stateful=True)
        sb.run_python(f"import subprocess; subprocess.Popen(['sleep', '{marker}'])", stateful=True)
        sb.run(["sh", "-c", "echo data > /workspace/f"])
        assert processes_with_argv(["sleep", marker])
    assert settled_footprint(before) == before
    assert not processes_with_argv(["sleep", marker])


@pytest.mark.usefixtures("private_tempdir")
def test_close_after_code_inside_crashed_the_runtime(marker: str) -> None:
    before = footprint()
    sb = Sandbox(warm=("python",))
    sb.run_python(f"import subprocess; subprocess.Popen(['sleep', '{marker}'])", stateful=True)
    # Kill every process of the warm runtime (zygote, relays, kernel), from inside.
    crash = sb.run_python("import os, signal; os.kill(-1, signal.SIGKILL)")
    # kill(-1) spares its caller (exits 0) unless the zygote's namespace ends it first.
    assert (crash.reason, crash.signal) in (("signaled", 9), ("exited", None))
    assert sb.run_python("print('back')").stdout == "back\n"  # a new runtime starts
    sb.close()
    assert settled_footprint(before) == before
    assert not processes_with_argv(["sleep", marker])


# ---- the files API ---------------------------------------------------------------------------

@pytest.fixture
def host_secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A host file that no sandbox may read or overwrite."""
    content = b"host-only-" + secrets.token_hex(16).encode()
    path = tmp_path / "host-secret.txt"
    path.write_bytes(content)
    return path, content


def host_contents() -> list[bytes]:
    """Host files whose content must never come back from a sandbox."""
    out = []
    for p in ("/etc/shadow", "/etc/hostname", "/proc/self/environ"):
        try:
            out.append(Path(p).read_bytes())
        except OSError:
            pass
    return [c for c in out if c]


def read_refused_or_foreign(sb: Sandbox, path: str, forbidden: list[bytes]) -> None:
    """Reading `path` either fails or returns none of the forbidden contents."""
    try:
        data = sb.read_file(path)
    except (cellblock.PathEscape, cellblock.SandboxIOError):
        return
    for f in forbidden:
        assert data != f and (len(f) < 16 or f not in data), f"{path} returned host content"


@pytest.mark.parametrize("path", [
    "../etc/passwd", "/workspace/../../etc/shadow", "a/../../x", "..", "/tmp/../..",
])
def test_dotdot_is_refused(sb: Sandbox, path: str) -> None:
    for call in (lambda: sb.read_file(path), lambda: sb.write_file(path, "x"),
                 lambda: sb.list_dir(path), lambda: sb.remove(path), lambda: sb.make_dirs(path)):
        with pytest.raises(cellblock.PathEscape):
            call()


def test_nul_bytes_are_refused(sb: Sandbox) -> None:
    for call in (lambda: sb.read_file("a\0b"), lambda: sb.write_file("/etc/passwd\0x", "x")):
        with pytest.raises(cellblock.PathEscape):
            call()


def test_absolute_host_paths_are_the_sandboxs_own(
    sb: Sandbox, host_secret: tuple[Path, bytes]
) -> None:
    path, content = host_secret
    forbidden = [content, *host_contents()]
    for p in (str(path), "/etc/shadow", "/root/.bashrc", "/proc/1/environ"):
        read_refused_or_foreign(sb, p, forbidden)
    # Written "to a host path", the data lands in the sandbox; the host file is untouched.
    sb.write_file(str(path), "from the sandbox")
    assert path.read_bytes() == content
    assert sb.run(["cat", str(path)]).stdout == "from the sandbox"


@pytest.mark.parametrize("kind", ["file", "dir", "root", "relative"])
def test_symlinks_planted_inside_stay_inside(
    sb: Sandbox, host_secret: tuple[Path, bytes], kind: str
) -> None:
    path, content = host_secret
    target = {"file": str(path), "dir": str(path.parent), "root": "/",
              "relative": "../" * 8 + str(path.parent).lstrip("/")}[kind]
    assert sb.run(["ln", "-s", target, "/workspace/link"]).ok
    forbidden = [content, *host_contents()]
    for p in ("link", "link/host-secret.txt", "/workspace/link/host-secret.txt", "link/etc/shadow"):
        read_refused_or_foreign(sb, p, forbidden)
    # Writing through the link never reaches the host.
    for p in ("link", "link/host-secret.txt", "link/new-file"):
        try:
            sb.write_file(p, "overwritten?")
        except (cellblock.PathEscape, cellblock.SandboxIOError):
            pass
    assert path.read_bytes() == content
    assert not (path.parent / "new-file").exists()
    # Removing the link removes the link, never its target.
    sb.remove("link")
    assert path.read_bytes() == content


@pytest.mark.parametrize("path", [
    "/proc/self/root/etc/hostname", "/proc/1/root/etc/hostname", "/proc/self/cwd/x",
    "/proc/thread-self/root/etc/passwd", "/proc/self/fd/0",
])
def test_magic_links_are_refused(sb: Sandbox, path: str) -> None:
    forbidden = host_contents()
    read_refused_or_foreign(sb, path, forbidden)
    with pytest.raises((cellblock.PathEscape, cellblock.SandboxIOError)):
        sb.list_dir("/proc/self/root")


def test_magic_link_planted_as_symlink_is_refused(sb: Sandbox) -> None:
    assert sb.run(["ln", "-s", "/proc/1/root", "/workspace/r"]).ok
    assert sb.run(["ln", "-s", "/proc/self/root/etc", "/workspace/e"]).ok
    for p in ("r/etc/hostname", "e/hostname"):
        read_refused_or_foreign(sb, p, host_contents())


def test_list_dir_and_remove_do_not_follow_symlinks(
    sb: Sandbox, host_secret: tuple[Path, bytes]
) -> None:
    path, content = host_secret
    sb.run_shell(f"mkdir -p d/sub && echo hi > d/f && ln -s {path.parent} d/l && ln -s / d/root")
    entries = {e.name: e.kind for e in sb.list_dir("d")}
    assert entries == {"f": "file", "l": "symlink", "root": "symlink", "sub": "dir"}
    sb.remove("d", recursive=True)
    assert path.read_bytes() == content
    assert not any(e.name == "d" for e in sb.list_dir("/workspace"))


def test_upload_and_download_round_trip(
    sb: Sandbox, tmp_path: Path, host_secret: tuple[Path, bytes]
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(bytes(range(256)) * 100)
    (src / "sub" / "b.txt").write_text("b")
    sb.upload(src, "project")
    listing = sb.run(["sh", "-c", "wc -c < project/a.bin; cat project/sub/b.txt"])
    assert listing.stdout.split() == ["25600", "b"]
    sb.run_shell(f"echo made > project/new.txt && ln -s {host_secret[0]} project/leak")
    out = tmp_path / "out"
    sb.download("project", out)
    assert (out / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert (out / "new.txt").read_text() == "made\n"
    assert not (out / "leak").exists()  # symlinks are not followed out of the sandbox
    sb.download("project/sub/b.txt", tmp_path / "single.txt")
    assert (tmp_path / "single.txt").read_text() == "b"


# ---- many sessions ---------------------------------------------------------------------------

@pytest.mark.usefixtures("private_tempdir")
def test_a_hundred_concurrent_sessions() -> None:
    before = footprint()

    def one(i: int) -> tuple[Sandbox, str]:
        sb = Sandbox()
        res = sb.run_python(
            f"open('/tmp/id', 'w').write('{i}'); import os; print(sorted(os.listdir('/tmp')))"
        )
        return sb, res.stdout
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        opened = list(pool.map(one, range(100)))
    try:
        assert {out for _, out in opened} == {"['.cellblock', 'id']\n"}
        ids = [sb.read_file("/tmp/id") for sb, _ in opened]
        assert ids == [str(i).encode() for i in range(100)]
    finally:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda item: item[0].close(), opened))
    assert settled_footprint(before) == before


# ---- unprivileged ----------------------------------------------------------------------------

SESSION_AS_NOBODY = textwrap.dedent("""\
    import json, os, cellblock
    from cellblock.session import Sandbox
    out = {}
    with Sandbox(secrets={"TOKEN": "nobody-secret-value"}) as sb:
        out["run"] = sb.run(["sh", "-c", "id -u; echo $TOKEN"]).stdout
        sb.write_file("f.txt", "data")
        out["file"] = sb.run(["cat", "f.txt"]).stdout
        out["stateless"] = sb.run_python("import os; print(os.environ['TOKEN'])").stdout
        sb.run_python("x = 20", stateful=True)
        out["stateful"] = sb.run_python("x + 1", stateful=True).value
        out["timeout"] = sb.run_python("while True: pass", timeout=1).reason
        out["after"] = sb.run_python("print('ok')").stdout
        try:
            sb.pause()
            out["pause"] = "paused"
        except cellblock.SetupError:
            out["pause"] = "SetupError"
    out["fds"] = len(os.listdir("/proc/self/fd"))
    print(json.dumps(out))
""")


def test_sessions_work_unprivileged(nobody_dir: Path) -> None:
    res = subprocess.run(
        [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
         "/usr/bin/python3", "-c", SESSION_AS_NOBODY],
        capture_output=True, text=True, timeout=180, cwd="/", check=False,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["run"] == "0\n[REDACTED:TOKEN]\n"
    assert out["file"] == "data"
    assert out["stateless"] == "[REDACTED:TOKEN]\n"
    assert out["stateful"] == "21"
    assert out["timeout"] == "timeout" and out["after"] == "ok\n"
    assert out["pause"] == "SetupError"
    assert out["fds"] <= 4
