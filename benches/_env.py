"""Shared bench helpers: environment record, timing, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence


def environment() -> dict[str, str]:
    """Kernel, CPUs and how cellblock enforces limits here."""
    from cellblock import _native

    info = _native.host_info()
    usable_v2 = [c for c in info["cgroup_v2_controllers"] if c in ("memory", "pids", "cpu")]
    if usable_v2:
        cg = "v2 (" + " ".join(usable_v2) + ")"
    elif info["cgroup_v1_controllers"]:
        cg = "v1 hybrid (" + " ".join(sorted(set(info["cgroup_v1_controllers"]))) + ")"
    else:
        cg = "none (rlimit fallback)"
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cgroups": cg,
        "user": "root" if info["root"] else f"uid {os.getuid()}",
        "python": platform.python_version(),
    }


def print_environment() -> None:
    env = environment()
    print("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print()


def print_environment_table() -> None:
    """The environment as a two-column markdown table (for the README)."""
    print("| environment | |")
    print("| --- | --- |")
    for key, value in environment().items():
        print(f"| {key} | {value} |")


def time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(
    cases: dict[str, Callable[[], object]], runs: int, warmup: int = 5, gap: float = 0.0
) -> dict[str, list[float]]:
    """Runs every case once per round, `runs` rounds, so drift affects all cases alike;
    `gap` seconds of idleness (untimed) before each run."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(runs):
        for name, fn in cases.items():
            if gap:
                time.sleep(gap)
            samples[name].append(time_once(fn))
    return samples


def percentile(xs: Sequence[float], p: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def median_ms(xs: Sequence[float]) -> float:
    return statistics.median(xs) * 1000
