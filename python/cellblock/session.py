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
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal, Self

from cellblock import _native
from cellblock.credentials import CredentialsArg, credential_hosts
from cellblock.environments.runtime import Hold, hold
from cellblock.errors import (
    CellblockError,
    InvalidSpec,
    SessionClosed,
    SetupError,
)
from cellblock.files import SandboxFiles
from cellblock.fork import ForkReport, SandboxForks, SpareFork
from cellblock.observe import notify_run, notify_session
from cellblock.policy import Policy, as_pattern_list
from cellblock.process import SandboxProcesses
from cellblock.redaction import redact_error, redactor_for
from cellblock.result import RunResult
from cellblock.runtimes.warm import SOCKET_PATH, CallLimits, CodeResult, WarmRuntimes, zygote_source
from cellblock.sandbox import OutputCallback, build_spec, resolve_seccomp, with_credentials
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import Secret, SecretsArg, normalize_secrets
from cellblock.terminal import SizeArg, tty_section, typed_input, typing_from, window_source

_log = logging.getLogger("cellblock.session")

#: Output the zygote itself may write before its call is ended (it writes one line).
_ZYGOTE_MAX_OUTPUT = 1 << 20
#: How long a close() waits for another thread's close of the same session (its own waits
#: are bounded by the core's deadlines and the runtimes' join).
_CLOSE_WAIT = 30.0

#: The layer hold a fork's new session takes over from its parent (set by `_fork_child` for
#: the constructor it calls).
_FORK_HOLD: ContextVar[Hold | None] = ContextVar("cellblock_fork_hold", default=None)

#: Session-wide limits (the cgroup's); the others are per call.
SESSION_LIMITS = ("memory", "pids", "cpus", "disk")


def _exec_zygote(
    session: _native.Session,
    spec_json: str,
    bpf: bytes | None,
    on_output: Callable[[int, bytes], None],
    on_start: Callable[[int], None],
) -> dict[str, Any]:
    return session.exec(spec_json, None, bpf, on_output, on_start=on_start)


class Sandbox(SandboxFiles, SandboxProcesses, SandboxForks):
    """A persistent sandbox: many calls, one workspace, until `close()`.

    ``Sandbox(policy=None, **limits)`` opens it; use it as a context manager or call `close()`.
    Keyword arguments override the policy: `memory`, `pids`, `cpus`, `disk` limit the session
    as a whole; `timeout`, `cpu_time`, `max_output` are the default limits of each call.
    `secrets` are injected into every call's environment and redacted from every output.
    `credentials` (`cellblock.Credential`) live and die with the session: every call sees the
    same placeholders, the egress proxy substitutes the values.
    `idle_timeout` (seconds) closes the session when no call has run for that long.
    `auto_pause` (seconds) freezes the session when no call has run for that long and thaws it
    on the next call, so that an idle session costs no CPU (needs a freezer cgroup: root);
    `paused_seconds` says how long it was frozen so.
    `warm` starts runtimes at once: ``warm=("python",)`` or ``("python", "node")``.
    `start` runs background processes and `expose` forwards ports (see cellblock.process).
    `environment` names a built environment, mounted read-only for the whole session.
    `fork()` opens a new session with a copy of this one's workspace and kernel state (see
    cellblock.fork).
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
        environment: str | None = None,
        credentials: CredentialsArg = None,
        idle_timeout: float | None = None,
        auto_pause: float | None = None,
        warm: Sequence[str] = (),
        rootfs: str | os.PathLike[str] | None = None,
    ) -> None:
        unknown = set(warm) - {"python", "node"}
        if unknown:
            raise InvalidSpec(f"warm: unknown runtimes {sorted(unknown)} (python, node)")
        for name, value in (("idle_timeout", idle_timeout), ("auto_pause", auto_pause)):
            if value is not None and not value > 0:
                raise InvalidSpec(f"{name} must be a number of seconds > 0, got {value!r}")
        base = policy or Policy()
        self._policy = base.merged(
            memory=memory, pids=pids, cpus=cpus, disk=disk, timeout=timeout, cpu_time=cpu_time,
            max_output=max_output, cwd=cwd, profile=profile, seccomp=seccomp,
            env={**base.env, **env} if env else None,
            allow_net=as_pattern_list(allow_net), rootfs=rootfs, environment=environment,
            credentials=with_credentials(base, credentials),
        )
        self._secrets: list[Secret] = (
            normalize_secrets(self._policy.secrets) + normalize_secrets(secrets)
        )
        # The environment's layers are held while the session is open (see
        # cellblock.environments.runtime): its calls use them as resolved now. A fork is
        # given its parent's hold (`_FORK_HOLD`): it uses the layers its parent does, even
        # when the name was removed or built again since.
        self._env_hold = _FORK_HOLD.get() or (
            hold(self._policy.environment) if self._policy.environment else None)
        self._environment = self._env_hold.resolved if self._env_hold else None
        try:
            spec = build_spec(["session"], self._policy, self._secrets, None,
                              environment=self._environment)
        except BaseException:
            self._release_environment()
            raise
        if spec["rootfs"] and warm:
            raise InvalidSpec("warm runtimes are the host's: they cannot run on a rootfs")
        for name in ("timeout", "cpu_time", "max_output"):
            spec["limits"][name] = None
        if allow_net is not None and spec["net"] is None:
            # An explicit empty list opens the egress plumbing with nothing allowed, so that
            # set_network can allow hosts later (a session without it never gets network).
            spec["net"] = {"allow": []}
        try:
            self._native = _native.Session(json.dumps(spec))
        except BaseException:
            self._release_environment()
            raise
        # What a fork is opened with (the policy above, as it is then).
        self._extra_secrets = secrets
        self._net_plumbed = spec["net"] is not None
        self._fork_report: ForkReport | None = None
        self._spare: SpareFork | None = None
        self._finalizer = weakref.finalize(self, self._native.close)
        _OPEN.add(self)
        self._closed = False
        #: Set once close() has freed everything; a close() racing another waits for it.
        self._torn_down = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._procs = []
        self._last_used = time.monotonic()
        self.idle_timeout = idle_timeout
        self.auto_pause = auto_pause
        #: Seconds this session spent frozen by `auto_pause` (the current pause included).
        self._paused_total = 0.0
        self._auto_paused_at: float | None = None
        self._user_paused = False
        self._runtimes = WarmRuntimes(
            self._native,
            self._zygote_starter(),
            {s.name: s.value.get_secret_value() for s in self._secrets},
            self._native.enforcement(),
            self._zygote_seccomp(),
        )
        notify_session("open", self)
        if auto_pause is not None:
            try:  # fail now, not at the first idle moment, where nobody would see it
                self._native.pause()
                self._native.resume()
            except SetupError as e:
                self.close()
                raise SetupError(f"auto_pause: {e}") from None
        if idle_timeout is not None or auto_pause is not None:
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
        """Kills every process of the session and frees everything it held. Idempotent: when
        another thread (e.g. the idle timeout) is closing it, returns once that close is done."""
        with self._lock:
            closing = self._closed
            self._closed = True
        if closing:
            self._torn_down.wait(_CLOSE_WAIT)
            return
        try:
            _IDLE.forget(self)
            _OPEN.discard(self)
            self._runtimes.close()
            self._finalizer()
            self._end_processes()
            self._runtimes.join(timeout=10.0)
            with self._lock:
                spare, self._spare = self._spare, None
            if spare is not None:
                spare.discard()
            with self._lock:
                self._end_auto_pause()
        finally:
            self._release_environment()
            self._torn_down.set()
        notify_session("close", self)

    def _release_environment(self) -> None:
        if self._env_hold is not None:
            self._env_hold.release()

    @property
    def is_open(self) -> bool:
        """Whether the session is open and its sandbox alive."""
        return not self._closed and self._native.is_open

    def set_network(self, allow: Sequence[str]) -> list[dict[str, Any]]:
        """Replace the egress allowlist of the running session (e.g. install packages, then
        lock down). New connections and DNS answers follow `allow` at once; open connections
        it no longer allows are closed and returned (and reported in the running calls'
        reports) as network violations with reason "policy changed". Patterns are validated as
        `allow_net` is; a bad one raises `NetworkPolicyError` and leaves the old list in force. A
        session opened without network (no `allow_net`) cannot gain it: pass `allow_net=[]`
        at creation to start with nothing allowed and allow hosts later. The hosts of the
        session's credentials stay allowed whatever `allow` says (as at creation: a credential
        allows egress to its hosts); only the hosts it names are added to them."""
        self._check_open()
        patterns = Policy.build(allow_net=as_pattern_list(allow)).allow_net
        live = list(patterns)
        live += [h for h in credential_hosts(self._policy.credentials) if h not in live]
        cut = self._native.set_network(live)
        self._policy = self._policy.merged(allow_net=patterns)
        return [{"kind": "network", "host": h, "port": p, "reason": r} for h, p, r in cut]

    def _fork_child(self) -> Sandbox:
        """A new session as this one was opened (its policy as it is now), holding the layers
        this one holds."""
        token = _FORK_HOLD.set(self._env_hold.share() if self._env_hold is not None else None)
        try:
            return Sandbox(
                self._policy, secrets=self._extra_secrets,
                allow_net=list(self._policy.allow_net) if self._net_plumbed else None,
                idle_timeout=self.idle_timeout, auto_pause=self.auto_pause,
            )
        finally:
            _FORK_HOLD.reset(token)

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
            self._user_paused = True
        notify_session("pause", self)

    def resume(self) -> None:
        """Thaws a paused session."""
        with self._call():
            self._native.resume()
            self._user_paused = False
        notify_session("resume", self)

    @property
    def paused_seconds(self) -> float:
        """Seconds this session spent frozen by `auto_pause`, the current pause included."""
        with self._lock:
            at = self._auto_paused_at
            return self._paused_total + (time.monotonic() - at if at is not None else 0.0)

    def pause_deadline(self) -> float | None:
        """When `auto_pause` freezes this idle session (monotonic clock), if it will."""
        with self._lock:
            return self._pause_due()

    def _pause_due(self) -> float | None:
        # The lock is held.
        if (self.auto_pause is None or self._active or self._closed or self._user_paused
                or self._auto_paused_at is not None):
            return None
        return self._last_used + self.auto_pause

    def _idle_pause(self) -> None:
        """Freezes the session if it is still idle (called by the idle watcher)."""
        with self._lock:
            due = self._pause_due()
            if due is None or due > time.monotonic():
                return
            self._native.pause()
            self._auto_paused_at = time.monotonic()
        notify_session("auto_pause", self)

    def _end_auto_pause(self) -> bool:
        """Counts the end of an auto-pause (the lock is held); whether there was one."""
        if self._auto_paused_at is None:
            return False
        self._paused_total += time.monotonic() - self._auto_paused_at
        self._auto_paused_at = None
        return True

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
            resumed = self._auto_paused_at is not None
            if resumed:
                try:
                    self._native.resume()
                except BaseException:
                    self._active -= 1
                    raise
                self._end_auto_pause()
        if resumed:
            notify_session("resume", self)
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last_used = time.monotonic()
            if self.auto_pause is not None or self.idle_timeout is not None:
                _IDLE.poke()

    def _hold_active(self, delta: int) -> None:
        """A background process started (+1) or ended (-1): while one runs, the session is
        not idle."""
        with self._lock:
            self._active += delta
            self._last_used = time.monotonic()
        if delta < 0 and (self.auto_pause is not None or self.idle_timeout is not None):
            _IDLE.poke()

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
        cancel: threading.Event | None = None,
        tty: bool = False,
        tty_size: SizeArg = None,
        tty_input: int | None = None,
    ) -> RunResult:
        """Runs a command in the session. The seccomp profile is chosen from argv[0] unless
        given; limits left out default to the session's per-call limits. Setting `cancel`
        from another thread kills the call (reported as `signaled`). `tty`, `tty_size` and
        `tty_input` as for `cellblock.run`."""
        with self._call():
            policy = self._call_policy(
                timeout=timeout, cpu_time=cpu_time, max_output=max_output, cwd=cwd,
                profile=profile, seccomp=seccomp, env=env,
            )
            compiled = resolve_seccomp(argv, policy.profile, policy.seccomp)
            terminal = tty_section(tty, tty_size)
            spec = build_spec(argv, policy, normalize_secrets(secrets), compiled, terminal,
                              self._environment)
            data = typed_input(
                stdin.encode() if isinstance(stdin, str) else stdin, terminal is not None
            )
            try:
                with typing_from(tty, tty_input) as on_terminal:
                    report = self._native.exec(
                        json.dumps(spec), data, compiled.bpf if compiled else None, on_output,
                        cancel, window=window_source(tty, tty_size), on_terminal=on_terminal,
                    )
            except CellblockError as e:
                call_secrets = self._secrets + normalize_secrets(secrets)
                raise redact_error(e, redactor_for(call_secrets)) from None
            result = RunResult(**report)
        notify_run("session.run", result, self)
        return result

    def run_shell(self, script: str, **kwargs: Any) -> RunResult:
        """Runs a shell script (`/bin/sh -c script`); keyword arguments as for `run`."""
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def run_python(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """Runs Python code in the session's warm interpreter.

        Stateless (default): a fresh fork of a pristine interpreter per call, so nothing of one
        call (globals, imports, monkey-patching, processes) reaches the next. Stateful: one
        long-lived interpreter whose globals survive between calls, like a notebook kernel.
        The result adds `value` (repr of the last expression) and `error` (the traceback).
        Keyword arguments: timeout, cpu_time, max_output, stdin, env, cwd, secrets, cancel (a
        `threading.Event`: setting it ends the call and kills its processes).
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
        cancel: threading.Event | None = None,
    ) -> CodeResult:
        with self._call():
            policy = self._call_policy(timeout=timeout, cpu_time=cpu_time, max_output=max_output)
            limits = policy.limits()
            call_secrets = normalize_secrets(secrets)
            try:
                result = self._runtimes.run(
                    language, code, stateful=stateful,
                    limits=CallLimits(
                        limits["timeout"], limits["cpu_time"], limits["max_output"], cancel
                    ),
                    stdin=stdin.encode() if isinstance(stdin, str) else stdin,
                    env=dict(env or {}), cwd=cwd,
                    secrets={s.name: s.value.get_secret_value() for s in call_secrets},
                )
            except CellblockError as e:
                # As `run`: a message may echo the caller's cwd or env, which may hold a secret.
                raise redact_error(e, redactor_for(self._secrets + call_secrets)) from None
        notify_run("session.python" if language == "python" else "session.node", result, self)
        return result

    def _zygote_seccomp(self) -> dict[str, Any] | None:
        """The seccomp part of the zygote's spec: warm calls report refusals by these names."""
        compiled = resolve_seccomp(["python3"], self._policy.profile, self._policy.seccomp)
        seccomp: dict[str, Any] | None = build_spec(
            ["python3"], self._policy, [], compiled, environment=self._environment).get(
            "seccomp"
        )
        return seccomp

    def _zygote_starter(
        self,
    ) -> Callable[[Callable[[int, bytes], None], Callable[[int], None]], dict[str, Any]]:
        """How the warm runtimes start their zygote: a long-lived call of this session. (A
        function of the native session only, so that a forgotten Sandbox can be collected.)
        The zygote gets the filter's program and every worker installs it, before any code
        runs, with a listener of its own: each call's refusals are its own. (The kernel allows
        one listener per filter chain, so the zygote itself, which runs no code of the
        sandbox's, is started without one.)"""
        compiled = resolve_seccomp(["python3"], self._policy.profile, self._policy.seccomp)
        bpf = base64.b64encode(compiled.bpf).decode() if compiled else ""
        argv = ["python3", "-c", zygote_source(), SOCKET_PATH, bpf]
        spec = build_spec(argv, self._policy, [], None, environment=self._environment)
        spec["limits"].update(timeout=None, cpu_time=None, max_output=_ZYGOTE_MAX_OUTPUT)
        return functools.partial(_exec_zygote, self._native, json.dumps(spec), None)


class _IdleWatcher:
    """One thread that closes sessions whose idle timeout has passed, and freezes those whose
    auto-pause delay has."""

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

    def poke(self) -> None:
        """A watched session's deadline moved: look again now."""
        with self._cond:
            self._cond.notify()

    def forget(self, sandbox: Sandbox) -> None:
        with self._cond:
            self._sessions.discard(sandbox)

    def _loop(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                sessions = list(self._sessions)
                closing = [(d, s) for s in sessions if (d := s.idle_deadline()) is not None]
                pausing = [(d, s) for s in sessions if (d := s.pause_deadline()) is not None]
                expired = [s for d, s in closing if d <= now]
                to_pause = [s for d, s in pausing if d <= now and s not in expired]
                pending = [d for d, _ in closing + pausing if d > now]
                if not expired and not to_pause:
                    # Calls end without notifying: look again at least every second.
                    self._cond.wait(min([1.0, *(d - now for d in pending)]))
                    continue
            for s in expired:
                s.close()
            for s in to_pause:
                try:
                    s._idle_pause()
                except CellblockError:
                    _log.exception("auto-pause of %r failed", s)


_IDLE = _IdleWatcher()

#: Every open sandbox, closed at interpreter exit: a zygote thread still inside the native
#: core when the interpreter finalizes would abort the process.
_OPEN: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sandbox in list(_OPEN):
        sandbox.close()
