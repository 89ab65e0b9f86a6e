"""`cellblock serve` driven over loopback with `cellblock.Client` and with plain HTTP: sessions,
runs, streaming, files, batches, problem+json errors, token isolation, per-token limits,
lifetimes, graceful shutdown and no sandbox left after kill -9."""

from __future__ import annotations

import contextlib
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
from conftest import NOBODY, Cli, processes_with_argv, remove_cgroups_of, wait_for


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
    """The service dies by SIGKILL with a busy session, a paused busy session and an idle warm
    one. The sessions' lifelines end the running ones at once; a frozen session cannot die
    until it is thawed, which the next cellblock process's sweep of dead owners' cgroups does
    (here: one `cellblock run`, as a restarted service would)."""
    cli, directory = service_cli
    svc = start_service(cli, directory)
    busy_argv, paused_argv = unique_sleep(), unique_sleep()
    paused_ok = False
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c:
        busy, idle = c.Sandbox(), c.Sandbox(warm=["python"])
        threading.Thread(target=lambda: _ignore_errors(busy.run, busy_argv, timeout=120),
                         daemon=True).start()
        wait_for(lambda: processes_with_argv(busy_argv), "the run to start")
        assert idle.run_python("print('warm')").stdout == "warm\n"
        running = all_descendants(svc.proc.pid)
        assert set(processes_with_argv(busy_argv)) < running

        paused = c.Sandbox()
        threading.Thread(target=lambda: _ignore_errors(paused.run, paused_argv, timeout=120),
                         daemon=True).start()
        wait_for(lambda: processes_with_argv(paused_argv), "the run to start")
        try:
            paused.pause()
            paused_ok = paused.info().state == "paused"
        except cellblock.SetupError:
            assert cli.name == "nobody", "pausing needs a freezer cgroup (root)"
        everything = all_descendants(svc.proc.pid)
    os.kill(svc.proc.pid, signal.SIGKILL)
    svc.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in running), "the running sessions to end", 20)
    if paused_ok:
        sweep = cli.run(["run", "--", "true"])
        assert sweep.returncode == 0, sweep.stderr
    wait_for(lambda: not any(pid_alive(p) for p in everything), "every sandbox to end", 20)
    assert processes_with_argv(busy_argv) == processes_with_argv(paused_argv) == []
    remove_cgroups_of(svc.proc.pid)


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
