"""Forking a session (`Sandbox.fork`): a new, separately isolated sandbox (its own namespaces,
cgroup and workspace) that starts with a copy of the parent's workspace and of its stateful
Python kernel's globals.

A process fork of the kernel would keep the parent's namespaces, cgroup and seccomp filter
(a process without capabilities cannot move into another sandbox's), so the fork would not be
isolated from its parent: the state is copied instead. The supervisor copies the workspace
from one sandbox's root to the other's (rust/core/src/files/copy.rs). The parent's kernel
pickles its globals to a file of its own scratch space (runtimes/state_py.py), the supervisor
copies that file raw into the fork's, and the fork's kernel unpickles it there: what the
parent's sandbox wrote is only ever read inside the fork (never by the host), which is a copy
of the parent and so runs nothing the parent could not have run itself.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field

from cellblock.errors import CellblockError, ForkError, InvalidSpec
from cellblock.redaction import redact_error, redactor_for

if TYPE_CHECKING:
    from cellblock.policy import Policy
    from cellblock.secrets import Secret
    from cellblock.session import Sandbox

#: Where a kernel's state travels, in both sandboxes (the zygote's own directory, 0700).
STATE_DIR = "/tmp/.cellblock"

#: Seconds a fork may take to save or load a kernel's state, by default.
DEFAULT_FORK_TIMEOUT = 60.0


class ForkReport(BaseModel):
    """What `Sandbox.fork` carried into the fork (its `fork_report`).

    Files: counted by the supervisor; `skipped_files` are paths not copied, with the reason
    (fifos, sockets, devices, other mounts, files unreadable to the sandbox's own uid).
    Kernel: `state` says whether a stateful Python kernel's globals were carried (False when
    the parent had none running); `names` how many; `skipped_names` maps each name that could
    not be pickled (an open file, a socket, a thread, a generator) to the reason, as the
    parent's kernel reported it (content of the sandbox, not a fact).
    """

    model_config = ConfigDict(frozen=True)

    files: int
    dirs: int
    symlinks: int
    bytes: int
    skipped_files: list[str] = Field(default_factory=list)
    state: bool = False
    names: int = 0
    skipped_names: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0
    #: Seconds of each step: "workspace", "kernel_start", "save", "copy_state", "load" (the
    #: first two run while the parent saves).
    steps: dict[str, float] = Field(default_factory=dict)


def _names(said: dict[str, object]) -> dict[str, str]:
    """The kernel's skipped names, kept only as str -> str (it could say anything)."""
    got = said.get("skipped")
    if not isinstance(got, dict):
        return {}
    return {str(k)[:200]: str(v)[:200] for k, v in list(got.items())[:200]}


def _count(said: dict[str, object], key: str) -> int:
    n = said.get(key)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def carry_over(parent: Sandbox, child: Sandbox, timeout: float) -> ForkReport:
    """Copies the parent's workspace and kernel state into `child` (a fresh session of the
    same policy); the parent is held in a call meanwhile. Raises `ForkError` when the state
    cannot be carried (the child is then the caller's to close)."""
    started = time.monotonic()
    path = f"{STATE_DIR}/fork-{secrets.token_hex(8)}.state"
    has_kernel = parent._runtimes.has_python_kernel()
    starting: list[BaseException] = []
    steps: dict[str, float] = {}

    def timed(step: str, since: float) -> None:
        steps[step] = round(time.monotonic() - since, 4)

    def start_kernel() -> None:
        t = time.monotonic()
        try:
            child._runtimes.start_python_kernel(timeout)
        except BaseException as e:  # re-raised in the caller's thread
            starting.append(e)
        timed("kernel_start", t)

    copied: dict[str, Any] = {}
    copying: list[BaseException] = []

    def copy_workspace() -> None:
        t = time.monotonic()
        try:
            copied.update(parent._native.copy_workspace_to(child._native))
        except BaseException as e:  # re-raised in the caller's thread
            copying.append(e)
        timed("workspace", t)

    # The fork's kernel starts and the workspace is copied while the parent's kernel saves
    # its state and the supervisor copies that.
    threads = [threading.Thread(target=copy_workspace, name="cellblock-fork-copy", daemon=True)]
    if has_kernel:
        threads.append(
            threading.Thread(target=start_kernel, name="cellblock-fork-kernel", daemon=True)
        )
    for thread in threads:
        thread.start()
    try:
        saved: dict[str, object] = {}
        if has_kernel:
            try:
                t = time.monotonic()
                saved = parent._runtimes.kernel_state("save", path, timeout)
                timed("save", t)
                if "error" in saved:
                    raise ForkError(f"the kernel's state could not be saved: {saved['error']}")
                t = time.monotonic()
                parent._native.copy_file_to(path, child._native, path, 1 << 62)
                timed("copy_state", t)
            except ForkError:
                raise
            except CellblockError as e:
                # Code of the parent replaced the file with something else (a symlink, a fifo).
                raise ForkError(f"the kernel's state could not be copied: {e}") from None
            finally:
                try:
                    parent._native.remove(path)
                except CellblockError:
                    pass  # never written, or removed by the parent's code itself
    finally:
        for thread in threads:
            thread.join(timeout)
    if copying:
        raise copying[0]
    if any(thread.is_alive() for thread in threads):
        raise ForkError(f"the copy into the fork did not finish within {timeout:g} s")
    if starting:
        raise starting[0]
    loaded: dict[str, object] = {}
    if has_kernel:
        t = time.monotonic()
        loaded = child._runtimes.kernel_state("load", path, timeout)
        timed("load", t)
        if "error" in loaded:
            raise ForkError(f"the fork's kernel could not load the state: {loaded['error']}")
    return ForkReport(
        files=copied["files"], dirs=copied["dirs"], symlinks=copied["symlinks"],
        bytes=copied["bytes"], skipped_files=list(copied["skipped"]),
        state=has_kernel, names=_count(loaded, "loaded"), skipped_names=_names(saved),
        seconds=time.monotonic() - started, steps=steps,
    )


class SpareFork:
    """A session opened ahead of time, its Python kernel started, for the next fork
    (`Sandbox.prepare_fork`): the fork then costs only the copies. Opened on a thread of its
    own; `take` gives it if it opened with the policy the parent has at the time of the fork."""

    def __init__(self, open_child: Callable[[], Sandbox], policy: Policy, timeout: float) -> None:
        self.policy = policy
        self.child: Sandbox | None = None
        self.thread = threading.Thread(
            target=self._open, args=(open_child, timeout), name="cellblock-fork-spare",
            daemon=True,
        )
        self.thread.start()

    def _open(self, open_child: Callable[[], Sandbox], timeout: float) -> None:
        try:
            child = open_child()
        except CellblockError:
            return  # the fork opens its own, and raises then
        try:
            child._runtimes.start_python_kernel(timeout)
        except CellblockError:
            pass  # started again by the fork
        self.child = child

    def take(self, policy: Policy) -> Sandbox | None:
        """The spare session, unless it failed or the parent's policy changed since."""
        self.thread.join()
        child, self.child = self.child, None
        if child is not None and (policy != self.policy or not child.is_open):
            child.close()
            child = None
        return child

    def discard(self) -> None:
        self.thread.join()
        if self.child is not None:
            self.child.close()
            self.child = None


class SandboxForks:
    """The fork API, mixed into `cellblock.Sandbox` (which provides the rest)."""

    _fork_report: ForkReport | None
    _spare: SpareFork | None
    _lock: threading.Lock
    _policy: Policy
    _secrets: list[Secret]

    def _call(self) -> AbstractContextManager[None]:
        """Marks a call in progress (raises once the sandbox is closed)."""
        raise NotImplementedError

    def _fork_child(self) -> Sandbox:
        """A new session as this one was opened (its policy as it is now)."""
        raise NotImplementedError

    def fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> Sandbox:
        """A new session, isolated from this one as any other (its own namespaces, cgroup
        and workspace, the same policy and secrets), that starts with a copy of this one's
        workspace and of its stateful Python kernel's globals (`run_python(...,
        stateful=True)`): variables, and functions and classes defined in the session, by
        value. Afterwards the two are independent: changes in one are not seen in the other,
        and closing one leaves the other open. Processes, open files, sockets, threads and
        generators are not carried: such names are listed in the fork's
        `fork_report.skipped_names`, and fifos, sockets and devices of the workspace in
        `fork_report.skipped_files`. Node kernels are not carried. `timeout`: seconds the
        saving and the loading of the kernel's state may each take (a save that takes longer
        ends the parent's kernel, as a call's timeout does).
        Raises `ForkError` when the copy does not fit the fork's disk limit or the state
        cannot be saved or loaded (the fork is then closed)."""
        if not timeout > 0:
            raise InvalidSpec(f"fork: timeout must be a number of seconds > 0, got {timeout!r}")
        with self._call():
            with self._lock:
                spare, self._spare = self._spare, None
            child = spare.take(self._policy) if spare is not None else None
            if child is None:
                child = self._fork_child()
            try:
                child._fork_report = carry_over(cast("Sandbox", self), child, timeout)
            except BaseException as e:
                child.close()
                if isinstance(e, CellblockError):
                    raise redact_error(e, redactor_for(self._secrets)) from None
                raise
        return child

    @property
    def fork_report(self) -> ForkReport | None:
        """What `fork()` carried into this session, when it is a fork (else None)."""
        return self._fork_report

    def prepare_fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> None:
        """Opens, in the background, the session the next `fork()` will be (its Python kernel
        started), so that the fork then costs only the copies. One at a time; it is a fresh
        session that nothing has run in, closed with this one if no fork takes it, and not
        used if the policy changed meanwhile (`set_network`)."""
        with self._call(), self._lock:
            if self._spare is None:
                self._spare = SpareFork(self._fork_child, self._policy, timeout)
