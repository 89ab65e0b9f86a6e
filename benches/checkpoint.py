"""Checkpoint cost for a 50 MB workspace with 1 % of its files changed between checkpoints
(issue 19), against a full copy of the workspace.

The workspace is 500 files of 100 kB (random, incompressible) in a real `cellblock.Sandbox`.
Each round rewrites 5 files (1 %), then measures, in rotating order:
- cellblock: `snapshot_workspace` (every file read through the public files API and hashed)
  + `Checkpoints.save` into SQLite (only blobs the store lacks are written; 10 kept);
- full copy: `Sandbox.download` of the workspace to a new host directory;
- full snapshot row: every file inserted again into SQLite without content addressing (what a
  saver that stores a whole snapshot per step does).
Data written is the new content stored (new blobs, or every file again); file growth is the
change in size of the database (+ WAL) or copy directory, which for cellblock stays near zero
as pages freed by pruning are reused. The last line shows the storage held after all rounds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benches"))

from _env import print_environment_table

import cellblock
from cellblock.memory import CheckpointConfig, MemoryStore
from cellblock.memory.checkpoint import snapshot_workspace

FILES = 500
FILE_BYTES = 100_000
CHANGED = FILES // 100
ROUNDS = 12
KEEP = 10


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cellblock-ckpt-bench-"))
    names = [f"data/d{i % 10}/f{i:03d}.bin" for i in range(FILES)]
    with cellblock.Sandbox(disk="256M") as sb:
        for name in names:
            sb.write_file(name, os.urandom(FILE_BYTES))
        db = tmp / "store.db"
        store = MemoryStore(f"sqlite://{db}")
        config = CheckpointConfig(max_checkpoints=KEEP)
        lease = store.checkpoints.start("bench", "bench")
        t = time.perf_counter()
        store.checkpoints.save(lease, {"round": 0}, snapshot_workspace(sb), config=config)
        first_s, first_b = time.perf_counter() - t, disk_bytes(db)

        full = sqlite3.connect(tmp / "full.db", isolation_level=None)
        full.execute("PRAGMA journal_mode=WAL")
        full.execute("CREATE TABLE snap (round INTEGER, path TEXT, data BLOB)")

        def blob_sizes() -> dict[str, int]:
            with store.db.transaction() as tx:
                return {h: n for h, n in tx.rows("SELECT hash, size FROM blobs")}

        def cellblock_ckpt(r: int) -> tuple[float, int, int]:
            known, before = blob_sizes(), disk_bytes(db)
            t = time.perf_counter()
            store.checkpoints.save(lease, {"round": r}, snapshot_workspace(sb), config=config)
            elapsed = time.perf_counter() - t
            written = sum(n for h, n in blob_sizes().items() if h not in known)
            return elapsed, written, disk_bytes(db) - before

        def full_copy(r: int) -> tuple[float, int, int]:
            dst = tmp / f"copy{r}"
            t = time.perf_counter()
            sb.download("/workspace", dst)
            elapsed = time.perf_counter() - t
            return elapsed, tree_bytes(dst), tree_bytes(dst)

        def full_row(r: int) -> tuple[float, int, int]:
            before = disk_bytes(tmp / "full.db")
            t = time.perf_counter()
            files = snapshot_workspace(sb)
            full.execute("BEGIN")
            full.executemany("INSERT INTO snap VALUES (?, ?, ?)",
                             [(r, p, d) for p, d in files.items() if d is not None])
            full.execute("COMMIT")
            elapsed = time.perf_counter() - t
            written = sum(len(d) for d in files.values() if d is not None)
            return elapsed, written, disk_bytes(tmp / "full.db") - before

        def read_only(r: int) -> tuple[float, int, int]:
            t = time.perf_counter()
            for d in snapshot_workspace(sb).values():
                if d is not None:
                    hashlib.sha256(d).digest()
            return time.perf_counter() - t, 0, 0

        cases = {"cellblock checkpoint (content-addressed)": cellblock_ckpt,
                 "full copy (Sandbox.download)": full_copy,
                 "full snapshot row in SQLite": full_row,
                 "  of which: reading + hashing the workspace": read_only}
        samples: dict[str, list[tuple[float, int, int]]] = {k: [] for k in cases}
        order = list(cases)
        for r in range(1, ROUNDS + 1):
            for i in range(CHANGED):
                sb.write_file(names[(r * 37 + i * 101) % FILES], os.urandom(FILE_BYTES))
            order = order[1:] + order[:1]
            for name in order:
                samples[name].append(cases[name](r))
        held = store.checkpoints.storage()
        store_disk = disk_bytes(db)
        copies_disk = sum(tree_bytes(tmp / f"copy{r}") for r in range(1, ROUNDS + 1))
        store.close()
        full.close()
    shutil.rmtree(tmp)

    mb = 1e6
    print(f"## Checkpoints: {FILES} files x {FILE_BYTES // 1000} kB = "
          f"{FILES * FILE_BYTES / mb:.0f} MB workspace, {CHANGED} files (1 %) changed per "
          f"checkpoint, median of {ROUNDS} interleaved rounds")
    print()
    print("| method | time per checkpoint | data written per checkpoint | file growth per "
          "checkpoint |")
    print("| --- | ---: | ---: | ---: |")
    for name in cases:
        t, written, growth = (statistics.median(x[i] for x in samples[name]) for i in range(3))
        sizes = (f"{written / mb:.2f} MB | {growth / mb:.2f} MB" if name.strip() == name
                 else "- | -")
        print(f"| {name} | {t * 1000:.0f} ms | {sizes} |")
    print()
    print(f"First checkpoint (every blob new): {first_s * 1000:.0f} ms, {first_b / mb:.1f} MB. "
          f"After {ROUNDS + 1} checkpoints with {KEEP} kept: store {store_disk / mb:.1f} MB on "
          f"disk ({held['blobs']} blobs, {held['blob_bytes'] / mb:.1f} MB live); "
          f"{ROUNDS} full copies: {copies_disk / mb:.0f} MB.")
    print()
    print_environment_table()
    print(f"| load average (1 min) at start | {os.getloadavg()[0]:.2f} |")


if __name__ == "__main__":
    main()
