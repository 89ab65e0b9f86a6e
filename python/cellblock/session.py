"""Sessions: `cellblock.Sandbox`, one sandbox that serves many calls until it is closed.

One set of namespaces, one cgroup (memory, pids, cpus and disk are limits of the session as a
whole) and one workspace (`/workspace`, tmpfs) that persists across calls. Each call has its
own timeout, CPU-time budget and output cap, and a call that hits its timeout ends alone.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import posixpath
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict

from cellblock import _native
from cellblock.errors import InvalidSpec, SandboxIOError, SessionClosed
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.runtimes.warm import SOCKET_PATH, CallLimits, CodeResult, WarmRuntimes, zygote_source
from cellblock.sandbox import OutputCallback, build_spec, resolve_seccomp
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import Secret, SecretsArg, normalize_secrets

#: Output the zygote itself may write before its call is ended (it writes one line).
_ZYGOTE_MAX_OUTPUT = 1 << 20

#: Session-wide limits (the cgroup's); the others are per call.
SESSION_LIMITS = ("memory", "pids", "cpus", "disk")


class DirEntry(BaseModel):
    """One entry of `Sandbox.list_dir`."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: Literal["file", "dir", "symlink", "other"]
    size: int


def _exec_zygote(
    session: _native.Session,
    spec_json: str,
    bpf: bytes | None,
    on_output: Callable[[int, bytes], None],
) -> dict[str, Any]:
    return session.exec(spec_json, None, bpf, on_output)


class Sandbox:
    """A persistent sandbox: many calls, one workspace, until `close()`.

    ``Sandbox(policy=None, **limits)`` opens it; use it as a context manager or call `close()`.
    Keyword arguments override the policy: `memory`, `pids`, `cpus`, `disk` limit the session
    as a whole; `timeout`, `cpu_time`, `max_output` are the default limits of each call.
    `secrets` are injected into every call's environment and redacted from every output.
    `idle_timeout` (seconds) closes the session when no call has run for that long.
    `warm` starts runtimes at once: ``warm=("python",)`` or ``("python", "node")``.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        memory: int | str | None = None,
        pids: int | None = None,
        cpus: float | None = None,
        disk: int | str | None = None,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        seccomp: SeccompPolicy | None = None,
        allow_net: Sequence[str] | None = None,
        secrets: SecretsArg = None,
        idle_timeout: float | None = None,
        warm: Sequence[str] = (),
    ) -> None:
        unknown = set(warm) - {"python", "node"}
        if unknown:
            raise InvalidSpec(f"warm: unknown runtimes {sorted(unknown)} (python, node)")
        base = policy or Policy()
        self._policy = base.merged(
            memory=memory, pids=pids, cpus=cpus, disk=disk, timeout=timeout, cpu_time=cpu_time,
            max_output=max_output, cwd=cwd, profile=profile, seccomp=seccomp,
            env={**base.env, **env} if env else None,
            allow_net=list(allow_net) if allow_net is not None else None,
        )
        self._secrets: list[Secret] = (
            normalize_secrets(self._policy.secrets) + normalize_secrets(secrets)
        )
        spec = build_spec(["session"], self._policy, self._secrets, None)
        for name in ("timeout", "cpu_time", "max_output"):
            spec["limits"][name] = None
        self._native = _native.Session(json.dumps(spec))
        self._finalizer = weakref.finalize(self, self._native.close)
        _OPEN.add(self)
        self._closed = False
        self._lock = threading.Lock()
        self._active = 0
        self._last_used = time.monotonic()
        self.idle_timeout = idle_timeout
        self._runtimes = WarmRuntimes(
            self._native,
            self._zygote_starter(),
            {s.name: s.value.get_secret_value() for s in self._secrets},
            self._native.enforcement(),
            self._zygote_seccomp(),
        )
        if idle_timeout is not None:
            _IDLE.watch(self)
        if warm:
            try:
                with self._call():
                    self._runtimes.warm(tuple(warm))
            except BaseException:
                self.close()
                raise

    # ---- life ------------------------------------------------------------------------------

    def open(self) -> Self:
        """The sandbox is open from construction on; returns it (raises once closed)."""
        self._check_open()
        return self

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kills every process of the session and frees everything it held. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _IDLE.forget(self)
        _OPEN.discard(self)
        self._runtimes.close()
        self._finalizer()
        self._runtimes.join(timeout=10.0)

    @property
    def is_open(self) -> bool:
        """Whether the session is open and its sandbox alive."""
        return not self._closed and self._native.is_open

    @property
    def enforcement(self) -> dict[str, str | None]:
        """What enforces each session-wide limit (cgroup-v2, cgroup-v1, rlimit, tmpfs, None)."""
        with self._call():
            return dict(self._native.enforcement())

    def pause(self) -> None:
        """Freezes every process of the session (cgroup freezer); state, files and processes
        are kept. Needs a freezer cgroup (root): otherwise raises SetupError."""
        with self._call():
            self._native.pause()

    def resume(self) -> None:
        """Thaws a paused session."""
        with self._call():
            self._native.resume()

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return f"<cellblock.Sandbox {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosed("the sandbox is closed")

    @contextmanager
    def _call(self) -> Iterator[None]:
        """Marks a call in progress (the idle timer does not run during calls)."""
        with self._lock:
            self._check_open()
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last_used = time.monotonic()

    def idle_deadline(self) -> float | None:
        """When the idle timeout closes this session (monotonic clock), if it will."""
        with self._lock:
            if self.idle_timeout is None or self._active or self._closed:
                return None
            return self._last_used + self.idle_timeout

    # ---- commands --------------------------------------------------------------------------

    def _call_policy(self, **fields: Any) -> Policy:
        env = fields.pop("env", None)
        return self._policy.merged(env={**self._policy.env, **env} if env else None, **fields)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        seccomp: SeccompPolicy | None = None,
        secrets: SecretsArg = None,
        on_output: OutputCallback | None = None,
    ) -> RunResult:
        """Runs a command in the session. The seccomp profile is chosen from argv[0] unless
        given; limits left out default to the session's per-call limits."""
        with self._call():
            policy = self._call_policy(
                timeout=timeout, cpu_time=cpu_time, max_output=max_output, cwd=cwd,
                profile=profile, seccomp=seccomp, env=env,
            )
            compiled = resolve_seccomp(argv, policy.profile, policy.seccomp)
            spec = build_spec(argv, policy, normalize_secrets(secrets), compiled)
            data = stdin.encode() if isinstance(stdin, str) else stdin
            report = self._native.exec(
                json.dumps(spec), data, compiled.bpf if compiled else None, on_output
            )
            return RunResult(**report)

    def run_shell(self, script: str, **kwargs: Any) -> RunResult:
        """Runs a shell script (`/bin/sh -c script`); keyword arguments as for `run`."""
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def run_python(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """Runs Python code in the session's warm interpreter.

        Stateless (default): a fresh fork of a pristine interpreter per call, so nothing of one
        call (globals, imports, monkey-patching, processes) reaches the next. Stateful: one
        long-lived interpreter whose globals survive between calls, like a notebook kernel.
        The result adds `value` (repr of the last expression) and `error` (the traceback).
        Keyword arguments: timeout, cpu_time, max_output, stdin, env, cwd, secrets.
        """
        return self._run_code("python", code, stateful, **kwargs)

    def run_node(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """Runs JavaScript in the session's warm Node runtime: a fresh vm context per call
        (stateless) or one persistent context (stateful). As `run_python` otherwise (no stdin)."""
        return self._run_code("node", code, stateful, **kwargs)

    def _run_code(
        self,
        language: Literal["python", "node"],
        code: str,
        stateful: bool,
        *,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        secrets: SecretsArg = None,
    ) -> CodeResult:
        with self._call():
            policy = self._call_policy(timeout=timeout, cpu_time=cpu_time, max_output=max_output)
            limits = policy.limits()
            call_secrets = normalize_secrets(secrets)
            return self._runtimes.run(
                language, code, stateful=stateful,
                limits=CallLimits(limits["timeout"], limits["cpu_time"], limits["max_output"]),
                stdin=stdin.encode() if isinstance(stdin, str) else stdin,
                env=dict(env or {}), cwd=cwd,
                secrets={s.name: s.value.get_secret_value() for s in call_secrets},
            )

    def _zygote_seccomp(self) -> dict[str, Any] | None:
        """The seccomp part of the zygote's spec: warm calls report refusals by these names."""
        compiled = resolve_seccomp(["python3"], self._policy.profile, self._policy.seccomp)
        seccomp: dict[str, Any] | None = build_spec(["python3"], self._policy, [], compiled).get(
            "seccomp"
        )
        return seccomp

    def _zygote_starter(self) -> Callable[[Callable[[int, bytes], None]], dict[str, Any]]:
        """How the warm runtimes start their zygote: a long-lived call of this session. (A
        function of the native session only, so that a forgotten Sandbox can be collected.)
        The zygote gets the filter's program and every worker installs it, before any code
        runs, with a listener of its own: each call's refusals are its own. (The kernel allows
        one listener per filter chain, so the zygote itself, which runs no code of the
        sandbox's, is started without one.)"""
        compiled = resolve_seccomp(["python3"], self._policy.profile, self._policy.seccomp)
        bpf = base64.b64encode(compiled.bpf).decode() if compiled else ""
        argv = ["python3", "-c", zygote_source(), SOCKET_PATH, bpf]
        spec = build_spec(argv, self._policy, [], None)
        spec["limits"].update(timeout=None, cpu_time=None, max_output=_ZYGOTE_MAX_OUTPUT)
        return functools.partial(_exec_zygote, self._native, json.dumps(spec), None)

    # ---- files -----------------------------------------------------------------------------

    def write_file(self, path: str, data: bytes | str) -> None:
        """Writes a file (created or replaced; missing parents created). Relative paths are
        under /workspace; every path stays inside the sandbox (PathEscape otherwise)."""
        with self._call():
            self._native.write_file(path, data.encode() if isinstance(data, str) else bytes(data))

    def read_file(self, path: str) -> bytes:
        """Reads a whole file of the sandbox."""
        with self._call():
            return self._native.read_file(path)

    def make_dirs(self, path: str) -> None:
        """Creates a directory and its missing parents."""
        with self._call():
            self._native.make_dirs(path)

    def list_dir(self, path: str = "/workspace") -> list[DirEntry]:
        """The entries of a directory, sorted by name (symlinks are listed, not followed)."""
        with self._call():
            return [DirEntry(**e) for e in self._native.list_dir(path)]

    def remove(self, path: str, recursive: bool = False) -> None:
        """Removes a file, a symlink (never its target) or an empty directory; with
        `recursive`, a directory and everything under it."""
        with self._call():
            if recursive and self._kind(path) == "dir":
                for entry in self._native.list_dir(path):
                    child = posixpath.join(path, entry["name"])
                    self.remove(child, recursive=entry["kind"] == "dir")
            self._native.remove(path)

    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """Copies a host file or directory tree into the sandbox at `path`."""
        src = Path(local)
        with self._call():
            if src.is_dir():
                self._native.make_dirs(path)
                for child in sorted(src.iterdir()):
                    self.upload(child, posixpath.join(path, child.name))
            else:
                self._native.write_file(path, src.read_bytes())

    def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """Copies a sandbox file or directory tree to the host path `local` (symlinks inside
        the sandbox are skipped, never followed)."""
        dst = Path(local)
        with self._call():
            if self._kind(path) == "dir":
                dst.mkdir(parents=True, exist_ok=True)
                for entry in self._native.list_dir(path):
                    if entry["kind"] in ("file", "dir"):
                        self.download(posixpath.join(path, entry["name"]), dst / entry["name"])
            else:
                dst.write_bytes(self._native.read_file(path))

    def _kind(self, path: str) -> str:
        """The kind of entry at `path` ("dir", "file", "symlink", "other"), not following it."""
        full = path if path.startswith("/") else posixpath.join("/workspace", path)
        full = full.rstrip("/") or "/"
        if full == "/":
            return "dir"
        parent, name = posixpath.split(full)
        for entry in self._native.list_dir(parent):
            if entry["name"] == name:
                return str(entry["kind"])
        raise SandboxIOError(f"{path}: no such file or directory")


class _IdleWatcher:
    """One thread that closes sessions whose idle timeout has passed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sessions: weakref.WeakSet[Sandbox] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def watch(self, sandbox: Sandbox) -> None:
        with self._cond:
            self._sessions.add(sandbox)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="cellblock-idle", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def forget(self, sandbox: Sandbox) -> None:
        with self._cond:
            self._sessions.discard(sandbox)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                deadlines = [
                    (d, s) for s in list(self._sessions) if (d := s.idle_deadline()) is not None
                ]
                expired = [s for d, s in deadlines if d <= now]
                pending = [d for d, _ in deadlines if d > now]
                if not expired:
                    # Calls end without notifying: look again at least every second.
                    self._cond.wait(min([1.0, *(d - now for d in pending)]))
                    continue
            for s in expired:
                s.close()


_IDLE = _IdleWatcher()

#: Every open sandbox, closed at interpreter exit: a zygote thread still inside the native
#: core when the interpreter finalizes would abort the process.
_OPEN: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sandbox in list(_OPEN):
        sandbox.close()
