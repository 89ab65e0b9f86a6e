"""Start cost of a run on a rootfs (an overlay over an unpacked directory) vs the default root
(binds of the host's /usr and friends), one-shot `/bin/true`-like runs, cold and pooled.

The rootfs is the host's /bin/dash and its libraries (made here, as tests/test_rootfs.py does).
Interleaved rounds; reports p50 and p99 and the difference to the default root.

Usage: python benches/environments_rootfs.py [--runs 100]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import interleaved, median_ms, percentile, print_environment, table

import cellblock
import cellblock.cells
from cellblock.environments.rootfs import unpack

CMD = ["/bin/dash", "-c", ":"]


def make_rootfs(top: Path) -> Path:
    tree = top / "tree"
    out = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True, check=True).stdout
    for path in ["/bin/dash", *re.findall(r"(/\S+\.so[^\s]*)", out)]:
        dst = tree / path.lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), dst)
    for d in ("etc", "tmp", "proc", "dev", "workspace"):
        (tree / d).mkdir(exist_ok=True)
    for root, dirs, _ in os.walk(top):
        for n in dirs:
            os.chmod(os.path.join(root, n), 0o755)
    return tree


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    args = ap.parse_args()
    print_environment()
    top = Path(tempfile.mkdtemp(prefix="cellblock-bench-rootfs-"))
    try:
        top.chmod(0o755)
        tree = make_rootfs(top)
        t = time.perf_counter()
        unpack(tree, top / "unpacked")
        unpack_ms = (time.perf_counter() - t) * 1000
        rootfs = top / "unpacked"
        cases = {
            "default root, cold": lambda: cellblock.run(CMD, cells=False),
            "rootfs, cold": lambda: cellblock.run(CMD, cells=False, rootfs=rootfs),
            "default root, pooled": lambda: cellblock.run(CMD),
            "rootfs, pooled": lambda: cellblock.run(CMD, rootfs=rootfs),
        }
        for name, fn in cases.items():
            r = fn()
            assert r.exit_code == 0, (name, r)
        before = cellblock.cells.stats()
        samples = interleaved(cases, args.runs)
        after = cellblock.cells.stats()
        load = os.getloadavg()[0]
        rows = []
        for name, xs in samples.items():
            base = samples[name.replace("rootfs", "default root")]
            rows.append([name, f"{median_ms(xs):.2f}", f"{percentile(xs, 99) * 1000:.2f}",
                         f"{median_ms(xs) - median_ms(base):+.2f}"])
        print(f"{args.runs} interleaved rounds, load average {load:.1f}; "
              f"unpacking the {sum(1 for _ in tree.rglob('*'))}-entry tree took "
              f"{unpack_ms:.1f} ms; ready cells served {after.hits - before.hits} of the "
              f"{2 * args.runs} pooled runs ({after.misses - before.misses} misses)")
        print()
        print(table(["run", "p50 ms", "p99 ms", "vs default root (p50)"], rows))
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
