"""Nothing remains after runs: many runs (killed, timed out, failed, concurrent) later, the
caller has no new fds, threads, mounts or children, and the host has no new cgroups, temp files,
mounts or sandbox processes.

Each caller's TMPDIR is a private empty directory, so any temp file left behind is seen even
while other programs use /tmp.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import cellblock
from conftest import Runner, own_cellblock_cgroups, wait_for

#: (argv, kwargs): one of every way a run can end.
RUNS: list[tuple[list[str], dict[str, Any]]] = [
    (["true"], {}),
    (["sh", "-c", "echo out; echo err >&2; exit 3"], {}),
    (["cat"], {"stdin": "some input\n" * 1000}),
    (["sleep", "60"], {"timeout": 0.5}),
    (["sh", "-c", "yes"], {"max_output": "64K"}),
    (["python3", "-c", "x = bytearray(256 << 20)"], {"memory": "32M"}),
    (["python3", "-c", "while True: pass"], {"cpu_time": 0.5, "timeout": 30}),
    (["sh", "-c", "sleep 60 & setsid sleep 60 & (trap '' TERM; sleep 60) & echo started"], {}),
    (["sh", "-c", "kill -KILL $$"], {}),
    (["sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=8; true"], {"disk": "1M"}),
]
FAILING: list[tuple[Any, dict[str, Any]]] = [
    (["no-such-command-cellblock"], {}),
    ([], {}),
    (["true"], {"memory": "lots"}),
    (["true"], {"cwd": "/no/such/dir"}),
]


def children_of(pid: int) -> list[int]:
    """Live host processes whose parent is `pid`."""
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


def snapshot(sandbox: Runner) -> dict[str, Any]:
    # Ready cells are the pool's standing state, not leftovers: drop them (and finish every
    # teardown) before looking. tests/test_cells.py bounds the pool while it is up.
    sandbox.cells(drain=True)
    st = sandbox.stats()
    pid = st["pid"]
    return {
        "fds": st["fds"],
        "threads": st["threads"],
        "mounts": Path(f"/proc/{pid}/mountinfo").read_text(),
        "children": children_of(pid),
        "cgroups": own_cellblock_cgroups(),
        "tmpdir": sorted(os.listdir(st["tmpdir"])),
        "mnt": set(os.listdir("/mnt")),
        "dev_shm": set(os.listdir("/dev/shm")),
    }


def run_everything(sandbox: Runner) -> None:
    for argv, kwargs in RUNS:
        sandbox.run(argv, **kwargs)
    for argv, kwargs in FAILING:
        with pytest.raises(cellblock.CellblockError):
            sandbox.run(argv, **kwargs)
    sandbox.run_many([(["sh", "-c", f"echo {i}; sleep 0.2"], {}) for i in range(6)])


def test_nothing_remains_after_many_runs(sandbox: Runner) -> None:
    run_everything(sandbox)  # warm-up: one-time initialisation is not a leak
    before = snapshot(sandbox)
    assert before["tmpdir"] == [] and before["cgroups"] == []
    for _ in range(2):
        run_everything(sandbox)
    # Threads of the runs are joined, but may take a moment to leave the kernel's count.
    wait_for(lambda: sandbox.stats()["threads"] <= before["threads"], "threads to exit", 10)
    after = snapshot(sandbox)
    for key in ("fds", "mounts", "children", "cgroups", "tmpdir"):
        assert after[key] == before[key], key
    # Other processes may use /mnt and /dev/shm at the same time: only additions count.
    for key in ("mnt", "dev_shm"):
        assert after[key] - before[key] == set(), key
