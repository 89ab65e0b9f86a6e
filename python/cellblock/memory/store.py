"""`MemoryStore`: the agent's memory tiers in one database (SQLite by default, PostgreSQL for
several machines).

- medium-term: per-user files under /memories (what the memory tool edits), kept `ttl_days`
  after their last write and at most `max_entries` per user, the least recently used evicted;
- short-term archive: turns that left the model's context window, searchable;
- long-term: a shared knowledge base (namespace, path, content, version), each refresh a new
  version switched in the same transaction that writes it.

Every query on user data names the user; an expired row is excluded by every read at once
(`expires_at > now`) and deleted by the next sweep.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from cellblock.memory import paths, schema
from cellblock.memory._db import Database, Tx, default_url
from cellblock.memory.config import KnowledgeSource, MemoryConfig
from cellblock.memory.errors import MemoryPathError, MemoryStoreError
from cellblock.memory.search import Hit, fts5_query, message_text, pg_queries, sqlite_queries
from cellblock.memory.sources import read_source

if TYPE_CHECKING:
    from cellblock.memory.checkpoint import Checkpoints

_log = logging.getLogger("cellblock.memory")

DAY = 86_400.0
MAX_USER_CHARS = 200



class Entry(BaseModel):
    """One medium-term memory file."""

    model_config = ConfigDict(frozen=True)

    path: str
    content: str
    created_at: float
    updated_at: float
    accessed_at: float
    expires_at: float


class EntryInfo(BaseModel):
    """A memory file as listed (without its content)."""

    model_config = ConfigDict(frozen=True)

    path: str
    size: int
    updated_at: float
    expires_at: float


def default_user() -> str:
    """`$CELLBLOCK_USER`, else the login name."""
    return os.environ.get("CELLBLOCK_USER") or getpass.getuser()


def check_user(user_id: str) -> str:
    """The user id, if it is a usable one (MemoryStoreError otherwise)."""
    if (not isinstance(user_id, str) or not user_id or len(user_id) > MAX_USER_CHARS
            or not user_id.isprintable()):
        raise MemoryStoreError(f"invalid user id {user_id!r}")
    return user_id


class MemoryStore:
    """The memory tiers and checkpoints in the database at `url` (see `default_url`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        config: MemoryConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url or default_url()
        self.config = config or MemoryConfig()
        self.clock = clock
        self.db = Database(self.url)
        schema.create(self.db)
        self._checkpoints: Checkpoints | None = None

    def close(self) -> None:
        """Closes the database connection."""
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def checkpoints(self) -> Checkpoints:
        """The checkpoints of agent sessions kept in this store."""
        from cellblock.memory.checkpoint import Checkpoints

        if self._checkpoints is None:
            self._checkpoints = Checkpoints(self)
        return self._checkpoints

    @property
    def ttl_seconds(self) -> float:
        return self.config.ttl_days * DAY

    # ---- medium-term: per-user memory files ------------------------------------------------

    def read(self, user_id: str, path: str) -> Entry:
        """The memory file at `path` (its use refreshes its place in the LRU order)."""
        user, path, now = check_user(user_id), paths.normalize(path), self.clock()
        with self.db.transaction() as tx:
            rows = tx.rows(
                "UPDATE memories SET accessed_at = ? WHERE user_id = ? AND path = ? "
                "AND expires_at > ? RETURNING path, content, created_at, updated_at, "
                "accessed_at, expires_at", (now, user, path, now))
        if not rows:
            raise MemoryPathError(f"{path}: no such memory file")
        return Entry(**dict(zip(Entry.model_fields, rows[0], strict=True)))

    def kind(self, user_id: str, path: str) -> Literal["file", "dir"] | None:
        """"file", "dir" (a path some files are under; /memories always is) or None."""
        user, path = check_user(user_id), paths.normalize(path)
        with self.db.read() as tx:
            return self._kind(tx, user, path, self.clock())

    def write(self, user_id: str, path: str, content: str, *, create: bool = False) -> None:
        """Writes the memory file at `path` (with `create`, only if it does not exist), then
        evicts the user's least recently used files beyond `max_entries`."""
        user, path, now = check_user(user_id), paths.normalize(path), self.clock()
        self._check_writable(path)
        if len(content) > self.config.max_entry_chars:
            raise MemoryStoreError(
                f"{path}: {len(content)} characters; a memory file holds at most "
                f"{self.config.max_entry_chars}")
        with self.db.transaction() as tx:
            self._sweep(tx, now)
            kind = self._kind(tx, user, path, now)
            if kind == "dir":
                raise MemoryPathError(f"{path} is a directory")
            if kind == "file" and create:
                raise MemoryPathError(f"{path} already exists")
            self._check_parents(tx, user, path, now)
            tx.run(
                "INSERT INTO memories (user_id, path, content, created_at, updated_at, "
                "accessed_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (user_id, path) DO UPDATE SET content = excluded.content, "
                "updated_at = excluded.updated_at, accessed_at = excluded.accessed_at, "
                "expires_at = excluded.expires_at",
                (user, path, content, now, now, now, now + self.ttl_seconds))
            self._evict(tx, user)

    def delete(self, user_id: str, path: str) -> int:
        """Deletes a memory file or a directory with everything under it; the count deleted."""
        user, path, now = check_user(user_id), paths.normalize(path), self.clock()
        if path == paths.ROOT:
            raise MemoryPathError("the /memories directory itself cannot be deleted")
        self._check_writable(path)
        prefix = paths.child_prefix(path)
        with self.db.transaction() as tx:
            n = tx.run(
                "DELETE FROM memories WHERE user_id = ? AND expires_at > ? AND "
                "(path = ? OR substr(path, 1, ?) = ?)", (user, now, path, len(prefix), prefix))
        if n == 0:
            raise MemoryPathError(f"{path}: no such memory file or directory")
        return n

    def rename(self, user_id: str, old: str, new: str) -> int:
        """Moves a memory file or directory; the destination must not exist."""
        user, now = check_user(user_id), self.clock()
        old, new = paths.normalize(old), paths.normalize(new)
        for p in (old, new):
            self._check_writable(p)
        if old == paths.ROOT:
            raise MemoryPathError("the /memories directory itself cannot be renamed")
        if paths.is_under(new, old):
            raise MemoryPathError(f"cannot move {old} inside itself")
        with self.db.transaction() as tx:
            self._sweep(tx, now)
            kind = self._kind(tx, user, old, now)
            if kind is None:
                raise MemoryPathError(f"{old}: no such memory file or directory")
            if self._kind(tx, user, new, now) is not None:
                raise MemoryPathError(f"the destination {new} already exists")
            self._check_parents(tx, user, new, now)
            prefix = paths.child_prefix(old)
            return tx.run(
                "UPDATE memories SET path = ? || substr(path, ?), updated_at = ?, "
                "accessed_at = ?, expires_at = ? WHERE user_id = ? AND "
                "(path = ? OR substr(path, 1, ?) = ?)",
                (new, len(old) + 1, now, now, now + self.ttl_seconds, user, old,
                 len(prefix), prefix))

    def entries(self, user_id: str, directory: str = paths.ROOT) -> list[EntryInfo]:
        """The user's live memory files under `directory`, sorted by path."""
        user, directory, now = check_user(user_id), paths.normalize(directory), self.clock()
        prefix = paths.child_prefix(directory)
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT path, length(content), updated_at, expires_at FROM memories "
                "WHERE user_id = ? AND expires_at > ? AND substr(path, 1, ?) = ? ORDER BY path",
                (user, now, len(prefix), prefix))
        return [EntryInfo(path=r[0], size=r[1], updated_at=r[2], expires_at=r[3]) for r in rows]

    def forget(self, user_id: str, path: str | None = None) -> int:
        """Deletes one memory path, or (without `path`) everything kept for the user: memory
        files, archived turns, agent sessions with their checkpoints and the workspace blobs
        only they referenced, in one transaction. Returns the number of files, turns and
        sessions deleted."""
        if path is not None:
            return self.delete(user_id, path)
        user = check_user(user_id)
        with self.db.transaction() as tx:
            return (tx.run("DELETE FROM memories WHERE user_id = ?", (user,))
                    + tx.run("DELETE FROM turns WHERE user_id = ?", (user,))
                    + self.checkpoints.forget(user))

    def sweep(self) -> int:
        """Deletes every expired memory file and archived turn, finished agent sessions
        `finished_session_ttl_days` after they finished and other sessions untouched for
        `ttl_days` (with their checkpoints); the count deleted."""
        now = self.clock()
        with self.db.transaction() as tx:
            return self._sweep(tx, now) + self.checkpoints.expire(
                now, self.config.finished_session_ttl_days * DAY, self.ttl_seconds)

    def export(self, user_id: str) -> dict[str, Any]:
        """Everything live kept for the user, as JSON-ready data: memory files, archived
        turns, agent sessions with their kept checkpoints, and the workspace blobs those
        reference (base64)."""
        user, now = check_user(user_id), self.clock()
        with self.db.read() as tx:
            files = tx.rows(
                "SELECT path, content, created_at, updated_at, accessed_at, expires_at "
                "FROM memories WHERE user_id = ? AND expires_at > ? ORDER BY path", (user, now))
            turns = tx.rows(
                "SELECT session_id, turn, created_at, message FROM turns WHERE user_id = ? "
                "AND expires_at > ? ORDER BY session_id, turn", (user, now))
        return {
            "user": user,
            "memories": [dict(zip(Entry.model_fields, r, strict=True)) for r in files],
            "archived_turns": [
                {"session_id": r[0], "turn": r[1], "created_at": r[2],
                 "message": json.loads(r[3])} for r in turns],
            **self.checkpoints.export(user),
        }

    # ---- short-term: turns archived when they leave the context window ---------------------

    def archive_turn(self, user_id: str, session_id: str, turn: int,
                     messages: Sequence[Mapping[str, Any]]) -> None:
        """Archives the messages of one turn that left the model's context."""
        user, now = check_user(user_id), self.clock()
        with self.db.transaction() as tx:
            tx.many(
                "INSERT INTO turns (user_id, session_id, turn, created_at, expires_at, message, "
                "body) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(user, session_id, turn, now, now + self.ttl_seconds,
                  json.dumps(m, ensure_ascii=False), message_text(m)) for m in messages])
            over = tx.rows("SELECT count(*) FROM turns WHERE user_id = ?", (user,))[0][0] \
                - self.config.max_archived_messages
            if over > 0:
                tx.run("DELETE FROM turns WHERE id IN (SELECT id FROM turns WHERE user_id = ? "
                       "ORDER BY id LIMIT ?)", (user, over))

    def archived_turns(self, user_id: str, session_id: str) -> list[tuple[int, dict[str, Any]]]:
        """(turn, message) of a session's archived turns, oldest first."""
        user, now = check_user(user_id), self.clock()
        with self.db.read() as tx:
            rows = tx.rows("SELECT turn, message FROM turns WHERE user_id = ? AND session_id = ? "
                           "AND expires_at > ? ORDER BY turn, id", (user, session_id, now))
        return [(r[0], json.loads(r[1])) for r in rows]

    # ---- long-term: the shared knowledge base ----------------------------------------------

    def refresh_knowledge(self, namespace: str, documents: Mapping[str, str], *,
                          unless_newer_than: float | None = None) -> int:
        """Writes `documents` (relative path -> text) as the next version of `namespace` and
        makes it current in the same transaction; older versions are deleted. Returns the
        current version; with `unless_newer_than` (seconds), nothing is written when the
        current version is younger (another machine refreshed it meanwhile)."""
        KnowledgeSource(namespace=namespace, directory=Path("."))  # validates the name
        docs = {self._knowledge_path(namespace, p): text for p, text in documents.items()}
        now = self.clock()
        with self.db.transaction() as tx:
            if self.db.dialect == "postgresql":
                # One refresh of a namespace at a time across machines (SQLite: BEGIN
                # IMMEDIATE already serialises writers).
                tx.rows("SELECT pg_advisory_xact_lock(hashtext(?))", (namespace,))
            rows = tx.rows("SELECT version, refreshed_at FROM knowledge_versions "
                           "WHERE namespace = ?", (namespace,))
            if rows and unless_newer_than is not None and rows[0][1] + unless_newer_than > now:
                return int(rows[0][0])
            version = (rows[0][0] if rows else 0) + 1
            tx.many("INSERT INTO knowledge (namespace, version, path, content) "
                    "VALUES (?, ?, ?, ?)",
                    [(namespace, version, p, text) for p, text in sorted(docs.items())])
            tx.run("INSERT INTO knowledge_versions (namespace, version, refreshed_at) "
                   "VALUES (?, ?, ?) ON CONFLICT (namespace) DO UPDATE SET "
                   "version = excluded.version, refreshed_at = excluded.refreshed_at",
                   (namespace, version, now))
            tx.run("DELETE FROM knowledge WHERE namespace = ? AND version < ?",
                   (namespace, version))
        return version

    def refresh_due(self, sources: Sequence[KnowledgeSource] | None = None) -> list[str]:
        """Refreshes each source whose namespace is older than `refresh_interval_hours`
        (or was never loaded); the namespaces refreshed. A source that cannot be read (its
        directory gone) is logged and keeps its current version: agents still start."""
        refreshed = []
        interval = self.config.refresh_interval_hours * 3600
        for source in self.config.sources if sources is None else sources:
            with self.db.read() as tx:
                rows = tx.rows("SELECT refreshed_at FROM knowledge_versions WHERE namespace = ?",
                               (source.namespace,))
            if rows and rows[0][0] + interval > self.clock():
                continue
            before = self.knowledge_version(source.namespace)
            try:
                documents = read_source(source)
            except MemoryStoreError as e:
                _log.warning("knowledge source %s not refreshed: %s", source.namespace, e)
                continue
            if self.refresh_knowledge(source.namespace, documents,
                                      unless_newer_than=interval) != before:
                refreshed.append(source.namespace)
        return refreshed

    def knowledge_version(self, namespace: str) -> int | None:
        """The current version of a namespace (None before its first refresh)."""
        with self.db.read() as tx:
            rows = tx.rows("SELECT version FROM knowledge_versions WHERE namespace = ?",
                           (namespace,))
        return int(rows[0][0]) if rows else None

    def list_knowledge(self, directory: str = paths.KNOWLEDGE_ROOT) -> list[EntryInfo]:
        """Current knowledge documents under `directory` (a /memories/knowledge/... path)."""
        directory = paths.normalize(directory)
        prefix = paths.child_prefix(directory)
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT k.path, length(k.content), v.refreshed_at FROM knowledge k "
                "JOIN knowledge_versions v ON v.namespace = k.namespace AND "
                "v.version = k.version WHERE substr(k.path, 1, ?) = ? ORDER BY k.path",
                (len(prefix), prefix))
        return [EntryInfo(path=r[0], size=r[1], updated_at=r[2], expires_at=float("inf"))
                for r in rows]

    def read_knowledge(self, path: str) -> str:
        """The current text of a knowledge document (/memories/knowledge/NS/...)."""
        path = paths.normalize(path)
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT k.content FROM knowledge k JOIN knowledge_versions v ON "
                "v.namespace = k.namespace AND v.version = k.version WHERE k.path = ?", (path,))
        if not rows:
            raise MemoryPathError(f"{path}: no such knowledge document")
        return str(rows[0][0])

    # ---- search ----------------------------------------------------------------------------

    def search(self, user_id: str, query: str, limit: int = 10) -> list[Hit]:
        """Full-text search of the user's memory files, the user's archived turns and the
        shared knowledge base (at most `limit` hits from each)."""
        user, now = check_user(user_id), self.clock()
        limit = max(1, min(limit, 100))
        hits: list[Hit] = []
        with self.db.read() as tx:
            if self.db.dialect == "sqlite":
                q = fts5_query(query)
                if q is None:
                    return []
                sources = sqlite_queries(q, user, now, limit)
            else:
                sources = pg_queries(query, user, now, limit)
            for tier, sql, params in sources:
                hits += [Hit(tier=tier, ref=r[0], snippet=r[1]) for r in tx.rows(sql, params)]
        return hits

    # ---- helpers ---------------------------------------------------------------------------

    def _sweep(self, tx: Tx, now: float) -> int:
        return (tx.run("DELETE FROM memories WHERE expires_at <= ?", (now,))
                + tx.run("DELETE FROM turns WHERE expires_at <= ?", (now,)))

    def _evict(self, tx: Tx, user: str) -> None:
        over = tx.rows("SELECT count(*) FROM memories WHERE user_id = ?", (user,))[0][0] \
            - self.config.max_entries
        if over > 0:
            tx.run("DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE user_id = ? "
                   "ORDER BY accessed_at, id LIMIT ?)", (user, over))

    def _kind(self, tx: Tx, user: str, path: str, now: float) -> Literal["file", "dir"] | None:
        if path == paths.ROOT:
            return "dir"
        if tx.rows("SELECT 1 FROM memories WHERE user_id = ? AND path = ? AND expires_at > ?",
                   (user, path, now)):
            return "file"
        prefix = paths.child_prefix(path)
        if tx.rows("SELECT 1 FROM memories WHERE user_id = ? AND expires_at > ? AND "
                   "substr(path, 1, ?) = ? LIMIT 1", (user, now, len(prefix), prefix)):
            return "dir"
        return None

    def _check_parents(self, tx: Tx, user: str, path: str, now: float) -> None:
        parent = path.rsplit("/", 1)[0]
        while parent != paths.ROOT:
            if self._kind(tx, user, parent, now) == "file":
                raise MemoryPathError(f"{parent} is a file, not a directory")
            parent = parent.rsplit("/", 1)[0]

    @staticmethod
    def _check_writable(path: str) -> None:
        if paths.is_under(path, paths.KNOWLEDGE_ROOT):
            raise MemoryPathError(f"{path}: the shared knowledge base is read-only")

    @staticmethod
    def _knowledge_path(namespace: str, relative: str) -> str:
        return paths.normalize(f"{paths.KNOWLEDGE_ROOT}/{namespace}/{relative.strip('/')}")
