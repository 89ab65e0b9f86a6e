"""Host side of the warm runtimes of a session.

One zygote (`zygote_py.py`) runs inside the session's sandbox as a long-lived call and listens
on a unix socket there. The host reaches it with `_native.Session.connect_unix`, which resolves
the socket's path inside the sandbox's root (openat2 RESOLVE_IN_ROOT) and connects through the
resolved descriptor: code in the sandbox cannot point the host at any other socket. A process
of the sandbox may still bind its own socket at that path: before sending anything the host
checks that the listener is the zygote (`connect_unix(path, parent=...)`: the listener's parent
must be the zygote call's PID 1, whose only child the zygote is).

Each call is supervised by the core (`_native.Session.warm_call`, rust/core/src/warm.rs): the
relay hands over the worker's pidfd, output pipes and seccomp listener, and the core produces
the report (exit status from the kernel, CPU time and memory from the call's cgroup, refused
syscalls, output redacted and capped, deadline). What the worker says (the value of the last
expression, the traceback) is content only, redacted and capped here.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import secrets as secrets_mod
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from pydantic import Field

from cellblock import _native
from cellblock.errors import (
    CellblockError,
    InvalidSpec,
    PathEscape,
    SandboxIOError,
    SessionClosed,
    SetupError,
)
from cellblock.result import RunResult
from cellblock.runtimes.outputs import Output, OutputRedactor, parse_outputs

#: Where the zygote listens, inside the sandbox.
SOCKET_PATH = "/tmp/.cellblock/zygote.sock"

#: How long a zygote or a kernel may take to start.
START_TIMEOUT_S = 30.0

#: Largest frame the host accepts (output chunks are 64 KiB; results hold a capped repr).
MAX_FRAME = 4 << 20

#: Tries of a call whose runtime vanishes before the code begins.
ATTEMPTS = 3

#: Output a kernel may write while it saves or loads its state (kept by no one).
STATE_OUTPUT = 64 << 10

#: The largest result frame the core takes from a runtime (rust/core/src/warm/conn.rs).
RESULT_FRAME_CAP = 4 << 20

#: Fresh Node workers kept ready for stateless calls (each serves one call, then ends).
MAX_IDLE_NODE = 1

Kind = Literal["python", "python-kernel", "node", "node-kernel"]


class CodeResult(RunResult):
    """A RunResult of warm code, plus the value of its last expression and its error.

    `value` is the repr (Python) or util.inspect (Node) of the last expression when it is not
    None/undefined; `error` is the formatted traceback of an uncaught exception (also on stderr).
    Stateful calls: `state_lost` says this call ended its kernel (os._exit, a timeout, a
    limit), so its variables are gone; `kernel_restarted` says this call ran in a fresh kernel
    because an earlier one ended: the variables of the calls before are gone.
    Python: `outputs` are the rich outputs, like a notebook's (each `display(obj)`, the last
    expression, open matplotlib figures; see runtimes/outputs.py), redacted and capped;
    `outputs_error` says what the worker sent that was malformed and dropped.
    `result_truncated`: `value` or `error` was cut (to max_output, or by the runtime to fit
    the 4 MiB result frame: a cut traceback keeps its start and end), or the result frame was
    over 4 MiB and dropped by the host unread (then `error` says so; the call's exit code and
    output are still the supervisor's).
    """

    value: str | None = None
    error: str | None = None
    outputs: list[Output] = Field(default_factory=list)
    outputs_error: str | None = None
    result_truncated: bool = False
    state_lost: bool = False
    kernel_restarted: bool = False


class _Timeout(Exception):
    """The call's deadline passed."""


class _Gone(Exception):
    """The other end closed the connection or broke the protocol."""


class _NotStarted(Exception):
    """The runtime went away before the call's code began: the call can be retried."""


class _Cancelled(Exception):
    """The call's cancel event was set."""


#: How often a cancellable call looks at its cancel event.
_CANCEL_POLL_S = 0.1


class _BadCwd(InvalidSpec):
    """The call's cwd does not exist in the sandbox (the code never ran): the same class as
    `Sandbox.run` with a missing cwd."""

    def __init__(self, message: str, alive: bool) -> None:
        super().__init__(message)
        self.alive = alive


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + len(payload).to_bytes(4, "big") + payload


class _Conn:
    """A connection to the zygote, reading frames against a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, data: bytes, deadline: float | None) -> None:
        bound = _bounded(deadline)
        try:
            self.sock.settimeout(_remaining(bound))
            self.sock.sendall(data)
        except (TimeoutError, _Timeout):
            raise (_Timeout if deadline is not None else _Gone) from None
        except OSError:
            raise _Gone from None

    def _fill(self, n: int, deadline: float | None, cancel: threading.Event | None) -> None:
        try:
            self._fill_by(n, _bounded(deadline), cancel)
        except _Timeout:
            # Without a deadline of the call's own, the runtime failed to answer in time.
            raise (_Timeout if deadline is not None else _Gone) from None

    def _fill_by(self, n: int, deadline: float, cancel: threading.Event | None) -> None:
        while len(self.buf) < n:
            left = _remaining(deadline)
            if cancel is not None:
                if cancel.is_set():
                    raise _Cancelled
                left = _CANCEL_POLL_S if left is None else min(left, _CANCEL_POLL_S)
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError:
                if cancel is not None:
                    continue  # the deadline itself is checked by _remaining
                raise _Timeout from None
            except OSError:
                raise _Gone from None
            if not chunk:
                raise _Gone
            self.buf += chunk

    def read(
        self, deadline: float | None, cancel: threading.Event | None = None
    ) -> tuple[bytes, bytes]:
        self._fill(5, deadline, cancel)
        size = int.from_bytes(self.buf[1:5], "big")
        if size > MAX_FRAME:
            raise _Gone
        self._fill(5 + size, deadline, cancel)
        kind, payload = bytes(self.buf[:1]), bytes(self.buf[5 : 5 + size])
        del self.buf[: 5 + size]
        return kind, payload

    def close(self) -> None:
        self.sock.close()


#: How long the zygote may take to answer when the call has no deadline (as the core's
#: handover limit): every wait on it is bounded.
HANDSHAKE_LIMIT_S = 30.0


def _bounded(deadline: float | None) -> float:
    """`deadline`, or the handshake limit from now when there is none."""
    return deadline if deadline is not None else time.monotonic() + HANDSHAKE_LIMIT_S


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Timeout
    return left


@dataclass
class CallLimits:
    """Per-call limits of a warm call."""

    timeout: float | None
    cpu_time: float | None
    max_output: int | None
    #: Set by another thread to end the call now (closing its connection kills its processes).
    cancel: threading.Event | None = None


@dataclass
class _ZygoteRun:
    """One start of the zygote: set when it listens, or when its call has ended."""

    event: threading.Event = field(default_factory=threading.Event)
    listening: bool = False
    ended: bool = False
    error: str = ""
    thread: threading.Thread | None = None
    #: Host pid of the zygote call's PID 1: the zygote is its only child (see `_connect`).
    init_pid: int | None = None


class WarmRuntimes:
    """The zygote of one session and its kernels.

    `start_zygote(on_output, on_start)` must run the zygote as a call of the session and block
    until it ends, calling `on_start` with the host pid of the call's PID 1 once it runs; it is
    called on a background thread. `secrets` are redacted from every call's output.
    """

    def __init__(
        self,
        session: _native.Session,
        start_zygote: Callable[
            [Callable[[int, bytes], None], Callable[[int], None]], dict[str, Any]
        ],
        secrets: Mapping[str, str],
        enforcement: Mapping[str, str | None],
        seccomp: Mapping[str, Any] | None,
    ) -> None:
        self._session = session
        self._start_zygote = start_zygote
        self._secrets = dict(secrets)
        self._enforcement = dict(enforcement)
        self._seccomp = dict(seccomp) if seccomp is not None else None
        self._profile: str | None = seccomp["profile"] if seccomp is not None else None
        # Stateful kinds whose kernel ended: their next call starts a fresh one.
        self._lost: set[Kind] = set()
        self._lock = threading.Lock()
        self._zygote: _ZygoteRun | None = None
        #: Zygote runs replaced while their call may still be in the core: joined at close too
        #: (a thread still inside the core when the interpreter finalizes aborts the process).
        self._replaced: list[_ZygoteRun] = []
        # Live worker connections: the stateful kernels, and idle stateless Node workers.
        self._stateful: dict[Kind, _Conn] = {}
        self._stateful_locks: dict[Kind, threading.Lock] = {
            "python-kernel": threading.Lock(), "node-kernel": threading.Lock(),
        }
        self._idle_node: list[_Conn] = []
        self._node_refill = False
        self._spare: threading.Thread | None = None
        self._closed = False

    # ---- zygote ----------------------------------------------------------------------------

    def _serve(self, run: _ZygoteRun) -> None:
        seen = bytearray()

        def on_output(stream: int, data: bytes) -> None:
            if stream == 1 and not run.listening:
                seen.extend(data)
                if b"ready\n" in seen:
                    run.listening = True
                    run.event.set()

        def on_start(pid: int) -> None:
            run.init_pid = pid

        try:
            report = self._start_zygote(on_output, on_start)
            run.error = bytes(report.get("stderr_bytes", b""))[-4000:].decode("utf-8", "replace")
        except Exception as e:
            run.error = f"{type(e).__name__}: {e}"
        finally:
            run.ended = True
            run.event.set()

    def ensure_zygote(self, replace: bool = False) -> None:
        """Starts the zygote unless one is serving (or `replace`: its socket is gone); waits
        until it listens."""
        with self._lock:
            if self._closed:
                raise SessionClosed("the sandbox is closed")
            run = self._zygote
            if run is None or run.ended:
                # The zygote's call has ended, and every kernel with it.
                self._drop_kernels()
            if run is None or run.ended or replace:
                if run is not None:
                    self._replaced = [r for r in self._replaced if not r.ended] + [run]
                run = self._zygote = _ZygoteRun()
                run.thread = threading.Thread(
                    target=self._serve, args=(run,), name="cellblock-zygote", daemon=True
                )
                run.thread.start()
        run.event.wait(START_TIMEOUT_S)
        if not run.listening or run.ended:
            if not self._session.is_open:
                raise SessionClosed("the sandbox is closed")
            raise SetupError(f"the warm runtime did not start: {run.error.strip()}")

    def _connect(self) -> _Conn:
        """A connection to the zygote, proved to be the zygote's: the path is inside the
        sandbox, where any process could bind another socket and receive the calls' code,
        environment and secrets, so the host checks who listens (the core compares the
        listener's parent with the zygote call's PID 1, whose only child the zygote is)."""
        try:
            fd = self._session.connect_unix(SOCKET_PATH, self._zygote_init())
        except (SandboxIOError, PathEscape):
            # Code in the sandbox removed or replaced the socket: start a zygote that binds a
            # new one (the old one notices and exits).
            self.ensure_zygote(replace=True)
            fd = self._session.connect_unix(SOCKET_PATH, self._zygote_init())
        return _Conn(socket.socket(fileno=fd))

    def _zygote_init(self) -> int:
        with self._lock:
            run = self._zygote
        if run is None or run.init_pid is None:
            raise SetupError("the warm runtime is not running")
        return run.init_pid

    # ---- kernels ---------------------------------------------------------------------------

    def _open_kernel(self, kind: Kind, deadline: float | None) -> _Conn:
        """A connection to a new worker of `kind`, once the worker is ready."""
        conn = self._connect()
        hello: dict[str, Any] = {"kind": kind}
        if kind.startswith("node"):
            hello["source"] = _node_source()
        try:
            conn.send(_frame(b"h", json.dumps(hello).encode()), deadline)
            kind_byte, _ = conn.read(deadline)
        except (_Timeout, _Gone):
            conn.close()
            raise
        if kind_byte != b"k":
            conn.close()
            raise _Gone
        return conn

    def warm(self, runtimes: tuple[str, ...]) -> None:
        """Starts the zygote, and a Node worker when "node" is asked for."""
        self.ensure_zygote()
        if "node" in runtimes:
            try:
                kernel = self._open_kernel("node", time.monotonic() + START_TIMEOUT_S)
            except (_Gone, _Timeout):
                raise SetupError("the warm Node runtime did not start") from None
            with self._lock:
                self._idle_node.append(kernel)

    def _refill_node(self) -> None:
        """Starts a fresh Node worker in the background, so that the next stateless call
        finds one ready."""
        with self._lock:
            if self._closed or self._node_refill or len(self._idle_node) >= MAX_IDLE_NODE:
                return
            self._node_refill = True
            # Joined at close: a thread still inside the core when the interpreter finalizes
            # would abort the process.
            self._spare = threading.Thread(target=self._start_spare_node,
                                           name="cellblock-node-spare", daemon=True)
            self._spare.start()

    def _start_spare_node(self) -> None:
        kernel: _Conn | None = None
        try:
            kernel = self._open_kernel("node", time.monotonic() + START_TIMEOUT_S)
        except (CellblockError, _Gone, _Timeout, OSError):
            pass  # the next call starts its own
        finally:
            with self._lock:
                self._node_refill = False
                if kernel is not None and not self._closed:
                    self._idle_node.append(kernel)
                    kernel = None
            if kernel is not None:
                kernel.close()

    def _drop_kernels(self) -> None:
        for conn in [*self._stateful.values(), *self._idle_node]:
            conn.close()
        self._stateful.clear()
        self._idle_node.clear()

    def close(self) -> None:
        """Closes every connection (the session's close kills the processes)."""
        with self._lock:
            self._closed = True
            self._drop_kernels()

    def join(self, timeout: float) -> None:
        """Waits for the zygote's call and a spare Node worker's start to return (after the
        session is closed), `timeout` seconds at most in all."""
        deadline = time.monotonic() + timeout
        runs = [*self._replaced, *([self._zygote] if self._zygote is not None else [])]
        for thread in (*(r.thread for r in runs), self._spare):
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    # ---- calls -----------------------------------------------------------------------------

    def run(
        self,
        language: Literal["python", "node"],
        code: str,
        *,
        stateful: bool,
        limits: CallLimits,
        stdin: bytes | None,
        env: Mapping[str, str],
        cwd: str | None,
        secrets: Mapping[str, str],
    ) -> CodeResult:
        """Runs code in the warm runtime; see `Sandbox.run_python`."""
        if language == "node" and stdin:
            raise InvalidSpec("stdin is not supported by the warm Node runtime")
        started = time.monotonic()
        deadline = started + limits.timeout if limits.timeout is not None else None
        request = {
            "code": code,
            "stdin": base64.b64encode(stdin).decode() if stdin else None,
            "env": {**env, **secrets},
            "cwd": cwd,
            "max_output": limits.max_output,
            # Names the call: a kernel's answer to an earlier one is never taken for this one.
            "call": secrets_mod.token_hex(8),
        }
        kinds: dict[tuple[str, bool], Kind] = {
            ("python", False): "python", ("python", True): "python-kernel",
            ("node", False): "node", ("node", True): "node-kernel",
        }
        kind = kinds[(language, stateful)]
        for _ in range(ATTEMPTS):
            self.ensure_zygote()
            try:
                if kind == "python":
                    return self._run_once(request, deadline, started, limits, secrets)
                if stateful:
                    with self._stateful_locks[kind]:
                        return self._run_kernel(
                            kind, request, deadline, started, limits, secrets, keep=True
                        )
                return self._run_kernel(
                    kind, request, deadline, started, limits, secrets, keep=False
                )
            except _NotStarted:
                # The runtime went away before the code started (e.g. killed by the previous
                # call): let a dying zygote finish, then try again on a fresh one.
                self.join(0.1)
            except _Timeout:
                return self._failed(started, "timeout", limits)
        raise SetupError("the warm runtime keeps failing before calls start")

    def _run_once(
        self,
        request: dict[str, Any],
        deadline: float | None,
        started: float,
        limits: CallLimits,
        secrets: Mapping[str, str],
    ) -> CodeResult:
        conn = self._connect()
        try:
            conn.send(_frame(b"h", b'{"kind":"python"}'), deadline)
            return self._call(conn, request, deadline, started, limits, secrets, False)[0]
        except _Gone:
            raise _NotStarted from None
        except _BadCwd as e:
            raise InvalidSpec(str(e)) from None
        finally:
            conn.close()

    def _run_kernel(
        self,
        kind: Kind,
        request: dict[str, Any],
        deadline: float | None,
        started: float,
        limits: CallLimits,
        secrets: Mapping[str, str],
        keep: bool,
        raw: dict[str, Any] | None = None,
    ) -> CodeResult:
        with self._lock:
            if keep:
                kernel = self._stateful.pop(kind, None)
            else:
                kernel = self._idle_node.pop() if self._idle_node else None
        restarted = False
        if kernel is None:
            try:
                kernel = self._open_kernel(kind, deadline)
            except _Gone:
                raise _NotStarted from None
            restarted = keep and kind in self._lost
        alive = False
        try:
            try:
                result, alive = self._call(
                    kernel, request, deadline, started, limits, secrets, True, raw
                )
            except _NotStarted:
                # The kernel had ended between calls: its state is gone.
                if keep:
                    self._lost.add(kind)
                raise
            except _BadCwd as e:
                alive = e.alive
                raise InvalidSpec(str(e)) from None
        finally:
            with self._lock:
                if alive and keep and not self._closed:
                    self._stateful[kind] = kernel
                else:
                    # A stateless Node worker serves one call: what the code did to its
                    # process (globals, require's cache, prototypes) ends with it.
                    kernel.close()
            if not keep:
                self._refill_node()
        if keep:
            if alive:
                self._lost.discard(kind)
            else:
                self._lost.add(kind)
            result = result.model_copy(
                update={"state_lost": not alive, "kernel_restarted": restarted}
            )
        return result

    def _call(
        self,
        conn: _Conn,
        request: dict[str, Any],
        deadline: float | None,
        started: float,
        limits: CallLimits,
        secrets: Mapping[str, str],
        serves_on: bool,
        raw: dict[str, Any] | None = None,
    ) -> tuple[CodeResult, bool]:
        """One call supervised by the core. Returns the result and whether the worker can
        serve another call; `raw` gets what the worker said (content, not facts)."""
        spec = {
            "argv": ["warm"],
            "limits": {
                "timeout": _remaining(deadline),
                "cpu_time": limits.cpu_time,
                "max_output": limits.max_output,
            },
            "secrets": [{"name": k, "value": v} for k, v in secrets.items()],
            "seccomp": self._seccomp,
        }
        try:
            out = self._session.warm_call(
                conn.sock.fileno(), json.dumps(request).encode(), json.dumps(spec), serves_on,
                cancel=limits.cancel,
            )
        except SandboxIOError:
            # The relay broke the protocol before the code began.
            raise _NotStarted from None
        if out is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise _Timeout
            raise _NotStarted
        report = dict(out["report"])
        report["wall_time_s"] = time.monotonic() - started
        said = _json_object(out["result"])
        if raw is not None:
            raw.update(said)
        if "cwd_errno" in said:
            # The code never ran; a kernel serves on with its state. The message is made here
            # from the requested path and a checked errno: the worker's text could be forged.
            raise _BadCwd(_cwd_message(request.get("cwd"), said["cwd_errno"]),
                          bool(out["alive"]))
        all_secrets = {**self._secrets, **secrets}
        redactor = _native.Redactor(all_secrets) if all_secrets else None
        redact = redactor.redact if redactor is not None else str
        value, error = said.get("value"), said.get("error")
        # The worker's own word that it cut (content), or a cut made here.
        truncated = said.get("truncated") is True
        if isinstance(value, str):
            value = redact(value)
            truncated |= _over(value, limits.max_output)
            value = _capped(value, limits.max_output)
        else:
            value = None
        if isinstance(error, str):
            error = redact(error)
            truncated |= _over(error, limits.max_output)
            error = _capped(error, limits.max_output)
        else:
            error = None
        dropped = out.get("result_dropped")
        if isinstance(dropped, int):
            truncated = True
            error = (f"the runtime's result was {dropped} bytes, over the host's limit of "
                     f"{RESULT_FRAME_CAP}: dropped unread")
        out_redactor = OutputRedactor(all_secrets)
        outputs, outputs_error = parse_outputs(
            said.get("outputs"), out_redactor, limits.max_output
        )
        if all_secrets:
            counts = dict(report.get("redactions") or {})
            for name, n in [*(redactor.counts.items() if redactor else ()),
                            *out_redactor.counts.items()]:
                if n:
                    counts[name] = counts.get(name, 0) + int(n)
            report["redactions"] = counts
        result = CodeResult(
            **report, value=value, error=error, outputs=outputs, outputs_error=outputs_error,
            result_truncated=truncated,
        )
        return result, bool(out["alive"])

    # ---- kernel state (Sandbox.fork) ------------------------------------------------------

    def has_python_kernel(self) -> bool:
        """Whether a stateful Python kernel is running (its globals can be saved)."""
        with self._lock:
            return "python-kernel" in self._stateful

    def start_python_kernel(self, timeout: float) -> None:
        """Starts the stateful Python kernel now unless one runs (a fork's, while the parent
        saves its state)."""
        with self._stateful_locks["python-kernel"]:
            if self.has_python_kernel():
                return
            self.ensure_zygote()
            try:
                kernel = self._open_kernel("python-kernel", time.monotonic() + timeout)
            except (_Gone, _Timeout):
                raise SetupError("the warm Python kernel did not start") from None
            with self._lock:
                if self._closed:
                    kernel.close()
                    raise SessionClosed("the sandbox is closed")
                self._stateful["python-kernel"] = kernel

    def kernel_state(
        self, op: Literal["save", "load"], path: str, timeout: float
    ) -> dict[str, Any]:
        """Has the stateful Python kernel save its globals to `path` of its sandbox, or load
        them from there (see state_py.py); starts a kernel to load into. Returns what the
        kernel said: {"saved"/"loaded": n, "skipped": {name: reason}}, or {"error": why} (also
        when the kernel ended or did not answer in time)."""
        kind: Kind = "python-kernel"
        started = time.monotonic()
        request = {"code": "", "state": {op: path}, "call": secrets_mod.token_hex(8),
                   "max_output": STATE_OUTPUT}
        said: dict[str, Any] = {}
        with self._stateful_locks[kind]:
            if op == "save" and not self.has_python_kernel():
                return {"error": "no stateful Python kernel is running"}
            self.ensure_zygote()
            try:
                result = self._run_kernel(
                    kind, request, started + timeout, started,
                    CallLimits(timeout, None, STATE_OUTPUT), {}, keep=True, raw=said,
                )
            except _Timeout:
                return {"error": f"the kernel did not {op} its state within {timeout:g} s"}
            except _NotStarted:
                return {"error": "the kernel ended before it could " + op + " its state"}
        state = said.get("state")
        if result.state_lost:
            return {"error": f"the kernel ended while it was to {op} its state ({result.reason})"}
        if not isinstance(state, dict):
            return {"error": "the kernel gave no answer about its state"}
        return state

    def _failed(self, started: float, reason: str, limits: CallLimits) -> CodeResult:
        return CodeResult(
            exit_code=None, signal=None, reason=reason,
            stdout_bytes=b"", stderr_bytes=b"",
            stdout_truncated=False, stderr_truncated=False,
            wall_time_s=time.monotonic() - started, cpu_time_s=0.0, peak_memory_bytes=0,
            violations=[], enforcement=self._call_enforcement(limits),
            seccomp_profile=self._profile,
        )

    def _call_enforcement(self, limits: CallLimits) -> dict[str, Any]:
        e: dict[str, Any] = dict(self._enforcement)
        for name in ("timeout", "cpu_time", "max_output"):
            e.pop(name, None)
        if limits.timeout is not None:
            e["timeout"] = "supervisor"
        if limits.max_output is not None:
            e["max_output"] = "supervisor"
        if limits.cpu_time is not None:
            e["cpu_time"] = "rlimit"
        return e


def _json_object(data: bytes | None) -> dict[str, Any]:
    """The worker's result frame as a dict ({} when it is missing or not an object)."""
    try:
        got = json.loads(data) if data else {}
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _cwd_message(cwd: Any, errno_: Any) -> str:
    """The error of a call whose cwd could not be entered: the requested path and the
    strerror of the worker's errno when it is one (any other value is not shown)."""
    if isinstance(errno_, int) and not isinstance(errno_, bool) and errno_ in errno.errorcode:
        return f"cwd {cwd}: {os.strerror(errno_)}"
    return f"cwd {cwd}: cannot be entered"


def _over(text: str, cap: int | None) -> bool:
    return cap is not None and len(text) > cap


def _capped(text: str, cap: int | None) -> str:
    return text if cap is None else text[:cap]


def _node_source() -> str:
    return resources.files("cellblock.runtimes").joinpath("kernel_node.js").read_text()


def zygote_source() -> str:
    """The in-sandbox server's source, run as `python3 -c SOURCE SOCKET_PATH`: the display
    protocol (display_py.py), the kernel state's saving and loading (state_py.py), then the
    server."""
    here = resources.files("cellblock.runtimes")
    return "\n".join(
        here.joinpath(f).read_text() for f in ("display_py.py", "state_py.py", "zygote_py.py")
    )
