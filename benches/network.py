"""Egress cost: an allowlisted 100 MB HTTP download and per-connection latency, sandbox vs host.

A loopback server in this process serves the bodies; `curl` downloads them directly on the
host, then inside `cellblock.run(..., allow_net=["127.0.0.1:PORT"])` through the HTTP proxy
(`-x $HTTP_PROXY`) and through the transparent path (plain connect, redirected by nftables).
Loopback is CPU-bound (client, server and relay share the cores), so a second pair of rows
caps the download at 100 MB/s (`--limit-rate`, about a 1 Gbit/s link) to show the cost where
the network, not the CPU, is the limit. Latency: a Python client makes 200 sequential
connections with a tiny GET, timed inside the client, on the host and in the sandbox.
Targets (issue 5): >= 80 % of direct throughput, < 1 ms added per connection.
The core alone:
`cargo test --release -p cellblock-core --test net -- --ignored --nocapture egress_bench`.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import cellblock

SIZE = 100 * 1000 * 1000
BLOCK = memoryview(b"x" * (1 << 20))
RUNS = 3
CONNS = 200
LIMIT = "100M"
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

LATENCY_SCRIPT = f"""
import socket, sys, time
port = int(sys.argv[1])
t = time.perf_counter()
for _ in range({CONNS}):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"GET /small HTTP/1.0\\r\\n\\r\\n")
    while c.recv(65536):
        pass
    c.close()
print((time.perf_counter() - t) / {CONNS} * 1e6)
"""


def serve_one(conn: socket.socket) -> None:
    with conn:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        size = 64 if b" /small " in head.split(b"\r\n", 1)[0] else SIZE
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        conn.sendall(head.encode())
        left = size
        while left > 0:
            n = min(left, len(BLOCK))
            conn.sendall(BLOCK[:n])
            left -= n


def start_server() -> int:
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)

    def accept_loop() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    return int(listener.getsockname()[1])


def curl_cmd(port: int, extra: str) -> list[str]:
    url = f"http://127.0.0.1:{port}/big"
    return ["sh", "-c", f"curl -sS -o /dev/null -w '%{{speed_download}}' {extra} {url}"]


def host_number(argv: list[str]) -> float:
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def sandbox_number(argv: list[str], port: int) -> float:
    result = cellblock.run(argv, allow_net=[f"127.0.0.1:{port}"], timeout=120, max_output="1M")
    if result.exit_code != 0 or result.violations:
        why = f"{result.reason} {result.stderr} {result.violations}"
        raise SystemExit(f"sandboxed run failed: {why}")
    return float(result.stdout.strip())


def median(f: Callable[..., float], argv: list[str], *args: int) -> float:
    return statistics.median(f(argv, *args) for _ in range(RUNS))


def environment() -> dict[str, str]:
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1"
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "cgroup": cgroup,
        "python": platform.python_version(),
        "curl": subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout.split()[1],
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }


def main() -> None:
    if not shutil.which("curl"):
        raise SystemExit("benches/network.py needs curl")
    port = start_server()
    proxy = '--noproxy "" -x "$HTTP_PROXY"'
    limited = f"--limit-rate {LIMIT}"
    rows = [
        ("direct on the host", median(host_number, curl_cmd(port, ""))),
        ("sandbox, HTTP proxy", median(sandbox_number, curl_cmd(port, proxy), port)),
        ("sandbox, transparent", median(sandbox_number, curl_cmd(port, ""), port)),
        (f"direct, --limit-rate {LIMIT}", median(host_number, curl_cmd(port, limited))),
        (
            f"sandbox proxy, --limit-rate {LIMIT}",
            median(sandbox_number, curl_cmd(port, f"{proxy} {limited}"), port),
        ),
    ]
    latency_argv = [PYTHON, "-c", LATENCY_SCRIPT, str(port)]
    lat_host = median(host_number, latency_argv)
    lat_sandbox = median(sandbox_number, latency_argv, port)

    print(f"## Egress: {SIZE / 1e6:.0f} MB download over loopback (median of {RUNS})")
    print("| path | MB/s | % of direct |")
    print("| --- | ---: | ---: |")
    for i, (name, bps) in enumerate(rows):
        base = rows[0][1] if i < 3 else rows[3][1]
        print(f"| {name} | {bps / 1e6:.0f} | {100 * bps / base:.0f} % |")
    print()
    print(f"## Connection latency: connect + tiny GET, mean of {CONNS} sequential connections")
    print("| path | µs per connection |")
    print("| --- | ---: |")
    print(f"| direct on the host | {lat_host:.0f} |")
    print(f"| sandbox, transparent | {lat_sandbox:.0f} |")
    print(f"| **added by the sandbox** | **{lat_sandbox - lat_host:.0f}** |")
    print()
    print("| environment | |")
    print("| --- | --- |")
    for key, value in environment().items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
