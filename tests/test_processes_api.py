"""Background processes (`Sandbox.start`) and exposed ports (`Sandbox.expose`).

Each scenario is a script run by this test's interpreter as root and, through setpriv, as
uid 65534; it prints what it saw as JSON and the test asserts on it. Host-side probes (leftover
processes, sockets on the host's loopback) are made by the test itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock import InvalidSpec, Sandbox
from conftest import IS_ROOT, SETPRIV, processes_with_argv, wait_for

WHO = ["root", "nobody"] if IS_ROOT else ["user"]

#: Helpers every scenario gets.
PRELUDE = textwrap.dedent("""\
    import json, os, signal, socket, sys, threading, time, urllib.request
    import cellblock
    from cellblock import Sandbox
    out = {}
    def http_get(url, tries=100):
        # The server inside may still be starting: retry while the connection is reset.
        for _ in range(tries):
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return r.status, r.read().decode()
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.1)
        raise AssertionError(f"{url} never answered")
""")


def scenario(who: str, code: str, nobody_dir: Path | None, **params: Any) -> dict[str, Any]:
    """Runs PRELUDE + `code` (which fills `out`) as `who`; returns `out`."""
    script = PRELUDE + f"PARAMS = {params!r}\n" + textwrap.dedent(code) + \
        "\nprint('RESULT ' + json.dumps(out))\n"
    if who == "nobody":
        assert nobody_dir is not None
        argv = [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
                "/usr/bin/python3", "-c", script]
    else:
        argv = [sys.executable, "-c", script]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd="/",
                         check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    out: dict[str, Any] = json.loads(line[len("RESULT "):])
    return out


@pytest.fixture(params=WHO)
def who(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path | None]]:
    if request.param == "nobody":
        yield "nobody", request.getfixturevalue("nobody_dir")
    else:
        yield request.param, None


def free_port() -> int:
    """A port nothing on the host's loopback listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_listeners() -> set[tuple[str, int]]:
    """(address hex, port) of every TCP socket listening on the host, from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        addr, port = fields[1].split(":")
        if fields[3] == "0A":  # LISTEN
            found.add((addr, int(port, 16)))
    return found


# ---- streaming stdin, live output -----------------------------------------------------------

STREAM = """
with Sandbox() as sb:
    p = sb.start(["cat"])
    ended = []
    def produce():
        # A producer that never ends on its own: it stops only when the process is gone.
        i = 0
        try:
            while True:
                p.write_stdin(f"tick {i}\\n")
                i += 1
                time.sleep(0.002)
        except cellblock.SandboxIOError as e:
            ended.append(type(e).__name__)
    t = threading.Thread(target=produce)
    t.start()
    lines = p.iter_lines(timeout=30)
    seen = [next(lines).decode() for _ in range(200)]
    out["live"] = p.running
    p.kill()
    res = p.wait(30)
    t.join(30)
    out["seen"] = seen
    out["producer"] = ended
    out["reason"], out["signal"] = res.reason, res.signal
    out["returncode"] = p.returncode
    try:
        p.write_stdin("more")
        out["after"] = "OK"
    except cellblock.SandboxIOError:
        out["after"] = "SandboxIOError"
"""


def test_streaming_stdin_from_a_never_ending_producer(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], STREAM, who[1])
    assert out["seen"] == [f"tick {i}\n" for i in range(200)]
    assert out["live"] is True
    assert out["producer"] == ["SandboxIOError"]
    assert (out["reason"], out["signal"], out["returncode"]) == ("signaled", 9, -9)
    assert out["after"] == "SandboxIOError"


STDIN_MODES = """
with Sandbox() as sb:
    p = sb.start(["cat"], stdin="given\\n")
    out["given"] = p.wait(30).stdout
    try:
        p.write_stdin("x")
        out["write_given"] = "OK"
    except cellblock.SandboxIOError:
        out["write_given"] = "SandboxIOError"
    q = sb.start("wc -c")
    q.write_stdin(b"12345")
    q.close_stdin()
    q.close_stdin()
    out["eof"] = q.wait(30).stdout.strip()
    out["shell"] = sb.start("echo $0").wait(30).stdout
"""


def test_stdin_given_or_streamed_then_closed(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], STDIN_MODES, who[1])
    assert out["given"] == "given\n"
    assert out["write_given"] == "SandboxIOError"
    assert out["eof"] == "5"
    assert out["shell"] == "/bin/sh\n"


# ---- signals, kill, wait ------------------------------------------------------------------

SIGNALS = """
with Sandbox() as sb:
    p = sb.start("trap 'echo got USR1' USR1; trap 'echo got TERM; exit 3' TERM; echo ready; "
                 "while :; do sleep 0.05; done")
    lines = p.iter_lines(timeout=30)
    assert next(lines) == b"ready\\n"
    out["usr1"] = p.signal(signal.SIGUSR1)
    out["after_usr1"] = next(lines).decode()
    try:
        p.signal(signal.SIGSTOP)
        out["sigstop"] = "sent"
    except cellblock.InvalidSpec:
        out["sigstop"] = "InvalidSpec"
    p.terminate()
    res = p.wait(30)
    out["reason"], out["exit"], out["stdout"] = res.reason, res.exit_code, res.stdout
    out["signal_after_end"] = p.signal(signal.SIGTERM)
"""


def test_signals_are_forwarded_to_the_command(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], SIGNALS, who[1])
    assert out["usr1"] is True and out["after_usr1"] == "got USR1\n"
    assert out["sigstop"] == "InvalidSpec"
    assert (out["reason"], out["exit"]) == ("exited", 3)
    assert out["stdout"] == "ready\ngot USR1\ngot TERM\n"
    assert out["signal_after_end"] is False


KILL = """
def host_pids(argv):
    want = b"".join(a.encode() + b"\\0" for a in argv)
    found = []
    for e in os.listdir("/proc"):
        try:
            if e.isdigit() and open(f"/proc/{e}/cmdline", "rb").read() == want:
                found.append(e)
        except OSError:
            pass
    return found
with Sandbox() as sb:
    m = PARAMS["marker"]
    p = sb.start(f"sleep {m} & echo up; sleep {m}; echo never")
    assert next(p.iter_lines(timeout=30)) == b"up\\n"
    deadline = time.time() + 30
    while len(host_pids(["sleep", m])) < 2 and time.time() < deadline:
        time.sleep(0.02)
    out["before"] = len(host_pids(["sleep", m]))
    try:
        p.wait(0.2)
        out["wait"] = "returned"
    except TimeoutError:
        out["wait"] = "TimeoutError"
    out["running"] = p.running
    out["listed"] = [x.argv for x in sb.processes()]
    p.kill()
    res = p.wait(30)
    out["reason"], out["signal"], out["stdout"] = res.reason, res.signal, res.stdout
    out["listed_after"] = len(sb.processes())
    out["session_ok"] = sb.run(["echo", "ok"]).stdout
"""


def test_kill_ends_the_process_and_what_it_started(who: tuple[str, Path | None],
                                                   marker: str) -> None:
    out = scenario(who[0], KILL, who[1], marker=marker)
    assert out["wait"] == "TimeoutError" and out["running"] is True
    assert out["before"] == 2
    script = f"sleep {marker} & echo up; sleep {marker}; echo never"
    assert out["listed"] == [["/bin/sh", "-c", script]]
    assert (out["reason"], out["signal"], out["stdout"]) == ("signaled", 9, "up\n")
    assert out["listed_after"] == 0
    assert out["session_ok"] == "ok\n"
    assert processes_with_argv(["sleep", marker]) == []


TIMEOUT = """
with Sandbox(timeout=1) as sb:
    # No timeout given: the session's per-call default does not apply to a background process.
    p = sb.start(["sleep", "2"])
    q = sb.start(["sleep", "30"], timeout=0.5)
    out["q"] = q.wait(30).reason
    out["p"] = p.wait(30).reason
"""


def test_timeout_applies_only_when_given(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], TIMEOUT, who[1])
    assert out == {"q": "timeout", "p": "exited"}


CLOSE = """
m = PARAMS["marker"]
sb = Sandbox()
procs = [sb.start(["sleep", m]) for _ in range(3)]
server = sb.start(["python3", "-m", "http.server", "8000", "--bind", "127.0.0.1"], stdin=b"")
ep = sb.expose(8000)
out["served"] = http_get(ep.url + "/")[0]
out["before"] = len(sb.processes())
sb.close()
out["reasons"] = [p.result.reason for p in procs + [server]]
out["running"] = [p.running for p in procs]
out["after"] = len(sb.processes())
out["port"] = list(ep.address)
# No child of ours is left: the calls' joiners and the port's socket factory are reaped.
out["children"] = [c for t in os.listdir("/proc/self/task")
                   for c in open(f"/proc/self/task/{t}/children").read().split()]
"""


def test_closing_the_session_ends_its_processes_and_ports(who: tuple[str, Path | None],
                                                          marker: str) -> None:
    out = scenario(who[0], CLOSE, who[1], marker=marker)
    assert out["served"] == 200 and out["before"] == 4
    assert out["reasons"] == ["session_closed"] * 4
    assert out["running"] == [False] * 3 and out["after"] == 0
    assert out["children"] == []
    assert processes_with_argv(["sleep", marker]) == []
    # The forwarded port is gone with the session.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(tuple(out["port"]), timeout=5).close()


# ---- caps, redaction --------------------------------------------------------------------------

CAPS = """
live = []
with Sandbox(secrets={"TOKEN": "s3cr3t-background-value"}) as sb:
    p = sb.start("echo start $TOKEN; printf '%s' \\"$TOKEN\\" >&2; yes $TOKEN", max_output=1000,
                 on_output=lambda s, d: live.append(d.decode()))
    chunks = [c.data.decode() for c in p.iter_output(timeout=30)]
    res = p.wait(30)
out["reason"], out["truncated"] = res.reason, res.stdout_truncated
out["len"] = len(res.stdout_bytes)
out["stderr"] = res.stderr
out["leaked"] = any("s3cr3t" in x for x in [res.stdout, res.stderr, *chunks, *live])
out["live"] = "".join(live) == res.stdout + res.stderr or sorted(live) == sorted(chunks)
out["chunks_len"] = sum(len(c.encode()) for c in chunks)
out["redactions"] = res.redactions
"""


def test_background_output_is_capped_and_redacted(who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], CAPS, who[1])
    assert (out["reason"], out["truncated"], out["len"]) == ("output_limit", True, 1000)
    assert out["leaked"] is False
    assert out["stderr"] == "[REDACTED:TOKEN]"
    assert out["live"] is True
    # The iterators and the callback get exactly what the report keeps.
    assert out["chunks_len"] == 1000 + len("[REDACTED:TOKEN]")
    assert out["redactions"]["TOKEN"] >= 2


SECCOMP = """
code = ("import ctypes, os, sys\\n"
        "libc = ctypes.CDLL(None, use_errno=True)\\n"
        "r = libc.syscall(165, 0, 0, 0, 0, 0)\\n"  # mount(2) on x86_64
        "print(r, os.strerror(ctypes.get_errno()), flush=True)\\n"
        "sys.stdin.read()")
with Sandbox() as sb:
    p = sb.start(["python3", "-c", code])
    out["attempt"] = next(p.iter_lines(timeout=30)).decode()
    p.close_stdin()
    res = p.wait(30)
    out["reason"] = res.reason
    out["profile"] = res.seccomp_profile
    out["violations"] = [[v["kind"], v.get("syscall")] for v in res.violations]
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="mount(2) is syscall 165 on x86_64")
def test_refused_syscalls_of_a_background_process_are_reported(
        who: tuple[str, Path | None]) -> None:
    out = scenario(who[0], SECCOMP, who[1])
    assert out["attempt"] == "-1 Operation not permitted\n"
    assert out["reason"] == "exited" and out["profile"] == "python"
    assert ["seccomp", "mount"] in out["violations"]


# ---- exposed ports ----------------------------------------------------------------------------

EXPOSE = """
port = PARAMS["port"]
with Sandbox() as sb:
    sb.write_file("hello.txt", "hello from the sandbox")
    server = sb.start(["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                      stdin=b"")
    # The server is up inside before anything is exposed.
    probe = ("import socket, time\\n"
             "for _ in range(200):\\n"
             "    try: socket.create_connection(('127.0.0.1', %d), 1).close(); break\\n"
             "    except OSError: time.sleep(0.05)\\n"
             "print('up')" % port)
    out["inside"] = sb.run(["python3", "-c", probe]).stdout
    # The host's own loopback does not reach it (the test checks that too, from outside).
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        out["direct"] = "OK"
    except ConnectionRefusedError:
        out["direct"] = "ConnectionRefusedError"
    ep = sb.expose(port)
    out["ep"] = [ep.port, ep.host, ep.host_port]
    out["listed"] = [[e.port, e.host, e.host_port] for e in sb.exposed_ports()]
    out["get"] = http_get(ep.url + "/hello.txt")
    # Many connections at once, each its own forward.
    results = []
    threads = [threading.Thread(target=lambda: results.append(http_get(ep.url + "/hello.txt")))
               for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join(60)
    out["parallel"] = sorted(set(r[1] for r in results)), len(results)
    # The sandbox's own code cannot reach the host side of its forward (its loopback is not
    # the host's).
    reach = ("import socket\\n"
             "try:\\n"
             "    socket.create_connection(('127.0.0.1', %d), 2); print('OK')\\n"
             "except OSError as e: print(type(e).__name__)" % ep.host_port)
    out["inside_to_host_side"] = sb.run(["python3", "-c", reach]).stdout.strip()
    # A second port of the sandbox is not reachable through the first one's forward, and
    # a forward to a port nothing listens on resets the connection.
    empty = sb.expose(port + 1)
    try:
        s = socket.create_connection(empty.address, timeout=5)
        s.settimeout(5)
        out["empty"] = repr(s.recv(1))
    except (ConnectionResetError, ConnectionRefusedError) as e:
        out["empty"] = type(e).__name__
    with open(PARAMS["flag"], "w") as f:
        f.write(json.dumps(out["ep"]))
    while not os.path.exists(PARAMS["flag"] + ".done"):
        time.sleep(0.05)
    server.kill()
"""


def test_expose_round_trip_over_loopback_only(who: tuple[str, Path | None],
                                               tmp_path: Path) -> None:
    port = free_port()
    # The scenario (maybe uid 65534) and the test meet in a directory both can write.
    shared = Path(tempfile.mkdtemp(dir=who[1] / "tmp" if who[1] else tmp_path))
    shared.chmod(0o777)
    flag = shared / "exposed"
    result: dict[str, Any] = {}
    failed: list[BaseException] = []

    def run() -> None:
        try:
            result.update(scenario(who[0], EXPOSE, who[1], port=port, flag=str(flag)))
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_for(lambda: failed or (flag.exists() and flag.read_text()),
                 "the port to be exposed", 120)
        if failed:
            raise failed[0]
        _, host, host_port = json.loads(flag.read_text())
        assert host == "127.0.0.1"
        # Bound on the host's loopback only, and the sandbox's own port is not on the host.
        listeners = loopback_listeners()
        assert ("0100007F", host_port) in listeners
        assert not any(p == host_port for a, p in listeners if a != "0100007F")
        assert not any(p == port for _, p in listeners)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        (shared / "exposed.done").write_text("")
        t.join(240)
        shutil.rmtree(shared, ignore_errors=True)
    if failed:
        raise failed[0]
    out = result
    assert out["inside"] == "up\n"
    assert out["direct"] == "ConnectionRefusedError"
    assert out["ep"][:2] == [port, "127.0.0.1"] and out["listed"] == [out["ep"]]
    assert out["get"] == [200, "hello from the sandbox"]
    assert out["parallel"] == [["hello from the sandbox"], 8]
    assert out["inside_to_host_side"] == "ConnectionRefusedError"
    assert out["empty"] in ("ConnectionResetError", "b''")


SHADOW = """
# The host has a server on 127.0.0.1:port; exposing the same port of a sandbox where nothing
# listens must not reach the host's server: the forward goes into the sandbox's namespace.
port = PARAMS["port"]
with Sandbox() as sb:
    ep = sb.expose(port)
    try:
        s = socket.create_connection(ep.address, timeout=5)
        s.settimeout(5)
        out["via_expose"] = repr(s.recv(100))
    except (ConnectionResetError, ConnectionRefusedError) as e:
        out["via_expose"] = type(e).__name__
    # Nor can the sandbox's own code reach the host's loopback server.
    code = ("import socket\\n"
            "try:\\n"
            "    socket.create_connection(('127.0.0.1', %d), 2); print('OK')\\n"
            "except OSError as e: print(type(e).__name__)" % port)
    out["inside"] = sb.run(["python3", "-c", code]).stdout.strip()
"""


def test_expose_never_reaches_the_host(who: tuple[str, Path | None]) -> None:
    secret = b"host-only-banner"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()
        accepted = []

        def serve() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                accepted.append(1)
                conn.sendall(secret)
                conn.close()

        t = threading.Thread(target=serve)
        t.start()
        try:
            out = scenario(who[0], SHADOW, who[1], port=port)
        finally:
            stop.set()
            t.join(10)
    assert out["via_expose"] in ("ConnectionResetError", "b''")
    assert out["inside"] == "ConnectionRefusedError"
    assert accepted == []


def test_bad_arguments_are_typed_errors() -> None:
    with Sandbox() as sb:
        for bad in (0, 65536, -1):
            with pytest.raises(InvalidSpec, match="port"):
                sb.expose(bad)
        with pytest.raises(InvalidSpec, match="host"):
            sb.expose(8000, host="localhost")
        with pytest.raises(InvalidSpec, match="argv"):
            sb.start([])
        p = sb.start(["true"])
        assert p.wait(30).ok
    with pytest.raises(Exception, match="closed"):
        sb.start(["true"])
    assert os.path.exists("/proc/self")


def test_a_port_the_allowlist_gives_to_the_host_cannot_be_exposed() -> None:
    # With 127.0.0.1:<port> listed, the sandbox's connections to that port go to the host's
    # loopback: a forward into the sandbox would end up on the host, so it is refused.
    with Sandbox(allow_net=["127.0.0.1:8000"]) as sb:
        with pytest.raises(InvalidSpec, match="8000"):
            sb.expose(8000)
        assert sb.exposed_ports() == []
        assert sb.expose(8001).port == 8001
    with Sandbox(allow_net=["127.0.0.1"]) as sb, pytest.raises(InvalidSpec, match="host"):
        sb.expose(8001)


def test_a_raising_output_callback_stops_the_process(marker: str) -> None:
    def stop(stream: int, data: bytes) -> None:
        raise ValueError("enough")

    with Sandbox() as sb:
        p = sb.start(f"echo x; sleep {marker}", on_output=stop)
        with pytest.raises(ValueError, match="enough"):
            p.wait(30)
        assert not p.running and sb.processes() == []
    assert processes_with_argv(["sleep", marker]) == []
