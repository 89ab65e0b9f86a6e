"""Environments: build time, cached rebuild time, and the start cost of a run in an environment
against a run without one (target: within 1 ms).

Offline: the packages are wheels made here, served by a PEP 503 index on 127.0.0.1 (as the
tests do). The environment has a pip layer (two packages) and a files layer.
- build: a fresh store, every layer built in its sandbox (pip install + tar back + unpack);
- rebuild: the same declaration again (every layer found and verified: a no-op);
- start cost, interleaved rounds, median and p90: `cellblock.run(["true"])` with and without
  `environment=` (default path: pre-created cells where they fit; and `cells=False`, the cold
  path both ways), a session call with and without, and resolving the name alone.

Usage: python benches/environments.py [--runs 200] [--builds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _env import interleaved, percentile, print_environment, table
from envfixtures import make_wheel, serve, simple_index, world_readable_dir

import cellblock
from cellblock.environments.build import build
from cellblock.environments.runtime import resolve
from cellblock.environments.spec import EnvironmentSpec
from cellblock.environments.store import Store


def ms(x: float) -> str:
    return f"{x * 1000:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--builds", type=int, default=3)
    args = ap.parse_args()
    print_environment()
    base = world_readable_dir("cellblock-envbench-")
    try:
        wheels = [make_wheel(base, "cbgreet", "1.0", "GREETING = 'hi'\n"),
                  make_wheel(base, "cbmath", "1.0", "def double(x):\n    return 2 * x\n")]
        simple_index(base / "idx", wheels)
        with serve(base / "idx") as url:
            os.environ["PIP_INDEX_URL"] = f"{url}/simple"
            os.environ.pop("PIP_FIND_LINKS", None)
            spec = EnvironmentSpec.build(name="bench", pip=["cbgreet", "cbmath"],
                                         files={"conf.txt": "x"})
            builds, rebuilds = [], []
            for i in range(args.builds):
                os.environ["XDG_DATA_HOME"] = str(base / f"data{i}")
                t = time.perf_counter()
                build(spec, Store())
                builds.append(time.perf_counter() - t)
                t = time.perf_counter()
                result = build(spec, Store())
                rebuilds.append(time.perf_counter() - t)
                assert all(s.cached for s in result.steps)
        print(table(["build", "median s", "runs"], [
            ["fresh (pip layer + files layer)", f"{statistics.median(builds):.2f}", len(builds)],
            ["unchanged declaration (no-op)", f"{statistics.median(rebuilds):.3f}",
             len(rebuilds)],
        ]))
        print()
        assert cellblock.run(["python3", "-c", "import cbmath"], environment="bench").ok
        with cellblock.Sandbox() as plain_sb, cellblock.Sandbox(environment="bench") as env_sb:
            cases = {
                "run (default)": lambda: cellblock.run(["true"]),
                "run (default), environment=": lambda: cellblock.run(
                    ["true"], environment="bench"),
                "run cells=False": lambda: cellblock.run(["true"], cells=False),
                "run cells=False, environment=": lambda: cellblock.run(
                    ["true"], cells=False, environment="bench"),
                "session call": lambda: plain_sb.run(["true"]),
                "session call, environment=": lambda: env_sb.run(["true"]),
                "resolve the name (cached check)": lambda: resolve("bench"),
            }
            samples = interleaved(cases, args.runs, warmup=5)
        rows = [[name, ms(statistics.median(xs)), ms(percentile(xs, 90))]
                for name, xs in samples.items()]
        print(table(["start", "median ms", "p90 ms"], rows))
        print()
        for plain, env in (("run (default)", "run (default), environment="),
                           ("run cells=False", "run cells=False, environment="),
                           ("session call", "session call, environment=")):
            delta = statistics.median(samples[env]) - statistics.median(samples[plain])
            print(f"{env}: {delta * 1000:+.2f} ms against {plain}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
