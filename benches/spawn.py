"""Spawn cost: bare exec vs bubblewrap vs cellblock (cold and pre-created cells), one-shot runs.

One interleaved loop per command (`/bin/true`, `python3 -c pass`, `node -e 0`): every round runs
each runner once, so load from the other users of the machine hits all of them alike. Reports
p50 and p99 and the ratio to bubblewrap, the load average, how many pooled runs a cell served,
and a phase table (where a `/bin/true` run's time goes). bubblewrap gets comparable isolation
(--unshare-all, read-only system, fresh /proc /dev /tmp) but no limits and no seccomp;
cellblock runs have their cgroup limits and the seccomp profile chosen from argv[0].

A second table times sparse `/bin/true` runs (60 ms idle before each), cold against bubblewrap.

Usage: python benches/spawn.py [--runs 200] [--sparse-runs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import interleaved, median_ms, percentile, print_environment, table

import cellblock
import cellblock.cells
from cellblock.policy import Policy
from cellblock.sandbox import build_spec, default_env, resolve_seccomp, runtime_prefixes

PY = os.path.realpath(sys.executable)
NODE = shutil.which("node")
#: bare and bwrap get the environment cellblock runs get: nothing of the caller's (which here
#: holds e.g. NODE_EXTRA_CA_CERTS, making node parse the whole CA bundle at start-up).
ENV = default_env(runtime_prefixes())


def bwrap_argv(cmd: list[str]) -> list[str]:
    binds = [a for p in {sys.base_prefix, *runtime_prefixes()} for a in ("--ro-bind", p, p)]
    return [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
        "--ro-bind", "/etc", "/etc", *binds,
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", *cmd,
    ]


def checked(r: cellblock.RunResult) -> None:
    if r.reason != "exited" or r.exit_code != 0:
        raise SystemExit(f"bench run failed: {r.reason} {r.exit_code} {r.stderr[-500:]}")


def runners(cmd: list[str], have_bwrap: bool) -> dict[str, Callable[[], object]]:
    cases: dict[str, Callable[[], object]] = {
        "bare": lambda: subprocess.run(cmd, check=True, env=ENV),
        "cellblock cold": lambda: checked(cellblock.run(cmd, cells=False)),
        "cellblock pooled": lambda: checked(cellblock.run(cmd)),
    }
    if have_bwrap:
        cases["bwrap"] = lambda: subprocess.run(bwrap_argv(cmd), check=True, env=ENV)
    return cases


def phases(runs: int) -> list[list[str]]:
    """Where a `/bin/true` run's time goes, median ms of `runs` interleaved samples."""
    cmd = ["/bin/true"]
    # `cellblock.run` without a policy starts from one made once (see cellblock.sandbox).
    default = Policy()

    def python_side() -> None:
        policy = default.merged()
        compiled = resolve_seccomp(cmd, policy.profile, policy.seccomp)
        json.dumps(build_spec(cmd, policy, [], compiled))

    samples: dict[str, list[float]] = {k: [] for k in (
        "py", "cold total", "cold wall", "pooled total", "pooled wall")}
    for _ in range(runs):
        t = time.perf_counter()
        python_side()
        samples["py"].append(time.perf_counter() - t)
        for name, cells in (("cold", False), ("pooled", True)):
            t = time.perf_counter()
            r = cellblock.run(cmd, cells=cells)
            samples[f"{name} total"].append(time.perf_counter() - t)
            samples[f"{name} wall"].append(r.wall_time_s)
            checked(r)
    m = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    return [
        ["Python: policy, seccomp lookup (cached), spec JSON", f"{m['py']:.2f}", f"{m['py']:.2f}"],
        ["native before the clock starts (spec parse, plan, cgroup mkdir; pooled: take a cell) "
         "and after it (report to Python)",
         f"{m['cold total'] - m['cold wall'] - m['py']:.2f}",
         f"{m['pooled total'] - m['pooled wall'] - m['py']:.2f}"],
        ["clock: build sandbox (cold) or send request (pooled), exec, status, output EOF",
         f"{m['cold wall']:.2f}", f"{m['pooled wall']:.2f}"],
        ["**total on the caller's path**", f"**{m['cold total']:.2f}**",
         f"**{m['pooled total']:.2f}**"],
    ]


def cell_memory() -> str:
    """What one ready cell costs: its PID 1's private memory (USS) and page tables."""
    cellblock.run(["/bin/true"])
    cellblock.run(["/bin/true"])
    deadline = time.monotonic() + 10
    while cellblock.cells.stats().ready < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    me = str(os.getpid())
    uss, pte = [], []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[1] != me:
                continue
            rollup = Path(f"/proc/{entry.name}/smaps_rollup").read_text().splitlines()
            status = Path(f"/proc/{entry.name}/status").read_text().splitlines()
        except OSError:
            continue
        kb = {x.split(":")[0]: int(x.split()[1]) for x in rollup[1:] if x.split()[-1] == "kB"}
        uss.append(kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0))
        pte += [int(x.split()[1]) for x in status if x.startswith("VmPTE:")]
    if not uss:
        return "no ready cell to measure"
    bound = cellblock.cells.stats().max_cells
    return (f"{len(uss)} ready cell(s): USS {statistics.median(uss) / 1024:.2f} MiB, page tables "
            f"{statistics.median(pte):.0f} KiB each (pool bound: {bound})")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--sparse-runs", type=int, default=100)
    args = ap.parse_args()
    print_environment()
    have_bwrap = shutil.which("bwrap") is not None
    commands = [("/bin/true", ["/bin/true"]), ("python3 -c pass", [PY, "-c", "pass"])]
    if NODE:
        commands.append(("node -e 0", [NODE, "-e", "0"]))
    print(f"Load average (1, 5, 15 min) at start: {load()}")
    rows = []
    before = cellblock.cells.stats()
    for label, cmd in commands:
        samples = interleaved(runners(cmd, have_bwrap), args.runs)
        bw = median_ms(samples["bwrap"]) if have_bwrap else float("nan")
        for name in ("bare", "bwrap", "cellblock cold", "cellblock pooled"):
            xs = samples.get(name)
            if xs is None:
                continue
            rows.append([
                label, name, f"{median_ms(xs):.2f}", f"{percentile(xs, 99) * 1000:.2f}",
                f"{median_ms(xs) / bw:.2f}" if have_bwrap else "n/a",
            ])
    after = cellblock.cells.stats()
    print(f"Load average at end: {load()}")
    pooled = (after.hits - before.hits) + (after.misses - before.misses)
    print(f"Pooled runs served by a ready cell: {after.hits - before.hits} of {pooled} "
          f"(the rest took the cold path)\n")
    print(f"Spawn cost, {args.runs} interleaved rounds (ms):\n")
    print(table(["command", "runner", "p50 ms", "p99 ms", "vs bwrap (p50)"], rows))
    # Sparse one-shot runs (the pattern of a caller that runs one command now and then): on
    # cgroup v1, a pid written to cgroup.procs after such a gap waits for an RCU grace period;
    # the cold path no longer writes one.
    gap_ms = 60
    sparse = interleaved({
        "bwrap": lambda: subprocess.run(bwrap_argv(["/bin/true"]), check=True, env=ENV),
        "cellblock cold": lambda: checked(cellblock.run(["/bin/true"], cells=False)),
    }, args.sparse_runs, gap=gap_ms / 1000) if have_bwrap else {}
    if sparse:
        bw = median_ms(sparse["bwrap"])
        print(f"\nSparse `/bin/true` runs, {gap_ms} ms idle before each, {args.sparse_runs} "
              f"interleaved rounds (ms):\n")
        print(table(["runner", "p50 ms", "p99 ms", "vs bwrap (p50)"], [
            [name, f"{median_ms(xs):.2f}", f"{percentile(xs, 99) * 1000:.2f}",
             f"{median_ms(xs) / bw:.2f}"] for name, xs in sparse.items()]))
    print("\nWhere the time goes, `/bin/true`, median of 100 interleaved runs (ms):\n")
    print(table(["phase", "cold", "pooled"], phases(100)))
    print(f"\nMemory: {cell_memory()}")


if __name__ == "__main__":
    main()
