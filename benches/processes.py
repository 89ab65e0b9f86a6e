"""Background processes and exposed ports: what `Sandbox.start` and `Sandbox.expose` cost.

- start: `sb.start(["echo", "x"])` until its first output chunk arrives, and `sb.run` of the same
  command, interleaved (p50/p99 over N);
- stdin echo: one line written to a running `cat`, until it comes back (p50/p99 over N);
- connection: connect + 5-byte request + reply through `expose` to an echo server inside the
  sandbox, against the same to an echo server on the host's loopback (mean over N);
- throughput: MB through one exposed connection (sandbox server writes, host reads).

Usage: python benches/processes.py [--runs 200] [--megabytes 200]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import interleaved, percentile, print_environment, table

from cellblock import Sandbox

ECHO = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
print("up", flush=True)
def serve(c):
    while d := c.recv(65536):
        c.sendall(d)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

BULK = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1)
print("up", flush=True)
c, _ = s.accept()
block = b"x" * (1 << 20)
for _ in range(int(sys.argv[2])):
    c.sendall(block)
c.close()
"""


def ms(xs: list[float], p: float) -> str:
    return f"{percentile(xs, p) * 1000:.2f}"


def round_trip(addr: tuple[str, int]) -> None:
    with socket.create_connection(addr) as c:
        c.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += c.recv(5)


def host_echo() -> tuple[socket.socket, tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)

    def serve() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                while d := c.recv(65536):
                    c.sendall(d)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--megabytes", type=int, default=200)
    args = ap.parse_args()
    print_environment()
    with Sandbox(max_output=1 << 20) as sb:
        def start() -> None:
            p = sb.start(["echo", "x"], stdin=b"")
            next(p.iter_output(timeout=30))
            p.wait(30)

        samples = interleaved({"start -> first output": start,
                               "run (whole call)": lambda: sb.run(["echo", "x"])}, args.runs)
        cat = sb.start(["cat"])
        lines = cat.iter_lines(timeout=30)
        echo = []
        for _ in range(args.runs):
            t = time.perf_counter()
            cat.write_stdin(b"ping\n")
            next(lines)
            echo.append(time.perf_counter() - t)
        cat.kill()
        samples["stdin line echoed"] = echo

        server = sb.start(["python3", "-c", ECHO, "9000"], stdin=b"")
        next(server.iter_lines(timeout=30))
        ep = sb.expose(9000)
        host_srv, host_addr = host_echo()
        conn = interleaved({"connect + echo via expose": lambda: round_trip(ep.address),
                            "connect + echo on host loopback": lambda: round_trip(host_addr)},
                           args.runs)
        host_srv.close()
        samples.update(conn)

        bulk = sb.start(["python3", "-c", BULK, "9001", str(args.megabytes)], stdin=b"")
        next(bulk.iter_lines(timeout=30))
        ep2 = sb.expose(9001)
        t = time.perf_counter()
        total = 0
        with socket.create_connection(ep2.address) as c:
            while d := c.recv(1 << 20):
                total += len(d)
        elapsed = time.perf_counter() - t
    rows = [[name, ms(xs, 50), ms(xs, 99), f"{statistics.mean(xs) * 1000:.2f}"]
            for name, xs in samples.items()]
    print(f"## Background processes and ports ({args.runs} runs each, interleaved)\n")
    print(table(["case", "p50 ms", "p99 ms", "mean ms"], rows))
    print(f"\nThroughput through one exposed connection: {total / elapsed / 1e6:.0f} MB/s "
          f"({total >> 20} MiB in {elapsed:.2f} s)")


if __name__ == "__main__":
    main()
