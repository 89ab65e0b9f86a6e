"""Live network policy: what `Sandbox.set_network` costs.

- swap: `set_network` alternating between two lists of N loopback targets (nft reload in the
  sandbox's namespace + allowlist swap), p50/p99 over R;
- with open connections: the same with C open connections through the supervisor, half of
  them to the target the new list drops (they are cut and reported).

Servers are on the host's loopback only. Usage: python benches/network_live.py [--runs 50]
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import percentile, print_environment, table

from cellblock import Sandbox

HOLD = """
import socket, sys, time
conns = []
for port in map(int, sys.argv[1:]):
    for _ in range(%d):
        conns.append(socket.create_connection(("127.0.0.1", port)))
print("up", flush=True)
time.sleep(600)
"""


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1024)
    return s


def swap_times(sb: Sandbox, a: list[str], b: list[str], runs: int) -> list[float]:
    out = []
    for i in range(runs):
        t = time.perf_counter()
        sb.set_network(a if i % 2 else b)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--conns", type=int, default=50)
    args = ap.parse_args()
    print_environment()
    rows = []
    for n in (1, 100):
        lists = ([f"127.0.0.1:{20000 + i}" for i in range(n)],
                 [f"127.0.0.1:{30000 + i}" for i in range(n)])
        with Sandbox(allow_net=lists[0]) as sb:
            xs = swap_times(sb, *lists, args.runs)
        rows.append([f"swap, {n} targets, no connection", f"{percentile(xs, 50) * 1000:.1f}",
                     f"{percentile(xs, 99) * 1000:.1f}"])
    keep, drop = listener(), listener()
    kp, dp = keep.getsockname()[1], drop.getsockname()[1]
    xs = []
    for _ in range(max(3, args.runs // 10)):
        with Sandbox(allow_net=[f"127.0.0.1:{kp}", f"127.0.0.1:{dp}"]) as sb:
            p = sb.start(["python3", "-c", HOLD % (args.conns // 2), str(kp), str(dp)])
            for chunk in p.iter_stdout(timeout=60):
                if b"up" in chunk:
                    break
            t = time.perf_counter()
            cut = sb.set_network([f"127.0.0.1:{kp}"])
            xs.append(time.perf_counter() - t)
            assert len(cut) == 1, cut
            p.kill()
    rows.append([f"drop 1 of 2 targets, {args.conns} open connections (half cut)",
                 f"{percentile(xs, 50) * 1000:.1f}", f"{percentile(xs, 99) * 1000:.1f}"])
    keep.close()
    drop.close()
    print("## set_network latency (ms)")
    print(table(["case", "p50", "p99"], rows))


if __name__ == "__main__":
    main()
