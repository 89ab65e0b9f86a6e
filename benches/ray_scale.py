"""Throughput of a batch on a local Ray cluster of 1..N nodes against the local backend.

The cluster runs inside a network namespace this script makes (only its loopback exists), so
every address Ray uses is local. Each node gets one CPU; the batch is the same small Python
jobs for every configuration; rounds are interleaved and the median is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import print_environment

JOBS, ROUNDS = 40, 3

INNER = textwrap.dedent('''\
    import json, os, statistics, sys, time
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster
    from cellblock import Job, run_many
    JOBS, ROUNDS, MAX_NODES = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    jobs = [Job(id=str(i), code="sum(range(200000))") for i in range(JOBS)]
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(MAX_NODES - 1):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    configs = [("local", n) for n in range(1, MAX_NODES + 1)] + \\
              [("ray", n) for n in range(1, MAX_NODES + 1)]
    times = {c: [] for c in configs}
    run_many(jobs[:4], backend="ray", address=cluster.address, progress=False)  # warm-up
    for _ in range(ROUNDS):
        for backend, n in configs:
            t = time.perf_counter()
            rs = run_many(jobs, concurrency=n, backend=backend, progress=False,
                          address=cluster.address if backend == "ray" else None)
            assert all(r.ok for r in rs), [r for r in rs if not r.ok][:1]
            times[(backend, n)].append(time.perf_counter() - t)
    ray.shutdown()
    cluster.shutdown()
    print("RESULT " + json.dumps([[b, n, statistics.median(v)] for (b, n), v in times.items()]))
''')


def main() -> None:
    nodes = min(os.cpu_count() or 1, 4)
    res = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
         sys.executable, "-c", INNER, str(JOBS), str(ROUNDS), str(nodes)],
        capture_output=True, text=True, check=False)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    if res.returncode != 0 or line is None:
        sys.exit(f"bench failed:\n{res.stderr[-3000:]}")
    rows = json.loads(line.removeprefix("RESULT "))
    print_environment()
    print(f"## Batch on Ray: {JOBS} Python jobs, median of {ROUNDS} interleaved rounds\n")
    print("| backend | workers | jobs/s | vs local, same workers |")
    print("|---|---:|---:|---:|")
    local = {n: t for b, n, t in rows if b == "local"}
    for b, n, t in rows:
        label = "local threads" if b == "local" else "Ray, 1 actor per node"
        unit = "threads" if b == "local" else "nodes (1 CPU each)"
        print(f"| {label} | {n} {unit} | {JOBS / t:.1f} | {local[n] / t:.2f}x |")
    print(f"\n(medians: {statistics.fmean(t for *_, t in rows):.2f} s per batch on average)")


if __name__ == "__main__":
    main()
