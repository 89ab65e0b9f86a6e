"""The fork server (`cellblock_core::forkserver`): cold runs' PID 1 is cloned by a small helper
process, not by the caller. A run it served is as isolated and limited as any; PID 1 holds no
copy of the caller's memory; the fork server dies with its owner, and a dead one only costs
speed.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_cells import children_of, state
from test_parts import probe_of, taking

import cellblock
import cellblock.cells
from conftest import IS_ROOT, PRELUDE, Runner, remove_cgroups_of, wait_for

ISOLATION_PROBE = PRELUDE + """
import resource, time
report(uid=os.getuid(), pid=os.getpid(), ppid=os.getppid(),
       ns={n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("pid", "net", "mnt", "ipc", "uts")},
       environ=attempt(open, "/proc/1/environ", "rb"),
       mem=attempt(open, "/proc/1/mem", "rb"), interfaces=[n for _, n in socket.if_nameindex()],
       cwd=os.getcwd())
"""


def test_a_run_the_forkserver_served_is_isolated_and_limited(sandbox: Runner) -> None:
    def one() -> list:
        return [sandbox.run(["python3", "-c", ISOLATION_PROBE], cells=False,
                            env={"CANARY": "run-env"})]

    results, took = taking(sandbox, "forkserver_clones", one)
    assert took == 1
    p = probe_of(results[0])
    host = {n: os.stat(f"/proc/self/ns/{n}").st_ino for n in ("pid", "net", "mnt", "ipc", "uts")}
    for name, ino in p["ns"].items():
        assert ino != host[name], (name, p)
    assert p["interfaces"] == ["lo"]
    # The command is a child of the sandbox's PID 1, whose memory it cannot read.
    assert p["ppid"] == 1 and p["pid"] > 1
    assert p["mem"] in ("EACCES", "EPERM"), p
    assert p["environ"] in ("EACCES", "EPERM"), p
    assert p["cwd"] == "/workspace"
    # Limits hold in a run the fork server served: a fork bomb stops at the pids limit.
    before = sandbox.cells()["forkserver_clones"]
    bomb = sandbox.run(["sh", "-c", "for i in $(seq 64); do sleep 2 & done; wait"],
                       cells=False, pids=8, timeout=20)
    assert sandbox.cells()["forkserver_clones"] == before + 1
    assert bomb.enforcement["pids"] == sandbox.enforcer("pids")
    if sandbox.privileged:
        assert "pids" in bomb.limits_hit, bomb
    else:
        # RLIMIT_NPROC: the bomb's forks fail (the kernel says so; nothing is "hit").
        assert bomb.exit_code != 0 and "fork" in bomb.stderr, bomb
    hog = sandbox.run(["python3", "-c", "b = bytearray(256 << 20)"], cells=False,
                      memory="48M", timeout=20)
    assert hog.reason == "memory" or (not sandbox.privileged and hog.exit_code != 0), hog


def test_sigpipe_is_default_in_a_forkserver_run(sandbox: Runner) -> None:
    """Python (which the fork server is) ignores SIGPIPE; the command must not inherit that."""
    def one() -> list:
        return [sandbox.run(["sh", "-c", "grep SigIgn /proc/self/status"], cells=False)]

    results, _ = taking(sandbox, "forkserver_clones", one)
    res = results[0]
    assert res.exit_code == 0, res
    ignored = int(res.stdout.split("SigIgn:")[1].split()[0], 16)
    assert ignored & (1 << (signal.SIGPIPE - 1)) == 0, res.stdout


CALLER = textwrap.dedent("""\
    import os, sys, time
    import cellblock, cellblock.cells
    marker = bytes.fromhex(sys.argv[1]) * 64   # in this process's heap only
    for _ in range(200):
        cellblock.run(["true"], cells=False)
        if cellblock.cells.stats().forkserver_clones or os.environ.get("CELLBLOCK_FORKSERVER"):
            break
        time.sleep(0.05)
    print(os.getpid(), flush=True)
    cellblock.run(["sleep", "30"], cells=False, timeout=60)
""")


def pid1_of(caller: int, forkserver: int | None) -> int:
    """The caller's child that is the PID 1 of the sandbox running `sleep` (earlier runs'
    PID 1s may still be ending)."""
    def found() -> int | None:
        for pid in children_of(caller):
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                comms = [Path(f"/proc/{k}/comm").read_text().strip() for k in kids]
            except OSError:
                continue
            if pid != forkserver and comms == ["sleep"]:
                return pid
        return None
    return wait_for(found, "the sandbox's PID 1", 10)


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether `needle` is anywhere in the readable private memory of `pid` (root only)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                if needle in mem.read(hi - lo):
                    return True
            except (OSError, OverflowError, ValueError):
                continue
    return False


@contextmanager
def caller(token: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """A process running CALLER (its heap holds `token`), once its `sleep` run started: its
    pid. Killed (with its cgroups removed) afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", CALLER, token], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout is not None and int(proc.stdout.readline()) == proc.pid
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        remove_cgroups_of(proc.pid)


@pytest.mark.skipif(not IS_ROOT, reason="reading another process's memory needs root")
@pytest.mark.parametrize("forkserver", [True, False], ids=["forkserver", "direct"])
def test_pid1_holds_no_copy_of_the_callers_memory(forkserver: bool) -> None:
    token = secrets.token_hex(16)
    needle = bytes.fromhex(token) * 64
    env = dict(os.environ)
    if not forkserver:
        env["CELLBLOCK_FORKSERVER"] = "0"
    with caller(token, env) as pid:
        zyg = [p for p in children_of(pid)
               if Path(f"/proc/{p}/comm").read_text().strip() == "cellblock-fsrv"
               and os.readlink(f"/proc/{p}/ns/pid") == os.readlink("/proc/self/ns/pid")]
        assert (len(zyg) == 1) == forkserver, zyg
        pid1 = pid1_of(pid, zyg[0] if zyg else None)
        # The scan works: the caller's own memory holds the marker.
        assert memory_holds(pid, needle)
        # Cloned from the caller, PID 1 is a copy of its heap; from the fork server it is not.
        assert memory_holds(pid1, needle) != forkserver


def test_the_forkserver_and_its_pid1s_die_with_their_owner() -> None:
    with caller("00") as pid:
        kids = wait_for(lambda: children_of(pid) if len(children_of(pid)) >= 2 else None,
                        "the fork server and a PID 1", 10)
        comms = {Path(f"/proc/{p}/comm").read_text().strip() for p in kids}
        assert "cellblock-fsrv" in comms, comms
        os.kill(pid, signal.SIGKILL)

        def gone() -> bool:
            return all(state(p) in (None, "Z") for p in kids)
        wait_for(gone, "the fork server and the PID 1 of a killed owner to die", 10)


def forkserver_pid() -> int | None:
    return cellblock.cells.stats().forkserver_pid


def warm_forkserver() -> int:
    def up() -> int | None:
        cellblock.run(["true"], cells=False)
        return forkserver_pid()
    return wait_for(up, "a fork server", 20)


def test_a_killed_forkserver_costs_no_run_and_is_replaced() -> None:
    old = warm_forkserver()
    os.kill(old, signal.SIGKILL)
    results = [cellblock.run(["sh", "-c", "echo ok"], cells=False) for _ in range(5)]
    assert all((r.reason, r.stdout) == ("exited", "ok\n") for r in results), results
    new = warm_forkserver()
    assert new != old
    assert state(old) is None, "the killed forkserver was reaped"


def test_a_drain_stops_the_forkserver() -> None:
    pid = warm_forkserver()
    assert cellblock.cells.drain()
    assert forkserver_pid() is None
    assert state(pid) is None, "the fork server was stopped and reaped"
    before = cellblock.cells.stats().forkserver_clones
    # The next cold run only records demand again.
    assert cellblock.run(["true"], cells=False).exit_code == 0
    assert cellblock.cells.stats().forkserver_clones == before


def test_forkserver_off_by_environment() -> None:
    code = ("import cellblock, cellblock.cells, time\n"
            "for _ in range(20):\n"
            "    cellblock.run(['true'], cells=False); time.sleep(0.02)\n"
            "s = cellblock.cells.stats(); print(s.forkserver_clones, s.forkserver_pid)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CELLBLOCK_FORKSERVER": "0"}, timeout=120, check=True)
    assert out.stdout.split() == ["0", "None"]
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={k: v for k, v in os.environ.items() if k != "CELLBLOCK_FORKSERVER"},
                        timeout=120, check=True)
    assert int(on.stdout.split()[0]) > 0, on.stdout


def test_a_forkserver_run_reports_like_a_direct_one() -> None:
    warm_forkserver()
    before = cellblock.cells.stats().forkserver_clones
    res = cellblock.run(["sh", "-c", "echo out; echo err >&2; exit 7"], cells=False,
                        memory="64M", timeout=10)
    assert cellblock.cells.stats().forkserver_clones == before + 1
    assert (res.exit_code, res.stdout, res.stderr, res.reason) == (7, "out\n", "err\n", "exited")
    assert res.wall_time_s > 0


def test_session_calls_are_joined_from_a_running_fork_server() -> None:
    """A session call's joiner (which enters the session and starts the call's init) comes from
    the fork server when one runs; the call is inside the session: its files, its limits."""
    warm_forkserver()
    with cellblock.Sandbox(memory="64M", pids=16) as sb:
        before = cellblock.cells.stats().forkserver_clones
        assert sb.run(["sh", "-c", "echo kept > /workspace/f"]).ok
        res = sb.run(["cat", "/workspace/f"])
        assert cellblock.cells.stats().forkserver_clones >= before + 2
        assert res.stdout == "kept\n", res
        bomb = sb.run(["sh", "-c", "for i in $(seq 64); do sleep 2 & done; wait"], timeout=20)
        assert bomb.exit_code != 0 or bomb.limits_hit, bomb
        if IS_ROOT:
            hog = sb.run(["python3", "-c", "b = bytearray(200 << 20); print('allocated')"])
            assert hog.reason == "memory" and "allocated" not in hog.stdout, hog


def test_sessions_alone_start_no_fork_server() -> None:
    assert cellblock.cells.drain()
    with cellblock.Sandbox() as sb:
        for _ in range(3):
            assert sb.run(["true"]).ok
    assert no_fork_server()


def no_fork_server() -> bool:
    return cellblock.cells.stats().forkserver_pid is None
