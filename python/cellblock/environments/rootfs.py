"""Root-filesystem bases: a directory, a tarball or an OCI image layout, unpacked safely.

The input is treated as hostile. Every entry is written through directory file descriptors
opened with O_NOFOLLOW, one path component at a time, so nothing escapes `dest`: absolute names
and `..` are refused, a symlink already unpacked is never followed (an entry whose path goes
through one is refused), hard links must point at a regular file inside `dest`. Device nodes and
fifos are dropped, setuid/setgid bits cleared, ownership is the unpacking user's. Whiteouts
(`.wh.NAME`, `.wh..wh..opq`) remove what lower layers made. Entry count and total size are
bounded. `dest` appears whole (a temporary directory renamed into place) or not at all.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO

from cellblock.errors import InvalidSpec, UnsafeLayer

#: Entries (files, directories, links, whiteouts) over all layers of one unpack.
MAX_ENTRIES = 500_000
#: Bytes of file data over all layers of one unpack.
MAX_BYTES = 16 << 30
#: Layers of one OCI image.
MAX_LAYERS = 128

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 20


class Budget:
    """What one unpack may still create; going past it raises `UnsafeLayer`."""

    def __init__(self) -> None:
        # Read at call time, so the limits are the module's constants when the unpack starts.
        self.entries = MAX_ENTRIES
        self.bytes = MAX_BYTES

    def entry(self, name: str) -> None:
        self.entries -= 1
        if self.entries < 0:
            raise UnsafeLayer(f"more than {MAX_ENTRIES} entries (at {name!r})")

    def data(self, size: int, name: str) -> None:
        self.bytes -= size
        if self.bytes < 0:
            raise UnsafeLayer(f"more than {MAX_BYTES} bytes of file data (at {name!r})")


def unpack(source: Path, dest: Path) -> None:
    """Unpack `source` (a directory, a tarball, or an OCI image layout) into `dest`, a new
    directory. Raises `UnsafeLayer` for hostile or corrupt input, `InvalidSpec` when `source`
    is missing or `dest` exists; on any failure `dest` is left absent."""
    from cellblock.environments import oci  # oci uses this module's layer functions

    source, dest = Path(source), Path(dest)
    if os.path.lexists(dest):
        raise InvalidSpec(f"unpack: {dest} already exists")
    if not source.exists():
        raise InvalidSpec(f"unpack: {source} does not exist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent)
    try:
        budget = Budget()
        root = os.open(tmp, _DIR_FLAGS)
        try:
            if source.is_dir() and oci.is_layout(source):
                for layer in oci.layers(source):
                    apply_layer(layer, root, budget)
            elif source.is_dir():
                copy_tree(source, root, budget)
            else:
                apply_layer(source, root, budget)
        finally:
            os.close(root)
        os.chmod(tmp, 0o755)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- names -------------------------------------------------------------------------------------


def parts_of(name: str) -> list[str]:
    """The components of an entry name, refusing any that could leave the destination."""
    if "\0" in name:
        raise UnsafeLayer(f"entry name {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeLayer(f"entry {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"entry {name!r} has a '..' component")
    return parts


@contextmanager
def parent_fd(root: int, parts: list[str], create: bool) -> Iterator[int | None]:
    """An fd of the directory holding `parts[-1]`, walked from `root` without following any
    symlink (missing directories are made when `create`, else None is yielded)."""
    fd = os.dup(root)
    try:
        for i, part in enumerate(parts[:-1]):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    yield None
                    return
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                # ELOOP: a symlink; ENOTDIR: a file. Either way not a directory we made.
                where = "/".join(parts[: i + 1])
                raise UnsafeLayer(
                    f"entry {'/'.join(parts)!r} goes through {where!r}, which is not a "
                    f"directory ({os.strerror(e.errno or 0)})"
                ) from None
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


def remove(dirfd: int, name: str) -> None:
    """Remove `name` in `dirfd` whatever it is (a directory with its contents), if present."""
    try:
        st = os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def clear_dir(dirfd: int) -> None:
    """Remove every entry of `dirfd` (an opaque whiteout)."""
    for name in os.listdir(dirfd):
        remove(dirfd, name)


# --- writing -----------------------------------------------------------------------------------


def dir_mode(mode: int) -> int:
    """Directory mode kept: permissions and sticky bit, always writable by the unpacking user
    (a later layer, a failure's clean-up, a store's removal must be able to change it)."""
    return (mode & 0o1777) | 0o700


def file_mode(mode: int) -> int:
    """File mode kept: permissions only (setuid, setgid and sticky dropped)."""
    return mode & 0o777


def make_dir(root: int, parts: list[str], mode: int) -> None:
    if not parts:
        os.fchmod(root, dir_mode(mode))
        return
    with parent_fd(root, parts, create=True) as pfd:
        assert pfd is not None
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError:
            remove(pfd, name)
            os.mkdir(name, 0o700, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            os.fchmod(fd, dir_mode(mode))
        finally:
            os.close(fd)


def make_file(
    root: int, parts: list[str], mode: int, data: IO[bytes] | None, size: int, budget: Budget
) -> None:
    name = "/".join(parts)
    if not parts:
        raise UnsafeLayer("a file entry names the root directory")
    budget.data(size, name)
    with parent_fd(root, parts, create=True) as pfd:
        assert pfd is not None
        remove(pfd, parts[-1])
        fd = os.open(
            parts[-1],
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        with os.fdopen(fd, "wb") as out:
            left = size
            while data is not None and left > 0:
                chunk = data.read(min(_CHUNK, left))
                if not chunk:
                    raise UnsafeLayer(f"entry {name!r} is truncated")
                out.write(chunk)
                left -= len(chunk)
            os.fchmod(out.fileno(), file_mode(mode))


def make_symlink(root: int, parts: list[str], target: str) -> None:
    # The target is stored as is: it is never followed here, and inside the sandbox it resolves
    # against the sandbox's own root.
    if not parts:
        raise UnsafeLayer("a symlink entry names the root directory")
    if "\0" in target:
        raise UnsafeLayer(f"symlink {'/'.join(parts)!r} has a NUL byte in its target")
    with parent_fd(root, parts, create=True) as pfd:
        assert pfd is not None
        remove(pfd, parts[-1])
        os.symlink(target, parts[-1], dir_fd=pfd)


def make_hardlink(root: int, parts: list[str], target: str) -> None:
    name = "/".join(parts)
    tparts = parts_of(target)
    if not parts or not tparts:
        raise UnsafeLayer(f"hard link {name!r} -> {target!r} names the root directory")
    with parent_fd(root, tparts, create=False) as tfd:
        try:
            st = None if tfd is None else os.lstat(tparts[-1], dir_fd=tfd)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise UnsafeLayer(
                f"hard link {name!r} -> {target!r}: the target is not a regular file "
                f"unpacked before it"
            )
        with parent_fd(root, parts, create=True) as pfd:
            assert pfd is not None and tfd is not None
            remove(pfd, parts[-1])
            os.link(tparts[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd,
                    follow_symlinks=False)


# --- tar layers --------------------------------------------------------------------------------


def _open_stream(path: Path) -> BinaryIO:
    """`path` decompressed (gzip, bzip2 and xz by tarfile itself; zstd by `zstandard`)."""
    f = open(path, "rb")  # returned to the caller, who closes it
    magic = f.read(4)
    f.seek(0)
    if magic == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            f.close()
            raise UnsafeLayer(
                f"{path}: a zstd-compressed layer needs the 'zstandard' package"
            ) from None
        stream: BinaryIO = zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
        return stream
    return f


@contextmanager
def _members(path: Path) -> Iterator[Iterator[tuple[tarfile.TarInfo, Callable[[], IO[bytes]]]]]:
    stream = _open_stream(path)
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as e:
        stream.close()
        raise UnsafeLayer(f"{path}: not a readable tar archive ({e})") from None

    def items() -> Iterator[tuple[tarfile.TarInfo, Callable[[], IO[bytes]]]]:
        try:
            for m in tar:
                yield m, lambda m=m: tar.extractfile(m) or io.BytesIO()  # type: ignore[misc]
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise UnsafeLayer(f"{path}: corrupt tar archive ({e})") from None

    try:
        yield items()
    finally:
        tar.close()
        stream.close()


def apply_layer(path: Path, root: int, budget: Budget) -> None:
    """Apply one tar layer onto the tree at `root`: first its whiteouts (they remove what lower
    layers made, never entries of this layer), then its entries."""
    with _members(path) as members:
        for m, _ in members:
            budget.entry(m.name)
            budget.data(m.size if m.isreg() else 0, m.name)
            parts = parts_of(m.name)
            if parts and parts[-1].startswith(WHITEOUT):
                _whiteout(root, parts)
    # The first pass charged the sizes: the second only checks what it writes against them.
    data_budget = Budget()
    with _members(path) as members:
        for m, open_data in members:
            parts = parts_of(m.name)
            if parts and parts[-1].startswith(WHITEOUT):
                continue
            if m.isdir():
                make_dir(root, parts, m.mode)
            elif m.isreg():
                make_file(root, parts, m.mode, open_data(), m.size, data_budget)
            elif m.issym():
                make_symlink(root, parts, m.linkname)
            elif m.islnk():
                make_hardlink(root, parts, m.linkname)
            # Device nodes, fifos and anything else: dropped.


def _whiteout(root: int, parts: list[str]) -> None:
    with parent_fd(root, parts, create=False) as pfd:
        if pfd is None:
            return
        if parts[-1] == OPAQUE:
            clear_dir(pfd)
            return
        hidden = parts[-1][len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"whiteout {'/'.join(parts)!r} names no entry")
        remove(pfd, hidden)


# --- directories -------------------------------------------------------------------------------


def copy_tree(source: Path, root: int, budget: Budget) -> None:
    """Copy a directory tree with the same rules as a layer (symlinks copied, not followed;
    hard links become copies; device nodes and fifos dropped)."""
    src_root = os.open(source, _DIR_FLAGS)
    try:
        os.fchmod(root, dir_mode(os.fstat(src_root).st_mode))
        _copy_dir(src_root, root, [], budget)
    finally:
        os.close(src_root)


def _copy_dir(src: int, root: int, prefix: list[str], budget: Budget) -> None:
    for entry in sorted(os.listdir(src)):
        parts = [*prefix, entry]
        name = "/".join(parts)
        budget.entry(name)
        st = os.lstat(entry, dir_fd=src)
        if stat.S_ISDIR(st.st_mode):
            make_dir(root, parts, st.st_mode)
            sub = os.open(entry, _DIR_FLAGS, dir_fd=src)
            try:
                _copy_dir(sub, root, parts, budget)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src)
            with os.fdopen(fd, "rb") as data:
                make_file(root, parts, st.st_mode, data, st.st_size, budget)
        elif stat.S_ISLNK(st.st_mode):
            make_symlink(root, parts, os.readlink(entry, dir_fd=src))
