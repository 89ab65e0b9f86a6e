"""Every sandbox has a time namespace of its own: its monotonic and boot-time clocks,
/proc/uptime and /proc/stat's btime start when the sandbox is built, not when the host booted.
Attempts from inside to change the namespace's offsets or to leave it fail. One-shot runs,
pre-created cells and session calls (which share their holder's namespace), as root and as
uid 65534.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_cells import served_by_cell

from conftest import PRELUDE, SETPRIV, Runner

#: A sandbox's clocks read less than this (seconds) when a run's payload reads them.
FRESH = 60.0
#: The host must have been up longer than this for the tests to tell the clocks apart.
HOST_UP = 300.0

#: Reads every clock a time namespace shifts, as the payload sees them.
READ_CLOCKS = textwrap.dedent("""\
    import time
    def clocks():
        btime = [int(l.split()[1]) for l in open("/proc/stat") if l.startswith("btime ")][0]
        return {"uptime": float(open("/proc/uptime").read().split()[0]),
                "monotonic": time.clock_gettime(time.CLOCK_MONOTONIC),
                "monotonic_raw": time.clock_gettime(time.CLOCK_MONOTONIC_RAW),
                "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
                "btime": btime, "now": time.time()}
""")

#: Tries to change the namespace's offsets, to enter another time namespace or to make one.
ATTACKS = textwrap.dedent("""\
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWTIME = 0x80
    def sys_attempt(fn, *args):
        if fn(*args) == 0:
            return "OK"
        e = ctypes.get_errno()
        return errno.errorcode.get(e, str(e))
    def write(path, text):
        with open(path, "w") as f:
            f.write(text)
    def setns(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            r = sys_attempt(libc.setns, fd, CLONE_NEWTIME)
            if r != "OK":
                raise OSError(getattr(errno, r, errno.EPERM), r)
        finally:
            os.close(fd)
    zero = "monotonic 0 0\\nboottime 0 0\\n"
    attacks = {
        "write_own_offsets": attempt(write, "/proc/self/timens_offsets", zero),
        "write_pid1_offsets": attempt(write, "/proc/1/timens_offsets", zero),
        "setns_pid1": attempt(setns, "/proc/1/ns/time"),
        "setns_own": attempt(setns, "/proc/self/ns/time_for_children"),
        "unshare_time": sys_attempt(libc.unshare, CLONE_NEWTIME),
    }
""")


def host_clocks() -> dict[str, float]:
    """The host's view, checked to be far from a fresh sandbox's so the tests can fail."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    assert uptime > HOST_UP, f"the host booted {uptime} s ago: too recently to tell clocks apart"
    assert time.clock_gettime(time.CLOCK_BOOTTIME) > HOST_UP
    assert time.clock_gettime(time.CLOCK_MONOTONIC) > HOST_UP
    assert btime < time.time() - HOST_UP
    return {"uptime": uptime, "btime": btime}


def assert_fresh(inside: dict[str, float], host: dict[str, float]) -> None:
    """The sandbox's clocks started when it was built (not when the host booted)."""
    # MONOTONIC_RAW too: it shares the monotonic offset, and never starts below 0.
    for clock in ("uptime", "monotonic", "monotonic_raw", "boottime"):
        assert 0 <= inside[clock] < FRESH, (clock, inside, host)
    # btime is the wall-clock moment the sandbox's boot-time clock was 0: its creation.
    assert inside["now"] - FRESH < inside["btime"] <= inside["now"] + 1, (inside, host)
    assert inside["btime"] > host["btime"] + HOST_UP, (inside, host)


def probe_clocks(sandbox: Runner, code: str = "report(**clocks())", **kwargs: object
                 ) -> tuple[dict[str, object], bool]:
    res = sandbox.run(["python3", "-c", PRELUDE + READ_CLOCKS + textwrap.dedent(code)], **kwargs)
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.exit_code, res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1]), res.time_namespace


def test_clocks_start_when_the_sandbox_is_built(sandbox: Runner) -> None:
    host = host_clocks()
    assert Path("/proc/self/ns/time").exists(), "this kernel has no time namespaces"
    inside, isolated = probe_clocks(sandbox)
    assert_fresh(inside, host)  # type: ignore[arg-type]
    assert isolated is True


def test_the_time_namespace_cannot_be_changed_or_left(sandbox: Runner) -> None:
    host = host_clocks()
    out, _ = probe_clocks(sandbox, ATTACKS + "report(attacks=attacks, **clocks())\n")
    attacks = out.pop("attacks")
    assert isinstance(attacks, dict)
    # Offsets are frozen once a process is in the namespace, PID 1's are not ours, PID 1's
    # namespace files are closed to us (not dumpable), and entering or making a time namespace
    # needs CAP_SYS_ADMIN, which the command does not have.
    assert all(v != "OK" for v in attacks.values()), attacks
    assert attacks["write_own_offsets"] in ("EPERM", "EACCES"), attacks
    assert attacks["unshare_time"] == "EPERM", attacks
    assert_fresh(out, host)  # type: ignore[arg-type]


def test_a_cell_has_clocks_of_its_own(sandbox: Runner) -> None:
    host = host_clocks()
    argv = ["python3", "-c", PRELUDE + READ_CLOCKS + "report(**clocks())"]
    res = served_by_cell(sandbox, argv)
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    assert_fresh(json.loads(res.stdout.strip().splitlines()[-1]), host)
    assert res.time_namespace is True


#: Two calls of one session, a second apart: the same clock, still running (one namespace),
#: and both fresh; then the attacks from a call.
SESSION_CLOCKS = textwrap.dedent("""\
    import json, sys, time
    from cellblock.session import Sandbox
    prelude, read, attacks = json.loads(sys.stdin.read())
    code = prelude + read + "report(**clocks())"
    out = {}
    with Sandbox() as sb:
        first = sb.run(["python3", "-c", code])
        time.sleep(1.5)
        second = sb.run(["python3", "-c", code])
        third = sb.run(["python3", "-c", prelude + read + attacks
                        + "report(attacks=attacks, **clocks())"])
        for name, res in [("first", first), ("second", second), ("third", third)]:
            assert res.exit_code == 0, res.stderr
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
            out[name]["isolated"] = res.time_namespace
    print(json.dumps(out))
""")


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_session_calls_share_the_holders_clock(who: str, nobody_dir: Path) -> None:
    host = host_clocks()
    argv = [sys.executable, "-c", SESSION_CLOCKS]
    if who == "nobody":
        argv = [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
                "/usr/bin/python3", "-c", SESSION_CLOCKS]
    res = subprocess.run(argv, input=json.dumps([PRELUDE, READ_CLOCKS, ATTACKS]),
                         capture_output=True, text=True, timeout=180, cwd="/", check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    first, second, third = out["first"], out["second"], out["third"]
    for call in (first, second, third):
        assert call.pop("isolated") is True
    attacks = third.pop("attacks")
    for call in (first, second, third):
        assert_fresh(call, host)
    # One clock across calls: it moved on by the time slept (a fresh namespace per call would
    # start each near 0 again), and the holder's boot time stayed the same.
    assert second["monotonic"] - first["monotonic"] >= 1.5, (first, second)
    assert second["boottime"] - first["boottime"] >= 1.5, (first, second)
    assert abs(second["btime"] - first["btime"]) <= 1, (first, second)
    assert all(v != "OK" for v in attacks.values()), attacks
