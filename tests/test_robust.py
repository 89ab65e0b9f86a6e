"""Robustness: abandoned and paused sessions, deadlines, callbacks, bad input, errors.

Every test makes the attempt (kills an owner, freezes a set-up, raises in a callback, passes bad
input) and checks the outcome from the host, as root and as uid 65534 where the feature exists
for that caller (unprivileged callers have no cgroup, hence no freezer: that is checked too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import cellblock
from conftest import (
    EGRESS_IS_COLD,
    IS_ROOT,
    SETPRIV,
    WORKER_DEADLINE,
    Caller,
    Cli,
    Runner,
    own_cellblock_cgroups,
    own_cgroup_dirs,
    processes_with_argv,
    wait_for,
)

#: Sessions each abandoned owner opens (the issue's "Done when").
ABANDONED_SESSIONS = 300
#: Of those, how many have a call running (frozen processes) when the owner dies.
BUSY_SESSIONS = 20

#: An owner process: opens sessions, starts a call in some, pauses all, then waits to be killed.
OWNER = textwrap.dedent('''\
    import os, sys, threading, time
    import cellblock
    n, marker, busy = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sessions = [cellblock.Sandbox(memory="64M", pids=32) for _ in range(n)]
    for sb in sessions[:busy]:
        threading.Thread(target=sb.run, args=(["sleep", marker],), kwargs={"timeout": 3600},
                         daemon=True).start()
    want = b"sleep\\0" + marker.encode() + b"\\0"
    def running():
        count = 0
        for p in os.listdir("/proc"):
            try:
                count += p.isdigit() and open(f"/proc/{p}/cmdline", "rb").read() == want
            except OSError:
                pass
        return count
    while running() < busy:
        time.sleep(0.05)
    state = "paused"
    for sb in sessions:
        try:
            sb.pause()
        except cellblock.SetupError:
            state = "no-freezer"
    print(state, flush=True)
    time.sleep(3600)
''')


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every descendant of `pid`."""
    out: list[tuple[int, str]] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            for k in kids:
                try:
                    stat = Path(f"/proc/{k}/stat").read_text()
                    out.append((k, stat.rsplit(")", 1)[1].split()[19]))
                except OSError:
                    continue
                todo.append(k)
    return out


def alive(pid: int, start: str) -> bool:
    """Whether the process `pid` that started at `start` still runs (a zombie does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == start and fields[0] != "Z"


def owner_command(identity: str, script: Path, nobody_dir: Path | None) -> list[str]:
    if identity == "nobody":
        assert nobody_dir is not None
        return [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
                "/usr/bin/python3", str(script)]
    return [sys.executable, str(script)]


@pytest.fixture(params=["self", "nobody"], ids=["root" if IS_ROOT else "user", "nobody"])
def owner_identity(request: pytest.FixtureRequest) -> tuple[str, Path | None]:
    """Who owns the sessions: this process's user, or uid 65534 (with its package copy)."""
    if request.param == "nobody":
        return "nobody", request.getfixturevalue("nobody_dir")
    return "self", None


# ---- 1. an owner killed with paused sessions leaves nothing behind ---------------------------


def test_abandoned_paused_sessions_leave_no_process_and_no_cgroup(
        owner_identity: tuple[str, Path | None], marker: str, tmp_path: Path) -> None:
    identity, nobody_dir = owner_identity
    script = (nobody_dir or tmp_path) / f"owner-{marker}.py"
    script.write_text(OWNER)
    script.chmod(0o644)
    owner = subprocess.Popen(
        [*owner_command(identity, script, nobody_dir), str(ABANDONED_SESSIONS), marker,
         str(BUSY_SESSIONS)], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert owner.stdout is not None
        state = owner.stdout.readline().strip()
        # Root pauses every session; uid 65534 has no freezer cgroup and is told so.
        assert state == ("paused" if identity == "self" and IS_ROOT else "no-freezer"), state
        sandbox_procs = descendants(owner.pid)
        # Each session has its holder; each busy one also its call's processes.
        assert len(sandbox_procs) >= ABANDONED_SESSIONS + BUSY_SESSIONS
        assert len(processes_with_argv(["sleep", marker])) == BUSY_SESSIONS
        if state == "paused":
            assert len(own_cellblock_cgroups(owner.pid)) >= ABANDONED_SESSIONS
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not any(alive(p, s) for p, s in sandbox_procs),
                 "every process of the abandoned sessions to exit", 60)
        assert processes_with_argv(["sleep", marker]) == []
        wait_for(lambda: own_cellblock_cgroups(owner.pid) == [],
                 "the abandoned sessions' cgroups to be removed", 30)
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout:
            owner.stdout.close()
        script.unlink()


# ---- 2. pause: calls wait within their timeout, resume and close never hang ------------------


def bounded(fn: Callable[[], Any], limit: float = 30.0) -> Any:
    """fn() in a thread, failing the test (instead of hanging it) if it takes over `limit` s."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), f"{fn} still blocked after {limit} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def session() -> Iterator[cellblock.Sandbox]:
    sb = cellblock.Sandbox(memory="128M")
    try:
        yield sb
    finally:
        # Thaw first if a test froze it behind the session's back.
        for d in own_cellblock_cgroups():
            for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0")):
                if os.path.exists(f"{d}/{name}"):
                    Path(f"{d}/{name}").write_text(value)
        bounded(sb.close)


@pytest.mark.skipif(not IS_ROOT, reason="the freezer needs a cgroup: root only")
def test_call_on_paused_session_times_out_and_resume_and_close_answer(
        session: cellblock.Sandbox, marker: str) -> None:
    session.pause()
    started = time.monotonic()
    r = bounded(lambda: session.run(["echo", "ran"], timeout=1))
    assert r.reason == "timeout" and r.stdout == "", r
    assert time.monotonic() - started < 10
    # A call waiting on the paused session does not block resume(): it then runs.
    box: list[cellblock.RunResult] = []
    waiting = threading.Thread(
        target=lambda: box.append(session.run(["echo", "late"], timeout=60)))
    waiting.start()
    time.sleep(0.3)
    bounded(session.resume, 5)
    waiting.join(30)
    assert [x.stdout for x in box] == ["late\n"]
    # close() while a call waits on the paused session: both end, the call with SessionClosed.
    session.pause()
    errors: list[str] = []

    def call() -> None:
        try:
            session.run(["sleep", marker], timeout=60)
        except cellblock.CellblockError as e:
            errors.append(type(e).__name__)
    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    bounded(session.close, 10)
    t.join(30)
    assert not t.is_alive() and errors == ["SessionClosed"], errors
    assert processes_with_argv(["sleep", marker]) == []


@pytest.mark.skipif(not IS_ROOT, reason="freezing a set-up needs a cgroup: root only")
def test_hung_setup_has_a_deadline(session: cellblock.Sandbox) -> None:
    # Freeze the session's cgroup behind its back: the next call's PID 1 hangs in its set-up.
    dirs = own_cellblock_cgroups()
    freezers = [Path(d) / "freezer.state" for d in dirs if (Path(d) / "freezer.state").exists()]
    freezers += [Path(d) / "cgroup.freeze" for d in dirs if (Path(d) / "cgroup.freeze").exists()]
    assert freezers, dirs
    for f in freezers:
        f.write_text("FROZEN" if f.name == "freezer.state" else "1")
    started = time.monotonic()
    with pytest.raises(cellblock.SetupTimeout) as e:
        bounded(lambda: session.run(["true"], timeout=2))
    assert isinstance(e.value, cellblock.SetupError)
    assert "set-up" in str(e.value) and time.monotonic() - started < 15
    for f in freezers:
        f.write_text("THAWED" if f.name == "freezer.state" else "0")
    assert session.run(["echo", "ok"], timeout=30).stdout == "ok\n"


def test_pause_without_freezer_is_a_typed_error(nobody_dir: Path) -> None:
    code = textwrap.dedent('''\
        import cellblock
        with cellblock.Sandbox() as sb:
            try:
                sb.pause()
                print("paused")
            except cellblock.SetupError as e:
                print(type(e).__name__, "freezer" in str(e))
    ''')
    out = subprocess.run([*SETPRIV, "env", "-i", f"PYTHONPATH={nobody_dir}", "/usr/bin/python3",
                          "-c", code], check=False, capture_output=True, text=True,
                         timeout=WORKER_DEADLINE, cwd="/")
    assert out.stdout.split() == ["SetupError", "True"], out.stderr


# ---- 3. a large nftables ruleset loads (no pipe-size deadlock) -------------------------------


@EGRESS_IS_COLD
def test_long_allowlist_loads_and_is_enforced(sandbox: Runner) -> None:
    # A ruleset larger than a whole default pipe buffer (64 KiB), let alone a small one.
    # Each listed target is ~19 bytes of the ruleset: 4000 of them make ~76 KB.
    allow = [f"127.0.0.1:{20000 + i}" for i in range(4000)]
    out = sandbox.probe("""
        def dial(port):
            socket.create_connection(("192.0.2.1", port), timeout=10).close()
        report(unlisted=attempt(dial, 22))
    """, allow_net=allow, timeout=60)
    # The ruleset loaded (else no run), and its last rule refuses what is not listed.
    assert out == {"unlisted": "ECONNREFUSED"}


# ---- 4. unlisted TCP is refused at connect time and reported ---------------------------------


@EGRESS_IS_COLD
def test_unlisted_destination_is_refused_at_connect(sandbox: Runner) -> None:
    res = sandbox.run(["python3", "-c", textwrap.dedent("""
        import errno, json, socket, time
        out = {}
        for host, port in (("192.0.2.1", 80), ("192.0.2.1", 22), ("192.0.2.9", 443)):
            s = socket.socket()
            s.settimeout(10)
            t = time.monotonic()
            out[f"{host}:{port}"] = [errno.errorcode.get(s.connect_ex((host, port)), "OK"),
                                     time.monotonic() - t < 3]
            s.close()
        print(json.dumps(out))
    """)], allow_net=["example.test:8443", "127.0.0.1:9"], timeout=60)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    # connect() itself fails, at once: nothing was accepted to be closed later.
    assert out == {k: ["ECONNREFUSED", True] for k in
                   ("192.0.2.1:80", "192.0.2.1:22", "192.0.2.9:443")}, out
    seen = {(v["host"], v["port"]) for v in res.violations if v["kind"] == "network"}
    assert {("192.0.2.1", 80), ("192.0.2.1", 22), ("192.0.2.9", 443)} <= seen, res.violations


# ---- 5. callbacks and live output ------------------------------------------------------------


def test_on_output_exception_stops_the_run_and_propagates(caller: Caller, marker: str) -> None:
    # The run happens in the caller's process; the check that the sandbox was killed is made
    # from here, on the host.
    out = caller.run("""
        marker = sys.argv[1]
        calls = []

        class Boom(Exception):
            pass

        def on_output(stream, data):
            calls.append(len(data))
            raise Boom("callback failed")
        started = time.monotonic()
        with raises(Boom):
            cellblock.run(["sh", "-c", f"sleep {marker} & while :; do echo y; done"],
                          on_output=on_output, timeout=120)
        print(json.dumps({"calls": len(calls), "took": time.monotonic() - started}))
    """, marker)
    assert out["took"] < 30, out
    assert out["calls"] == 1, "the callback was called again after it raised"
    assert processes_with_argv(["sleep", marker]) == [], "the sandbox was not killed"


def test_live_output_is_capped_like_the_report(caller: Caller) -> None:
    caller.run("""
        got = []
        r = cellblock.run(["head", "-c", "100000000", "/dev/zero"], max_output="1K",
                          on_output=lambda s, d: got.append(len(d)))
        assert sum(got) == len(r.stdout_bytes) == 1024 and r.stdout_truncated, (sum(got), r)
    """)


def test_live_output_of_the_cli_is_capped(cli: Cli) -> None:
    out = cli.run(["run", "--max-output", "1K", "--", "head", "-c", "100000000", "/dev/zero"])
    assert len(out.stdout) == 1024, len(out.stdout)


# ---- 6. bad input: typed errors naming what was wrong ----------------------------------------


@pytest.mark.parametrize("kwargs, cls, words", [
    ({"allow_net": "localhost"}, "InvalidSpec", ["allow_net", "'localhost'"]),
    ({"memory": "2IB"}, "InvalidSpec", ["memory", "2IB"]),
    ({"memory": 1}, "InvalidSpec", ["memory", "1 bytes"]),
    ({"env": {"HUGE": "x" * 200_000}}, "InvalidSpec", ["HUGE", "200000", "limit"]),
    ({"cwd": "/no/such/dir"}, "InvalidSpec", ["/no/such/dir", "No such file"]),
])
def test_bad_input_is_a_typed_error_naming_it(sandbox: Runner, kwargs: dict[str, Any], cls: str,
                                              words: list[str]) -> None:
    with pytest.raises(cellblock.CellblockError) as e:
        sandbox.run(["true"], **kwargs)
    assert type(e.value).__name__ == cls, e.value
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_good_sizes_still_parse() -> None:
    from cellblock.sizes import parse_size
    assert [parse_size(s) for s in ("2", "2B", "2K", "2KB", "2KiB", "2kib", "1.5M")] == [
        2, 2, 2048, 2048, 2048, 2048, 1572864]


def test_cli_prints_kind_and_message(cli: Cli) -> None:
    out = cli.run(["run", "--memory", "2IB", "--", "true"])
    assert out.returncode == 2
    assert out.stderr.decode().startswith("cellblock: error: InvalidSpec: memory"), out.stderr


# ---- 7. errors keep errno and path; cleanup failures are reported ----------------------------


def test_io_error_is_an_oserror_with_errno(caller: Caller) -> None:
    caller.run("""
        assert issubclass(cellblock.SandboxIOError, OSError)
        assert issubclass(cellblock.SandboxIOError, cellblock.CellblockError)
        with Sandbox() as sb, raises(cellblock.SandboxIOError) as e:
            sb.read_file("no-such-file")
        assert e.value.errno == errno.ENOENT, e.value
        assert e.value.filename is not None and "no-such-file" in e.value.filename, e.value
        with raises(OSError):
            raise cellblock.SandboxIOError(errno.EIO, "x", "/p")
    """)


def test_errors_about_a_path_carry_it_as_filename(caller: Caller) -> None:
    # Not only I/O errors: a missing command, a missing cwd and a path leaving the sandbox
    # name the path in `filename`, as an OSError would.
    got = caller.run("""
        out = {}
        with Sandbox() as sb:
            with raises(cellblock.CommandNotFound) as e:
                sb.run(["/no/such/command"])
            out["command"] = [e.value.filename, str(e.value)]
            with raises(cellblock.InvalidSpec) as e:
                sb.run(["true"], cwd="/no/such/dir")
            out["cwd"] = [e.value.filename, str(e.value)]
            with raises(cellblock.PathEscape) as e:
                sb.read_file("/etc/passwd")
            out["escape"] = [e.value.filename, str(e.value)]
            with raises(cellblock.InvalidSpec) as e:
                sb.run([], timeout=1)
            out["no_path"] = getattr(e.value, "filename", None)
        print(json.dumps(out))
    """)
    assert got["command"][0] == "/no/such/command", got
    assert got["cwd"][0] == "/no/such/dir", got
    assert got["escape"][0] == "/etc/passwd", got
    for name in ("command", "cwd", "escape"):
        assert got[name][0] in got[name][1], got
    # An error about no path has none.
    assert got["no_path"] is None, got


@pytest.mark.skipif(not IS_ROOT, reason="a run's cgroup exists only for root callers")
def test_a_cgroup_that_cannot_be_removed_is_reported(marker: str) -> None:
    # A process of ours placed in the run's cgroup keeps it from being removed. A one-shot
    # run's report is returned before its teardown, so the failure is counted by the pool.
    import cellblock.cells

    assert cellblock.cells.drain(30)
    failures = cellblock.cells.stats().teardown_failures
    before = set(own_cellblock_cgroups())
    squatter = subprocess.Popen(["sleep", marker])
    done: list[cellblock.RunResult] = []
    t = threading.Thread(target=lambda: done.append(
        cellblock.run(["sleep", "2"], timeout=30, cells=False)))
    t.start()
    try:
        dirs = wait_for(lambda: sorted(set(own_cellblock_cgroups()) - before),
                        "the run's cgroup", 10)
        Path(dirs[0], "cgroup.procs").write_text(str(squatter.pid))
        t.join(60)
        assert done, "the run did not finish"
        assert done[0].reason == "exited"
        cellblock.cells.drain(30)
        stats = cellblock.cells.stats()
        assert stats.teardown_failures == failures + 1
        # Not only counted: the error names the directory and the errno (EBUSY).
        assert any(e.startswith(dirs[0]) and "os error 16" in e for e in stats.teardown_errors), \
            stats.teardown_errors
    finally:
        squatter.kill()
        squatter.wait()
        t.join(60)
        for d in own_cellblock_cgroups():
            wait_for(partial(_gone, d), f"removal of {d}", 10)


@pytest.mark.skipif(not IS_ROOT, reason="a warm call's cgroup exists only for root callers")
def test_a_warm_call_whose_cgroup_cannot_be_removed_reports_it() -> None:
    # A cgroup of ours made inside the call's own cgroup (a child of the session's) keeps it
    # from being removed (a process would be killed with the call's): the call's report says
    # so, naming the directory and the errno.
    sessions = set(own_cellblock_cgroups())
    sb = cellblock.Sandbox(memory="256M")
    done: list[cellblock.CodeResult] = []
    t = threading.Thread(target=lambda: done.append(
        sb.run_python("import time\ntime.sleep(2)", timeout=60)))
    blocker: Path | None = None
    try:
        sb.run_python("1", timeout=60)  # the runtime is up: its cgroups are the session's
        sessions = set(own_cellblock_cgroups()) - sessions
        t.start()

        def call_dirs() -> list[Path]:
            # The running call's cgroup: a child of the session's holding its worker.
            return [c for d in sessions for c in Path(d).glob("cellblock-*")
                    if c.is_dir() and (c / "cgroup.procs").read_text().strip()]
        calls = wait_for(call_dirs, "the call's cgroup", 20)
        blocker = calls[0] / "blocker"
        blocker.mkdir()
        t.join(60)
        assert done, "the call did not finish"
        errors = done[0].cleanup_errors
        assert any(e.startswith(str(calls[0])) and "os error 16" in e for e in errors), (
            calls, done[0])
    finally:
        if t.is_alive():
            t.join(60)
        if blocker is not None:
            blocker.rmdir()
            wait_for(partial(_gone, str(blocker.parent)), f"removal of {blocker.parent}", 10)
        sb.close()


def _freezable(parent: Path, name: str) -> Path | None:
    """A new cgroup `name` under `parent` when that hierarchy has a freezer, else None."""
    path = parent / name
    path.mkdir()
    if (path / "freezer.state").exists() or (path / "cgroup.freeze").exists():
        return path
    path.rmdir()
    return None


def _freeze(path: Path) -> None:
    if (path / "freezer.state").exists():
        (path / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (path / "freezer.state").read_text().strip() == "FROZEN",
                 f"{path} frozen", 10)
    else:
        (path / "cgroup.freeze").write_text("1")
        wait_for(lambda: "frozen 1" in (path / "cgroup.events").read_text(),
                 f"{path} frozen", 10)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.skipif(not IS_ROOT, reason="cgroups (and their sweep) exist only for root callers")
def test_the_stale_cgroup_sweep_thaws_kills_and_removes(marker: str) -> None:
    # Three planted cgroups, children of our own freezer cgroup, each holding a process this
    # test started: an owner that is dead (frozen: on cgroup v1 it dies only once thawed; with
    # a child cgroup holding another, as a warm call's), an owner whose pid lives on in another
    # process (a reused pid: the start time differs) and a live owner (its start time matches:
    # left alone).
    parents = [d for d in own_cgroup_dirs() if d.is_dir()]
    gone = subprocess.Popen(["true"])
    gone.wait()
    procs = {k: subprocess.Popen(["sleep", marker])
             for k in ("dead", "nested", "reused", "owner")}
    names = {"dead": f"cellblock-{gone.pid}-x",
             "reused": f"cellblock-{procs['reused'].pid}-0-1",
             "owner": f"cellblock-{procs['owner'].pid}-0-{_start_time(procs['owner'].pid)}"}
    planted: dict[str, Path] = {}
    try:
        for key, name in names.items():
            path = next(p for d in parents if (p := _freezable(d, name)) is not None)
            planted[key] = path
            (path / "cgroup.procs").write_text(str(procs[key].pid))
        nested = planted["dead"] / "cellblock-call"
        nested.mkdir()
        planted["nested"] = nested
        (nested / "cgroup.procs").write_text(str(procs["nested"].pid))
        _freeze(planted["dead"])
        _freeze(planted["reused"])
        # A frozen process cannot have exited on its own.
        assert all(procs[k].poll() is None for k in ("dead", "nested", "reused"))
        # The sweep runs once per process, before its first cgroup.
        sweep = subprocess.run(
            [sys.executable, "-c",
             "import cellblock; print(cellblock.run(['true'], cells=False).reason)"],
            capture_output=True, text=True, timeout=120, check=False)
        assert sweep.stdout.strip() == "exited", sweep.stderr
        for key in ("dead", "nested", "reused"):
            assert procs[key].wait(10) == -signal.SIGKILL, key
            assert not planted[key].exists(), key
        assert procs["owner"].poll() is None and planted["owner"].exists()
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        for path in sorted(planted.values(), key=lambda p: -len(p.parts)):
            if (path / "freezer.state").exists():
                (path / "freezer.state").write_text("THAWED")
            wait_for(partial(_gone, str(path)), f"removal of {path}", 10)


def _gone(path: str) -> bool:
    """Removes the directory `path`; true once it does not exist."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


# ---- 8. papercuts ----------------------------------------------------------------------------


def test_version_has_one_source(cli: Cli) -> None:
    cargo = (Path(__file__).parents[1] / "Cargo.toml").read_text()
    version = next(line.split('"')[1] for line in cargo.splitlines()
                   if line.startswith("version ="))
    assert cellblock.__version__ == version
    out = cli.run(["--version"])
    assert (out.returncode, out.stdout.decode().strip()) == (0, f"cellblock {version}")


def readme_snippets() -> list[str]:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2]
            if block.startswith("python\n")]


def test_readme_python_snippets_run_as_written(owner_identity: tuple[str, Path | None],
                                                tmp_path: Path) -> None:
    identity, nobody_dir = owner_identity
    snippets = readme_snippets()
    assert snippets, "README.md has no python snippet"
    for i, code in enumerate(snippets):
        script = (nobody_dir or tmp_path) / f"readme-{i}.py"
        script.write_text(code)
        script.chmod(0o644)
        out = subprocess.run(owner_command(identity, script, nobody_dir), check=False,
                             capture_output=True, text=True, timeout=WORKER_DEADLINE, cwd="/")
        script.unlink()
        assert out.returncode == 0, (code, out.stderr[-3000:])
        # Quiet unless asked: run_many prints no progress bar.
        assert out.stderr == "", out.stderr[-3000:]


def test_run_many_shows_progress_only_when_asked(capfd: pytest.CaptureFixture[str]) -> None:
    jobs = [cellblock.Job(argv=["true"]) for _ in range(3)]
    assert all(r.ok for r in cellblock.run_many(jobs))
    assert capfd.readouterr().err == ""
    cellblock.run_many(jobs, progress=True)
    assert "3 jobs" in capfd.readouterr().err


def test_cli_batch_draws_no_progress_off_a_terminal(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"argv": ["true"]}) + "\n" for _ in range(3)))
    script = Path(sys.executable).parent / "cellblock"
    out = subprocess.run([str(script), "batch", str(jobs), "--out", str(tmp_path / "out.jsonl")],
                         check=False, capture_output=True, text=True, timeout=WORKER_DEADLINE)
    assert out.returncode == 0, out.stderr
    # Piped stderr: the summary only, no "n/total ... jobs/s" progress lines.
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("3 jobs in"), out.stderr


def test_cellblock_works_without_anthropic() -> None:
    code = textwrap.dedent('''\
        import sys
        sys.modules["anthropic"] = None  # import anthropic now raises ImportError
        import cellblock, cellblock.cli
        assert cellblock.run(["echo", "hi"]).stdout == "hi\\n"
        from cellblock.agent.loop import require_sdk
        try:
            require_sdk()
        except ImportError as e:
            print(e)
    ''')
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                         text=True, timeout=WORKER_DEADLINE)
    assert out.returncode == 0, out.stderr
    assert "pip install 'cellblock[agent]'" in out.stdout
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "anthropic" not in deps
    assert 'agent = ["anthropic' in pyproject

