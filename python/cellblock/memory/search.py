"""Full-text search of the memory tiers: SQLite FTS5 or PostgreSQL text search, each query
restricted to one user's rows (the shared knowledge base excepted) and to live rows."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Tier = Literal["memory", "archive", "knowledge"]
#: One search statement: its tier, SQL and parameters.
Query = tuple[Tier, str, tuple[Any, ...]]


class Hit(BaseModel):
    """One search result: `ref` is a memory path (knowledge documents: under
    /memories/knowledge/) or `session_id#turn` for an archived turn."""

    model_config = ConfigDict(frozen=True)

    tier: Tier
    ref: str
    snippet: str


def fts5_query(text: str) -> str | None:
    """User text as an FTS5 query: every word quoted (no operators), all required."""
    words = [w for w in text.split() if any(c.isalnum() for c in w)]
    return " ".join('"' + w.replace('"', '""') + '"' for w in words) or None


def message_text(message: Mapping[str, Any]) -> str:
    """The searchable text of a conversation message: text, tool inputs and tool results."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            parts.append(json.dumps(block.get("input"), ensure_ascii=False))
        elif block.get("type") == "tool_result":
            body = block.get("content")
            parts.append(body if isinstance(body, str) else json.dumps(body, ensure_ascii=False))
    return "\n".join(parts)


def sqlite_queries(q: str, user: str, now: float, limit: int) -> list[Query]:
    """FTS5 statements for an already quoted query `q` (see `fts5_query`)."""
    snip = "snippet({t}, 0, '[', ']', '...', 16)"
    memory = (f"SELECT m.path, {snip.format(t='memories_fts')} FROM memories_fts "
              "JOIN memories m ON m.id = memories_fts.rowid WHERE memories_fts MATCH ? "
              "AND m.user_id = ? AND m.expires_at > ? ORDER BY bm25(memories_fts) LIMIT ?")
    archive = (f"SELECT t.session_id || '#' || t.turn, {snip.format(t='turns_fts')} "
               "FROM turns_fts JOIN turns t ON t.id = turns_fts.rowid WHERE turns_fts "
               "MATCH ? AND t.user_id = ? AND t.expires_at > ? ORDER BY bm25(turns_fts) "
               "LIMIT ?")
    knowledge = (f"SELECT k.path, {snip.format(t='knowledge_fts')} FROM knowledge_fts "
                 "JOIN knowledge k ON k.id = knowledge_fts.rowid JOIN knowledge_versions v "
                 "ON v.namespace = k.namespace AND v.version = k.version WHERE "
                 "knowledge_fts MATCH ? ORDER BY bm25(knowledge_fts) LIMIT ?")
    return [("memory", memory, (q, user, now, limit)),
            ("archive", archive, (q, user, now, limit)),
            ("knowledge", knowledge, (q, limit))]


def pg_queries(query: str, user: str, now: float, limit: int) -> list[Query]:
    """PostgreSQL full-text statements (`plainto_tsquery`: the text is never parsed as
    operators)."""

    def select(ref: str, column: str, source: str, where: str) -> str:
        return (f"SELECT {ref}, ts_headline('simple', {column}, q, "
                "'StartSel=[,StopSel=],MaxWords=24,MinWords=8') "
                f"FROM {source}, plainto_tsquery('simple', ?) q "
                f"WHERE to_tsvector('simple', {column}) @@ q {where} "
                f"ORDER BY ts_rank(to_tsvector('simple', {column}), q) DESC LIMIT ?")

    scoped = "AND user_id = ? AND expires_at > ?"
    current = ("knowledge k JOIN knowledge_versions v ON v.namespace = k.namespace "
               "AND v.version = k.version")
    return [
        ("memory", select("path", "content", "memories", scoped),
         (query, user, now, limit)),
        ("archive", select("session_id || '#' || turn", "body", "turns", scoped),
         (query, user, now, limit)),
        ("knowledge", select("k.path", "k.content", current, ""), (query, limit)),
    ]
