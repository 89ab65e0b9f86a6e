"""Bounds of the memory tiers and checkpoints (defaults from the managed-agents guide)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class KnowledgeSource(BaseModel):
    """A directory of text files that feeds one namespace of the shared knowledge base."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    directory: Path
    #: Files larger than this are left out of the knowledge base (bytes).
    max_file_bytes: int = Field(default=1 << 20, ge=1)


class MemoryConfig(BaseModel):
    """Short-term: `max_turns` turns in context (older ones archived, searchable); medium-term:
    per-user entries kept `ttl_days` after their last write, at most `max_entries` per user
    (least recently used evicted); long-term: `sources` refreshed every
    `refresh_interval_hours`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_turns: int = Field(default=50, ge=1)
    ttl_days: float = Field(default=90, gt=0)
    max_entries: int = Field(default=1000, ge=1)
    #: Largest memory file (characters): bigger writes are refused.
    max_entry_chars: int = Field(default=100_000, ge=1)
    #: Archived turn messages kept per user (the oldest go first; they also expire after
    #: `ttl_days`).
    max_archived_messages: int = Field(default=20_000, ge=1)
    refresh_interval_hours: float = Field(default=24, gt=0)
    #: A finished agent session (its checkpoints and workspace blobs) is deleted this many
    #: days after it finished; an unfinished one, resumable, after `ttl_days` untouched.
    finished_session_ttl_days: float = Field(default=7, gt=0)
    sources: tuple[KnowledgeSource, ...] = ()


class CheckpointConfig(BaseModel):
    """A checkpoint every `interval_seconds` and after each completed tool call; at most
    `max_checkpoints` kept per session."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_seconds: float = Field(default=300, gt=0)
    max_checkpoints: int = Field(default=10, ge=1)
    #: Workspace files larger than this are not checkpointed (bytes); they are listed in the
    #: checkpoint as skipped.
    max_file_bytes: int = Field(default=64 << 20, ge=0)
    #: SQLite: the WAL is folded back and free pages returned every this many checkpoints.
    compact_every: int = Field(default=20, ge=1)
