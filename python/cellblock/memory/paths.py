"""Memory paths: every path the model gives is checked here, before any query.

A memory path is `/memories` or `/memories/<part>/...`. Refused: anything not under /memories
(absolute host paths, relative paths, `/memoriesX`), `.` and `..` parts, empty parts (`//`),
percent-encoded bytes (`%2e%2e`), backslashes, NUL and other control characters, names that
Unicode normalisation would change (fullwidth dots and slashes), `~`, and over-long paths. The
store has no symlinks, so a name can never lead anywhere else; checking the text is enough.
"""

from __future__ import annotations

import re
import unicodedata

from cellblock.memory.errors import MemoryPathError

#: The root the model sees.
ROOT = "/memories"

#: The shared knowledge base is visible read-only under this directory.
KNOWLEDGE_ROOT = "/memories/knowledge"

MAX_PATH_CHARS = 1024
MAX_PART_CHARS = 255
MAX_DEPTH = 16

_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def normalize(raw: object) -> str:
    """The canonical form of a memory path (no trailing slash); MemoryPathError otherwise."""
    if not isinstance(raw, str):
        raise MemoryPathError(f"a memory path must be a string, got {type(raw).__name__}")
    path = raw
    problem = _problem(path)
    if problem:
        raise MemoryPathError(f"refused memory path {raw!r}: {problem}")
    return path.rstrip("/") or ROOT


def _problem(path: str) -> str | None:
    if len(path) > MAX_PATH_CHARS:
        return "too long"
    if any(unicodedata.category(c).startswith("C") for c in path):
        return "control characters (NUL, newline, ...) are not allowed"
    if "\\" in path:
        return "backslashes are not allowed"
    if _PERCENT_ESCAPE.search(path):
        return "percent-encoded characters are not allowed"
    if unicodedata.normalize("NFKC", path) != path:
        return "characters that normalise to others (e.g. fullwidth dots) are not allowed"
    if path != ROOT and not path.startswith(ROOT + "/"):
        return f"paths must be under {ROOT}"
    parts = path[len(ROOT):].rstrip("/").split("/")[1:]
    if len(parts) > MAX_DEPTH:
        return "too deep"
    for part in parts:
        if part in ("", ".", "..", "~"):
            return f"the path part {part!r} is not allowed"
        if len(part) > MAX_PART_CHARS:
            return "a name is too long"
        if part.strip() != part:
            return "names may not begin or end with spaces"
    return None


def is_under(path: str, directory: str) -> bool:
    """True when `path` is `directory` or inside it (both canonical)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def child_prefix(directory: str) -> str:
    """The text every path strictly inside `directory` begins with."""
    return directory.rstrip("/") + "/"
