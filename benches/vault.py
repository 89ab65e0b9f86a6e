"""Vault cost: what opening a session's credentials (`Vault.resolve`) and `Vault.add` take.

`resolve` reads the file, checks its HMAC and opens the session's entries (AES-256-GCM); `add`
does the same under an exclusive flock, then writes a temp file, fsyncs it and renames it (the
fsyncs dominate, and depend on the disk). Prints a markdown table of medians for vaults of 10,
100 and 1000 entries, in the directory given as argv[1] (default: a temporary one, removed after).
"""

from __future__ import annotations

import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr

from cellblock.credentials import Credential
from cellblock.vault import Vault

RUNS = 30


def cred(name: str) -> Credential:
    return Credential(name=name, value=SecretStr(secrets.token_urlsafe(30)),
                      hosts=["api.example.test"], methods=["GET"], header="Authorization")


def median_ms(fn: object, runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    if len(sys.argv) > 1:
        measure(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            measure(Path(tmp))


def measure(base: Path) -> None:
    print("| entries | resolve 1 session + 3 agent credentials (ms) | add (ms) | file (kB) |")
    print("|---:|---:|---:|---:|")
    for n in (10, 100, 1000):
        path = base / f"vault-{n}.json"
        v = Vault(path, key=secrets.token_bytes(32))
        for i in range(n - 3):
            v.add(cred(f"C{i}"))
        for i in range(3):
            v.add(cred(f"A{i}"), agent="reviewer")
        resolve = median_ms(lambda v=v: v.resolve(["C0"], agent="reviewer"))
        counter = iter(range(10**6))
        add = median_ms(lambda v=v, c=counter: v.add(cred(f"N{next(c)}")), runs=10)
        print(f"| {n} | {resolve:.2f} | {add:.2f} | {path.stat().st_size / 1000:.0f} |")


if __name__ == "__main__":
    main()
