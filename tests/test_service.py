"""`cellblock serve` driven over loopback with `cellblock.Client` and with plain HTTP: sessions,
runs, streaming, files, batches, problem+json errors, token isolation, per-token limits,
lifetimes, graceful shutdown and no sandbox left after kill -9."""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_fixtures import Service, share_service_packages, start_service

import cellblock
from cellblock.service.problems import LimitExceeded, NotFound, RequestTooLarge, Unauthorized
from conftest import (
    IS_ROOT,
    NOBODY,
    Cli,
    own_cellblock_cgroups,
    own_cgroup_dirs,
    processes_with_argv,
    wait_for,
)


def unique_sleep() -> list[str]:
    return ["sleep", f"{700 + secrets.randbelow(10**6) / 10**6:.6f}"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    script = Path(sys.executable).parent / "cellblock"
    cli = Cli("root", [str(script)], dict(os.environ))
    svc = start_service(cli, tmp_path_factory.mktemp("service"))
    yield svc
    assert svc.stop() == 128 + signal.SIGTERM


@pytest.fixture
def alice(service: Service) -> Iterator[cellblock.Client]:
    with cellblock.Client(service.url, service.tokens["alice"]) as c:
        yield c


def problem_of(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body = r.json()
    assert body["status"] == r.status_code
    assert body["type"] == "urn:cellblock:error:" + body["title"]
    return dict(body)


def test_client_has_the_sandbox_surface(alice: cellblock.Client, tmp_path: Path) -> None:
    with alice.Sandbox(memory="256M", labels={"job": "t1"}, env={"GREETING": "hi"}) as sb:
        assert sb.labels == {"job": "t1"}
        r = sb.run(["sh", "-c", "echo $GREETING; exit 3"])
        assert isinstance(r, cellblock.RunResult)
        assert (r.stdout, r.exit_code, r.reason) == ("hi\n", 3, "exited")
        assert sb.run(["cat"], stdin="piped").stdout == "piped"
        assert sb.run_python("x = 41", stateful=True).ok
        assert sb.run_python("x + 1", stateful=True).value == "42"
        assert sb.run_node("[1, 2].length").value == "2"
        assert sb.run(["sleep", "5"], timeout=0.3).reason == "timeout"
        binary = bytes(range(256)) * 300
        sb.write_file("d/blob.bin", binary)
        assert sb.read_file("d/blob.bin") == binary
        assert sb.run_shell("wc -c < d/blob.bin").stdout.strip() == str(len(binary))
        sb.make_dirs("d/e")
        assert [(e.name, e.kind) for e in sb.list_dir("d")] == [("blob.bin", "file"), ("e", "dir")]
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f.txt").write_text("tree")
        sb.upload(src, "up")
        sb.download("up", tmp_path / "back")
        assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "tree"
        sb.remove("d", recursive=True)
        assert "d" not in [e.name for e in sb.list_dir()]
        with pytest.raises(cellblock.PathEscape):
            sb.read_file("../../../etc/shadow")
        with pytest.raises(cellblock.SandboxIOError):
            sb.read_file("missing.txt")
        with pytest.raises(cellblock.InvalidSpec):
            sb.run([])
        sb.pause()
        assert sb.info().state == "paused"
        sb.resume()
        assert sb.run(["echo", "thawed"]).stdout == "thawed\n"
        assert sb.enforcement["memory"] is not None
        assert [s.id for s in alice.sessions(job="t1")] == [sb.id]
        assert alice.sessions(job="other") == []
    assert not sb.is_open
    with pytest.raises(cellblock.SessionClosed):
        sb.run(["true"])


def test_live_output_through_the_client(alice: cellblock.Client) -> None:
    seen: list[tuple[int, bytes, float]] = []
    r = alice.run(["sh", "-c", "echo one; sleep 0.7; echo two >&2"],
                  on_output=lambda s, d: seen.append((s, d, time.monotonic())))
    ended = time.monotonic()
    assert [(s, d) for s, d, _ in seen] == [(1, b"one\n"), (2, b"two\n")]
    assert ended - seen[0][2] > 0.5, "the first chunk was not delivered live"
    assert (r.stdout, r.stderr, r.exit_code) == ("one\n", "two\n", 0)


def test_reconnect_from_another_process(service: Service, alice: cellblock.Client) -> None:
    sb = alice.Sandbox(labels={"owner": "p1"})
    try:
        sb.run_python("state = 'kept'", stateful=True)
        code = (
            "import cellblock, sys\n"
            "c = cellblock.Client(sys.argv[1], sys.argv[2])\n"
            "[info] = c.sessions(owner='p1')\n"
            "sb = c.connect(info.id)\n"
            "print(sb.run_python('state', stateful=True).value)\n"
        )
        done = subprocess.run([sys.executable, "-c", code, service.url, service.tokens["alice"]],
                              check=False, capture_output=True, text=True, timeout=60)
        assert done.stdout.strip() == "'kept'", done.stderr
    finally:
        sb.close()


def test_plain_http_and_problem_json(service: Service) -> None:
    url, auth = service.url, service.headers("alice")
    r = httpx.post(url + "/v1/sessions", json={})
    assert r.status_code == 401 and problem_of(r)["title"] == "Unauthorized"
    r = httpx.post(url + "/v1/sessions", json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and problem_of(r)["title"] == "Unauthorized"
    r = httpx.post(url + "/v1/sessions", json={"memory": "lots"}, headers=auth)
    assert r.status_code == 422 and problem_of(r)["title"] == "InvalidSpec"
    r = httpx.post(url + "/v1/sessions", json={"nonsense": 1}, headers=auth)
    assert r.status_code == 422 and problem_of(r)["title"] == "InvalidSpec"
    r = httpx.post(url + "/v1/sessions/ses_none/run", json={"argv": ["true"]}, headers=auth)
    assert r.status_code == 404 and problem_of(r)["title"] == "SessionClosed"
    r = httpx.post(url + "/v1/run", json={"argv": ["/no/such/program"]}, headers=auth)
    assert r.status_code == 422 and problem_of(r)["title"] == "CommandNotFound"

    info = httpx.post(url + "/v1/sessions", json={"labels": {"via": "http"}}, headers=auth)
    assert info.status_code == 201, info.text
    sid = info.json()["id"]
    base = f"{url}/v1/sessions/{sid}"
    r = httpx.put(base + "/files", params={"path": "a.txt"}, content=b"xyz", headers=auth)
    assert r.status_code == 204
    r = httpx.post(base + "/run", json={"argv": ["cat", "a.txt"]}, headers=auth)
    assert r.status_code == 200 and r.json()["stdout"] == "xyz" and r.json()["reason"] == "exited"
    r = httpx.get(base + "/files", params={"path": "/etc/../../../root"}, headers=auth)
    assert r.status_code == 403 and problem_of(r)["title"] == "PathEscape"
    r = httpx.post(base + "/python", json={"code": "1/0"}, headers=auth)
    assert r.status_code == 200 and "ZeroDivisionError" in r.json()["error"]

    with httpx.stream("POST", base + "/run/stream", headers=auth,
                      json={"argv": ["sh", "-c", "echo a; echo b >&2; exit 4"]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.iter_lines())
    names = [name for name, _ in events]
    assert names[-1] == "result" and sorted(names[:-1]) == ["stderr", "stdout"]
    assert {n: d["text"] for n, d in events[:-1]} == {"stdout": "a\n", "stderr": "b\n"}
    assert events[-1][1]["exit_code"] == 4

    r = httpx.delete(base, headers=auth)
    assert r.status_code == 200 and r.json()["state"] == "closed"
    r = httpx.get(base, headers=auth)
    assert r.status_code == 404 and problem_of(r)["title"] == "SessionClosed"

    spec = httpx.get(url + "/openapi.json").json()
    assert {"/v1/sessions", "/v1/sessions/{session_id}/run/stream", "/v1/batches",
            "/v1/sessions/{session_id}/files", "/v1/run"} <= set(spec["paths"])


def parse_sse(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], ""
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line[5:])))
    return events


def test_disconnecting_a_stream_kills_the_run(service: Service) -> None:
    argv = unique_sleep()
    body = {"argv": ["sh", "-c", f"echo started; exec {' '.join(argv)}"], "timeout": 120}
    with httpx.stream("POST", service.url + "/v1/run/stream", json=body,
                      headers=service.headers("alice")) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                wait_for(lambda: processes_with_argv(argv), "the run to start")
                break
        r.close()  # the client goes away mid-run
    wait_for(lambda: not processes_with_argv(argv), "the run to be killed", 15)


def test_tokens_see_only_their_own(service: Service) -> None:
    with cellblock.Client(service.url, service.tokens["alice"]) as alice, \
         cellblock.Client(service.url, service.tokens["bob"]) as bob:
        sb = alice.Sandbox(labels={"secret": "alice"})
        batch = alice.submit([cellblock.Job(code="print(1)")])
        try:
            sb.write_file("mine.txt", "alice's")
            assert sb.id not in [s.id for s in bob.sessions()]
            with pytest.raises(cellblock.SessionClosed):
                bob.connect(sb.id)
            theirs = cellblock.RemoteSandbox(bob, sb.info())
            for attempt in (lambda: theirs.read_file("mine.txt"),
                            lambda: theirs.run(["cat", "mine.txt"]),
                            lambda: theirs.write_file("mine.txt", "bob's"),
                            lambda: theirs.set_timeout(1),
                            theirs.pause):
                with pytest.raises(cellblock.SessionClosed):
                    attempt()
            theirs.close()  # idempotent on the client, refused on the service
            with pytest.raises(NotFound):
                bob.batch(batch)
            assert sb.read_file("mine.txt") == b"alice's"
            assert sb.info().state == "open"
        finally:
            sb.close()


def test_per_token_limits(service: Service) -> None:
    with cellblock.Client(service.url, service.tokens["carol"]) as carol:
        first, second = carol.Sandbox(), carol.Sandbox()
        with pytest.raises(LimitExceeded):
            carol.Sandbox()
        second.close()
        third = carol.Sandbox()

        argv = unique_sleep()
        running = threading.Thread(target=first.run, args=(argv,), kwargs={"timeout": 30})
        running.start()
        try:
            wait_for(lambda: processes_with_argv(argv), "the first run to start")
            with pytest.raises(LimitExceeded):
                third.run(["true"])
            with pytest.raises(LimitExceeded):
                carol.run(["true"])
        finally:
            for pid in processes_with_argv(argv):
                os.kill(pid, signal.SIGKILL)
            running.join(30)
        assert third.run(["echo", "free"]).stdout == "free\n"

        url, auth = service.url, service.headers("carol")
        big = b"x" * 4096
        r = httpx.put(f"{url}/v1/sessions/{third.id}/files", params={"path": "big"},
                      content=big, headers=auth)
        assert r.status_code == 413 and problem_of(r)["title"] == "RequestTooLarge"
        r = httpx.put(f"{url}/v1/sessions/{third.id}/files", params={"path": "big"},
                      content=iter([big[:1500], big[1500:]]), headers=auth)  # chunked
        assert r.status_code == 413 and problem_of(r)["title"] == "RequestTooLarge"
        with pytest.raises(RequestTooLarge):
            third.write_file("big", big)
        assert third.list_dir() == []
        third.write_file("small", b"y" * 1000)
        first.close()
        third.close()
    with cellblock.Client(service.url, "cbk_forged") as forged, pytest.raises(Unauthorized):
        forged.sessions()


#: A file larger than the in-memory read cap (64 MiB) and than the service could hold without
#: it showing in its peak RSS.
BIG_FILE = 80 << 20


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_files_stream_through_the_service(service_cli: tuple[Cli, Path],
                                          tmp_path: Path) -> None:
    """An 80 MiB file goes up and comes back through the service (run by root, and by uid
    65534), which holds only chunks: its peak RSS (reset first through clear_refs) grows by
    far less than the file."""
    cli, directory = service_cli
    service = start_service(cli, directory)
    try:
        _stream_big_file(service, tmp_path)
    finally:
        assert service.stop() == 128 + signal.SIGTERM


def _stream_big_file(service: Service, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with src.open("wb") as f:
        for i in range(BIG_FILE >> 20):
            f.write(bytes([i]) * (1 << 20))
    pid = service.proc.pid
    with cellblock.Client(service.url, service.tokens["big"]) as c, \
            c.Sandbox(disk="200M", memory="400M") as sb:
        sb.write_file("warm.bin", b"x" * (2 << 20))  # first-use allocations, before the baseline
        assert len(b"".join(sb.iter_file("warm.bin"))) == 2 << 20
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = peak_rss(pid)
        sb.upload(src, "big.bin")  # streamed from the open file
        assert sb.list_dir() == [cellblock.DirEntry(name="big.bin", kind="file", size=BIG_FILE),
                                 cellblock.DirEntry(name="warm.bin", kind="file", size=2 << 20)]
        sb.download("big.bin", tmp_path / "back.bin")
        grown = peak_rss(pid) - before
        assert grown < BIG_FILE // 4, f"the service's peak RSS grew by {grown >> 20} MiB"
        assert filecmp.cmp(src, tmp_path / "back.bin", shallow=False)

        with pytest.raises(cellblock.FileTooLarge):  # past the 64 MiB in-memory default
            sb.read_file("big.bin")
        with pytest.raises(cellblock.FileTooLarge):
            sb.iter_file("big.bin", max_size=BIG_FILE - 1)
        r = httpx.get(f"{service.url}/v1/sessions/{sb.id}/files", headers=service.headers("big"),
                      params={"path": "big.bin", "max_size": 1000})
        assert r.status_code == 413 and problem_of(r)["title"] == "FileTooLarge"
        assert sum(len(c) for c in sb.iter_file("big.bin", max_size=BIG_FILE)) == BIG_FILE
        chunks = sb.iter_file("big.bin", chunk_size=1 << 16)
        assert len(next(chunks)) == 1 << 16
        chunks.close()  # an abandoned download frees its stream

        sb.write_file("gen.bin", (bytes([i]) * 1000 for i in range(3)))  # an iterable, chunked
        assert sb.read_file("gen.bin") == b"\0" * 1000 + b"\1" * 1000 + b"\2" * 1000


def test_fork_through_the_client(alice: cellblock.Client) -> None:
    with alice.Sandbox(labels={"job": "fork"}) as sb:
        sb.write_file("a.txt", "A")
        sb.run_python("x = 41\ndef inc(v): return v + 1", stateful=True)
        sb.prepare_fork()
        with sb.fork(timeout=30) as fk:
            assert fk.id != sb.id and fk.labels == {"job": "fork"}
            assert fk.fork_report is not None and fk.fork_report.state
            assert fk.fork_report.files == 1 and fk.fork_report.names == 2
            assert fk.run_python("inc(x)", stateful=True).value == "42"
            fk.write_file("a.txt", "changed")
            assert sb.read_file("a.txt") == b"A"
        assert sb.run_python("x", stateful=True).value == "41"


def test_lifetime_and_set_timeout(alice: cellblock.Client) -> None:
    short = alice.Sandbox(lifetime=1.0)
    extended = alice.Sandbox(lifetime=1.0)
    extended.set_timeout(60)
    wait_for(lambda: not short.is_open, "the short session to be closed", 10)
    assert extended.is_open
    assert extended.run(["echo", "alive"]).stdout == "alive\n"
    extended.close()


def test_batches(alice: cellblock.Client) -> None:
    jobs = [cellblock.Job(code=f"print({i} * 2)") for i in range(3)]
    jobs += [cellblock.Job(argv=["sh", "-c", "exit 7"]), cellblock.Job(argv=["/no/such"])]
    outcomes = alice.run_many(jobs, concurrency=2)
    assert [o.stdout for o in outcomes[:3]] == ["0\n", "2\n", "4\n"]  # type: ignore[union-attr]
    assert outcomes[3].exit_code == 7  # type: ignore[union-attr]
    assert isinstance(outcomes[4], cellblock.JobError) and outcomes[4].kind == "CommandNotFound"

    argv = unique_sleep()
    batch = alice.submit([cellblock.Job(argv=argv, limits={"timeout": 120})])
    wait_for(lambda: processes_with_argv(argv), "the batch job to start")
    assert alice.cancel_batch(batch).state == "cancelled"
    assert processes_with_argv(argv) == []


def test_graceful_shutdown_closes_every_sandbox(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "cellblock"
    svc = start_service(Cli("root", [str(script)], dict(os.environ)), tmp_path)
    argv = unique_sleep()
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
        idle = c.Sandbox(warm=["python"])
        busy = c.Sandbox()
        threading.Thread(target=lambda: _ignore_errors(busy.run, argv, timeout=120),
                         daemon=True).start()
        wait_for(lambda: processes_with_argv(argv), "the run to start")
        assert idle.run_python("1").value == "1"
    assert svc.stop() == 128 + signal.SIGTERM
    assert processes_with_argv(argv) == []
    assert descendants(svc.proc.pid) == []


def _ignore_errors(fn: Any, *args: Any, **kwargs: Any) -> None:
    """Calls `fn`; the service goes away under this call on purpose."""
    with contextlib.suppress(Exception):
        fn(*args, **kwargs)


def descendants(pid: int) -> list[int]:
    """Living processes whose parent chain reaches `pid` (reparented orphans are not)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def service_cli(cli: Cli, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Cli, Path]:
    """The `cli` identities, with the service's packages and a directory they can read."""
    if cli.name != "nobody":
        return cli, tmp_path
    nobody_dir = request.getfixturevalue("nobody_dir")
    share_service_packages(nobody_dir)
    directory = Path(tempfile.mkdtemp(dir=nobody_dir / "tmp"))
    os.chown(directory, NOBODY, NOBODY)
    return cli, directory


def test_kill_9_leaves_no_sandbox(service_cli: tuple[Cli, Path]) -> None:
    """The service dies by SIGKILL with a busy session, an idle warm one, and (root) a paused
    idle and a paused busy session. Nothing else runs after it: the sessions' lifelines end
    the running ones, and each session's reaper thaws a frozen one, kills it and removes its
    cgroups. As uid 65534 there is no freezer: pausing is refused, and says why."""
    cli, directory = service_cli
    svc = start_service(cli, directory)
    busy_argv, paused_argv = unique_sleep(), unique_sleep()
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
        busy, idle = c.Sandbox(), c.Sandbox(warm=["python"])
        threading.Thread(target=lambda: _ignore_errors(busy.run, busy_argv, timeout=120),
                         daemon=True).start()
        wait_for(lambda: processes_with_argv(busy_argv), "the run to start")
        assert idle.run_python("print('warm')").stdout == "warm\n"

        paused_busy, paused_idle = c.Sandbox(), c.Sandbox(warm=["python"])
        threading.Thread(target=lambda: _ignore_errors(paused_busy.run, paused_argv,
                                                       timeout=120), daemon=True).start()
        wait_for(lambda: processes_with_argv(paused_argv), "the run to start")
        if cli.name == "nobody":
            with pytest.raises(cellblock.SetupError, match="no freezer cgroup"):
                paused_busy.pause()
        else:
            for sb in (paused_busy, paused_idle):
                sb.pause()
                assert sb.info().state == "paused"
            wait_for(lambda: cgroup_states(svc.proc.pid).count("frozen") >= 2,
                     "the paused sessions' cgroups to be frozen", 15)
        everything = all_descendants(svc.proc.pid)
        assert set(processes_with_argv(busy_argv) + processes_with_argv(paused_argv)) \
            < everything
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in everything), "every sandbox to end", 30)
    assert processes_with_argv(busy_argv) == processes_with_argv(paused_argv) == []
    wait_for(lambda: own_cellblock_cgroups(svc.proc.pid) == [],
             "the dead service's cgroups to be removed", 30)


def cgroup_states(pid: int) -> list[str]:
    """"frozen" or "thawed" for each freezer-capable cellblock cgroup made by `pid`."""
    states = []
    for path in map(Path, own_cellblock_cgroups(pid)):
        if (path / "cgroup.freeze").exists():
            states.append("frozen" if (path / "cgroup.freeze").read_text().strip() == "1"
                          else "thawed")
        elif (path / "freezer.state").exists():
            states.append("frozen" if (path / "freezer.state").read_text().strip() == "FROZEN"
                          else "thawed")
    return states


def reapers_of(pid: int) -> list[int]:
    """The service's forked helpers, its session reapers among them: children running the
    service's own program in its pid namespace (a session's PID 1 is in a new one)."""
    program = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for child in descendants(pid):
        try:
            same = Path(f"/proc/{child}/cmdline").read_bytes() == program
            nspid = [line for line in Path(f"/proc/{child}/status").read_text().splitlines()
                     if line.startswith("NSpid:")]
        except OSError:
            continue
        if same and len(nspid[0].split()) == 2:
            found.append(child)
    return found


#: The v1 hierarchies cellblock uses (a private test cgroup is made in these only).
CELLBLOCK_V1 = {"memory", "cpu", "cpuacct", "cpu,cpuacct", "pids", "freezer"}


@contextlib.contextmanager
def private_cgroup() -> Iterator[list[Path]]:
    """A child of our own cgroups, in each hierarchy cellblock uses, for services whose
    leftovers no other cellblock process may sweep (every cellblock process on this shared
    machine sweeps the stale cgroups beside its own). Removed at the end."""
    own = own_cgroup_dirs()
    v1 = [d for d in own if any(part in CELLBLOCK_V1 for part in d.parts)]
    name = f"svctest-{os.getpid()}-{secrets.token_hex(4)}"
    dirs = []
    for parent in v1 or own:
        (parent / name).mkdir()
        dirs.append(parent / name)
    try:
        yield dirs
    finally:
        for d in dirs:
            def gone(d: Path = d) -> bool:
                with contextlib.suppress(FileNotFoundError):
                    d.rmdir()
                return not d.exists()
            wait_for(gone, f"removal of {d}", 20)


def frozen_in(dirs: list[Path]) -> list[Path]:
    """The frozen cellblock cgroups below `dirs`."""
    def frozen(path: Path) -> bool:
        v1, v2 = path / "freezer.state", path / "cgroup.freeze"
        return ((v1.exists() and v1.read_text().strip() == "FROZEN")
                or (v2.exists() and v2.read_text().strip() == "1"))

    return [d / e for d in dirs for e in os.listdir(d)
            if e.startswith("cellblock-") and frozen(d / e)]


def cellblock_cgroups_in(dirs: list[Path], pid: int) -> list[Path]:
    return [d / e for d in dirs for e in os.listdir(d) if e.startswith(f"cellblock-{pid}-")]


@pytest.mark.skipif(not IS_ROOT, reason="pausing a session needs a freezer cgroup (root); "
                    "test_kill_9_leaves_no_sandbox[nobody] proves it is refused, and says so")
def test_a_restarted_service_reclaims_frozen_sessions(tmp_path: Path) -> None:
    """Worse than kill -9 of the service alone: the service and its sessions' reapers are all
    killed, so nothing thaws the paused sessions, whose frozen processes cannot die. The next
    `cellblock serve` sweeps the dead service's cgroups at start, before any request: it
    thaws them, kills their processes and removes them. (Both services run in a private
    child cgroup, so that no other cellblock process sweeps first.)"""
    cli = Cli("root", [str(Path(sys.executable).parent / "cellblock")], dict(os.environ))
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
    with private_cgroup() as dirs:
        def enter() -> None:  # in the service's process, before exec
            for d in dirs:
                (d / "cgroup.procs").write_text("0")

        svc = start_service(cli, tmp_path / "first", preexec_fn=enter)
        argv = unique_sleep()
        with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
            busy, idle = c.Sandbox(), c.Sandbox()
            threading.Thread(target=lambda: _ignore_errors(busy.run, argv, timeout=120),
                             daemon=True).start()
            wait_for(lambda: processes_with_argv(argv), "the run to start")
            busy.pause()
            idle.pause()
            wait_for(lambda: len(frozen_in(dirs)) >= 2, "the sessions to be frozen", 15)
            sessions = all_descendants(svc.proc.pid)
            reapers = reapers_of(svc.proc.pid)
        assert len(reapers) >= 2, reapers  # one per session, at least
        for pid in [*reapers, svc.proc.pid]:  # the reapers first: they act on its death
            os.kill(pid, signal.SIGKILL)
        svc.proc.wait(10)
        left = cellblock_cgroups_in(dirs, svc.proc.pid)
        frozen = [d for d in left if ((d / "freezer.state").exists()
                  and (d / "freezer.state").read_text().strip() == "FROZEN")
                  or ((d / "cgroup.freeze").exists()
                  and (d / "cgroup.freeze").read_text().strip() == "1")]
        time.sleep(1.0)  # the frozen sessions really are stuck: nothing else reclaims them
        stuck = processes_with_argv(argv)
        second = start_service(cli, tmp_path / "second", preexec_fn=enter)
        try:
            assert stuck, "the frozen run died without a sweep"
            assert len(frozen) >= 2, left
            assert cellblock_cgroups_in(dirs, svc.proc.pid) == []
            wait_for(lambda: not any(pid_alive(p) for p in sessions), "the sessions to end", 10)
            assert processes_with_argv(argv) == []
            log = (tmp_path / "second" / "service.log").read_text()
            assert f"reclaimed {len(left)} cgroups of dead cellblock processes" in log, log
        finally:
            assert second.stop() == 128 + signal.SIGTERM


def all_descendants(pid: int) -> set[int]:
    """Every process below `pid`, transitively."""
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        children = [c for p in frontier for c in descendants(p)]
        frontier = [c for c in children if c not in found]
        found.update(children)
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
