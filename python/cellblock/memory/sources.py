"""Reading a knowledge source directory into documents."""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

from cellblock.memory import paths
from cellblock.memory.config import KnowledgeSource
from cellblock.memory.errors import MemoryPathError, MemoryStoreError

_log = logging.getLogger("cellblock.memory")


def read_source(source: KnowledgeSource) -> dict[str, str]:
    """The UTF-8 text files under a source directory (symlinks not followed), by relative
    path in NFC (macOS and some tools write names decomposed: `cafe` + U+0301 is `café`);
    files over the size limit or not UTF-8 are left out. A name no memory path can hold
    (control characters, fullwidth forms, too long) is skipped with a warning naming it:
    one odd file must not keep the others, or any agent, from starting."""
    root = source.directory
    if not root.is_dir():
        raise MemoryStoreError(f"knowledge source {root}: not a directory")
    docs: dict[str, str] = {}
    for top, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            file = Path(top) / name
            if name.startswith(".") or file.is_symlink() or not file.is_file():
                continue
            if file.stat().st_size > source.max_file_bytes:
                continue
            rel = unicodedata.normalize("NFC", file.relative_to(root).as_posix())
            try:
                paths.normalize(f"{paths.KNOWLEDGE_ROOT}/{source.namespace}/{rel}")
            except MemoryPathError as e:
                _log.warning("knowledge source %s (%s): skipped %r: %s", source.namespace,
                             root, file.relative_to(root).as_posix(), e)
                continue
            if rel in docs:
                _log.warning("knowledge source %s (%s): skipped %r: another file has the same "
                             "name in NFC", source.namespace, root,
                             file.relative_to(root).as_posix())
                continue
            try:
                docs[rel] = file.read_text("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return docs
