"""Reading a knowledge source directory into documents."""

from __future__ import annotations

import os
from pathlib import Path

from cellblock.memory.config import KnowledgeSource
from cellblock.memory.errors import MemoryStoreError


def read_source(source: KnowledgeSource) -> dict[str, str]:
    """The UTF-8 text files under a source directory (symlinks not followed), by relative
    path; files over the size limit or not UTF-8 are left out."""
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
            try:
                docs[file.relative_to(root).as_posix()] = file.read_text("utf-8")
            except (UnicodeDecodeError, OSError):
                continue
    return docs
