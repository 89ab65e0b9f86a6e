"""One connection to the store's database, SQLite or PostgreSQL, behind the same small API.

SQL is written once with `?` placeholders (rewritten to `%s` for psycopg) and never contains a
literal `?` or `%`. Every write goes through `transaction()`: SQLite takes the write lock at
BEGIN (IMMEDIATE), so two processes never interleave a read-modify-write. Pure reads go through
`read()`: a deferred transaction that only reads a snapshot of the WAL, so a reader (even one
paused with its transaction open) never blocks a writer, and a writer never blocks it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from cellblock.memory.errors import MemoryStoreError

Dialect = Literal["sqlite", "postgresql"]
Params = Sequence[Any]

#: SQLite waits this long for another process's write lock before failing.
BUSY_TIMEOUT_MS = 30_000

#: SQLite's WAL file is truncated back to this size after a checkpoint (bytes).
WAL_SIZE_LIMIT = 4 << 20


def default_url() -> str:
    """`$CELLBLOCK_MEMORY_URL`, else a SQLite file under the user's data directory
    (`$XDG_DATA_HOME/cellblock/memory.db`, by default `~/.local/share/cellblock/memory.db`)."""
    url = os.environ.get("CELLBLOCK_MEMORY_URL")
    if url:
        return url
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"sqlite://{Path(base) / 'cellblock' / 'memory.db'}"


class Tx:
    """Statements of one transaction."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def rows(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Runs a statement and returns its rows."""
        self._execute(sql, params)
        return list(self._cursor.fetchall()) if self._cursor.description else []

    def run(self, sql: str, params: Params = ()) -> int:
        """Runs a statement and returns the number of rows it changed."""
        self._execute(sql, params)
        return int(self._cursor.rowcount)

    def many(self, sql: str, seq: Sequence[Params]) -> None:
        """Runs a statement once per parameter tuple."""
        if seq:
            self._cursor.executemany(self._sql(sql), seq)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._dialect == "postgresql" else sql

    def _execute(self, sql: str, params: Params) -> None:
        self._cursor.execute(self._sql(sql), tuple(params))


class Database:
    """A connection to `url`: `sqlite://PATH` (so `sqlite:///abs/path`), a plain file path,
    `sqlite://:memory:`, or `postgresql://...`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        #: Transactions open on this connection (the lock's owner's): >1 means savepoints.
        self._depth = 0
        #: The outermost open transaction is a `read()` (a write inside it is refused).
        self._reading = False
        self.dialect: Dialect
        if url.startswith(("postgresql://", "postgres://")):
            self.dialect = "postgresql"
            self._conn = _connect_postgres(url)
        elif url.startswith("sqlite://") or "://" not in url:
            self.dialect = "sqlite"
            self.path = url.removeprefix("sqlite://")
            self._conn = _connect_sqlite(self.path)
        else:
            raise MemoryStoreError(f"unsupported store URL {url!r}: use sqlite:///PATH or "
                                   "postgresql://...")

    def close(self) -> None:
        """Closes the connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises. Opened
        inside another transaction of this connection, it is a savepoint of that one: its
        statements commit with the outer transaction (so a memory-tool operation and the
        record that it was applied are one commit), and it alone is undone if it raises."""
        with self._lock:
            if self._reading:
                # SQLite would upgrade the read snapshot to a write lock, which fails at once
                # (SQLITE_BUSY, no busy wait) whenever another process wrote since it began.
                raise MemoryStoreError("a write transaction cannot be opened inside read()")
            nested = self._depth > 0
            self._depth += 1
            try:
                if self.dialect == "sqlite":
                    cur = self._conn.cursor()
                    cur.execute("SAVEPOINT nested" if nested else "BEGIN IMMEDIATE")
                    try:
                        yield Tx(cur, "sqlite")
                    except BaseException:
                        if nested:
                            cur.execute("ROLLBACK TO nested")
                            cur.execute("RELEASE nested")
                        else:
                            self._conn.rollback()
                        raise
                    if nested:
                        cur.execute("RELEASE nested")
                    else:
                        self._conn.commit()
                else:
                    # psycopg makes a nested transaction() a savepoint by itself.
                    with self._conn.transaction(), self._conn.cursor() as cur:
                        yield Tx(cur, "postgresql")
            except (sqlite3.Error, _pg_error()) as e:
                raise MemoryStoreError(f"{type(e).__name__}: {e}") from e
            finally:
                self._depth -= 1

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction: one consistent snapshot, ended when the block ends. SQLite:
        a deferred transaction, which takes no write lock, so writers of other connections go
        on while it is open (WAL); it is rolled back at the end, and a write made in it raises
        MemoryStoreError (PostgreSQL: a READ ONLY transaction refuses it). Inside another
        transaction of this connection, it reads in that one."""
        with self._lock:
            outer = self._depth == 0
            self._depth += 1
            self._reading = self._reading or outer
            try:
                if not outer:
                    yield Tx(self._conn.cursor(), self.dialect)
                elif self.dialect == "sqlite":
                    cur = self._conn.cursor()
                    changes = self._conn.total_changes
                    cur.execute("BEGIN DEFERRED")
                    try:
                        yield Tx(cur, "sqlite")
                    finally:
                        self._conn.rollback()  # ends the snapshot; undoes any write
                    if self._conn.total_changes != changes:
                        raise MemoryStoreError("a write inside read() (rolled back)")
                else:
                    self._conn.read_only = True  # BEGIN READ ONLY (no extra round trip)
                    try:
                        with self._conn.transaction(), self._conn.cursor() as cur:
                            yield Tx(cur, "postgresql")
                    finally:
                        self._conn.read_only = None
            except (sqlite3.Error, _pg_error()) as e:
                raise MemoryStoreError(f"{type(e).__name__}: {e}") from e
            finally:
                if outer:
                    self._reading = False
                self._depth -= 1

    def script(self, statements: Sequence[str]) -> None:
        """Runs schema statements, each on its own (outside of a transaction in SQLite)."""
        with self._lock:
            try:
                cur = self._conn.cursor()
                for sql in statements:
                    cur.execute(sql)
                if self.dialect == "sqlite":
                    self._conn.commit()
            except (sqlite3.Error, _pg_error()) as e:
                raise MemoryStoreError(f"{type(e).__name__}: {e}") from e

    def compact(self) -> None:
        """SQLite: returns free pages to the file system and copies the WAL into the database
        (PASSIVE: never waits for other processes' readers; the next write then restarts the
        WAL, truncated to WAL_SIZE_LIMIT). PostgreSQL reclaims space with autovacuum."""
        if self.dialect != "sqlite":
            return
        with self._lock:
            if self._depth:
                return  # inside a transaction: the next compaction outside one does it
            cur = self._conn.cursor()
            cur.execute("PRAGMA incremental_vacuum")
            cur.fetchall()
            cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cur.fetchall()


def _connect_sqlite(path: str) -> sqlite3.Connection:
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _create_private(path)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        # auto_vacuum must be chosen before the first table exists; a no-op afterwards.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=ON")
    except (sqlite3.Error, OSError) as e:
        raise MemoryStoreError(f"cannot open {path}: {e}") from e
    # Explicit transactions only (Database.transaction and Database.read).
    conn.isolation_level = None
    return conn


#: Serialises `_create_private` between the threads of this process.
_CREATE_LOCK = threading.Lock()


def _create_private(path: str) -> None:
    """Creates the database file readable by its owner only (SQLite gives the -wal/-shm files
    the same mode), if it does not exist. An existing file is never opened here: closing any
    descriptor of a file drops every POSIX lock this process holds on it, so an open/close
    while another connection of this process is in a transaction lets other processes write
    under it (seen as "disk I/O error", "file is not a database" or a corrupt file). A file
    created here is new: only a thread of this process racing through this function could
    have opened it, and the lock keeps it out until the descriptor is closed."""
    with _CREATE_LOCK:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return
        os.close(fd)


def _connect_postgres(url: str) -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise MemoryStoreError(
            "PostgreSQL needs psycopg: pip install 'cellblock[postgres]'") from e
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as e:
        raise MemoryStoreError(f"cannot connect to PostgreSQL: {e}") from e


def _pg_error() -> type[Exception]:
    """psycopg's base error class when psycopg is installed (a class never raised otherwise)."""
    try:
        import psycopg
    except ImportError:
        return _NeverRaised
    return psycopg.Error


class _NeverRaised(Exception):
    pass
