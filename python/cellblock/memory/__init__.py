"""Agent memory in three tiers (short-term archive, per-user entries, shared knowledge) and
checkpoints of agent sessions, in SQLite or PostgreSQL."""

from cellblock.memory._db import default_url
from cellblock.memory.checkpoint import Checkpoint, Checkpoints, Lease, SessionInfo
from cellblock.memory.config import CheckpointConfig, KnowledgeSource, MemoryConfig
from cellblock.memory.errors import (
    CheckpointNotFound,
    MemoryPathError,
    MemoryStoreError,
    StaleCheckpoint,
)
from cellblock.memory.search import Hit
from cellblock.memory.store import Entry, EntryInfo, MemoryStore

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointNotFound",
    "Checkpoints",
    "Entry",
    "EntryInfo",
    "Hit",
    "KnowledgeSource",
    "Lease",
    "MemoryConfig",
    "MemoryPathError",
    "MemoryStore",
    "MemoryStoreError",
    "SessionInfo",
    "StaleCheckpoint",
    "default_url",
]
