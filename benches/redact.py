"""Redaction throughput: 200 MB of mixed text, 20 secrets in all their printed forms.

Planted forms include UTF-16, UTF-32 and base32 ones. Wall-clock and thread CPU time are both
printed: on a shared machine the CPU time is the cost on one core.

Prints a markdown table: `Redactor.feed` in 64 KiB chunks (what the output pumps do), one-shot
`redact_bytes`, and the time redaction adds to a run producing 10 MB of output compared with
collecting the same chunks unredacted. Medians of several runs, one thread (= one core).
The core alone: `cargo test --release -p cellblock-core -- --ignored --nocapture redact_throughput`.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import random
import statistics
import string
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from cellblock import Redactor

TOTAL_BYTES = 200 * 1000 * 1000
CHUNK = 64 * 1024
RUNS = 5
SECRET_EVERY = 20_000  # about one planted secret form per 20 KB of text


def make_secrets(rng: random.Random) -> dict[str, str]:
    alnum = string.ascii_letters + string.digits
    shapes = [
        lambda: "ghp_" + "".join(rng.choices(alnum, k=36)),
        lambda: "sk-" + "".join(rng.choices(alnum, k=48)),
        lambda: "AKIA" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=16)),
        lambda: "".join(rng.choices(alnum + "/+", k=40)),  # AWS secret key style
        lambda: "".join(rng.choices(alnum + "!@#$%^&*/", k=20)),  # password
    ]
    return {f"SECRET_{i:02}": shapes[i % len(shapes)]() for i in range(20)}


def printed_forms(value: str) -> list[bytes]:
    raw = value.encode()
    return [
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        base64.b64encode(raw),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        base64.b64encode(b"Authorization: Basic " + raw),  # embedded at some alignment
        urllib.parse.quote(value, safe="").encode(),
        json.dumps({"token": value}).encode(),
        json.dumps(value).replace("/", "\\/").encode(),
        value.encode("utf-16-le"),
        value.encode("utf-32-be"),
        base64.b32encode(raw).lower().rstrip(b"="),
    ]


def filler_line(rng: random.Random, n: int) -> str:
    kind = n % 7
    if kind == 0:
        return (f"2024-05-{n % 28 + 1:02} 12:{n % 60:02}:07 INFO worker-{n % 9}"
                f" request id={rng.getrandbits(64):016x} ok\n")
    if kind == 1:
        return (
            json.dumps(
                {"user": f"user{n}@example.com", "ok": True, "n": n, "path": "/api/v1/items"}
            )
            + "\n"
        )
    if kind == 2:
        return f"sha256:{rng.getrandbits(256):064x}  build/artifact-{n}.tar.gz\n"
    if kind == 3:
        return base64.b64encode(rng.randbytes(48)).decode() + "\n"
    if kind == 4:
        return f"    def handler_{n}(self, request):  # TODO: retry on 503, café ünïcode ✓\n"
    if kind == 5:
        return 'Traceback (most recent call last):\n  File "/app/main.py", line 42, in <module>\n'
    return "The quick brown fox jumps over the lazy dog; " * 2 + "\n"


def make_text(secrets: dict[str, str], rng: random.Random) -> tuple[bytes, int]:
    """About 10 MB of distinct mixed text with planted secret forms, tiled to TOTAL_BYTES."""
    forms = [f for v in secrets.values() for f in printed_forms(v)]
    parts: list[bytes] = []
    size, planted, next_secret, n = 0, 0, SECRET_EVERY, 0
    while size < TOTAL_BYTES // 20:
        line = filler_line(rng, n).encode()
        n += 1
        if size >= next_secret:
            line = b"value: " + rng.choice(forms) + b"\n" + line
            planted += 1
            next_secret += SECRET_EVERY
        parts.append(line)
        size += len(line)
    block = b"".join(parts)
    copies = round(TOTAL_BYTES / len(block))
    return block * copies, planted * copies


def median_seconds(fn: Callable[[], object], runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_cpu_seconds(fn: Callable[[], object], runs: int = RUNS) -> float:
    """Median CPU time of this thread: the cost on one core, also on a shared machine."""
    times = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def environment() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cpu model": cpu,
        "cgroup": cgroup,
        "python": platform.python_version(),
    }


def main() -> None:
    rng = random.Random(20240501)
    secrets = make_secrets(rng)
    text, planted = make_text(secrets, rng)
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    redactor = Redactor(secrets)

    def feed_all() -> bytes:
        out = bytearray()
        for chunk in chunks:
            out += redactor.feed(chunk)
        out += redactor.finish()
        return bytes(out)

    # Correctness first: every planted form is redacted and no raw value is left.
    redacted = feed_all()
    found = sum(redactor.counts.values())
    if found < planted or any(v.encode() in redacted for v in secrets.values()):
        sys.exit(f"redaction check failed: {found} redactions for {planted} planted forms")

    def feed_only() -> None:
        # Output handed on and dropped, as a pump does: measures redaction, not accumulation.
        for chunk in chunks:
            redactor.feed(chunk)
        redactor.finish()

    feed_s = median_seconds(feed_only)
    feed_cpu_s = median_cpu_seconds(feed_only)
    compile_s = median_seconds(lambda: Redactor(secrets), runs=9)

    ten_mb = chunks[: (10 * 1000 * 1000) // CHUNK + 1]
    ten = sum(map(len, ten_mb)) / 1e6
    # One-shot use is for messages (the agent loop's own output): 64 KiB texts.
    oneshot_s = median_seconds(lambda: [redactor.redact_bytes(c) for c in ten_mb], runs=9)

    def copy_10mb() -> None:
        out = bytearray()
        for chunk in ten_mb:
            out += chunk

    def redact_10mb() -> None:
        stream = Redactor(secrets)
        out = bytearray()
        for chunk in ten_mb:
            out += stream.feed(chunk)
        out += stream.finish()

    copy_s = median_seconds(copy_10mb, runs=9)
    redact_s = median_seconds(redact_10mb, runs=9)
    mb = len(text) / 1e6

    print(
        f"## Redaction: {len(secrets)} secrets ({redactor.pattern_count} patterns), "
        f"{mb:.0f} MB mixed text, {planted} planted forms, one core\n"
    )
    print("| measure | median time | throughput |")
    print("| --- | ---: | ---: |")
    print(
        f"| `Redactor.feed`, {mb:.0f} MB in 64 KiB chunks | {feed_s:.3f} s | "
        f"**{mb / 1000 / feed_s:.2f} GB/s** |"
    )
    print(
        f"| `Redactor.feed`, the same, CPU time of the thread | {feed_cpu_s:.3f} s | "
        f"**{mb / 1000 / feed_cpu_s:.2f} GB/s** |"
    )
    print(
        f"| `Redactor.redact_bytes`, {ten:.0f} MB as 64 KiB messages | {oneshot_s * 1000:.1f} ms | "
        f"{ten / 1000 / oneshot_s:.2f} GB/s |"
    )
    print(f"| compiling the 20 secrets (`Redactor(secrets)`) | {compile_s * 1000:.2f} ms | |")
    print(f"| run output of {ten:.0f} MB, chunks copied only | {copy_s * 1000:.1f} ms | |")
    print(
        f"| run output of {ten:.0f} MB, compiled + fed + collected | {redact_s * 1000:.1f} ms | |"
    )
    print(
        f"| **time added by redaction to a run with {ten:.0f} MB of output** | "
        f"**{(redact_s - copy_s) * 1000:.1f} ms** | |"
    )
    print()
    print("| environment | |")
    print("| --- | --- |")
    for key, value in environment().items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
