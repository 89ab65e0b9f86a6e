"""Pre-created cells: plain `cellblock.run` is served by a ready sandbox, every per-run option
still applies, the pool stays bounded, and 1000 pooled runs leave no process, mount or cgroup
behind once it is drained. As root and as uid 65534.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_cleanup import children_of

import cellblock
import cellblock.cells
import conftest
from conftest import (
    DEFAULT_MAX_CELLS,
    PRELUDE,
    Caller,
    Runner,
    own_cellblock_cgroups,
    remove_cgroups_of,
    wait_for,
)

MAX_CELLS = DEFAULT_MAX_CELLS


def ready_cell(sandbox: Runner, **kwargs: Any) -> dict[str, Any]:
    """Makes the pool want a cell of this run shape only and waits until one is ready (after a
    drain, the first run of a shape only records it; the second asks for a cell)."""
    sandbox.cells(drain=True)
    sandbox.run(["true"], **kwargs)
    sandbox.run(["true"], **kwargs)
    return wait_for(lambda: (c := sandbox.cells())["ready"] >= 1 and c, "a ready cell", 30)


def served_by_cell(sandbox: Runner, argv: list[str], **kwargs: Any) -> Any:
    """Runs argv with a cell of its shape ready, and checks that the cell served it."""
    before = ready_cell(sandbox, **kwargs)
    res = sandbox.run(argv, **kwargs)
    after = sandbox.cells()
    assert after["hits"] == before["hits"] + 1, (before, after)
    return res


def test_isolation_holds_in_a_cell(sandbox: Runner) -> None:
    code = PRELUDE + textwrap.dedent("""
        import socket
        def status(key):
            return [x for x in open("/proc/self/status") if x.startswith(key)][0].split()[1]
        report(pid=os.getpid(), host=socket.gethostname(), uid=os.getuid(),
               caps=status("CapEff"), nnp=status("NoNewPrivs"), seccomp=status("Seccomp:"),
               work=attempt(os.listdir, "/work"), root=sorted(os.listdir("/")),
               mount=attempt(os.mkdir, "/usr/cellblock-x"),
               ifaces=sorted(n for _, n in socket.if_nameindex()))
    """)
    res = served_by_cell(sandbox, ["python3", "-c", code])
    assert (res.reason, res.exit_code) == ("exited", 0), res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    # PID 1 is the cell's init; the command is its child in a fresh pid namespace.
    assert out["pid"] == 2 and out["host"] == "cellblock" and out["uid"] == 0
    assert out["caps"] == "0000000000000000" and out["nnp"] == "1" and out["seccomp"] == "2"
    assert out["work"] == "ENOENT" and "work" not in out["root"]
    assert out["mount"] in ("EROFS", "EPERM", "EACCES")
    assert out["ifaces"] == ["lo"]
    assert res.seccomp_profile == "python"


def test_a_cell_honours_every_per_run_option(sandbox: Runner) -> None:
    res = served_by_cell(sandbox, ["sh", "-c", 'pwd; echo "$GREETING"; cat; echo err >&2; exit 7'],
                         env={"GREETING": "hello"}, cwd="/tmp", stdin="from stdin\n")
    assert (res.reason, res.exit_code) == ("exited", 7)
    assert res.stdout == "/tmp\nhello\nfrom stdin\n" and res.stderr == "err\n"
    res = served_by_cell(sandbox, ["sleep", "30"], timeout=0.5)
    assert res.reason == "timeout" and res.exit_code is None
    res = served_by_cell(sandbox, ["sh", "-c", "yes"], max_output="16K")
    assert res.reason == "output_limit" and res.stdout_truncated
    res = served_by_cell(sandbox, ["sh", "-c", "unshare -U true; echo $?"])
    assert res.stdout.strip() != "0"
    assert any(v["kind"] == "seccomp" for v in res.violations), res.violations
    secret = "s3cr3t-" + os.urandom(4).hex()
    res = served_by_cell(sandbox, ["sh", "-c", "echo $TOKEN"], secrets={"TOKEN": secret})
    assert secret not in res.stdout and "[REDACTED:TOKEN]" in res.stdout


def test_limits_of_the_shape_apply_in_a_cell(sandbox: Runner) -> None:
    res = served_by_cell(sandbox, ["python3", "-c", "x = bytearray(256 << 20)"], memory="32M")
    assert res.enforcement["memory"] == sandbox.enforcer("memory")
    if sandbox.privileged:
        assert res.reason == "memory"
    else:
        assert res.exit_code == 1 and "MemoryError" in res.stderr
    res = served_by_cell(sandbox, ["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=8"],
                         disk="1M")
    assert res.exit_code != 0 and "No space left" in res.stderr


def test_a_missing_command_is_reported_from_a_cell(sandbox: Runner) -> None:
    ready_cell(sandbox)
    with pytest.raises(cellblock.CommandNotFound):
        sandbox.run(["no-such-command-cellblock"])


def test_cells_can_be_bypassed(sandbox: Runner) -> None:
    before = ready_cell(sandbox)
    res = sandbox.run(["true"], cells=False)
    after = sandbox.cells()
    assert res.reason == "exited"
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]


#: Bound on the caller's children during the runs: ready cells, two being built (two builder
#: threads), the fork server, ten concurrent runs, and a margin for sandboxes whose teardown is
#: queued. A leak grows past it.
MAX_CHILDREN = MAX_CELLS + 2 + 1 + 10 + 16
#: cgroup hierarchies a sandbox here has a directory in (memory, pids, cpu at most).
HIERARCHIES = 3
#: cgroups made ahead for the cold path (`cell::parts`: 2 per kind, one kind here), as
#: directories in up to 3 hierarchies.
PARTS_CGROUP_DIRS = 2 * HIERARCHIES


def test_a_thousand_pooled_runs_leave_nothing(sandbox: Runner) -> None:
    pid = sandbox.stats()["pid"]
    sandbox.run(["true"])
    sandbox.cells(drain=True)
    mounts = Path(f"/proc/{pid}/mountinfo").read_text()
    fds = sandbox.stats()["fds"]
    # Other children of the caller (pytest's own workers) are not the pool's.
    others = set(children_of(pid))
    assert own_cellblock_cgroups(pid) == []
    start = sandbox.cells()
    peak_children = peak_cgroups = 0
    for i in range(100):
        results = sandbox.run_many([(["true"], {})] * 10) if i % 10 == 0 else [
            sandbox.run(["true"]) for _ in range(10)]
        assert all(r.reason == "exited" and r.exit_code == 0 for r in results)
        peak_children = max(peak_children, len(set(children_of(pid)) - others))
        peak_cgroups = max(peak_cgroups, len(own_cellblock_cgroups(pid)))
    end = sandbox.cells()
    runs = end["hits"] + end["misses"] - start["hits"] - start["misses"]
    assert runs == 1000
    # Most runs were served by cells, and the pool never grew past its bound (ready cells,
    # plus at most the 10 concurrent runs and the sandboxes still being torn down).
    assert end["hits"] - start["hits"] >= 500, (start, end)
    assert peak_children <= MAX_CHILDREN, peak_children
    assert peak_cgroups <= MAX_CHILDREN * HIERARCHIES + PARTS_CGROUP_DIRS, peak_cgroups
    assert sandbox.cells(drain=True)["ready"] == 0
    assert set(children_of(pid)) == others
    assert own_cellblock_cgroups(pid) == []
    assert Path(f"/proc/{pid}/mountinfo").read_text() == mounts
    assert sandbox.stats()["fds"] == fds


def state(pid: int) -> str | None:
    """A process's state letter, None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


OWNER = textwrap.dedent("""\
    import os, sys, time
    import cellblock, cellblock.cells
    cellblock.run(["true"])
    cellblock.run(["true"])
    while cellblock.cells.stats().ready < 1:
        time.sleep(0.01)
    print("ready", flush=True)
    time.sleep(3600)
""")


def test_cells_die_with_their_owner() -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "ready\n"
        cells = wait_for(lambda: children_of(owner.pid), "the owner's cells", 10)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()

        def gone() -> bool:
            return all(state(p) in (None, "Z") for p in cells)
        wait_for(gone, "the cells of a killed owner to die", 10)
    finally:
        owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        remove_cgroups_of(owner.pid)


def test_prepare_makes_a_shapes_first_run_a_hit(sandbox: Runner) -> None:
    sandbox.cells(drain=True)
    # After a drain the pool knows no shape: without prepare this run would only record it.
    prep = sandbox.prepare([(["true"], {"memory": "96M"})] * 2)
    assert prep == {"status": "ready", "served": [True, True], "detail": None}
    before = sandbox.cells()
    assert before["ready"] >= 2
    res = sandbox.run(["sh", "-c", "echo in-a-cell"], memory="96M", env={"X": "1"})
    after = sandbox.cells()
    assert (res.reason, res.stdout) == ("exited", "in-a-cell\n")
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]


def test_prepare_says_which_shapes_cells_never_serve(sandbox: Runner) -> None:
    prep = sandbox.prepare([(["true"], {"allow_net": ["127.0.0.1:9"]}), (["true"], {"tty": True}),
                            (["true"], {})])
    assert prep["served"] == [False, False, True] and prep["status"] == "ready"


def test_prepare_refuses_more_than_the_bounds_and_bad_runs(sandbox: Runner) -> None:
    prep = sandbox.prepare([(["true"], {})] * (MAX_CELLS + 1))
    assert prep["status"] == "over_bound" and str(MAX_CELLS) in prep["detail"]
    with pytest.raises(cellblock.InvalidSpec, match="cwd"):
        sandbox.prepare([(["true"], {"cwd": "relative"})])
    with pytest.raises(cellblock.InvalidSpec, match="count"):
        cellblock.cells.prepare(["true"], count=0)


#: argv larger than a cell's request buffer (cellblock_core::cell::wire::REQUEST_CAP, 128 KiB).
HUGE_ARGV = ["sh", "-c", 'echo "${#0} ${#1}"', "a" * 100_000, "b" * 100_000]


def test_a_run_too_large_for_its_cell_is_a_miss_not_a_hit(sandbox: Runner) -> None:
    assert sandbox.prepare([(HUGE_ARGV, {})])["status"] == "ready"
    before = sandbox.cells()
    res = sandbox.run(HUGE_ARGV)
    after = sandbox.cells()
    # Correct through the cold path, and counted as such.
    assert (res.reason, res.stdout) == ("exited", "100000 100000\n"), res.stderr
    assert after["hits"] == before["hits"], (before, after)
    assert after["misses"] == before["misses"] + 1
    assert after["fallbacks"] == before["fallbacks"] + 1


def test_the_pooled_check_fails_runs_that_took_the_cold_path(
        sandbox: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """--cells=pooled (conftest `Runner.pooled`) cannot pass a run the cold path served."""
    monkeypatch.setattr(conftest, "POOLED", True)
    assert sandbox.run(["true"]).reason == "exited"
    with pytest.raises(AssertionError, match="should have been served by ready cells"):
        sandbox.run(HUGE_ARGV)
    with pytest.raises(AssertionError, match="never serve"):
        sandbox.run(["true"], allow_net=["127.0.0.1:9"])


def test_prepare_makes_room_in_a_full_pool(sandbox: Runner) -> None:
    full = sandbox.prepare([(["true"], {"memory": "96M"})] * MAX_CELLS)
    assert full["status"] == "ready" and sandbox.cells()["ready"] == MAX_CELLS
    # Another shape: the first one's cells and demand give way (the bound holds throughout).
    prep = sandbox.prepare([(["true"], {"memory": "80M"})] * 2)
    assert prep["status"] == "ready"
    assert sandbox.cells()["ready"] <= MAX_CELLS
    before = sandbox.cells()
    sandbox.run(["true"], memory="80M")
    sandbox.run(["true"], memory="80M")
    after = sandbox.cells()
    assert after["hits"] == before["hits"] + 2, (before, after)


def test_a_dead_cell_is_never_handed_to_a_waiting_run(caller: Caller) -> None:
    """CELLBLOCK_CELLS=wait: a run skips a ready cell whose PID 1 died and waits for a live
    one (not a fallback to the cold path). The same check now guards the cells the wait
    hands over as they are built; that race is not provoked here."""
    out = caller.run("""
        import signal
        os.environ["CELLBLOCK_CELLS"] = "wait"  # read when the pool starts (first use)
        import cellblock.cells
        assert cellblock.cells.prepare(["true"]).status == "ready"
        tasks = os.listdir("/proc/self/task")
        cells = {int(p) for t in tasks
                 for p in open(f"/proc/self/task/{t}/children").read().split()}
        assert cells
        for pid in cells:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        res = cellblock.run(["sh", "-c", "echo served"])
        s = cellblock.cells.stats()
        print(json.dumps({"out": res.stdout, "hits": s.hits, "misses": s.misses,
                          "fallbacks": s.fallbacks}))
    """)
    assert out == {"out": "served\n", "hits": 1, "misses": 0, "fallbacks": 0}


def test_a_run_that_goes_cold_in_wait_mode_is_a_logged_warning() -> None:
    """CELLBLOCK_CELLS=wait: a run served by a cell says nothing; one that takes the cold path
    anyway is counted in stats().misses and logged as a warning, once: a request too large
    for its cell's buffer, and a run that found no cell within its 30 s wait (none can be
    built: max_cells=0), which used to go cold without a word."""
    code = textwrap.dedent("""
        import json, logging, sys
        import cellblock, cellblock.cells
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
        assert cellblock.cells.prepare(["true"]).status == "ready"
        assert cellblock.run(["true"]).ok
        print("SERVED", flush=True)
        huge = ["sh", "-c", 'echo "${#0} ${#1}"', "a" * 100_000, "b" * 100_000]  # HUGE_ARGV
        res = cellblock.run(huge)
        assert res.stdout == "100000 100000\\n", res
        assert cellblock.run(["true"]).ok
        print("FELL BACK", flush=True)
        # No cell can be built: the run waits its 30 s, then goes cold.
        cellblock.cells.configure(True, max_cells=0)
        assert cellblock.cells.drain()
        assert cellblock.run(["true"]).ok
        s = cellblock.cells.stats()
        print(json.dumps({"hits": s.hits, "misses": s.misses, "fallbacks": s.fallbacks}))
    """)
    res = subprocess.run([sys.executable, "-c", code],
                         env={**os.environ, "CELLBLOCK_CELLS": "wait"}, capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0] == "SERVED", lines
    warnings = [line for line in lines if line.startswith("LOG ")]
    assert len(warnings) == 2, lines
    assert lines.index(warnings[0]) < lines.index("FELL BACK") < lines.index(warnings[1])
    for n, warning in enumerate(warnings, 1):
        assert warning.startswith("LOG CELLBLOCK_CELLS=wait: 1 run(s) found no ready cell")
        assert f"({n} so far" in warning
    assert json.loads(lines[-1]) == {"hits": 2, "misses": 2, "fallbacks": 1}
