"""The content-addressed store of built environments, under the user's data directory.

    $XDG_DATA_HOME/cellblock/envs/      (default ~/.local/share/cellblock/envs)
        layers/<key>/manifest.json      what the layer is: step, inputs, parent, tree digest
        layers/<key>/root/              its files (mounted read-only into runs)
        names/<name>.json               an environment: its layers (with manifest digests), vars
        tmp/                            layers being built (renamed into layers/ when complete)
        locks/<key>.lock                one builder per layer
    (runs hold a shared flock on layers/<key> while they use it: see runtime.hold)

A layer's key is the digest of its step's inputs and its parent's key, so an unchanged
declaration finds every layer already built and a changed one rebuilds from the first changed
step. A layer appears in layers/ only by rename after its files and manifest are on disk: an
interrupted build leaves at most a directory in tmp/, which the next build of that layer
removes. Runs use a layer only if its manifest digest matches the environment's record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cellblock.environments.spec import NAME_RE
from cellblock.errors import CorruptEnvironment, EnvironmentNotFound, InvalidSpec

#: Version of the on-disk format (part of every key: a new format never reuses old layers).
FORMAT = 1


def store_root() -> Path:
    """Where environments live: `$XDG_DATA_HOME/cellblock/envs` (default ~/.local/share)."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(data) / "cellblock" / "envs"


def digest(data: Any) -> str:
    """sha256 of a JSON-able value in canonical form."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


class LayerRef(BaseModel):
    """One layer of an environment, as its record names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    step: str
    manifest: str  # sha256 of the layer's manifest.json bytes


class Record(BaseModel):
    """A named environment: its layers, bottom first, and its declared variables."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = FORMAT
    name: str
    id: str
    layers: list[LayerRef]
    env: dict[str, str]
    paths: dict[str, list[str]]
    declaration: dict[str, Any]
    built: float


def tree_digest(root: Path) -> tuple[str, int, int]:
    """(sha256, files, bytes) of a directory tree: paths, types, modes, contents, link targets."""
    h = hashlib.sha256()
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(
                os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            entry = os.path.normpath(os.path.join(rel, name))
            if stat.S_ISLNK(st.st_mode):
                h.update(f"L {entry}\0{os.readlink(path)}\0".encode())
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        fh.update(chunk)
                h.update(f"F {entry}\0{st.st_mode & 0o7777:o}\0{fh.hexdigest()}\0".encode())
                files += 1
                size += st.st_size
            else:
                h.update(f"? {entry}\0{st.st_mode:o}\0".encode())
        h.update(f"D {rel}\0{os.lstat(dirpath).st_mode & 0o7777:o}\0".encode())
    return h.hexdigest(), files, size


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Store:
    """The environment store at `root` (default: `store_root()`)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else store_root()

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    def _dirs(self) -> None:
        for sub in ("layers", "names", "tmp", "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # Runs as other users (and their sandboxes) may read layers: the store is readable,
        # and its parent (which holds other data, e.g. memory.db) only traversable.
        for d, mode in ((self.root.parent, 0o711), (self.root, 0o755),
                        (self.root / "layers", 0o755), (self.root / "names", 0o755)):
            with contextlib.suppress(OSError):
                if d.stat().st_uid == os.geteuid():
                    d.chmod(d.stat().st_mode | mode)

    # ---- layers ----------------------------------------------------------------------------

    def layer_dir(self, key: str) -> Path:
        return self.layers / key

    def has_layer(self, key: str) -> bool:
        return (self.layer_dir(key) / "manifest.json").is_file()

    def manifest(self, key: str) -> dict[str, Any]:
        """A layer's manifest, checked to be this layer's (raises CorruptEnvironment)."""
        path = self.layer_dir(key) / "manifest.json"
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            raise CorruptEnvironment(f"layer {key[:12]}: unreadable manifest: {e}") from None
        if not isinstance(data, dict) or data.get("key") != key:
            raise CorruptEnvironment(f"layer {key[:12]}: manifest is not this layer's")
        return data

    def verify_layer(self, key: str) -> dict[str, Any]:
        """Recomputes a layer's tree digest against its manifest (raises CorruptEnvironment)."""
        data = self.manifest(key)
        root = self.layer_dir(key) / "root"
        if not root.is_dir():
            raise CorruptEnvironment(f"layer {key[:12]} ({data.get('step')}): files missing")
        tree, _, _ = tree_digest(root)
        if tree != data.get("tree"):
            raise CorruptEnvironment(
                f"layer {key[:12]} ({data.get('step')}): contents do not match the manifest "
                f"(tree digest {tree[:12]}, manifest says {str(data.get('tree'))[:12]})")
        return data

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Holds the build lock of a layer (blocks while another process builds it)."""
        self._dirs()
        with open(self.root / "locks" / f"{key}.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def new_layer(self, key: str) -> Iterator[Path]:
        """A fresh directory to build layer `key` in (call with its lock held); `commit` it,
        or it is removed. Leftovers of interrupted builds of this layer are removed first."""
        self._dirs()
        self._clear_leftovers(key)
        work = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.root / "tmp"))
        try:
            (work / "root").mkdir()
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _clear_leftovers(self, held: str) -> None:
        """Removes what interrupted builds left in tmp/ (never a layer another process is
        building: its lock is held)."""
        for old in (self.root / "tmp").iterdir():
            key = old.name.split(".", 1)[0]
            if key == held:
                shutil.rmtree(old, ignore_errors=True)
                continue
            with open(self.root / "locks" / f"{key}.lock", "a") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                shutil.rmtree(old, ignore_errors=True)

    def commit(self, work: Path, key: str, step: str, parent: str | None,
               inputs: dict[str, Any]) -> dict[str, Any]:
        """Writes the manifest, syncs everything and renames `work` into layers/<key>."""
        root = work / "root"
        os.chmod(work, 0o755)
        os.chmod(root, 0o755)
        tree, files, size = tree_digest(root)
        manifest = {"format": FORMAT, "key": key, "step": step, "parent": parent,
                    "inputs": inputs, "tree": tree, "files": files, "bytes": size,
                    "created": time.time()}
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.chmod(work / "manifest.json", 0o644)
        _fsync_tree(work)
        dest = self.layer_dir(key)
        # A corrupt entry found by the caller: replaced, never reused. One a run or session
        # holds is renamed aside instead of deleted (its mounts follow it) and removed by a
        # later collect once unused, as the layers of a removed environment are.
        if dest.exists() and not self._unheld(dest):
            with contextlib.suppress(FileNotFoundError):
                os.rename(dest, self.layers / f"{key}.replaced-{secrets.token_hex(6)}")
        os.rename(work, dest)
        _fsync_dir(self.layers)
        return manifest

    def manifest_digest(self, key: str) -> str:
        return hashlib.sha256((self.layer_dir(key) / "manifest.json").read_bytes()).hexdigest()

    # ---- named environments ----------------------------------------------------------------

    def _record_path(self, name: str) -> Path:
        if not NAME_RE.match(name):
            raise InvalidSpec(f"environment: {name!r} is not a valid name")
        return self.root / "names" / f"{name}.json"

    def save(self, record: Record) -> None:
        self._dirs()
        _write_atomic(self._record_path(record.name), record.model_dump_json(indent=1).encode())

    def record(self, name: str) -> Record:
        """The record of environment `name` (EnvironmentNotFound, CorruptEnvironment)."""
        path = self._record_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise EnvironmentNotFound(
                f"no environment named {name!r} in {self.root} (see 'cellblock env ls')"
            ) from None
        except OSError as e:
            raise CorruptEnvironment(f"environment {name!r}: cannot read its record: {e}") from None
        try:
            return Record.model_validate_json(data)
        except ValidationError:
            raise CorruptEnvironment(f"environment {name!r}: its record is not valid") from None

    def check(self, record: Record) -> None:
        """Cheap consistency check before a run: every layer's manifest is the recorded one."""
        for layer in record.layers:
            try:
                got = self.manifest_digest(layer.key)
            except OSError:
                raise CorruptEnvironment(
                    f"environment {record.name!r}: layer {layer.key[:12]} ({layer.step}) is "
                    "missing") from None
            if got != layer.manifest:
                raise CorruptEnvironment(
                    f"environment {record.name!r}: layer {layer.key[:12]} ({layer.step}): "
                    f"manifest digest {got[:12]} does not match the recorded {layer.manifest[:12]}")

    def names(self) -> list[str]:
        d = self.root / "names"
        return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []

    def remove(self, name: str) -> list[str]:
        """Removes environment `name` and the layers no other environment uses; returns them.
        A layer a running run or open session holds is kept for it (the name is gone at
        once: no new run starts in it) and removed by a later collect."""
        path = self._record_path(name)
        self.record(name)  # EnvironmentNotFound when absent
        path.unlink()
        return self.collect()

    def unnamed_layers(self) -> list[str]:
        """Layers on disk that no environment names (after a collect: those a run holds or
        a build is making), with replaced ones (`<key>.replaced-<id>`, see `commit`)."""
        used = self._used_layers()
        if not self.layers.is_dir():
            return []
        return sorted(e.name for e in self.layers.iterdir() if e.name not in used)

    def _used_layers(self) -> set[str]:
        used: set[str] = set()
        for name in self.names():
            with contextlib.suppress(EnvironmentNotFound, CorruptEnvironment):
                used.update(layer.key for layer in self.record(name).layers)
        return used

    def collect(self) -> list[str]:
        """Removes layers no environment names, skipping any being built or held by a run
        (runtime.hold); returns their keys."""
        used = self._used_layers()
        removed: list[str] = []
        if not self.layers.is_dir():
            return removed
        for entry in sorted(self.layers.iterdir()):
            if entry.name in used:
                continue
            with open(self.root / "locks" / f"{entry.name}.lock", "a") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if not self._unheld(entry):
                    continue
                removed.append(entry.name)
        return removed

    def _unheld(self, layer: Path) -> bool:
        """Removes a layer unless a run holds it (its build lock is held by the caller)."""
        try:
            fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use: kept until a collect finds it unused
            # Renamed away first: a reader never sees half a layer. The lock is kept until
            # it is gone: a run that opened the layer before the rename waits, then finds it
            # moved and refuses to start.
            doomed = self.root / "tmp" / f"{layer.name}.removed"
            os.rename(layer, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return True
        finally:
            os.close(fd)
