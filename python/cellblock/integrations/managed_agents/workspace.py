"""One work item's sandbox: a `cellblock.Sandbox` opened at the first tool call, holding the
session's skills and memory stores, and the path rules of the file tools."""

from __future__ import annotations

import posixpath
import threading
from pathlib import Path

from anthropic.lib.tools.agent_toolset import AgentToolContext

from cellblock.errors import CellblockError
from cellblock.policy import Policy
from cellblock.session import Sandbox

#: The sandbox's working directory: the file tools' root and bash's first cwd.
WORKSPACE = "/workspace"

#: Where memory stores mounted outside the worker's workdir go (the sandbox root is read-only).
MOUNTS = WORKSPACE + "/.mounts"


class SandboxWorkspace:
    """The sandbox of one work item and the mapping between it and the SDK's host folders.

    The SDK downloads skills to ``{workdir}/skills/<name>/`` and memory stores to their
    ``mount_path`` (or ``{workdir}/memory/<name>``) on the host; the sandbox gets them at
    ``/workspace/skills/<name>/``, ``/workspace/memory/<name>`` and, for mount paths elsewhere,
    ``/workspace/.mounts<mount_path>`` (the file tools accept the mount path itself too).
    Writable memory stores are copied back to the host after every call that can change
    them, so the SDK's memory sync sees the agent's edits.
    """

    def __init__(self, ctx: AgentToolContext, policy: Policy) -> None:
        self._ctx = ctx
        self._policy = policy
        self._host_root = Path(ctx.workdir).resolve()
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ---- life ------------------------------------------------------------------------------

    def sandbox(self) -> Sandbox:
        """The item's sandbox, opened (and given skills and memory) at the first call."""
        with self._lock:
            if self._closed:
                raise CellblockError("the work item's sandbox is closed")
            if self._sandbox is None:
                sandbox = Sandbox(self._policy)
                try:
                    self._place(sandbox)
                except BaseException:
                    sandbox.close()
                    raise
                self._sandbox = sandbox
            return self._sandbox

    @property
    def policy(self) -> Policy:
        """The policy every sandbox of this workspace is opened with."""
        return self._policy

    @property
    def opened(self) -> Sandbox | None:
        """The sandbox if one was opened (it stays referenced after `close`)."""
        return self._sandbox

    def close(self) -> None:
        """Copies writable memory back to the host, then closes the sandbox. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sandbox = self._sandbox
        if sandbox is None:
            return
        try:
            self._pull_memory(sandbox)
        finally:
            sandbox.close()

    def sync_memory(self) -> None:
        """Copies the writable memory stores from the sandbox to the host (new and changed
        files; deletions inside the sandbox are not propagated)."""
        with self._lock:
            sandbox = None if self._closed else self._sandbox
        if sandbox is not None:
            self._pull_memory(sandbox)

    # ---- placement -------------------------------------------------------------------------

    def to_sandbox(self, host: Path) -> str:
        """The sandbox path of a host folder the SDK prepared (workdir or a memory store)."""
        host = host.resolve()
        if host.is_relative_to(self._host_root):
            rel = host.relative_to(self._host_root).as_posix()
            return WORKSPACE if rel == "." else f"{WORKSPACE}/{rel}"
        return MOUNTS + host.as_posix()

    def _place(self, sandbox: Sandbox) -> None:
        skills = self._host_root / "skills"
        if skills.is_dir():
            sandbox.upload(skills, f"{WORKSPACE}/skills")
        for root in self._ctx.allowed_roots:
            if Path(root).is_dir():
                sandbox.upload(root, self.to_sandbox(Path(root)))

    def _writable_memory(self) -> list[Path]:
        read_only = {Path(r).resolve() for r in self._ctx.read_only_roots}
        return [Path(r) for r in self._ctx.allowed_roots if Path(r).resolve() not in read_only]

    def _pull_memory(self, sandbox: Sandbox) -> None:
        for root in self._writable_memory():
            if sandbox.is_open:
                _mirror(sandbox, self.to_sandbox(root), root)

    def host_memory_path(self, path: str) -> Path | None:
        """The host file of a sandbox path inside a writable memory store (where the SDK's
        memory write saves it), or None."""
        for root in self._writable_memory():
            inside = self.to_sandbox(root)
            if _within(path, inside) and path != inside:
                return root.resolve() / posixpath.relpath(path, inside)
        return None

    # ---- paths of the file tools -----------------------------------------------------------

    def roots(self) -> list[str]:
        """Sandbox folders the file tools may reach."""
        return [WORKSPACE] + [self.to_sandbox(Path(r)) for r in self._ctx.allowed_roots]

    def read_only(self, path: str) -> bool:
        """Whether `path` (a resolved sandbox path) lies in a read-only memory store."""
        return any(_within(path, self.to_sandbox(Path(r))) for r in self._ctx.read_only_roots)

    def resolve(self, path: str) -> str:
        """The sandbox path a tool's `file_path` names: relative paths are under /workspace,
        an absolute host path of the workdir or of a memory store is translated. Raises
        ValueError outside the workspace and the memory stores, or through a symlink (the
        file tools never follow one: its target is whatever the sandboxed code made it)."""
        if posixpath.isabs(path):
            full = posixpath.normpath(path)
            for host in (self._host_root, *(Path(r).resolve() for r in self._ctx.allowed_roots)):
                if _within(full, host.as_posix()):
                    rel = posixpath.relpath(full, host.as_posix())
                    full = posixpath.normpath(posixpath.join(self.to_sandbox(host), rel))
                    break
        else:
            full = posixpath.normpath(posixpath.join(WORKSPACE, path))
        root = next((r for r in self.roots() if _within(full, r)), None)
        if root is None:
            raise ValueError(f"path {path!r} is outside the session's working directory")
        self.refuse_symlinks(path, root, full)
        return full

    def refuse_symlinks(self, path: str, root: str, full: str) -> None:
        """Raises ValueError if `full` passes through a symlink below `root`."""
        # Only below `root` can the sandboxed code have made links; above it are the
        # sandbox's own mount points, which the files API does not list anyway.
        sandbox = self.sandbox()
        current = root
        rest = posixpath.relpath(full, root)
        for part in [] if rest == "." else rest.split("/"):
            entries = {e.name: e.kind for e in sandbox.list_dir(current)}
            kind = entries.get(part)
            if kind is None:
                return  # the rest does not exist yet
            current = posixpath.join(current, part)
            if kind == "symlink":
                raise ValueError(f"path {path!r} passes through a symlink, which is not followed")
            if kind != "dir":
                return


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _mirror(sandbox: Sandbox, src: str, dst: Path) -> None:
    """Copies new and changed regular files of the sandbox folder `src` to the host `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sandbox.list_dir(src):
        if entry.name in ("", ".", "..") or "/" in entry.name:
            continue  # names come from the sandbox: never let one leave `dst`
        child = posixpath.join(src, entry.name)
        target = dst / entry.name
        if entry.kind == "dir":
            if not target.is_symlink():
                _mirror(sandbox, child, target)
        elif entry.kind == "file" and not target.is_symlink():
            data = sandbox.read_file(child)
            if not target.is_file() or target.read_bytes() != data:
                target.write_bytes(data)
