"""Spawn cost: bare exec vs bubblewrap vs cellblock.run, for /bin/true and `python3 -c pass`.

Median of N interleaved runs in one process. bubblewrap gets the same kind of isolation
(--unshare-all, read-only system, fresh /proc /dev /tmp); cellblock adds cgroup limits and, in
the "+seccomp" rows, its syscall filter. Usage: python benches/spawn.py [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import interleaved, median_ms, percentile, print_environment, table

import cellblock

PY = os.path.realpath(sys.executable)


def bwrap_argv(cmd: list[str]) -> list[str]:
    return [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
        "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
        "--ro-bind", "/etc", "/etc", "--ro-bind", sys.base_prefix, sys.base_prefix,
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--", *cmd,
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    print_environment()
    have_bwrap = shutil.which("bwrap") is not None
    rows = []
    for label, cmd in (("/bin/true", ["/bin/true"]), ("python3 -c pass", [PY, "-c", "pass"])):
        cases = {
            "bare": lambda c=cmd: subprocess.run(c, check=True),
            "cellblock": lambda c=cmd: cellblock.run(c, profile="none"),
            "cellblock+seccomp": lambda c=cmd: cellblock.run(c),
        }
        if have_bwrap:
            cases["bwrap"] = lambda c=cmd: subprocess.run(bwrap_argv(c), check=True)
        samples = interleaved(cases, args.runs)
        bw = median_ms(samples["bwrap"]) if have_bwrap else float("nan")
        for name, xs in samples.items():
            rows.append([
                label, name, f"{median_ms(xs):.2f}", f"{percentile(xs, 99) * 1000:.2f}",
                f"{median_ms(xs) / bw:.2f}" if have_bwrap else "n/a",
            ])
    print(f"Spawn cost, median of {args.runs} interleaved runs (ms):\n")
    print(table(["command", "runner", "p50 ms", "p99 ms", "vs bwrap"], rows))


if __name__ == "__main__":
    main()
