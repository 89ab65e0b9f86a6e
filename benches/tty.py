"""Terminals: keystroke echo round trip, one key typed until its echo is read back.

Every case types into a `cat` waiting on a terminal (canonical mode: the terminal's line
discipline echoes the key; `cat` reads nothing until Enter), so the cases differ only in the
path a key and its echo travel:

- bare pty: a pty of the host, the key written to its master, the echo read from it;
- `script`: `script -q -c cat` on a host pty (a relay process between two ptys, the usual
  baseline for a program that holds a terminal for another);
- tty run (in-process): `Sandbox.run(["cat"], tty=True, tty_input=fd, on_output=...)`, the
  key written to `fd` (as `cellblock run -t`/`cellblock shell --tty` do with the keyboard);
- tty process (in-process): `Sandbox.start(["cat"], tty=True)`, `write_stdin`, output read;
- service WebSocket: `RemoteSandbox.run(..., tty=True, tty_input=fd)` against `cellblock
  serve` in another process (keys and echoes as frames of one WebSocket);
- service HTTP: `RemoteSandbox.start(["cat"], tty=True)`: `write_stdin` (one POST per key),
  the echo from the server-sent event stream of its output.

All cases run side by side, one key each per round, `--runs` rounds (medians of interleaved
runs: drift from the shared machine hits every case alike).

Usage: python benches/tty.py [--runs 300]
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
from _env import percentile, print_environment, table

import cellblock

#: Keys typed: letters (each echoed as one byte); fewer than a canonical line's 4095 in all.
KEYS = b"abcdefghijklmnopqrstuvwxyz"


class Echoes:
    """Counts echoed bytes arriving on another thread; `wait(n)` until n have arrived."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def add(self, data: bytes) -> None:
        with self._cond:
            self.count += len(data)
            self._cond.notify_all()

    def wait(self, n: int, limit: float = 30.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.count >= n, limit):
                raise SystemExit(f"no echo within {limit} s")


class Case:
    """One path: `type(key)` then `wait()` for its echo."""

    def __init__(self, type_key: Callable[[bytes], None], echoes: Echoes) -> None:
        self.type_key = type_key
        self.echoes = echoes
        self.sent = 0

    def __call__(self, key: bytes) -> None:
        self.sent += 1
        self.type_key(key)
        self.echoes.wait(self.sent)


def read_into(fd: int, echoes: Echoes, stop: threading.Event) -> None:
    while not stop.is_set():
        if select.select([fd], [], [], 0.1)[0]:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            echoes.add(data)


@contextmanager
def host_pty(argv: list[str] | None) -> Iterator[Case]:
    """A host pty; with `argv`, a program on its slave (the echo comes through it)."""
    master, slave = os.openpty()
    proc = None
    if argv is not None:
        proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True)
        time.sleep(0.5)  # `script` sets its terminal raw, then starts cat
    echoes, stop = Echoes(), threading.Event()
    reader = threading.Thread(target=read_into, args=(master, echoes, stop), daemon=True)
    reader.start()
    try:
        yield Case(lambda key: os.write(master, key) and None, echoes)
    finally:
        stop.set()
        reader.join()
        if proc is not None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)


@contextmanager
def tty_run(sb: cellblock.Sandbox | cellblock.RemoteSandbox) -> Iterator[Case]:
    """`cat` as a tty run of `sb` with a keyboard pipe; the echo from `on_output`."""
    keys_r, keys_w = os.pipe()
    echoes = Echoes()
    done = threading.Event()

    def run() -> None:
        try:
            sb.run(["cat"], tty=True, tty_input=keys_r, on_output=lambda s, d: echoes.add(d),
                   timeout=3600)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(1.0)  # the sandbox is up and `cat` waits on its terminal
    try:
        yield Case(lambda key: os.write(keys_w, key) and None, echoes)
    finally:
        os.write(keys_w, b"\x04")  # end of file: cat ends
        done.wait(30)
        os.close(keys_w)
        thread.join(30)
        os.close(keys_r)


@contextmanager
def tty_process(sb: cellblock.Sandbox | cellblock.RemoteSandbox) -> Iterator[Case]:
    """`cat` as a tty process of `sb`: `write_stdin`, the echo from its output."""
    proc = sb.start(["cat"], tty=True)
    echoes = Echoes()

    def follow() -> None:
        for chunk in proc.iter_output():
            echoes.add(chunk.data)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(1.0)
    try:
        yield Case(lambda key: proc.write_stdin(key), echoes)
    finally:
        proc.kill()
        thread.join(30)


@contextmanager
def service() -> Iterator[tuple[str, str]]:
    """`cellblock serve` in a process of its own, on loopback; (url, token)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.json"
        cli = [sys.executable, "-m", "cellblock.cli", "serve", "--tokens", str(tokens)]
        token = subprocess.run([*cli, "--add-token", "bench"], check=True,
                               capture_output=True, text=True).stdout.strip()
        port = 19000 + os.getpid() % 1000
        proc = subprocess.Popen([*cli, "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    httpx.get(url + "/v1/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            yield url, token
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    if args.runs + 10 > 4000:
        raise SystemExit("--runs: at most 3990 (one canonical line of keys)")
    print_environment()
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    with ExitStack() as stack:
        url, token = stack.enter_context(service())
        client = stack.enter_context(cellblock.Client(url, token))
        remote = stack.enter_context(client.Sandbox())
        local = stack.enter_context(cellblock.Sandbox())
        cases: dict[str, Case] = {
            "bare pty (host)": stack.enter_context(host_pty(None)),
            "`script -q -c cat` (host)": stack.enter_context(
                host_pty(["script", "-q", "-c", "cat", "/dev/null"])),
            "tty run, in-process (`tty_input`)": stack.enter_context(tty_run(local)),
            "tty process, in-process (`write_stdin`)": stack.enter_context(tty_process(local)),
            "service: tty run over the WebSocket": stack.enter_context(tty_run(remote)),
            "service: tty process, POST stdin + SSE": stack.enter_context(tty_process(remote)),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for i in range(args.runs + 5):
            key = KEYS[i % len(KEYS):][:1]
            for name, case in cases.items():
                t = time.perf_counter()
                case(key)
                if i >= 5:  # the first rounds warm up
                    samples[name].append(time.perf_counter() - t)
        time.sleep(0.5)
        for name, case in cases.items():
            if case.echoes.count != case.sent:  # bytes that are no echo: the timing is void
                raise SystemExit(f"{name}: {case.echoes.count} bytes for {case.sent} keys")
    print(f"Keystroke echo round trip, {args.runs} interleaved keys per case:\n")
    rows = [(name, f"{percentile(xs, 50) * 1000:.3f}", f"{percentile(xs, 99) * 1000:.3f}")
            for name, xs in samples.items()]
    print(table(["path", "p50 ms", "p99 ms"], rows))


if __name__ == "__main__":
    main()
