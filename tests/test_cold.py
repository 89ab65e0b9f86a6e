"""The cold path (`cells=False`, or no ready cell): PID 1 starts inside its run's cgroup without
the caller attaching it on its path (cgroup v1: PID 1 moves itself in as its first act, through
`tasks` files opened for it; v2: clone3(CLONE_INTO_CGROUP)), no thread of the caller ever is in
a run's cgroup, and the pids limit is exactly what was asked.
As root and as uid 65534 (no cgroup there: the rlimit fallback).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

from conftest import PRELUDE, Runner, processes_with_argv, wait_for


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller (or "" for v2) -> cgroup path of `pid`, as the host sees it."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_cold_run_starts_inside_its_cgroup(sandbox: Runner, marker: str) -> None:
    caller = sandbox.stats()["pid"]
    wait = sandbox.start(["sleep", marker], cells=False, memory="64M", pids=16, timeout=3)
    try:
        command = wait_for(lambda: processes_with_argv(["sleep", marker]), "the command", 20)[0]
        init = parent_of(command)
        init_parent = parent_of(init)
        seen = {p: cgroup_paths(p) for p in (command, init)}
        threads = [cgroup_paths(int(t)) for t in os.listdir(f"/proc/{caller}/task")]
        own = cgroup_paths(caller)
    finally:
        res = wait()
    assert res.reason == "timeout", res
    # PID 1 is the caller's own child (a thread of the caller cloned it).
    assert init_parent == caller
    if sandbox.privileged:
        assert res.enforcement["memory"] == res.enforcement["pids"] == sandbox.enforcer("pids")
        ctrls = ["memory", "pids"] if sandbox.enforcer("pids") == "cgroup-v1" else [""]
        for paths in seen.values():
            for c in ctrls:
                name = paths[c].rsplit("/", 1)[-1]
                assert name.startswith(f"cellblock-{caller}-"), (c, paths)
                assert paths[c].rsplit("/", 1)[0] == own[c].rstrip("/"), (c, paths, own)
    else:
        assert res.enforcement["pids"] == "rlimit"
        for paths in seen.values():
            assert paths == own, (paths, own)
    # No thread of the caller was left in a run's cgroup.
    assert all(t == own for t in threads), (threads, own)


COUNT_FORKS = PRELUDE + textwrap.dedent("""
    import subprocess
    procs = []
    while len(procs) < 32:
        try:
            procs.append(subprocess.Popen(["sleep", "60"]))
        except OSError as e:
            refused = errno.errorcode.get(e.errno, str(e.errno))
            break
    else:
        refused = None
    for p in procs:
        p.kill()
        p.wait()
    report(started=len(procs), refused=refused)
""")


def test_the_pids_limit_of_a_cold_run_is_exact(sandbox: Runner) -> None:
    # 8 tasks: PID 1, python3, and 6 more: nothing of the caller's takes one of them, and
    # nothing leaves one extra behind.
    res = sandbox.run(["python3", "-c", COUNT_FORKS], cells=False, pids=8, timeout=60)
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert out["refused"] == "EAGAIN", out
    assert res.enforcement["pids"] == sandbox.enforcer("pids")
    if sandbox.privileged:
        assert out["started"] == 6, out
    else:
        # RLIMIT_NPROC counts the user's processes in the run's user namespace.
        assert out["started"] <= 6, out
