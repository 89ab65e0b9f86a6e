"""Parts made ahead for the cold path (`cell::parts`): a network namespace (as root) and cgroup
directories, made by a background thread and each used by one run only. A run that takes them
is as isolated and as limited as one that made its own; as uid 65534 no namespace is made ahead
(it would belong to the wrong user namespace) and no cgroup can be. Nothing is left after a
drain.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from types import SimpleNamespace

from conftest import PRELUDE, Runner, own_cellblock_cgroups

NET_PROBE = """
import time
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind(("127.0.0.1", 0))
me = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
me.sendto(b"ping", peer.getsockname())
peer.settimeout(2)
data = peer.recv(16)
report(netns=os.stat("/proc/self/ns/net").st_ino, interfaces=[n for _, n in socket.if_nameindex()],
       lo=data.decode())
time.sleep(1.0)
"""


def taking(sandbox: Runner, key: str, run: Callable[[], list[SimpleNamespace]]
           ) -> tuple[list[SimpleNamespace], int]:
    """Runs `run` until a run takes a part counted by `key` (a kind's first request only
    records it; the maker then keeps some ready). Returns the results and how many took one."""
    for _ in range(40):
        before = sandbox.cells()[key]
        results = run()
        took = sandbox.cells()[key] - before
        if took:
            return results, took
        time.sleep(0.1)
    raise AssertionError(f"no cold run took a part ({key}) in 40 tries: {sandbox.cells()}")


def test_a_namespace_made_ahead_is_fresh_private_and_used_once(sandbox: Runner) -> None:
    host_ns = os.stat("/proc/self/ns/net").st_ino
    runs = [(["python3", "-c", PRELUDE + NET_PROBE], {"cells": False})] * 2

    def both() -> list[SimpleNamespace]:
        return sandbox.run_many(runs)

    if not sandbox.privileged:
        # Unprivileged runs create their network namespace in their own user namespace.
        before = sandbox.cells()["cold_netns_ahead"]
        for _ in range(3):
            results = both()
        assert sandbox.cells()["cold_netns_ahead"] == before
    else:
        results, took = taking(sandbox, "cold_netns_ahead", both)
        assert took >= 1
    seen = [probe_of(r) for r in results]
    for s in seen:
        # Only loopback, up (a datagram went through it): none of the host's interfaces.
        assert s["interfaces"] == ["lo"], s
        assert s["lo"] == "ping"
        assert s["netns"] != host_ns
    # Both runs were alive at once (each sleeps after reporting): one namespace each.
    assert seen[0]["netns"] != seen[1]["netns"], seen


def test_limits_hold_in_a_cgroup_made_ahead(sandbox: Runner) -> None:
    hog = ["python3", "-c", "b = bytearray(256 << 20); print(len(b))"]

    def one() -> list[SimpleNamespace]:
        return [sandbox.run(hog, cells=False, memory="48M", pids=32, timeout=20)]

    if sandbox.privileged:
        results, took = taking(sandbox, "cold_cgroups_ahead", one)
        assert took == 1
        res = results[0]
        assert res.enforcement["memory"] == sandbox.enforcer("memory")
        assert res.reason == "memory", (res.reason, res.stderr[-300:])
        # The pids limit was written into the cgroup taken: a fork bomb stops at it.
        bomb = sandbox.run(["sh", "-c", "for i in $(seq 64); do sleep 2 & done; wait"],
                           cells=False, pids=8, timeout=20)
        assert bomb.enforcement["pids"] == sandbox.enforcer("pids")
        assert "pids" in bomb.limits_hit, bomb
    else:
        before = sandbox.cells()["cold_cgroups_ahead"]
        res = one()[0]
        assert sandbox.cells()["cold_cgroups_ahead"] == before
        assert res.enforcement["memory"] == "rlimit"
        assert res.reason in ("memory", "exited") and res.exit_code != 0, res


def test_a_drain_leaves_no_part(sandbox: Runner) -> None:
    pid = sandbox.stats()["pid"]
    for _ in range(3):
        sandbox.run(["true"], cells=False, pids=16)
    stats = sandbox.cells(drain=True)
    assert stats["parts_ready"] == 0, stats
    assert own_cellblock_cgroups(pid) == []


def probe_of(res: SimpleNamespace) -> dict[str, object]:
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stderr[-500:])
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out
