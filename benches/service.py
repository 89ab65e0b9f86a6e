"""Bench of the embedding surfaces: a warm `print(1)` over HTTP (`cellblock serve`), through
the async API and in-process (p50/p99 of interleaved calls), throughput with 100 concurrent
sessions, and what one open session costs the service process (file descriptors, threads)
up to 1000 open sessions. Prints Markdown tables."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import cellblock
from cellblock import aio

CALLS = 300
CONCURRENT_SESSIONS = 100
CALLS_PER_SESSION = 5
MANY_SESSIONS = 1000
CODE = {"code": "print(1)"}


def environment() -> str:
    info = cellblock._native.host_info()
    v1, v2 = info["cgroup_v1_controllers"], info["cgroup_v2_controllers"]
    cgroup = "v1 hybrid" if v1 and v2 else "v1" if v1 else "v2"
    return (f"Environment: kernel {platform.release()}, cpus {os.cpu_count()}, cgroup {cgroup}, "
            f"user {'root' if os.geteuid() == 0 else os.geteuid()}, python "
            f"{platform.python_version()}, load average at start {os.getloadavg()[0]:.2f}")


def start_service(directory: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    exe = Path(sys.executable).parent / "cellblock"
    tokens = directory / "tokens.json"
    token = subprocess.run(
        [str(exe), "serve", "--tokens", str(tokens), "--add-token", "bench",
         "--max-sessions", str(MANY_SESSIONS + 10), "--max-concurrent-runs", "256"],
        check=True, capture_output=True, text=True).stdout.strip()
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([str(exe), "serve", "--tokens", str(tokens), "--port", str(port),
                             "--max-total-sessions", str(MANY_SESSIONS + 10)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/v1/health")
            return proc, url, token
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the service did not start")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def process_cost(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        threads = int(next(ln.split()[1] for ln in f if ln.startswith("Threads:")))
    return fds, threads


async def latency(http: httpx.Client, url: str, sid: str) -> dict[str, list[float]]:
    """Interleaved warm print(1): HTTP, async API, in-process."""
    times: dict[str, list[float]] = {"HTTP (cellblock serve)": [], "async API (cellblock.aio)": [],
                                     "in-process (cellblock.Sandbox)": []}
    sync = cellblock.Sandbox(warm=("python",))
    asb = await aio.Sandbox(warm=("python",)).open()
    try:
        for _ in range(10):  # warm-up
            http.post(f"{url}/v1/sessions/{sid}/python", json=CODE)
            await asb.run_python("print(1)")
            sync.run_python("print(1)")
        for _ in range(CALLS):
            t = time.perf_counter()
            r = http.post(f"{url}/v1/sessions/{sid}/python", json=CODE)
            times["HTTP (cellblock serve)"].append(time.perf_counter() - t)
            assert r.json()["stdout"] == "1\n", r.text
            t = time.perf_counter()
            assert (await asb.run_python("print(1)")).stdout == "1\n"
            times["async API (cellblock.aio)"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert sync.run_python("print(1)").stdout == "1\n"
            times["in-process (cellblock.Sandbox)"].append(time.perf_counter() - t)
    finally:
        sync.close()
        await asb.close()
    return times


async def throughput_http(url: str, token: str) -> float:
    """Calls/s of warm print(1) over HTTP, one session per concurrent client."""
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=CONCURRENT_SESSIONS)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300,
                                 limits=limits) as http:
        made = await asyncio.gather(*(http.post("/v1/sessions", json={"warm": ["python"]})
                                      for _ in range(CONCURRENT_SESSIONS)))
        ids = [m.json()["id"] for m in made]

        async def client(sid: str) -> None:
            for _ in range(CALLS_PER_SESSION):
                r = await http.post(f"/v1/sessions/{sid}/python", json=CODE)
                assert r.json()["stdout"] == "1\n", r.text

        t = time.perf_counter()
        await asyncio.gather(*(client(sid) for sid in ids))
        elapsed = time.perf_counter() - t
        await asyncio.gather(*(http.delete(f"/v1/sessions/{sid}") for sid in ids))
    return CONCURRENT_SESSIONS * CALLS_PER_SESSION / elapsed


async def throughput_aio() -> float:
    """Calls/s of warm print(1) through cellblock.aio, 100 concurrent sessions."""
    boxes = await asyncio.gather(*(aio.Sandbox(warm=("python",)).open()
                                   for _ in range(CONCURRENT_SESSIONS)))

    async def client(sb: aio.Sandbox) -> None:
        for _ in range(CALLS_PER_SESSION):
            assert (await sb.run_python("print(1)")).stdout == "1\n"

    t = time.perf_counter()
    await asyncio.gather(*(client(sb) for sb in boxes))
    elapsed = time.perf_counter() - t
    await asyncio.gather(*(sb.close() for sb in boxes))
    return CONCURRENT_SESSIONS * CALLS_PER_SESSION / elapsed


def session_cost(proc: subprocess.Popen[bytes], url: str, token: str) -> list[str]:
    """fds and threads of the service process with 0, 10 warm, and 1000 idle sessions open."""
    headers = {"Authorization": f"Bearer {token}"}
    rows = []
    with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
        base_fds, base_threads = process_cost(proc.pid)
        warm = [http.post("/v1/sessions", json={"warm": ["python"]}).json()["id"]
                for _ in range(10)]
        fds, threads = process_cost(proc.pid)
        rows.append(f"| 10 warm Python sessions | {(fds - base_fds) / 10:.1f} | "
                    f"{(threads - base_threads) / 10:.1f} | - |")
        for sid in warm:
            http.delete(f"/v1/sessions/{sid}")
        time.sleep(1)
        base_fds, base_threads = process_cost(proc.pid)
        t = time.perf_counter()
        ids = [http.post("/v1/sessions", json={}).json()["id"] for _ in range(MANY_SESSIONS)]
        opened = time.perf_counter() - t
        fds, threads = process_cost(proc.pid)
        assert len(http.get("/v1/sessions").json()) == MANY_SESSIONS
        probe = http.post(f"/v1/sessions/{ids[-1]}/run", json={"argv": ["echo", "ok"]}).json()
        assert probe["stdout"] == "ok\n", probe
        rows.append(f"| {MANY_SESSIONS} idle sessions (no runtime) | "
                    f"{(fds - base_fds) / MANY_SESSIONS:.1f} | "
                    f"{(threads - base_threads) / MANY_SESSIONS:.2f} | "
                    f"{opened / MANY_SESSIONS * 1000:.1f} |")
        for sid in ids:
            http.delete(f"/v1/sessions/{sid}")
    return rows


async def main() -> None:
    print(environment())
    print()
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, token = start_service(Path(tmp))
        try:
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
                sid = http.post(url + "/v1/sessions", json={"warm": ["python"]}).json()["id"]
                times = await latency(http, url, sid)
                http.delete(f"{url}/v1/sessions/{sid}")
            print(f"Warm stateless `print(1)`, {CALLS} interleaved calls each:")
            print()
            print("| path | p50 ms | p99 ms | mean ms |")
            print("|---|---:|---:|---:|")
            for name, values in times.items():
                print(f"| {name} | {pct(values, 0.5):.2f} | {pct(values, 0.99):.2f} | "
                      f"{statistics.mean(values) * 1000:.2f} |")
            print()
            http_rate = await throughput_http(url, token)
            aio_rate = await throughput_aio()
            print(f"Throughput, {CONCURRENT_SESSIONS} concurrent warm sessions x "
                  f"{CALLS_PER_SESSION} `print(1)` each:")
            print()
            print("| path | calls/s |")
            print("|---|---:|")
            print(f"| HTTP (cellblock serve, httpx.AsyncClient) | {http_rate:.0f} |")
            print(f"| async API (cellblock.aio) | {aio_rate:.0f} |")
            print()
            print("Cost per open session in the service process:")
            print()
            print("| sessions | fds/session | threads/session | ms to open (sequential) |")
            print("|---|---:|---:|---:|")
            for row in session_cost(proc, url, token):
                print(row)
        finally:
            proc.terminate()
            proc.wait(120)


if __name__ == "__main__":
    asyncio.run(main())
