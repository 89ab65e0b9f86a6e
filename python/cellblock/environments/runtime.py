"""Starting a run in an environment: its layers are bound read-only at their store paths (no
copy) and PATH, PYTHONPATH, NODE_PATH and LD_LIBRARY_PATH point into them.

Resolving a name costs a few stat calls once it has been checked: the record and every layer
manifest are re-read and re-checked (manifest digests against the record) whenever one of them
changed on disk.

A run or session `hold`s its environment while it runs: a shared flock on each layer directory,
which `Store.collect` (`cellblock env rm`) needs exclusively to remove a layer. A layer in use
is kept, never emptied under a run, and removed by a later collect once unused.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from cellblock.environments.store import Store
from cellblock.errors import CorruptEnvironment, EnvironmentNotFound


@dataclass(frozen=True)
class Resolved:
    """What a run needs of an environment: directories to bind and variables to set."""

    name: str
    binds: tuple[str, ...]
    paths: dict[str, list[str]]
    env: dict[str, str]
    #: The base layer's tree when the environment has a root filesystem base: the run's root.
    rootfs: str | None = None
    #: The directories of its layers (layers/<key>), what a `hold` locks.
    layers: tuple[str, ...] = ()

    def apply(self, env: dict[str, str]) -> None:
        """Puts the environment's paths in front of `env`'s and adds its variables."""
        for var, dirs in self.paths.items():
            old = env.get(var)
            env[var] = ":".join(dirs + ([old] if old else []))
        env["CELLBLOCK_ENV"] = self.name
        env.update(self.env)


_Stamp = tuple[tuple[int, int, int, int], ...]
#: (store root, name) -> (files the result depends on, their stamp, the result).
_cache: dict[tuple[str, str], tuple[tuple[str, ...], _Stamp, Resolved]] = {}
_lock = threading.Lock()


def _stat(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _default_root() -> str:
    # store_root() without pathlib: this runs before every run in an environment.
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(data, "cellblock", "envs")


def resolve(name: str, store: Store | None = None) -> Resolved:
    """The environment `name`, checked (EnvironmentNotFound, CorruptEnvironment)."""
    key = (str(store.root) if store is not None else _default_root(), name)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        paths, stamp, resolved = hit
        if tuple(map(_stat, paths)) == stamp:
            return resolved
    store = store or Store(key[0])
    record = store.record(name)  # validates the name
    paths = (str(store.root / "names" / f"{name}.json"),
             *(str(store.layer_dir(layer.key) / "manifest.json") for layer in record.layers))
    # Stamped before checking: a change during the check is seen by the next use.
    stamp = tuple(map(_stat, paths))
    store.check(record)
    binds = []
    rootfs = None
    for layer in record.layers:
        root = store.layer_dir(layer.key) / "root"
        if not root.is_dir():
            raise CorruptEnvironment(f"environment {name!r}: layer {layer.key[:12]} has no files")
        if layer.step == "base":
            rootfs = str(root)
        else:
            binds.append(str(root))
    layers = tuple(str(store.layer_dir(layer.key)) for layer in record.layers)
    resolved = Resolved(name, tuple(binds), record.paths, record.env, rootfs, layers)
    with _lock:
        _cache[key] = (paths, stamp, resolved)
    return resolved


class Hold:
    """An environment resolved and held for a run or session (see the module docs): its
    layers stay as they are until `release()` (or until this object is collected)."""

    def __init__(self, resolved: Resolved, fds: list[int]) -> None:
        self.resolved = resolved
        self._fds = fds
        self._release = weakref.finalize(self, _close_all, fds)

    def share(self) -> Hold:
        """Another hold of the same layers, released on its own: a fork's, which goes on
        using its parent's layers even once the name is removed or rebuilt, or the parent
        closed. The descriptors are duplicated, so they share the parent's locks (a flock
        belongs to the open file, released when its last descriptor closes)."""
        if not self._release.alive:
            raise EnvironmentNotFound(
                f"environment {self.resolved.name!r}: its hold was released")
        fds: list[int] = []
        try:
            for fd in self._fds:
                fds.append(os.dup(fd))  # non-inheritable, as Python makes every descriptor
        except BaseException:
            _close_all(fds)
            raise
        return Hold(self.resolved, fds)

    def release(self) -> None:
        """Lets `Store.collect` remove the layers again (idempotent)."""
        self._release()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def hold(name: str, store: Store | None = None) -> Hold:
    """Resolves environment `name` and holds its layers (EnvironmentNotFound when it is
    removed meanwhile, CorruptEnvironment as `resolve`)."""
    resolved = resolve(name, store)
    fds: list[int] = []
    try:
        for layer in resolved.layers:
            gone = EnvironmentNotFound(
                f"environment {name!r} was removed while a run was starting in it (layer "
                f"{os.path.basename(layer)[:12]} is gone)")
            try:
                fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise gone from None
            fds.append(fd)
            # Blocks only while a collect removes this very layer; then it is gone.
            fcntl.flock(fd, fcntl.LOCK_SH)
            held = os.fstat(fd)
            try:
                now = os.stat(layer)
            except FileNotFoundError:
                raise gone from None
            if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise gone
    except BaseException:
        _close_all(fds)
        raise
    return Hold(resolved, fds)


@contextlib.contextmanager
def held(name: str | None) -> Iterator[Resolved | None]:
    """`hold(name)` for the duration of a block (None: no environment)."""
    if name is None:
        yield None
        return
    h = hold(name)
    try:
        yield h.resolved
    finally:
        h.release()
