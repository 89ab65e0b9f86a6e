"""Checkpoints of agent sessions: state and workspace files in one transaction, bounded.

A checkpoint is a JSON state (conversation, agent state, budget spent, pending tool results)
plus the session's workspace as (path, sha256) rows; file contents are content-addressed
blobs, so a file unchanged since an earlier checkpoint is stored once. Saving inserts only the
blobs the database lacks, then deletes the session's checkpoints beyond `max_checkpoints` and
the blobs no checkpoint references any more, all in the same transaction.

Fencing: each run of a session holds a generation number (`Lease`). Starting or resuming a
session increments it; a save whose generation is no longer the session's fails with
StaleCheckpoint inside its transaction, so a stale process cannot write over a newer run.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from cellblock.memory._db import Tx
from cellblock.memory.config import CheckpointConfig
from cellblock.memory.errors import CheckpointNotFound, StaleCheckpoint
from cellblock.memory.store import check_user

if TYPE_CHECKING:
    from cellblock.files import DirEntry
    from cellblock.memory.store import MemoryStore

#: Where a session's files live in its sandbox.
WORKSPACE = "/workspace"

#: Hashes looked up per query when checking which blobs exist.
_CHUNK = 500

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

    def start(self, user_id: str, task: str, session_id: str | None = None) -> Lease:
        """Creates a session (generation 1) and returns its lease."""
        user, now = check_user(user_id), self.store.clock()
        sid = session_id or f"sess_{secrets.token_hex(8)}"
        with self.db.transaction() as tx:
            tx.run("INSERT INTO agent_sessions (id, user_id, task, generation, status, "
                   "created_at, updated_at) VALUES (?, ?, ?, 1, 'running', ?, ?)",
                   (sid, user, task, now, now))
        return Lease(session_id=sid, user_id=user, generation=1)

    def take_over(self, session_id: str) -> Lease:
        """A new lease on an existing session: every older lease becomes stale."""
        with self.db.transaction() as tx:
            rows = tx.rows("UPDATE agent_sessions SET generation = generation + 1, "
                           "status = 'running', updated_at = ? WHERE id = ? "
                           "RETURNING user_id, generation", (self.store.clock(), session_id))
        if not rows:
            raise CheckpointNotFound(f"no agent session {session_id!r}")
        return Lease(session_id=session_id, user_id=rows[0][0], generation=rows[0][1])

    def save(self, lease: Lease, state: Mapping[str, Any], files: Files, *,
             reason: str = "tool_call", config: CheckpointConfig | None = None,
             status: str = "running") -> str:
        """Writes a checkpoint and prunes old ones in one transaction; returns its id."""
        config = config or CheckpointConfig()
        blobs = {digest(data): data for data in files.values() if data is not None}
        refs = [(p, "dir" if d is None else "file", None if d is None else digest(d))
                for p, d in sorted(files.items())]
        state_json = json.dumps(state, ensure_ascii=False)
        now = self.store.clock()
        with self.db.transaction() as tx:
            if not tx.run("UPDATE agent_sessions SET updated_at = ?, status = ? "
                          "WHERE id = ? AND generation = ?",
                          (now, status, lease.session_id, lease.generation)):
                raise StaleCheckpoint(
                    f"session {lease.session_id} was taken over by a newer run (this run's "
                    f"generation {lease.generation} is stale): checkpoint not written")
            seq = tx.rows("SELECT coalesce(max(seq), 0) + 1 FROM checkpoints "
                          "WHERE session_id = ?", (lease.session_id,))[0][0]
            cid = f"ckpt_{lease.session_id.removeprefix('sess_')}_{seq}"
            missing = set(blobs) - _existing(tx, blobs)
            tx.many("INSERT INTO blobs (hash, size, data) VALUES (?, ?, ?) "
                    "ON CONFLICT (hash) DO NOTHING",
                    [(h, len(blobs[h]), blobs[h]) for h in sorted(missing)])
            tx.run("INSERT INTO checkpoints (id, session_id, seq, generation, created_at, "
                   "reason, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (cid, lease.session_id, seq, lease.generation, now, reason, state_json))
            tx.many("INSERT INTO checkpoint_files (checkpoint_id, path, kind, hash) "
                    "VALUES (?, ?, ?, ?)", [(cid, p, k, h) for p, k, h in refs])
            self._prune(tx, lease.session_id, config.max_checkpoints)
        if seq % config.compact_every == 0:
            self.db.compact()
        return str(cid)

    def get(self, checkpoint_id: str) -> Checkpoint:
        """The checkpoint with this id."""
        with self.db.transaction() as tx:
            rows = tx.rows("SELECT id, session_id, seq, generation, created_at, reason, state "
                           "FROM checkpoints WHERE id = ?", (checkpoint_id,))
            if not rows:
                raise CheckpointNotFound(f"no checkpoint {checkpoint_id!r}")
            files = tx.rows("SELECT path, kind, hash FROM checkpoint_files "
                            "WHERE checkpoint_id = ? ORDER BY path", (checkpoint_id,))
        r = rows[0]
        return Checkpoint(id=r[0], session_id=r[1], seq=r[2], generation=r[3], created_at=r[4],
                          reason=r[5], state=json.loads(r[6]),
                          files=[FileRef(path=f[0], kind=f[1], hash=f[2]) for f in files])

    def latest(self, session_id: str | None = None, user_id: str | None = None) -> Checkpoint:
        """The newest checkpoint of a session, or of the most recently active session (of
        `user_id` when given)."""
        with self.db.transaction() as tx:
            if session_id is None:
                where, params = ("WHERE s.user_id = ?", (user_id,)) if user_id else ("", ())
                rows = tx.rows("SELECT c.id FROM checkpoints c JOIN agent_sessions s ON "
                               f"s.id = c.session_id {where} ORDER BY c.created_at DESC, "
                               "c.seq DESC LIMIT 1", params)
            else:
                rows = tx.rows("SELECT id FROM checkpoints WHERE session_id = ? "
                               "ORDER BY seq DESC LIMIT 1", (session_id,))
        if not rows:
            raise CheckpointNotFound(
                f"no checkpoint for session {session_id!r}" if session_id else "no checkpoint")
        return self.get(rows[0][0])

    def resolve(self, ref: str, user_id: str | None = None) -> Checkpoint:
        """`latest`, a session id (its newest checkpoint) or a checkpoint id; with `user_id`,
        only that user's sessions are found."""
        if ref == "latest":
            return self.latest(user_id=user_id)
        found = self.latest(session_id=ref) if ref.startswith("sess_") else self.get(ref)
        if user_id is not None:
            with self.db.transaction() as tx:
                owner = tx.rows("SELECT user_id FROM agent_sessions WHERE id = ?",
                                (found.session_id,))
            if not owner or owner[0][0] != user_id:
                raise CheckpointNotFound(f"no checkpoint {ref!r} of user {user_id!r}")
        return found

    def kept(self, session_id: str) -> list[Checkpoint]:
        """The kept checkpoints of a session, oldest first."""
        with self.db.transaction() as tx:
            ids = tx.rows("SELECT id FROM checkpoints WHERE session_id = ? ORDER BY seq",
                          (session_id,))
        return [self.get(r[0]) for r in ids]

    def sessions(self, user_id: str | None = None) -> list[SessionInfo]:
        """Agent sessions, most recently active first."""
        where, params = ("WHERE s.user_id = ?", (user_id,)) if user_id else ("", ())
        with self.db.transaction() as tx:
            rows = tx.rows(
                "SELECT s.id, s.user_id, s.task, s.status, s.generation, s.updated_at, "
                "(SELECT count(*) FROM checkpoints c WHERE c.session_id = s.id) "
                f"FROM agent_sessions s {where} ORDER BY s.updated_at DESC", params)
        return [SessionInfo(**dict(zip(SessionInfo.model_fields, r, strict=True)))
                for r in rows]

    def blob(self, digest_hex: str) -> bytes:
        """The content of a blob."""
        with self.db.transaction() as tx:
            rows = tx.rows("SELECT data FROM blobs WHERE hash = ?", (digest_hex,))
        if not rows:
            raise CheckpointNotFound(f"no blob {digest_hex}")
        return bytes(rows[0][0])

    def storage(self) -> dict[str, int]:
        """Rows and bytes held by checkpoints (for bounds and benchmarks)."""
        with self.db.transaction() as tx:
            blobs, size = tx.rows("SELECT count(*), coalesce(sum(size), 0) FROM blobs")[0]
            checkpoints = tx.rows("SELECT count(*) FROM checkpoints")[0][0]
            files = tx.rows("SELECT count(*) FROM checkpoint_files")[0][0]
        return {"checkpoints": int(checkpoints), "files": int(files), "blobs": int(blobs),
                "blob_bytes": int(size)}

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
            tx.many("DELETE FROM blobs WHERE hash = ? AND NOT EXISTS "
                    "(SELECT 1 FROM checkpoint_files f WHERE f.hash = blobs.hash)",
                    [(h,) for h in hashes])


def _existing(tx: Tx, hashes: Iterable[str]) -> set[str]:
    wanted = sorted(hashes)
    found: set[str] = set()
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        found.update(r[0] for r in tx.rows(f"SELECT hash FROM blobs WHERE hash IN ({marks})",
                                           chunk))
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
                      root: str = WORKSPACE) -> None:
    """Makes the sandbox's workspace hold exactly the checkpoint's files."""
    wanted = {f.path for f in checkpoint.files}
    for path in sorted(set(list_workspace(sandbox, root)) - wanted, reverse=True):
        sandbox.remove(posixpath.join(root, path), recursive=True)
    for f in checkpoint.files:
        full = posixpath.join(root, f.path)
        if f.kind == "dir":
            sandbox.make_dirs(full)
        elif f.hash is not None:
            sandbox.write_file(full, checkpoints.blob(f.hash))
