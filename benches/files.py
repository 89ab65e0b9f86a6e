"""Files API: throughput of a 50 MB write and read, and latency of small operations.

Each operation resolves and checks its path with the sandbox's root, uid and no capabilities
(see cellblock.files), then moves bytes on the opened descriptor in 1 MiB chunks, redacted.
Cases run interleaved (median of N rounds):
- write 50 MB: `write_file(path, bytes)` and from an iterable of 1 MiB chunks;
- read 50 MB: `read_file(path, max_size=...)` and `iter_file(path)` (1 MiB chunks);
- small: `read_file` and `write_file` of 5 bytes, `list_dir` of a 10-entry directory;
- for scale: `cat` of the same small file through `Sandbox.run` (a call in the session).

Usage: python benches/files.py [--runs 15] [--small-runs 200] [--mb 50]
(also runs against an older package without `iter_file`/`max_size`, to compare.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import interleaved, percentile, print_environment, table

from cellblock.session import Sandbox


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--small-runs", type=int, default=200)
    ap.add_argument("--mb", type=int, default=50)
    args = ap.parse_args()
    size = args.mb << 20
    blob = bytes(range(256)) * (size // 256)
    print_environment()
    with Sandbox(disk=f"{3 * args.mb + 16}M") as sb:
        streaming = hasattr(sb, "iter_file")
        read_all: Callable[[str], bytes] = (
            (lambda p: sb.read_file(p, max_size=size)) if streaming else sb.read_file
        )

        def check(path: str) -> None:
            assert len(read_all(path)) == size

        big: dict[str, Callable[[], Any]] = {
            "write_file 50 MB (bytes)": lambda: sb.write_file("big.bin", blob),
            "read_file 50 MB": lambda: check("big.bin"),
        }
        if streaming:
            chunk = 1 << 20
            big["write_file 50 MB (1 MiB chunks)"] = lambda: sb.write_file(
                "big2.bin", (blob[i:i + chunk] for i in range(0, size, chunk)))
            big["iter_file 50 MB (1 MiB chunks)"] = lambda: sum(
                len(c) for c in sb.iter_file("big.bin"))
        sb.write_file("big.bin", blob)
        samples = interleaved(big, args.runs, warmup=1)
        rows = [[name, f"{statistics.median(s) * 1e3:.1f}",
                 f"{size / statistics.median(s) / 1e6:.0f}"]
                for name, s in samples.items()]
        print(f"## Files API: {args.mb} MB (median of {args.runs} interleaved runs)")
        print(table(["case", "ms", "MB/s"], rows))
        print()

        sb.write_file("small.txt", b"hello")
        for i in range(10):
            sb.write_file(f"d/{i}.txt", b"x")
        small: dict[str, Callable[[], Any]] = {
            "read_file 5 B": lambda: read_all("small.txt"),
            "write_file 5 B": lambda: sb.write_file("small2.txt", b"hello"),
            "list_dir 10 entries": lambda: sb.list_dir("d"),
            "run(['cat', ...]) 5 B (a session call)": lambda: sb.run(["cat", "small.txt"]),
        }
        samples = interleaved(small, args.small_runs)
        rows = [[name, f"{percentile(s, 50) * 1e3:.3f}", f"{percentile(s, 99) * 1e3:.3f}"]
                for name, s in samples.items()]
        print(f"## Files API: small operations ({args.small_runs} interleaved runs)")
        print(table(["case", "p50 ms", "p99 ms"], rows))


if __name__ == "__main__":
    main()
