"""Starting a run in an environment: its layers are bound read-only at their store paths (no
copy) and PATH, PYTHONPATH, NODE_PATH and LD_LIBRARY_PATH point into them.

Resolving a name costs a few stat calls once it has been checked: the record and every layer
manifest are re-read and re-checked (manifest digests against the record) whenever one of them
changed on disk.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from cellblock.environments.store import Record, Store
from cellblock.errors import CorruptEnvironment, InvalidSpec


@dataclass(frozen=True)
class Resolved:
    """What a run needs of an environment: directories to bind and variables to set."""

    name: str
    binds: tuple[str, ...]
    paths: dict[str, list[str]]
    env: dict[str, str]

    def apply(self, env: dict[str, str]) -> None:
        """Puts the environment's paths in front of `env`'s and adds its variables."""
        for var, dirs in self.paths.items():
            old = env.get(var)
            env[var] = ":".join(dirs + ([old] if old else []))
        env["CELLBLOCK_ENV"] = self.name
        env.update(self.env)


_Stamp = tuple[tuple[int, int, int, int], ...]
_cache: dict[tuple[str, str], tuple[_Stamp, Resolved]] = {}
_lock = threading.Lock()


def _stat(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp(store: Store, record_path: str, record: Record | None) -> _Stamp:
    paths = [record_path]
    if record is not None:
        paths += [str(store.layer_dir(layer.key) / "manifest.json") for layer in record.layers]
    return tuple(_stat(p) for p in paths)


def resolve(name: str, store: Store | None = None) -> Resolved:
    """The environment `name`, checked (EnvironmentNotFound, CorruptEnvironment)."""
    store = store or Store()
    record_path = str(store.root / "names" / f"{name}.json")
    key = (str(store.root), name)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        stamp, resolved = hit
        if stamp[0] == _stat(record_path) and stamp == _stamp_of(store, record_path, resolved):
            return resolved
    record = store.record(name)
    stamp = _stamp(store, record_path, record)
    store.check(record)
    if any(layer.step == "base" for layer in record.layers):
        raise InvalidSpec(
            f"environment {name!r} has a root filesystem base: running on it needs the "
            "rootfs option of the sandbox (cellblock.environments.rootfs)")
    binds = []
    for layer in record.layers:
        root = store.layer_dir(layer.key) / "root"
        if not root.is_dir():
            raise CorruptEnvironment(f"environment {name!r}: layer {layer.key[:12]} has no files")
        binds.append(str(root))
    resolved = Resolved(name, tuple(binds), record.paths, record.env)
    with _lock:
        _cache[key] = (stamp, resolved)
    return resolved


def _stamp_of(store: Store, record_path: str, resolved: Resolved) -> _Stamp:
    manifests = [os.path.join(os.path.dirname(b), "manifest.json") for b in resolved.binds]
    return tuple(_stat(p) for p in [record_path, *manifests])
