"""The files API of a `cellblock.Sandbox`: read, write, list and remove files of the sandbox.

Every operation resolves its path from the sandbox's root with the sandbox's own credentials
(its uid 0, no capabilities), so it can do only what the sandbox's own code could do, and only
on the sandbox's writable scratch mounts (`/workspace`, `/tmp`, `/dev/shm`): a path that
resolves into `/proc`, `/sys`, `/dev` or a read-only bind is refused (`PathEscape`), and only
regular files and directories are read or written. What is read has the session's secrets
redacted. Large files stream: `iter_file` yields chunks, `write_file` takes a binary file or an
iterable of chunks. No lock is held while data moves, so a slow read never delays `close()`,
`pause()` or another call.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict

from cellblock._native import FileReader
from cellblock._native import Session as NativeSession
from cellblock.errors import FileTooLarge, InvalidSpec, SandboxIOError
from cellblock.sizes import parse_size

#: Default most bytes `read_file` returns; larger files raise `FileTooLarge`.
DEFAULT_MAX_READ = 64 << 20
#: Bytes per chunk moved between the host and the sandbox.
CHUNK_SIZE = 1 << 20
#: Directories whose parent the files API cannot list: the root and the scratch mounts.
_MOUNT_ROOTS = ("/", "/workspace", "/tmp", "/dev", "/dev/shm")
#: No cap (streaming reads).
_UNLIMITED = (1 << 64) - 1

#: What `write_file` accepts: bytes-like, text (UTF-8), a binary file, or an iterable of chunks.
FileData = bytes | bytearray | memoryview | str | IO[bytes] | Iterable[bytes]

__all__ = ["CHUNK_SIZE", "DEFAULT_MAX_READ", "DirEntry", "FileData", "FileTooLarge", "SandboxFiles"]


class DirEntry(BaseModel):
    """One entry of `Sandbox.list_dir`."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int


def _check_path(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise InvalidSpec(f"{what}: path must be a str, not {type(path).__name__}")
    return path


def _as_bytes(chunk: object, what: str) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    raise InvalidSpec(f"{what}: chunks must be bytes or str, got {type(chunk).__name__}")


def _chunks(data: object) -> Iterator[bytes]:
    """The chunks of `data`, checked one by one (typed errors for anything else)."""
    what = "write_file"
    if isinstance(data, (bytes, bytearray, memoryview, str)):
        yield _as_bytes(data, what)
        return
    read = getattr(data, "read", None)
    if callable(read):
        while chunk := read(CHUNK_SIZE):
            if isinstance(chunk, str):
                raise InvalidSpec(f"{what}: the file object is in text mode; open it with 'rb'")
            yield _as_bytes(chunk, what)
        return
    if isinstance(data, Iterable):
        for chunk in data:
            yield _as_bytes(chunk, what)
        return
    raise InvalidSpec(
        f"{what}: data must be bytes, str, a binary file or an iterable of bytes, "
        f"not {type(data).__name__}"
    )


class SandboxFiles:
    """The files API, mixed into `cellblock.Sandbox` (which provides the native session)."""

    _native: NativeSession

    def _call(self) -> AbstractContextManager[None]:
        """Marks a call in progress (raises once the sandbox is closed)."""
        raise NotImplementedError

    def write_file(self, path: str, data: FileData) -> None:
        """Writes a file (created or replaced; missing parents created). Relative paths are
        under /workspace. `data`: bytes, str (UTF-8), a binary file object or an iterable of
        byte chunks (streamed, never held whole). Never writes through a symlink."""
        path = _check_path(path, "write_file")
        chunks = _chunks(data)
        # The first chunk is checked before the file is touched: bad input changes nothing.
        first = next(chunks, b"")
        rest = next(chunks, None)
        with self._call():
            if rest is None:
                self._native.write_file(path, first)
                return
            writer = self._native.open_write(path)
        try:
            writer.write(first)
            writer.write(rest)
            for chunk in chunks:
                writer.write(chunk)
        finally:
            writer.close()

    def read_file(self, path: str, *, max_size: int | str = DEFAULT_MAX_READ) -> bytes:
        """Reads a whole regular file (secrets redacted). Files larger than `max_size`
        (default 64 MiB) raise `FileTooLarge`: stream them with `iter_file`."""
        path = _check_path(path, "read_file")
        cap = parse_size(max_size, "max_size")
        with self._call():
            reader = self._native.open_read(path, cap)
        # Chunks joined once: cheaper than growing one buffer (and no lock is held meanwhile).
        return b"".join(self._chunks_of(reader, CHUNK_SIZE))

    def iter_file(
        self, path: str, *, chunk_size: int = CHUNK_SIZE, max_size: int | str | None = None
    ) -> Iterator[bytes]:
        """Streams a regular file in chunks of at most `chunk_size` bytes (secrets redacted,
        so a chunk's length may differ). `max_size` caps the total (default: none)."""
        path = _check_path(path, "iter_file")
        cap = _UNLIMITED if max_size is None else parse_size(max_size, "max_size")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise InvalidSpec(f"iter_file: chunk_size must be a positive int, got {chunk_size!r}")
        with self._call():
            reader = self._native.open_read(path, cap)
        return self._chunks_of(reader, chunk_size)

    @staticmethod
    def _chunks_of(reader: FileReader, chunk_size: int) -> Iterator[bytes]:
        try:
            while chunk := reader.read(chunk_size):
                yield chunk
        finally:
            reader.close()

    def make_dirs(self, path: str) -> None:
        """Creates a directory and its missing parents."""
        path = _check_path(path, "make_dirs")
        with self._call():
            self._native.make_dirs(path)

    def list_dir(self, path: str = "/workspace") -> list[DirEntry]:
        """The entries of a directory, sorted by name (symlinks are listed, not followed;
        secrets redacted from the names)."""
        path = _check_path(path, "list_dir")
        with self._call():
            return [DirEntry(**e) for e in self._native.list_dir(path)]

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, a symlink (never its target) or an empty directory; with
        `recursive`, a directory and everything under it."""
        path = _check_path(path, "remove")
        with self._call():
            if recursive and self._kind(path) == "dir":
                for entry in self._native.list_dir(path):
                    child = posixpath.join(path, entry["name"])
                    self.remove(child, recursive=entry["kind"] == "dir")
            self._native.remove(path)

    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """Copies a host file or directory tree into the sandbox at `path` (streamed)."""
        src = Path(local)
        path = _check_path(path, "upload")
        if src.is_dir():
            self.make_dirs(path)
            for child in sorted(src.iterdir()):
                self.upload(child, posixpath.join(path, child.name))
        else:
            with src.open("rb") as f:
                self.write_file(path, f)

    def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """Copies a sandbox file or directory tree to the host path `local`, streamed and
        redacted like `read_file` (symlinks inside the sandbox are skipped, never followed)."""
        path = _check_path(path, "download")
        with self._call():
            kind = self._kind(path)
        self._download(path, Path(local), kind)

    def _download(self, path: str, dst: Path, kind: str) -> None:
        if kind == "dir":
            dst.mkdir(parents=True, exist_ok=True)
            for entry in self.list_dir(path):
                if entry.kind in ("file", "dir"):
                    self._download(posixpath.join(path, entry.name), dst / entry.name, entry.kind)
        else:
            with dst.open("wb") as f:
                for chunk in self.iter_file(path):
                    f.write(chunk)

    def _kind(self, path: str) -> str:
        """The kind of entry at `path` ("dir", "file", "symlink", "other"), not following it."""
        full = path if path.startswith("/") else posixpath.join("/workspace", path)
        full = full.rstrip("/") or "/"
        if full in _MOUNT_ROOTS:
            return "dir"
        parent, name = posixpath.split(full)
        for entry in self._native.list_dir(parent):
            if entry["name"] == name:
                return str(entry["kind"])
        raise SandboxIOError(f"{path}: no such file or directory")
