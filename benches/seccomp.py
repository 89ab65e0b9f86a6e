"""Seccomp costs: compiling a profile, installing the filter per run, and filtering each syscall.

- compile: `compile_filter` uncached (libseccomp builds and exports the BPF) vs cached;
- install: the `seccomp(SET_MODE_FILTER, NEW_LISTENER)` call alone, timed in a forked child, and
  the whole per-run difference: wall time of `cellblock.run(["true"])` with the default profile
  vs `profile="none"`, in interleaved pairs, median of the pair differences (spawn itself
  varies by milliseconds, so run this on an idle machine);
- per syscall: a loop of 1e6 `os.getpid()` inside the sandbox, with and without the filter
  (best of 3), so the difference is the filter's cost per call.
Target (issue 4): per-run overhead < 0.2 ms with a warm cache.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from pathlib import Path

import pyseccomp

import cellblock
from cellblock.seccomp import _compile, compile_filter

TARGET_MS = 0.2
PROFILE = "default"
COMPILES = 50
CACHED_COMPILES = 100_000
RUN_PAIRS = 100
INSTALLS = 50
LOOP = 1_000_000
LOOP_REPEATS = 3

GETPID_LOOP = f"""
import os, time
t = time.perf_counter_ns()
for _ in range({LOOP}):
    os.getpid()
print((time.perf_counter_ns() - t) / {LOOP})
"""


def compile_times() -> tuple[float, float]:
    """Milliseconds per uncached compile, microseconds per cached one."""
    uncached = _compile.__wrapped__  # the function under the lru_cache
    started = time.perf_counter()
    for _ in range(COMPILES):
        uncached(PROFILE, (), (), "errno")
    per_uncached = (time.perf_counter() - started) / COMPILES * 1e3
    compile_filter(PROFILE)
    started = time.perf_counter()
    for _ in range(CACHED_COMPILES):
        compile_filter(PROFILE)
    per_cached = (time.perf_counter() - started) / CACHED_COMPILES * 1e6
    return per_uncached, per_cached


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_time_us() -> float:
    """Median microseconds of the install syscall, each in a fresh forked child."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    bpf = compile_filter(PROFILE).bpf
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _Fprog(len(bpf) // 8, ctypes.addressof(buf))
    nr_seccomp = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "seccomp")
    samples = []
    for _ in range(INSTALLS):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            t = time.perf_counter_ns()
            fd = libc.syscall(nr_seccomp, 1, 8, ctypes.byref(prog))  # SET_MODE_FILTER, NEW_LISTENER
            took = time.perf_counter_ns() - t
            os.write(w, str(took if fd >= 0 else -1).encode())
            os._exit(0)
        os.close(w)
        took = int(os.read(r, 64) or b"-1")
        os.close(r)
        os.waitpid(pid, 0)
        if took < 0:
            raise RuntimeError("seccomp install failed in the child")
        samples.append(took / 1e3)
    return statistics.median(samples)


def per_run_ms() -> tuple[float, float, float]:
    """Median wall ms of `true` without a filter, with the cached default profile, and the
    median of the paired differences."""
    cellblock.run(["true"], profile=PROFILE)
    without, with_filter = [], []
    for _ in range(RUN_PAIRS):
        for profile, samples in (("none", without), (PROFILE, with_filter)):
            started = time.perf_counter()
            res = cellblock.run(["true"], profile=profile)
            samples.append((time.perf_counter() - started) * 1e3)
            assert res.ok, res
    diffs = [f - n for f, n in zip(with_filter, without, strict=True)]
    return statistics.median(without), statistics.median(with_filter), statistics.median(diffs)


def getpid_ns(profile: str) -> float:
    """Best-of-N nanoseconds per os.getpid() inside the sandbox."""
    best = float("inf")
    for _ in range(LOOP_REPEATS):
        res = cellblock.run(["python3", "-c", GETPID_LOOP], profile=profile, timeout=120)
        assert res.ok, res.stderr
        best = min(best, float(res.stdout))
    return best


def environment() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_version.restype = ctypes.POINTER(ctypes.c_uint * 3)
    major, minor, micro = lib.seccomp_version().contents
    return [
        f"- kernel {platform.release()}, {platform.machine()}, {os.cpu_count()} CPUs ({cpu})",
        (f"- cgroup {cgroup}; Python {platform.python_version()}; libseccomp "
         f"{major}.{minor}.{micro}; pyseccomp {pyseccomp.__version__}"),
    ]


def main() -> None:
    uncached_ms, cached_us = compile_times()
    insns = len(compile_filter(PROFILE).bpf) // 8
    install_us = install_time_us()
    run_none, run_filtered, overhead_ms = per_run_ms()
    ns_none, ns_filtered = getpid_ns("none"), getpid_ns(PROFILE)
    print(f"## seccomp (profile `{PROFILE}`, {insns} BPF instructions)\n")
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| compile, uncached (libseccomp) | {uncached_ms:.2f} ms |")
    print(f"| compile, cached | {cached_us:.2f} µs |")
    print(f"| install syscall in the child (median of {INSTALLS}) | {install_us:.1f} µs |")
    print(f"| run `true`, no filter (median of {RUN_PAIRS}) | {run_none:.2f} ms |")
    print(f"| run `true`, filter, warm cache (median of {RUN_PAIRS}) | {run_filtered:.2f} ms |")
    verdict = "meets" if overhead_ms < TARGET_MS else "misses"
    print(f"| per-run overhead of the filter (median of paired differences) | "
          f"{overhead_ms:+.3f} ms ({verdict} < {TARGET_MS} ms) |")
    print(f"| getpid, no filter (1e6 calls, best of {LOOP_REPEATS}) | {ns_none:.0f} ns/call |")
    print(f"| getpid, filter | {ns_filtered:.0f} ns/call |")
    print(f"| per-syscall overhead of the filter | {ns_filtered - ns_none:+.0f} ns/call |")
    print("\nEnvironment:\n")
    print("\n".join(environment()))


if __name__ == "__main__":
    main()
