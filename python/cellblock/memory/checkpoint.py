"""Checkpoints of agent sessions: state and workspace files in one transaction, bounded.

A checkpoint is a JSON state (conversation, agent state, budget spent, pending tool results)
plus the session's workspace as (path, sha256) rows; file contents are content-addressed
blobs, so a file unchanged since an earlier checkpoint is stored once. Saving inserts only the
blobs the database lacks, then deletes the session's checkpoints beyond `max_checkpoints` and
the blobs no checkpoint references any more, all in the same transaction.

Fencing: each run of a session holds a generation number (`Lease`). Starting or resuming a
session increments it; a save whose generation is no longer the session's fails with
StaleCheckpoint inside its transaction, so a stale process cannot write over a newer run.

The tool-call journal (`journal`, `journal_entry`) records, per session and tool_use id, a
sandbox tool call about to run (`started`) or a memory-tool call applied (`done`, in the same
transaction as the call's own writes); the agent consults it so that no call runs twice
across kills (see `cellblock.memory.agent.Persistence.run_tool`).

PostgreSQL, several machines: checkpoint_files.hash references blobs; a save locks the blobs
it reuses and a prune skips locked ones, so a blob is never deleted under a checkpoint that
is being written (`_store_blobs`, `_delete_unreferenced`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from cellblock.memory._db import Tx
from cellblock.memory.config import CheckpointConfig
from cellblock.memory.errors import CheckpointNotFound, MemoryStoreError, StaleCheckpoint
from cellblock.memory.store import check_user

if TYPE_CHECKING:
    from cellblock.files import DirEntry
    from cellblock.memory.store import MemoryStore

#: Where a session's files live in its sandbox.
WORKSPACE = "/workspace"

#: Hashes looked up per query when checking which blobs exist.
_CHUNK = 500

#: Times a save inserts blobs that other sessions' prunes keep deleting before it gives up.
_INSERT_ROUNDS = 5

#: A workspace snapshot: relative path -> content, or None for a directory.
Files = Mapping[str, bytes | None]


class Lease(BaseModel):
    """The right of one run to write a session's checkpoints (its fencing token)."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    user_id: str
    generation: int


class FileRef(BaseModel):
    """A workspace entry of a checkpoint."""

    model_config = ConfigDict(frozen=True)

    path: str
    kind: Literal["file", "dir"]
    hash: str | None


class Checkpoint(BaseModel):
    """A saved checkpoint (its files are references to blobs: see `Checkpoints.blob`)."""

    model_config = ConfigDict(frozen=True)

    id: str
    session_id: str
    seq: int
    generation: int
    created_at: float
    reason: str
    state: dict[str, Any]
    files: list[FileRef]


class JournalEntry(BaseModel):
    """A tool call in the journal: `started` (a sandbox tool about to run) or `done` (a
    memory-tool operation applied, with its outcome as JSON)."""

    model_config = ConfigDict(frozen=True)

    state: Literal["started", "done"]
    outcome: str | None


class SessionInfo(BaseModel):
    """An agent session with checkpoints."""

    model_config = ConfigDict(frozen=True)

    id: str
    user_id: str
    task: str
    status: str
    generation: int
    updated_at: float
    checkpoints: int


def digest(data: bytes) -> str:
    """The content address of a blob."""
    return hashlib.sha256(data).hexdigest()


class Checkpoints:
    """The checkpoint tables of a MemoryStore."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.db = store.db
        #: path -> (content, digest) of the last save's files (see `_digests`).
        self._last_digests: dict[str, tuple[bytes, str]] = {}

    def start(self, user_id: str, task: str, session_id: str | None = None) -> Lease:
        """Creates a session (generation 1) and returns its lease."""
        user, now = check_user(user_id), self.store.clock()
        sid = session_id or f"sess_{secrets.token_hex(8)}"
        with self.db.transaction() as tx:
            tx.run("INSERT INTO agent_sessions (id, user_id, task, generation, status, "
                   "created_at, updated_at) VALUES (?, ?, ?, 1, 'running', ?, ?)",
                   (sid, user, task, now, now))
        return Lease(session_id=sid, user_id=user, generation=1)

    def take_over(self, user_id: str, session_id: str) -> Lease:
        """A new lease on one of the user's sessions: every older lease becomes stale. The
        status is left as it is (a save sets it): resuming a finished session, which only
        returns its result, leaves it finished."""
        user = check_user(user_id)
        with self.db.transaction() as tx:
            rows = tx.rows("UPDATE agent_sessions SET generation = generation + 1 "
                           "WHERE id = ? AND user_id = ? RETURNING generation",
                           (session_id, user))
        if not rows:
            raise CheckpointNotFound(f"no agent session {session_id!r} of user {user!r}")
        return Lease(session_id=session_id, user_id=user, generation=rows[0][0])

    def save(self, lease: Lease, state: Mapping[str, Any], files: Files, *,
             reason: str = "tool_call", config: CheckpointConfig | None = None,
             status: str = "running", completed: Collection[str] = ()) -> str:
        """Writes a checkpoint and prunes old ones in one transaction; returns its id.
        `completed`: the tool_use ids whose results the state holds (their journal rows are
        deleted once every kept checkpoint holds them)."""
        config = config or CheckpointConfig()
        hashes = self._digests(files)
        blobs = {hashes[p]: data for p, data in files.items() if data is not None}
        refs = [(p, "dir" if d is None else "file", hashes.get(p))
                for p, d in sorted(files.items())]
        state_json = json.dumps(state, ensure_ascii=False)
        now = self.store.clock()
        with self.db.transaction() as tx:
            self._fence(tx, lease, now, status)
            seq = tx.rows("SELECT coalesce(max(seq), 0) + 1 FROM checkpoints "
                          "WHERE session_id = ?", (lease.session_id,))[0][0]
            cid = f"ckpt_{lease.session_id.removeprefix('sess_')}_{seq}"
            self._store_blobs(tx, blobs)
            tx.run("INSERT INTO checkpoints (id, session_id, seq, generation, created_at, "
                   "reason, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (cid, lease.session_id, seq, lease.generation, now, reason, state_json))
            tx.many("INSERT INTO checkpoint_files (checkpoint_id, path, kind, hash) "
                    "VALUES (?, ?, ?, ?)", [(cid, p, k, h) for p, k, h in refs])
            self._mark_saved(tx, lease.session_id, seq, completed)
            self._prune(tx, lease.session_id, config.max_checkpoints)
        if seq % config.compact_every == 0:
            self.db.compact()
        return str(cid)

    def _digests(self, files: Files) -> dict[str, str]:
        """The digest of each file's content. The same bytes object as in the previous save
        (a snapshot reused: nothing changed the workspace) is not hashed again."""
        out: dict[str, str] = {}
        for p, data in files.items():
            if data is None:
                continue
            seen = self._last_digests.get(p)
            out[p] = seen[1] if seen is not None and seen[0] is data else digest(data)
        self._last_digests = {p: (data, out[p]) for p, data in files.items()
                              if data is not None}
        return out

    # ---- the tool-call journal: no call runs twice ------------------------------------

    def journal_entry(self, lease: Lease, tool_use_id: str) -> JournalEntry | None:
        """What the journal holds for a tool call of the session (None: never started).
        Fenced: a stale lease raises StaleCheckpoint, so a stale process runs no tool."""
        with self.db.transaction() as tx:
            self._fence(tx, lease, self.store.clock())
            rows = tx.rows("SELECT state, outcome FROM tool_calls WHERE session_id = ? AND "
                           "tool_use_id = ?", (lease.session_id, tool_use_id))
        if not rows:
            return None
        return JournalEntry(state=rows[0][0], outcome=rows[0][1])

    def journal(self, lease: Lease, tool_use_id: str, state: Literal["started", "done"],
                outcome: str | None = None) -> None:
        """Records that a tool call started (before a sandbox tool runs) or was applied (in
        the transaction of a memory-tool operation, which then commits with it)."""
        with self.db.transaction() as tx:
            now = self.store.clock()
            self._fence(tx, lease, now)
            tx.run("INSERT INTO tool_calls (session_id, tool_use_id, state, outcome, "
                   "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (session_id, tool_use_id) "
                   "DO UPDATE SET state = excluded.state, outcome = excluded.outcome",
                   (lease.session_id, tool_use_id, state, outcome, now))

    def get(self, user_id: str, checkpoint_id: str) -> Checkpoint:
        """The user's checkpoint with this id."""
        user = check_user(user_id)
        with self.db.read() as tx:
            rows = tx.rows("SELECT c.id, c.session_id, c.seq, c.generation, c.created_at, "
                           "c.reason, c.state FROM checkpoints c JOIN agent_sessions s ON "
                           "s.id = c.session_id WHERE c.id = ? AND s.user_id = ?",
                           (checkpoint_id, user))
            if not rows:
                raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r} of user {user!r}")
            files = tx.rows("SELECT path, kind, hash FROM checkpoint_files "
                            "WHERE checkpoint_id = ? ORDER BY path", (checkpoint_id,))
        r = rows[0]
        return Checkpoint(id=r[0], session_id=r[1], seq=r[2], generation=r[3], created_at=r[4],
                          reason=r[5], state=json.loads(r[6]),
                          files=[FileRef(path=f[0], kind=f[1], hash=f[2]) for f in files])

    def latest(self, user_id: str, session_id: str | None = None) -> Checkpoint:
        """The newest checkpoint of one of the user's sessions, or of the user's most recently
        active session."""
        user = check_user(user_id)
        with self.db.read() as tx:
            if session_id is None:
                rows = tx.rows("SELECT c.id FROM checkpoints c JOIN agent_sessions s ON "
                               "s.id = c.session_id WHERE s.user_id = ? ORDER BY "
                               "c.created_at DESC, c.seq DESC LIMIT 1", (user,))
            else:
                rows = tx.rows("SELECT c.id FROM checkpoints c JOIN agent_sessions s ON "
                               "s.id = c.session_id WHERE c.session_id = ? AND s.user_id = ? "
                               "ORDER BY c.seq DESC LIMIT 1", (session_id, user))
        if not rows:
            raise CheckpointNotFound(
                f"no checkpoint for session {session_id!r} of user {user!r}" if session_id
                else f"no checkpoint of user {user!r}")
        return self.get(user, rows[0][0])

    def resolve(self, user_id: str, ref: str) -> Checkpoint:
        """`latest`, a session id (its newest checkpoint) or a checkpoint id, of the user."""
        if ref == "latest":
            return self.latest(user_id)
        return self.latest(user_id, ref) if ref.startswith("sess_") else self.get(user_id, ref)

    def kept(self, user_id: str, session_id: str) -> list[Checkpoint]:
        """The kept checkpoints of one of the user's sessions, oldest first."""
        user = check_user(user_id)
        with self.db.read() as tx:
            ids = tx.rows("SELECT c.id FROM checkpoints c JOIN agent_sessions s ON "
                          "s.id = c.session_id WHERE c.session_id = ? AND s.user_id = ? "
                          "ORDER BY c.seq", (session_id, user))
        return [self.get(user, r[0]) for r in ids]

    def sessions(self, user_id: str) -> list[SessionInfo]:
        """The user's agent sessions, most recently active first."""
        user = check_user(user_id)
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT s.id, s.user_id, s.task, s.status, s.generation, s.updated_at, "
                "(SELECT count(*) FROM checkpoints c WHERE c.session_id = s.id) "
                "FROM agent_sessions s WHERE s.user_id = ? ORDER BY s.updated_at DESC", (user,))
        return [SessionInfo(**dict(zip(SessionInfo.model_fields, r, strict=True)))
                for r in rows]

    def blob(self, user_id: str, digest_hex: str) -> bytes:
        """The content of a blob that a checkpoint of the user's references."""
        user = check_user(user_id)
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT b.data FROM blobs b WHERE b.hash = ? AND EXISTS (SELECT 1 FROM "
                "checkpoint_files f JOIN checkpoints c ON c.id = f.checkpoint_id JOIN "
                "agent_sessions s ON s.id = c.session_id WHERE f.hash = b.hash AND "
                "s.user_id = ?)", (digest_hex, user))
        if not rows:
            raise CheckpointNotFound(f"no blob {digest_hex} of user {user!r}")
        return bytes(rows[0][0])

    # ---- retention, forget, export -----------------------------------------------------

    def forget(self, user_id: str) -> int:
        """Deletes the user's sessions with their checkpoints, journal and the workspace
        blobs no other checkpoint references; the number of sessions deleted."""
        user = check_user(user_id)
        with self.db.transaction() as tx:
            ids = [r[0] for r in tx.rows("SELECT id FROM agent_sessions WHERE user_id = ?",
                                         (user,))]
            self._delete_sessions(tx, ids)
        return len(ids)

    def expire(self, now: float, finished_ttl_s: float, idle_ttl_s: float) -> int:
        """Deletes finished sessions `finished_ttl_s` after their last checkpoint, and any
        other (resumable) session untouched for `idle_ttl_s`; the number deleted."""
        with self.db.transaction() as tx:
            ids = [r[0] for r in tx.rows(
                "SELECT id FROM agent_sessions WHERE (status = 'finished' AND updated_at <= ?) "
                "OR updated_at <= ?", (now - finished_ttl_s, now - idle_ttl_s))]
            self._delete_sessions(tx, ids)
        return len(ids)

    def export(self, user_id: str) -> dict[str, Any]:
        """The user's sessions, their kept checkpoints and the workspace blobs those
        reference (base64), as JSON-ready data."""
        user = check_user(user_id)
        sessions = []
        hashes: set[str] = set()
        for info in self.sessions(user):
            kept = self.kept(user, info.id)
            hashes.update(f.hash for c in kept for f in c.files if f.hash is not None)
            sessions.append({**info.model_dump(mode="json"),
                             "checkpoints": [c.model_dump(mode="json") for c in kept]})
        return {"agent_sessions": sessions,
                "blobs": {h: base64.b64encode(self.blob(user, h)).decode() for h in
                          sorted(hashes)}}

    def _delete_sessions(self, tx: Tx, session_ids: Sequence[str]) -> None:
        for sid in session_ids:
            cids = [r[0] for r in tx.rows("SELECT id FROM checkpoints WHERE session_id = ?",
                                          (sid,))]
            hashes: set[str] = set()
            for cid in cids:
                hashes.update(r[0] for r in tx.rows(
                    "SELECT DISTINCT hash FROM checkpoint_files WHERE checkpoint_id = ? "
                    "AND hash IS NOT NULL", (cid,)))
                tx.run("DELETE FROM checkpoint_files WHERE checkpoint_id = ?", (cid,))
            tx.run("DELETE FROM checkpoints WHERE session_id = ?", (sid,))
            tx.run("DELETE FROM tool_calls WHERE session_id = ?", (sid,))
            tx.run("DELETE FROM agent_sessions WHERE id = ?", (sid,))
            self._delete_unreferenced(tx, sorted(hashes))

    def storage(self) -> dict[str, int]:
        """Rows and bytes held by checkpoints (for bounds and benchmarks)."""
        with self.db.read() as tx:
            blobs, size = tx.rows("SELECT count(*), coalesce(sum(size), 0) FROM blobs")[0]
            checkpoints = tx.rows("SELECT count(*) FROM checkpoints")[0][0]
            files = tx.rows("SELECT count(*) FROM checkpoint_files")[0][0]
        return {"checkpoints": int(checkpoints), "files": int(files), "blobs": int(blobs),
                "blob_bytes": int(size)}

    @staticmethod
    def _fence(tx: Tx, lease: Lease, now: float, status: str = "running") -> None:
        if not tx.run("UPDATE agent_sessions SET updated_at = ?, status = ? "
                      "WHERE id = ? AND generation = ?",
                      (now, status, lease.session_id, lease.generation)):
            raise StaleCheckpoint(
                f"session {lease.session_id} was taken over by a newer run (this run's "
                f"generation {lease.generation} is stale): nothing written")

    @staticmethod
    def _mark_saved(tx: Tx, session_id: str, seq: int, completed: Collection[str]) -> None:
        """Journal rows of calls this checkpoint holds the results of get its seq (the rows
        not yet saved are only those of the calls since the previous checkpoint)."""
        unsaved = [r[0] for r in tx.rows("SELECT tool_use_id FROM tool_calls WHERE "
                                         "session_id = ? AND saved_seq IS NULL", (session_id,))]
        tx.many("UPDATE tool_calls SET saved_seq = ? WHERE session_id = ? AND tool_use_id = ?",
                [(seq, session_id, t) for t in unsaved if t in completed])

    def _store_blobs(self, tx: Tx, blobs: Mapping[str, bytes]) -> None:
        """Makes every blob exist until this transaction ends. PostgreSQL: the blobs found
        are locked (FOR KEY SHARE, as the foreign key of checkpoint_files would), so another
        session's prune skips them instead of deleting them before this checkpoint commits;
        one such prune that deleted a blob first makes it missing here, and it is inserted
        again. SQLite serialises writers (BEGIN IMMEDIATE): nothing can interleave."""
        lock = " FOR KEY SHARE" if self.db.dialect == "postgresql" else ""
        missing = set(blobs) - _existing(tx, blobs, lock)
        for _ in range(_INSERT_ROUNDS):
            if not missing:
                return
            tx.many("INSERT INTO blobs (hash, size, data) VALUES (?, ?, ?) "
                    "ON CONFLICT (hash) DO NOTHING",
                    [(h, len(blobs[h]), blobs[h]) for h in sorted(missing)])
            if not lock:
                return
            # DO NOTHING neither locks nor returns a row another session inserted meanwhile:
            # lock it now (it may have been pruned already, then insert it again).
            missing -= _existing(tx, missing, lock)
        raise MemoryStoreError(f"{len(missing)} blobs kept disappearing while being saved")

    def _prune(self, tx: Tx, session_id: str, keep: int) -> None:
        old = [r[0] for r in tx.rows(
            "SELECT id FROM checkpoints WHERE session_id = ? ORDER BY seq DESC LIMIT -1 "
            "OFFSET ?" if self.db.dialect == "sqlite" else
            "SELECT id FROM checkpoints WHERE session_id = ? ORDER BY seq DESC OFFSET ?",
            (session_id, keep))]
        for cid in old:
            hashes = [r[0] for r in tx.rows(
                "SELECT DISTINCT hash FROM checkpoint_files WHERE checkpoint_id = ? "
                "AND hash IS NOT NULL", (cid,))]
            tx.run("DELETE FROM checkpoint_files WHERE checkpoint_id = ?", (cid,))
            tx.run("DELETE FROM checkpoints WHERE id = ?", (cid,))
            self._delete_unreferenced(tx, hashes)
        # A journal row is needed while a kept checkpoint lacks the call's result.
        tx.run("DELETE FROM tool_calls WHERE session_id = ? AND saved_seq <= "
               "(SELECT min(seq) FROM checkpoints WHERE session_id = ?)",
               (session_id, session_id))


    def _delete_unreferenced(self, tx: Tx, hashes: Sequence[str]) -> None:
        """Deletes the blobs among `hashes` that no checkpoint references. PostgreSQL: a blob
        another session holds (locked to reference it, see `_store_blobs`) is skipped, never
        waited for (two prunes cannot deadlock); one whose reference committed after this
        statement's snapshot makes the foreign key refuse the delete: that blob is kept."""
        if self.db.dialect == "sqlite":
            tx.many("DELETE FROM blobs WHERE hash = ? AND NOT EXISTS "
                    "(SELECT 1 FROM checkpoint_files f WHERE f.hash = blobs.hash)",
                    [(h,) for h in hashes])
            return
        sql = ("DELETE FROM blobs WHERE hash IN (SELECT b.hash FROM blobs b WHERE b.hash = "
               "ANY(?) AND NOT EXISTS (SELECT 1 FROM checkpoint_files f WHERE f.hash = b.hash) "
               "FOR UPDATE SKIP LOCKED)")
        try:
            with self.db.transaction() as inner:  # a savepoint: undone alone if refused
                inner.run(sql, (list(hashes),))
        except MemoryStoreError:
            for h in hashes:
                try:
                    with self.db.transaction() as inner:
                        inner.run(sql, ([h],))
                except MemoryStoreError:
                    continue  # referenced after all: kept


def _existing(tx: Tx, hashes: Iterable[str], lock: str = "") -> set[str]:
    wanted = sorted(hashes)
    found: set[str] = set()
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        found.update(r[0] for r in tx.rows(
            f"SELECT hash FROM blobs WHERE hash IN ({marks}){lock}", chunk))
    return found


class WorkspaceLike(Protocol):
    """What checkpoints need from a sandbox session (`cellblock.Sandbox` provides it)."""

    def list_dir(self, path: str = WORKSPACE) -> Sequence[DirEntry]: ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes | str) -> None: ...

    def make_dirs(self, path: str) -> None: ...

    def remove(self, path: str, recursive: bool = False) -> None: ...


def list_workspace(sandbox: WorkspaceLike, root: str = WORKSPACE) -> dict[str, DirEntry]:
    """Every entry under `root`, by path relative to it (directories are not followed
    through symlinks: list_dir reports a symlink as one)."""
    out: dict[str, DirEntry] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        for entry in sandbox.list_dir(posixpath.join(root, rel) if rel else root):
            child = posixpath.join(rel, entry.name) if rel else entry.name
            out[child] = entry
            if entry.kind == "dir":
                pending.append(child)
    return out


def snapshot_workspace(sandbox: WorkspaceLike, max_file_bytes: int = 64 << 20,
                       root: str = WORKSPACE) -> dict[str, bytes | None]:
    """The files (content) and directories (None) under `root`, read through the public
    files API; symlinks, special files and files over `max_file_bytes` are left out."""
    out: dict[str, bytes | None] = {}
    for path, entry in sorted(list_workspace(sandbox, root).items()):
        if entry.kind == "dir":
            out[path] = None
        elif entry.kind == "file" and entry.size <= max_file_bytes:
            out[path] = sandbox.read_file(posixpath.join(root, path))
    return out


def restore_workspace(sandbox: WorkspaceLike, checkpoint: Checkpoint, checkpoints: Checkpoints,
                      user_id: str, root: str = WORKSPACE) -> None:
    """Makes the sandbox's workspace hold exactly the checkpoint's files (the checkpoint
    of `user_id`'s, whose blobs are read)."""
    wanted = {f.path for f in checkpoint.files}
    for path in sorted(set(list_workspace(sandbox, root)) - wanted, reverse=True):
        sandbox.remove(posixpath.join(root, path), recursive=True)
    for f in checkpoint.files:
        full = posixpath.join(root, f.path)
        if f.kind == "dir":
            sandbox.make_dirs(full)
        elif f.hash is not None:
            sandbox.write_file(full, checkpoints.blob(user_id, f.hash))
