"""The store's tables, for SQLite and PostgreSQL (the same columns; full-text search is FTS5
tables kept in step by triggers in SQLite, expression GIN indexes in PostgreSQL)."""

from __future__ import annotations

from cellblock.memory._db import Database

#: Bumped when a table changes; stored in `meta` to refuse a store of another version.
SCHEMA_VERSION = 2

_COMMON = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memories (
    id {serial}, user_id TEXT NOT NULL, path TEXT NOT NULL, content TEXT NOT NULL,
    created_at {real} NOT NULL, updated_at {real} NOT NULL, accessed_at {real} NOT NULL,
    expires_at {real} NOT NULL, UNIQUE (user_id, path));
CREATE INDEX IF NOT EXISTS memories_expiry ON memories (expires_at);
CREATE INDEX IF NOT EXISTS memories_lru ON memories (user_id, accessed_at);
CREATE TABLE IF NOT EXISTS turns (
    id {serial}, user_id TEXT NOT NULL, session_id TEXT NOT NULL, turn INTEGER NOT NULL,
    created_at {real} NOT NULL, expires_at {real} NOT NULL, message TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS turns_user ON turns (user_id, session_id, turn);
CREATE INDEX IF NOT EXISTS turns_expiry ON turns (expires_at);
CREATE TABLE IF NOT EXISTS knowledge (
    id {serial}, namespace TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL,
    content TEXT NOT NULL, UNIQUE (namespace, version, path));
CREATE TABLE IF NOT EXISTS knowledge_versions (
    namespace TEXT PRIMARY KEY, version INTEGER NOT NULL, refreshed_at {real} NOT NULL);
CREATE TABLE IF NOT EXISTS agent_sessions (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, task TEXT NOT NULL,
    generation INTEGER NOT NULL, status TEXT NOT NULL, created_at {real} NOT NULL,
    updated_at {real} NOT NULL);
CREATE INDEX IF NOT EXISTS agent_sessions_user ON agent_sessions (user_id, updated_at);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, session_id TEXT NOT NULL, seq INTEGER NOT NULL,
    generation INTEGER NOT NULL, created_at {real} NOT NULL, reason TEXT NOT NULL,
    state TEXT NOT NULL, UNIQUE (session_id, seq));
CREATE TABLE IF NOT EXISTS blobs (hash TEXT PRIMARY KEY, size BIGINT NOT NULL,
    data {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint_files (
    checkpoint_id TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
    hash TEXT REFERENCES blobs (hash), PRIMARY KEY (checkpoint_id, path));
CREATE INDEX IF NOT EXISTS checkpoint_files_hash ON checkpoint_files (hash);
CREATE TABLE IF NOT EXISTS tool_calls (
    session_id TEXT NOT NULL, tool_use_id TEXT NOT NULL, state TEXT NOT NULL,
    outcome TEXT, created_at {real} NOT NULL, saved_seq INTEGER,
    PRIMARY KEY (session_id, tool_use_id));
"""

_SQLITE_FTS = [
    # External-content FTS5 tables: the text lives once, in the main table.
    ("CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5("
     "content, content='memories', content_rowid='id')"),
    ("CREATE VIRTUAL TABLE IF NOT EXISTS turns_fts USING fts5("
     "body, content='turns', content_rowid='id')"),
    ("CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_fts USING fts5("
     "content, content='knowledge', content_rowid='id')"),
]

_SQLITE_TRIGGERS = [
    ("memories", "memories_fts", "content"),
    ("turns", "turns_fts", "body"),
    ("knowledge", "knowledge_fts", "content"),
]

_PG_FTS = [
    ("CREATE INDEX IF NOT EXISTS memories_fts ON memories "
     "USING gin (to_tsvector('simple', content))"),
    "CREATE INDEX IF NOT EXISTS turns_fts ON turns USING gin (to_tsvector('simple', body))",
    ("CREATE INDEX IF NOT EXISTS knowledge_fts ON knowledge "
     "USING gin (to_tsvector('simple', content))"),
]


def _sqlite_triggers() -> list[str]:
    out = []
    for table, fts, col in _SQLITE_TRIGGERS:
        out += [
            (f"CREATE TRIGGER IF NOT EXISTS {table}_ai AFTER INSERT ON {table} BEGIN "
             f"INSERT INTO {fts}(rowid, {col}) VALUES (new.id, new.{col}); END"),
            (f"CREATE TRIGGER IF NOT EXISTS {table}_ad AFTER DELETE ON {table} BEGIN "
             f"INSERT INTO {fts}({fts}, rowid, {col}) VALUES ('delete', old.id, old.{col}); END"),
            (f"CREATE TRIGGER IF NOT EXISTS {table}_au AFTER UPDATE OF {col} ON {table} BEGIN "
             f"INSERT INTO {fts}({fts}, rowid, {col}) VALUES ('delete', old.id, old.{col}); "
             f"INSERT INTO {fts}(rowid, {col}) VALUES (new.id, new.{col}); END"),
        ]
    return out


def create(db: Database) -> None:
    """Creates the tables that do not exist yet."""
    if db.dialect == "sqlite":
        common = _COMMON.format(serial="INTEGER PRIMARY KEY", real="REAL", blob="BLOB")
        statements = [s for s in common.split(";") if s.strip()]
        db.script(statements + _SQLITE_FTS + _sqlite_triggers())
    else:
        common = _COMMON.format(serial="BIGSERIAL PRIMARY KEY", real="DOUBLE PRECISION",
                                blob="BYTEA")
        statements = [s for s in common.split(";") if s.strip()]
        with db.transaction() as tx:
            # Several machines may open a new database at once: one creates the tables.
            tx.rows("SELECT pg_advisory_xact_lock(?)", (0x6365_6C6C,))
            for sql in statements + _PG_FTS:
                tx.run(sql)
    with db.transaction() as tx:
        tx.run("INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING",
               (str(SCHEMA_VERSION),))
