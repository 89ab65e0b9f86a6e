"""The model's way into memory: the Anthropic memory tool (`memory_20250818`) backed by a
MemoryStore and scoped to one user, and a full-text search tool.

`StoreMemoryTool` subclasses the SDK's `BetaAbstractMemoryTool` (its schema, command
dispatch and `ToolError` convention); each command validates its input with the SDK's
command model and its paths with `cellblock.memory.paths` before the store is asked anything.
The shared knowledge base appears read-only under /memories/knowledge/<namespace>/.
"""

from __future__ import annotations

from typing import Any

from anthropic.lib.tools import BetaAbstractMemoryTool, ToolError
from anthropic.types.beta import (
    BetaMemoryTool20250818CreateCommand,
    BetaMemoryTool20250818DeleteCommand,
    BetaMemoryTool20250818InsertCommand,
    BetaMemoryTool20250818RenameCommand,
    BetaMemoryTool20250818StrReplaceCommand,
    BetaMemoryTool20250818ViewCommand,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellblock.memory import paths
from cellblock.memory.errors import MemoryStoreError
from cellblock.memory.store import MemoryStore, check_user

#: Name of the memory tool (fixed by the API) and of the search tool.
MEMORY_TOOL = "memory"
SEARCH_TOOL = "memory_search"

#: The Messages API beta that enables the memory tool.
MEMORY_BETA = "context-management-2025-06-27"

_COMMANDS: dict[str, type[BaseModel]] = {
    "view": BetaMemoryTool20250818ViewCommand,
    "create": BetaMemoryTool20250818CreateCommand,
    "str_replace": BetaMemoryTool20250818StrReplaceCommand,
    "insert": BetaMemoryTool20250818InsertCommand,
    "delete": BetaMemoryTool20250818DeleteCommand,
    "rename": BetaMemoryTool20250818RenameCommand,
}

LINE_WIDTH = 6


def _numbered(lines: list[str], start: int) -> str:
    return "\n".join(f"{str(i + start).rjust(LINE_WIDTH)}\t{line}" for i, line in
                     enumerate(lines))


class StoreMemoryTool(BetaAbstractMemoryTool):
    """The memory tool over `store`, seeing only `user_id`'s files (and shared knowledge)."""

    def __init__(self, store: MemoryStore, user_id: str) -> None:
        super().__init__()
        self.store = store
        self.user_id = check_user(user_id)

    def call(self, input: object) -> str:
        """Runs one command; ToolError (with a message for the model) when it is refused."""
        if not isinstance(input, dict) or input.get("command") not in _COMMANDS:
            raise ToolError(f"the memory tool takes an object with a 'command' among "
                            f"{sorted(_COMMANDS)}")
        try:
            command = _COMMANDS[input["command"]].model_validate(input)
        except ValidationError as e:
            raise ToolError(f"invalid memory command: {e.errors()[0].get('msg')} "
                            f"at {'.'.join(map(str, e.errors()[0].get('loc', ())))}") from e
        try:
            return str(self.execute(command))  # type: ignore[arg-type]
        except MemoryStoreError as e:
            raise ToolError(str(e)) from e

    def view(self, command: BetaMemoryTool20250818ViewCommand) -> str:
        path = paths.normalize(command.path)
        if paths.is_under(path, paths.KNOWLEDGE_ROOT):
            entries = self.store.list_knowledge(path)
            if not entries:
                return self._show(path, self.store.read_knowledge(path), command.view_range)
            return self._listing(path, [(e.path, e.size) for e in entries])
        kind = self.store.kind(self.user_id, path)
        if kind == "file":
            return self._show(path, self.store.read(self.user_id, path).content,
                              command.view_range)
        if kind is None:
            raise ToolError(f"The path {path} does not exist.")
        listed = [(e.path, e.size) for e in self.store.entries(self.user_id, path)]
        if path == paths.ROOT:
            listed += [(e.path, e.size) for e in self.store.list_knowledge()]
        return self._listing(path, listed)

    def create(self, command: BetaMemoryTool20250818CreateCommand) -> str:
        path = paths.normalize(command.path)
        self.store.write(self.user_id, path, command.file_text, create=True)
        return f"File created successfully at: {path}"

    def str_replace(self, command: BetaMemoryTool20250818StrReplaceCommand) -> str:
        path = paths.normalize(command.path)
        content = self.store.read(self.user_id, path).content
        count = content.count(command.old_str) if command.old_str else 0
        if count != 1:
            raise ToolError(f"No replacement was performed: old_str occurs {count} times in "
                            f"{path} (it must occur exactly once).")
        self.store.write(self.user_id, path, content.replace(command.old_str, command.new_str))
        return f"The memory file {path} has been edited."

    def insert(self, command: BetaMemoryTool20250818InsertCommand) -> str:
        path = paths.normalize(command.path)
        lines = self.store.read(self.user_id, path).content.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not 0 <= command.insert_line <= len(lines):
            raise ToolError(f"Invalid insert_line {command.insert_line}: it should be within "
                            f"[0, {len(lines)}].")
        lines.insert(command.insert_line, command.insert_text.rstrip("\n"))
        self.store.write(self.user_id, path, "\n".join(lines) + "\n")
        return f"The file {path} has been edited."

    def delete(self, command: BetaMemoryTool20250818DeleteCommand) -> str:
        path = paths.normalize(command.path)
        self.store.delete(self.user_id, path)
        return f"Successfully deleted {path}"

    def rename(self, command: BetaMemoryTool20250818RenameCommand) -> str:
        old, new = paths.normalize(command.old_path), paths.normalize(command.new_path)
        self.store.rename(self.user_id, old, new)
        return f"Successfully renamed {old} to {new}"

    @staticmethod
    def _show(path: str, content: str, view_range: list[int] | None) -> str:
        lines = content.split("\n")
        start = 1
        if view_range and len(view_range) == 2:
            start = max(1, view_range[0])
            end = len(lines) if view_range[1] == -1 else view_range[1]
            lines = lines[start - 1:end]
        return f"Here's the content of {path} with line numbers:\n" + _numbered(lines, start)

    @staticmethod
    def _listing(path: str, entries: list[tuple[str, int]]) -> str:
        lines = [f"{size}\t{p}" for p, size in entries]
        return (f"Files under {path} (size in characters):\n" + "\n".join(lines)
                if lines else f"{path} is empty.")


class SearchInput(BaseModel):
    """Input of the memory search tool."""

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(min_length=1, max_length=500)
    limit: int = Field(default=5, ge=1, le=20)


SEARCH_SCHEMA: dict[str, Any] = {
    "name": SEARCH_TOOL,
    "description": (
        "Full-text search of your memory: your files under /memories, earlier turns of your "
        "conversations that left the context window, and the shared knowledge base. Returns "
        "matching paths (open them with the memory tool) and snippets."),
    "input_schema": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "words to look for"},
            "limit": {"type": "integer", "description": "hits per source (default 5)"},
        },
        "required": ["query"],
        "additionalProperties": False,
    },
}


def search(store: MemoryStore, user_id: str, raw_input: object) -> str:
    """Runs the search tool for `user_id`; ToolError for malformed input."""
    try:
        args = SearchInput.model_validate(raw_input)
    except ValidationError as e:
        raise ToolError(f"invalid input for {SEARCH_TOOL}: {e.errors()[0].get('msg')}") from e
    hits = store.search(user_id, args.query, args.limit)
    if not hits:
        return f"No memory matches {args.query!r}."
    return "\n".join(f"[{h.tier}] {h.ref}: {' '.join(h.snippet.split())}" for h in hits)
