"""Background processes and exposed ports through the real `cellblock serve` on loopback (run
by root and by uid 65534), driven with `cellblock.Client` and with plain HTTP; and through
`cellblock.aio`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from service_fixtures import Service, share_service_packages, start_service

import cellblock
from cellblock import aio
from cellblock.process import OutputChunk
from cellblock.service.problems import LimitExceeded, WaitTimeout
from conftest import NOBODY, Cli, processes_with_argv, wait_for

#: The port the sandboxed web server listens on, inside the sandbox's own network namespace.
INSIDE_PORT = 8000


def unique_sleep() -> list[str]:
    return ["sleep", f"{700 + secrets.randbelow(10**6) / 10**6:.6f}"]


@pytest.fixture
def svc(cli: Cli, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    """The service run by the `cli` identity (root, and uid 65534)."""
    directory = tmp_path
    if cli.name == "nobody":
        nobody_dir = request.getfixturevalue("nobody_dir")
        share_service_packages(nobody_dir)
        directory = Path(tempfile.mkdtemp(dir=nobody_dir / "tmp"))
        os.chown(directory, NOBODY, NOBODY)
    service = start_service(cli, directory)
    try:
        yield service
    finally:
        assert service.stop() == 128 + signal.SIGTERM


def problem_of(r: httpx.Response) -> dict[str, Any]:
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body = r.json()
    assert body["status"] == r.status_code
    return dict(body)


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str | None, Any, float]]:
    """(event, id, data, arrival time) of a server-sent event stream, parsed by hand: this is
    the wire format a non-Python client sees."""
    event, ident, data = "message", None, ""
    for line in lines:
        if line == "":
            if data:
                yield event, ident, json.loads(data), time.monotonic()
            event, ident, data = "message", None, ""
        elif line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("id: "):
            ident = line[len("id: "):]
        elif line.startswith("data: "):
            data += line[len("data: "):]


def http_get(url: str) -> tuple[int, str]:
    r = httpx.get(url, timeout=10)
    return r.status_code, r.text


def test_processes_through_the_client(svc: Service) -> None:
    with cellblock.Client(svc.url, svc.tokens["alice"]) as c, c.Sandbox() as sb:
        # A never-ending stdin stream: each line comes back before the next is written.
        cat = sb.start(["cat"])
        lines = cat.iter_lines(timeout=30)
        for i in range(20):
            cat.write_stdin(f"line {i}\n")
            assert next(lines) == f"line {i}\n".encode()
        assert [p.id for p in sb.processes()] == [cat.id] and cat.running
        cat.close_stdin()
        assert list(lines) == []
        r = cat.wait(30)
        assert (r.reason, r.exit_code) == ("exited", 0)
        assert r.stdout == "".join(f"line {i}\n" for i in range(20))
        with pytest.raises(cellblock.SandboxIOError):
            cat.write_stdin("closed")
        assert sb.processes() == [] and cat.returncode == 0 and not cat.running

        # A trap in the command fires on forwarded signals; others are refused.
        trap = sb.start("trap 'echo got USR1' USR1; trap 'echo got TERM; exit 3' TERM; "
                        "echo ready; while :; do sleep 0.05; done")
        it = trap.iter_lines(timeout=30)
        assert next(it) == b"ready\n"
        assert trap.signal(signal.SIGUSR1) is True
        assert next(it) == b"got USR1\n"
        with pytest.raises(cellblock.InvalidSpec):
            trap.signal(signal.SIGSTOP)
        with pytest.raises(TimeoutError):
            trap.wait(0.3)
        with pytest.raises(WaitTimeout):
            trap.wait(0.1)
        assert trap.running
        assert trap.terminate() is True
        res = trap.wait(30)
        assert (res.reason, res.exit_code) == ("exited", 3)
        assert res.stdout == "ready\ngot USR1\ngot TERM\n"
        assert trap.signal(signal.SIGTERM) is False

        # wait() gives what the in-process Sandbox gives for the same commands.
        seen: list[tuple[int, bytes]] = []
        cmd = "echo out; echo err >&2; exit 7"
        remote = sb.start(cmd, on_output=lambda s, d: seen.append((s, d))).wait(30)
        killed = sb.start(unique_sleep())
        assert killed.kill() is True
        remote_killed = killed.wait(30)
        with cellblock.Sandbox() as local:
            here = local.start(cmd).wait(30)
            p = local.start(unique_sleep())
            p.kill()
            here_killed = p.wait(30)
        fields = ("exit_code", "signal", "reason", "stdout", "stderr")
        assert [getattr(remote, f) for f in fields] == [getattr(here, f) for f in fields]
        assert [getattr(remote_killed, f) for f in fields] == \
            [getattr(here_killed, f) for f in fields]
        assert remote_killed.reason == "signaled" and killed.returncode == -signal.SIGKILL
        wait_for(lambda: sorted(seen) == [(1, b"out\n"), (2, b"err\n")], "on_output")

        # Given stdin is written then closed; argv lists and env travel.
        r = sb.start(["sh", "-c", "cat; echo $GREETING"], stdin=b"\x00\xffin\n",
                     env={"GREETING": "hi"}).wait(30)
        assert r.stdout_bytes == b"\x00\xffin\nhi\n"


def test_processes_over_plain_http(svc: Service) -> None:
    url, auth = svc.url, svc.headers("alice")
    sid = httpx.post(url + "/v1/sessions", json={}, headers=auth).json()["id"]
    base = f"{url}/v1/sessions/{sid}"
    try:
        r = httpx.post(base + "/processes", headers=auth,
                       json={"shell": "echo a; sleep 1.5; echo b >&2; exit 4"})
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        assert r.json()["state"] == "running"
        with httpx.stream("GET", f"{base}/processes/{pid}/output", headers=auth,
                          timeout=30) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = list(sse_events(s.iter_lines()))
        assert [(e, i, d.get("text")) for e, i, d, _ in events[:2]] == [
            ("stdout", "0", "a\n"), ("stderr", "1", "b\n")]
        assert events[1][3] - events[0][3] > 0.5, "the output was not streamed live"
        assert events[2][0] == "result" and events[2][2]["exit_code"] == 4
        assert len(events) == 3
        # A client that reconnects resumes after the last event it saw.
        with httpx.stream("GET", f"{base}/processes/{pid}/output", timeout=30,
                          headers={**auth, "Last-Event-ID": "0"}) as s:
            again = list(sse_events(s.iter_lines()))
        assert [(e, i) for e, i, _, _ in again] == [("stderr", "1"), ("result", None)]
        info = httpx.get(f"{base}/processes/{pid}", headers=auth).json()
        assert (info["state"], info["returncode"], info["result"]["stderr"]) == ("ended", 4, "b\n")

        # stdin as a raw body, then closed; wait returns the report.
        pid = httpx.post(base + "/processes", headers=auth, json={"argv": ["cat"]}).json()["id"]
        assert httpx.post(f"{base}/processes/{pid}/stdin", headers=auth,
                          content=b"raw\n").status_code == 204
        r = httpx.post(f"{base}/processes/{pid}/wait", headers=auth, params={"timeout": 0.2})
        assert r.status_code == 408 and problem_of(r)["title"] == "WaitTimeout"
        assert httpx.post(f"{base}/processes/{pid}/stdin", headers=auth,
                          params={"close": "true"}).status_code == 204
        r = httpx.post(f"{base}/processes/{pid}/wait", headers=auth, timeout=30)
        assert (r.json()["stdout"], r.json()["exit_code"]) == ("raw\n", 0)
        r = httpx.post(f"{base}/processes/{pid}/stdin", headers=auth, content=b"late")
        assert problem_of(r)["title"] == "SandboxIOError"

        # Signals by name; DELETE kills.
        argv = unique_sleep()
        pid = httpx.post(base + "/processes", headers=auth, json={"argv": argv}).json()["id"]
        wait_for(lambda: processes_with_argv(argv), "the process to start")
        r = httpx.post(f"{base}/processes/{pid}/signal", headers=auth, json={"signal": "STOP"})
        assert r.status_code == 422 and problem_of(r)["title"] == "InvalidSpec"
        listed = httpx.get(base + "/processes", headers=auth).json()
        assert [p["state"] for p in listed if p["id"] == pid] == ["running"]
        r = httpx.delete(f"{base}/processes/{pid}", headers=auth, timeout=30)
        assert (r.json()["state"], r.json()["result"]["reason"]) == ("ended", "signaled")
        assert not processes_with_argv(argv)
        r = httpx.post(f"{base}/processes/{pid}/signal", headers=auth, json={"signal": "TERM"})
        assert r.json() == {"delivered": False}

        for bad in ({}, {"argv": ["true"], "shell": "true"}, {"argv": []}):
            r = httpx.post(base + "/processes", headers=auth, json=bad)
            assert r.status_code == 422 and problem_of(r)["title"] == "InvalidSpec", bad
        r = httpx.get(f"{base}/processes/prc_missing", headers=auth)
        assert r.status_code == 404 and problem_of(r)["title"] == "NotFound"
    finally:
        httpx.delete(base, headers=auth)


def test_ports_isolation_limits_and_close(svc: Service) -> None:
    with cellblock.Client(svc.url, svc.tokens["alice"]) as alice, \
            cellblock.Client(svc.url, svc.tokens["bob"]) as bob:
        sb = alice.Sandbox()
        sb.write_file("hello.txt", "hello from the sandbox")
        server = sb.start(["python3", "-m", "http.server", str(INSIDE_PORT),
                           "--bind", "127.0.0.1"], stdin=b"")
        ep = sb.expose(INSIDE_PORT)
        # The address is on the service's machine (here: this one), loopback only.
        assert (ep.port, ep.host) == (INSIDE_PORT, "127.0.0.1") and ep.host_port > 0
        assert sb.exposed_ports() == [ep]
        got = wait_for(lambda: _try_get(ep.url + "/hello.txt"), "the sandboxed server", 60)
        assert got == (200, "hello from the sandbox")
        auth = svc.headers("alice")
        r = httpx.get(f"{svc.url}/v1/sessions/{sb.id}/ports", headers=auth)
        assert r.json() == [{"port": INSIDE_PORT, "host": "127.0.0.1",
                             "host_port": ep.host_port}]
        r = httpx.post(f"{svc.url}/v1/sessions/{sb.id}/ports", headers=auth,
                       json={"port": INSIDE_PORT, "host": "0.0.0.0"})
        assert r.status_code == 422 and problem_of(r)["title"] == "InvalidSpec"

        # Another token reaches neither the processes nor the ports of the session.
        theirs = cellblock.RemoteSandbox(bob, sb.info())
        for attempt in (lambda: theirs.start(["true"]), theirs.processes,
                        lambda: theirs.expose(INSIDE_PORT), theirs.exposed_ports):
            with pytest.raises(cellblock.SessionClosed):
                attempt()
        bob_auth = svc.headers("bob")
        base = f"{svc.url}/v1/sessions/{sb.id}/processes/{server.id}"
        for method, suffix, body in (("GET", "", None), ("DELETE", "", None),
                                     ("POST", "/signal", {"signal": "KILL"}),
                                     ("POST", "/wait", None), ("GET", "/output", None),
                                     ("POST", "/stdin", None)):
            r = httpx.request(method, base + suffix, headers=bob_auth, json=body, timeout=10)
            assert (r.status_code, problem_of(r)["title"]) == (404, "SessionClosed"), suffix
        assert server.running and _try_get(ep.url + "/hello.txt") == got

        # Closing the session ends its processes and its ports.
        argv = unique_sleep()
        sb.start(argv)
        wait_for(lambda: processes_with_argv(argv), "the process to start")
        sb.close()
        wait_for(lambda: not processes_with_argv(argv), "the session's process to end", 15)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(ep.address, timeout=5).close()

    # A running process holds one of the token's concurrent runs (carol has one).
    with cellblock.Client(svc.url, svc.tokens["carol"]) as carol, carol.Sandbox() as sb:
        first = sb.start(unique_sleep())
        with pytest.raises(LimitExceeded):
            sb.start(["true"])
        with pytest.raises(LimitExceeded):
            sb.run(["true"])
        first.kill()
        wait_for(lambda: _runs_free(sb), "the killed process to give its run back", 15)


def _runs_free(sb: cellblock.RemoteSandbox) -> bool:
    try:
        return sb.run(["true"]).ok
    except LimitExceeded:
        return False


def _try_get(url: str) -> tuple[int, str] | None:
    try:
        return http_get(url)
    except httpx.TransportError:
        return None


def test_aio_start_and_expose() -> None:
    async def main() -> None:
        async with aio.Sandbox() as sb:
            cat = await sb.start(["cat"])
            chunks = cat.iter_output()
            for i in range(5):
                await cat.write_stdin(f"{i}\n")
                assert await anext(chunks) == OutputChunk("stdout", f"{i}\n".encode())
            assert [p.sync for p in sb.processes()] == [cat.sync]
            with pytest.raises(TimeoutError):
                await cat.wait(0.2)
            await cat.close_stdin()
            assert [c async for c in chunks] == []
            r = await cat.wait(30)
            assert (r.exit_code, r.stdout) == (0, "0\n1\n2\n3\n4\n")

            await sb.write_file("hello.txt", "async hello")
            server = await sb.start(["python3", "-m", "http.server", str(INSIDE_PORT),
                                     "--bind", "127.0.0.1"], stdin=b"")
            ep = await sb.expose(INSIDE_PORT)
            assert sb.exposed_ports() == [ep]
            got = await asyncio.to_thread(
                wait_for, lambda: _try_get(ep.url + "/hello.txt"), "the server", 60)
            assert got == (200, "async hello")
            server.kill()
            done = await server.wait(30)
            assert (done.reason, done.signal, server.returncode) == ("signaled", 9, -9)

    asyncio.run(main())
