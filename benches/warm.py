"""Warm runtimes: `run_python("print(1)")` / `run_node("console.log(1)")` latency, and idle
memory per session.

Latency (p50/p99 over N calls, one process, same run):
- cold: `bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc python3 -c 'print(1)'`
  (and `node -e`), and `cellblock.run(["python3", "-c", ...])`, a fresh sandbox per call;
- session: `Sandbox.run_python` stateless (a fresh fork of the warm interpreter per call) and
  stateful (one long-lived interpreter), back to back;
- pool: `cellblock.run_python` one-shot, each call in a fresh pre-warmed sandbox; timed when the
  pool is full (the refill between calls is not timed: it is what the pool hides).
Memory: 100 sessions open at once, idle, without and with the warm Python runtime; PSS (shared
pages divided among their users) and USS (pages of the session alone) summed over every process
of the sessions, per session, next to the RSS of the zygote (the interpreter itself).
Targets (issue 7): stateless p50 <= 10 ms (aim 5) and >= 10x faster than cold; idle memory
<= 5 MiB per session above the interpreter.

Usage: python benches/warm.py [--runs 200] [--cold-runs 30] [--sessions 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import percentile, print_environment, table

import cellblock
from cellblock import pool
from cellblock.policy import Policy

TARGET_P50_MS = 10.0
TARGET_SPEEDUP = 10.0
TARGET_MIB = 5.0


def samples(
    fn: Callable[[], object], runs: int, before: Callable[[], None] | None = None
) -> list[float]:
    """Seconds per call of `fn` (after 3 untimed calls); `before` runs untimed before each."""
    for _ in range(3):
        if before:
            before()
        fn()
    out = []
    for _ in range(runs):
        if before:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def checked(result: cellblock.RunResult) -> None:
    if result.stdout.strip() != "1":
        raise SystemExit(f"bench call failed: {result.reason} {result.stderr[-500:]}")


def bwrap(cmd: list[str]) -> Callable[[], None]:
    argv = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            *cmd]

    def call() -> None:
        out = subprocess.run(argv, capture_output=True, check=True).stdout
        if out.strip() != b"1":
            raise SystemExit(f"bwrap call failed: {out!r}")
    return call


def row(label: str, xs: list[float], cold_p50: float | None) -> list[str]:
    p50 = percentile(xs, 50) * 1000
    speedup = f"{cold_p50 / p50:.0f}x" if cold_p50 else "-"
    return [label, f"{p50:.2f}", f"{percentile(xs, 99) * 1000:.2f}", speedup]


def wait_full(p: pool.Pool) -> Callable[[], None]:
    def wait() -> None:
        deadline = time.monotonic() + 60
        while p.ready < p.size and time.monotonic() < deadline:
            time.sleep(0.005)
    return wait


def latency(language: str, runs: int, cold_runs: int) -> list[list[str]]:
    python3 = shutil.which("python3") or "python3"
    code = "print(1)" if language == "python" else "console.log(1)"
    argv = [python3, "-c", code] if language == "python" else ["node", "-e", code]
    rows: list[list[str]] = []
    cold = samples(bwrap(argv), cold_runs) if shutil.which("bwrap") else None
    cold_p50 = percentile(cold, 50) * 1000 if cold else None
    if cold:
        rows.append(row(f"{language}: cold, bubblewrap", cold, None))
    rows.append(row(f"{language}: cold, cellblock.run", samples(
        lambda: checked(cellblock.run(["python3" if language == "python" else "node",
                                       "-c" if language == "python" else "-e", code])),
        cold_runs), cold_p50))
    with cellblock.Sandbox(warm=(language,)) as sb:
        run = sb.run_python if language == "python" else sb.run_node
        rows.append(row(f"{language}: session, stateless",
                        samples(lambda: checked(run(code)), runs), cold_p50))
        rows.append(row(f"{language}: session, stateful",
                        samples(lambda: checked(run(code, stateful=True)), runs), cold_p50))
    p = pool.Pool(language, Policy(), size=2)  # type: ignore[arg-type]
    try:
        rows.append(row(f"{language}: one-shot pool (fresh sandbox)",
                        samples(lambda: checked(p.run(code)), min(runs, 50), before=wait_full(p)),
                        cold_p50))
    finally:
        p.shutdown()
    return rows


def descendants() -> list[int]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    out, todo = [], [os.getpid()]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, USS) of a process, KiB."""
    pss = uss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name == "Pss":
                pss = int(rest.split()[0])
            elif name in ("Private_Clean", "Private_Dirty"):
                uss += int(rest.split()[0])
    except OSError:
        pass
    return pss, uss


def is_zygote(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return cmd[:2] == [b"python3", b"-c"] and len(cmd) > 2 and b"zygote" in cmd[2]


def parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def memory(sessions: int) -> list[list[str]]:
    rows = []
    cases = (("idle session, no runtime", ()), ("idle session, warm Python", ("python",)))
    for label, warm in cases:
        opened = [cellblock.Sandbox(warm=warm) for _ in range(sessions)]
        try:
            time.sleep(1)
            total_pss = total_uss = zygote_uss = 0
            procs = descendants()
            # The zygote itself, not its forks (relays and workers share its command line).
            zygotes = [pid for pid in procs if is_zygote(pid) and not is_zygote(parent(pid))]
            for pid in procs:
                pss, uss = memory_kib(pid)
                total_pss += pss
                total_uss += uss
                zygote_uss += uss if pid in zygotes else 0
            per = sessions * 1024
            rows.append([
                label, str(len(procs) // sessions), f"{total_pss / per:.1f}",
                f"{total_uss / per:.1f}", f"{(total_uss - zygote_uss) / per:.1f}",
                f"{rss_mib(zygotes[0]):.1f}" if zygotes else "-",
            ])
        finally:
            for sb in opened:
                sb.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--cold-runs", type=int, default=30)
    ap.add_argument("--sessions", type=int, default=100)
    args = ap.parse_args()
    print_environment()
    node = "absent"
    if shutil.which("node"):
        node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                              check=False).stdout.strip()
    print(f"Load average at start: {os.getloadavg()[0]:.2f}; node {node}")
    print()
    rows = latency("python", args.runs, args.cold_runs)
    if shutil.which("node"):
        rows += latency("node", args.runs, args.cold_runs)
    print(table(["call", "p50 ms", "p99 ms", "vs cold bwrap (p50)"], rows))
    print()
    print(table(["sessions open: " + str(args.sessions), "processes/session", "PSS MiB/session",
                 "USS MiB/session", "USS without the interpreter", "interpreter (zygote) RSS MiB"],
                memory(args.sessions)))
    print()
    print(f"Targets: stateless p50 <= {TARGET_P50_MS:g} ms and >= {TARGET_SPEEDUP:g}x faster "
          f"than cold; idle memory <= {TARGET_MIB:g} MiB per session above the interpreter (USS).")


if __name__ == "__main__":
    main()
