"""A private PostgreSQL server for the memory tests: initdb + pg_ctl in a temp directory,
listening only on a unix socket there (no TCP), run as uid 65534 when the tests run as root
(postgres refuses root), stopped and deleted at the end. No system cluster is touched."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

NOBODY = 65534
_names = itertools.count(1)


def pg_bindir() -> Path:
    """Debian's PostgreSQL binaries (the `postgresql` package), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not found:
        raise RuntimeError("PostgreSQL is not installed: make deps installs Debian's postgresql")
    return Path(found[0]).parent


class PostgresServer:
    """A running private server; `new_database()` gives each test its own database URL."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket_dir = root / "sock"
        self.data = root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://cellblock@/{dbname}?host={self.socket_dir}"

    def new_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Starts the server; stops it (immediate shutdown) and removes its files afterwards."""
    bindir = pg_bindir()
    root = Path(tempfile.mkdtemp(prefix="cellblock-pg-"))
    server = PostgresServer(root)
    server.socket_dir.mkdir()
    if os.geteuid() == 0:
        for p in (root, server.socket_dir):
            os.chown(p, NOBODY, NOBODY)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C", "LC_ALL": "C"}

    def run(argv: list[str]) -> None:
        subprocess.run(_as_server_user(argv), cwd=root, env=env, check=True,
                       capture_output=True, timeout=120)

    started = False
    try:
        run([str(bindir / "initdb"), "-D", str(server.data), "-U", "cellblock", "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync"])
        options = (f"-k {server.socket_dir} -c listen_addresses='' -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=40"
                   # Shared memory in the data directory, not the host's /dev/shm: nothing of
                   # the server outlives its temp dir, even after an immediate stop.
                   " -c dynamic_shared_memory_type=mmap")
        run([str(bindir / "pg_ctl"), "-D", str(server.data), "-l", str(root / "log"), "-w",
             "-t", "60", "-o", options, "start"])
        started = True
        yield server
    finally:
        if started:
            subprocess.run(_as_server_user([
                str(bindir / "pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w",
                "stop"]), cwd=root, env=env, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A private server for the tests of one module (import this fixture into the module)."""
    with postgres_server() as server:
        yield server
