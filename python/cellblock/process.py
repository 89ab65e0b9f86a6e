"""Background processes and exposed ports of a `cellblock.Sandbox`.

`Sandbox.start` runs a command in the session and returns at once with a `Process`: its output
arrives live (callback and iterators), its stdin can be streamed, it can be signalled, waited
for or killed. It is a call of the session like `Sandbox.run` (same supervisor, output cap,
redaction, seccomp answers and report); closing the session ends it (reason
`session_closed`). With `tty=True` the process gets a terminal of the sandbox's own (see
`cellblock.terminal`): `write_stdin` types into it, `close_stdin` types end-of-file and
`resize` changes its window. `Sandbox.expose` forwards a host address (loopback by default)
to a port inside the sandbox's network namespace, until the session closes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal as signals
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from cellblock._native import FORWARDED_SIGNALS, Call
from cellblock._native import Session as NativeSession
from cellblock.environments.runtime import Resolved
from cellblock.errors import CellblockError, InvalidSpec, SandboxIOError
from cellblock.observe import notify_run
from cellblock.policy import Policy
from cellblock.redaction import redact_error, redactor_for
from cellblock.result import RunResult
from cellblock.sandbox import OutputCallback, build_spec, resolve_seccomp
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import Secret, SecretsArg, normalize_secrets
from cellblock.terminal import (
    EOF,
    SizeArg,
    WindowSize,
    checked_size,
    tty_section,
    typed_input,
    window_source,
)

__all__ = ["ExposedPort", "OutputChunk", "Process", "SandboxProcesses"]

#: How long closing a session waits for each of its processes' reports.
_CLOSE_JOIN = 10.0
#: How long `resize` waits for the supervisor to hand over a starting process's terminal.
_ATTACH_WAIT = 10.0

Stream = Literal["stdout", "stderr"]


class OutputChunk(NamedTuple):
    """A piece of a process's output, as the supervisor read it (redacted, within the cap)."""

    stream: Stream
    data: bytes


@dataclass(frozen=True)
class ExposedPort:
    """A port of the sandbox reachable from the host at `host:host_port`."""

    #: The port inside the sandbox (its 127.0.0.1).
    port: int
    #: The host address that reaches it.
    host: str
    host_port: int

    @property
    def address(self) -> tuple[str, int]:
        """`(host, host_port)`, e.g. for `socket.create_connection`."""
        return (self.host, self.host_port)

    @property
    def url(self) -> str:
        """`http://host:host_port` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.host_port}"


class Process:
    """A command running in the background in a session (see `Sandbox.start`).

    `pid` is the host pid of the process's init (the supervisor's handle, not a pid inside the
    sandbox). Output is kept (within the call's `max_output`) so that every iterator sees it
    from the start; `wait()` returns the supervisor's `RunResult`.
    """

    def __init__(
        self,
        call: Call,
        argv: list[str],
        on_output: OutputCallback | None,
        on_end: Callable[[Process], None],
        tty: bool = False,
        window: Callable[[], WindowSize | None] | None = None,
    ) -> None:
        self._call = call
        self.argv = argv
        #: Whether the process runs on a terminal (`Sandbox.start(..., tty=True)`).
        self.tty = tty
        self._window = window
        self._on_output = on_output
        self._on_end = on_end
        # On a terminal this is a dup of its master: writes are typed into it.
        stdin = call.take_stdin()
        self._stdin: int | None = stdin
        self._stdin_lock = threading.Lock()
        # The terminal's master for `resize` (a dup, from the supervisor's on_terminal).
        self._master: int | None = None
        self._master_lock = threading.Lock()
        self._attached = threading.Event()
        self._line_start = True
        self._chunks: list[OutputChunk] = []
        self._cond = threading.Condition()
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._supervise, name=f"cellblock-process-{call.pid}", daemon=True
        )
        self._thread.start()

    # ---- state -----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Host pid of the process's init (0 when it never started)."""
        return self._call.pid

    @property
    def running(self) -> bool:
        """Whether the process has not ended yet (its report is not in)."""
        return not self._done.is_set()

    @property
    def result(self) -> RunResult | None:
        """The supervisor's report once the process ended, else None."""
        return self._result

    @property
    def returncode(self) -> int | None:
        """Like `subprocess.Popen.returncode`: the exit status, or minus the signal that ended
        it; None while it runs."""
        r = self._result
        if r is None:
            return None
        if r.exit_code is not None:
            return r.exit_code
        return -(r.signal or signals.SIGKILL)

    def __repr__(self) -> str:
        state = "running" if self.running else f"ended ({self.returncode})"
        return f"<cellblock.Process {self.argv!r} {state}>"

    # ---- supervision -----------------------------------------------------------------------

    def _sink(self, stream: int, data: bytes) -> None:
        chunk = OutputChunk("stdout" if stream == 1 else "stderr", data)
        with self._cond:
            self._chunks.append(chunk)
            self._cond.notify_all()
        if self._on_output is not None:
            # Raising stops the process, as for `Sandbox.run`; `wait()` re-raises it.
            self._on_output(stream, data)

    def _attach(self, master: int) -> None:
        with self._master_lock:
            self._master = os.dup(master)
        self._attached.set()

    def _supervise(self) -> None:
        try:
            report = self._call.supervise(
                self._sink, None, self._window, self._attach if self.tty else None
            )
            self._result = RunResult(**report)
        except BaseException as e:  # re-raised by wait() in the caller's thread
            self._error = e
        finally:
            # A writer blocked on a full pipe gets EPIPE now that every reader is dead.
            with self._stdin_lock:
                self._close_stdin_fd()
            with self._master_lock:
                master, self._master = self._master, None
                if master is not None:
                    os.close(master)
            self._attached.set()
            with self._cond:
                self._done.set()
                self._cond.notify_all()
            self._on_end(self)

    # ---- stdin -----------------------------------------------------------------------------

    def write_stdin(self, data: bytes | str) -> None:
        """Writes to the process's stdin (blocks while the pipe is full; the GIL is released).
        Raises SandboxIOError once stdin is closed, was given as bytes to `start`, or the
        process no longer reads it."""
        buf = memoryview(data.encode() if isinstance(data, str) else bytes(data))
        with self._stdin_lock:
            fd = self._stdin
            if fd is None:
                raise SandboxIOError(
                    errno.EPIPE, "stdin of this process is closed (or was given to start())"
                )
            while buf:
                try:
                    n = os.write(fd, buf)
                except OSError as e:
                    # A pipe without reader: EPIPE; a terminal whose side is gone: EIO.
                    if e.errno not in (errno.EPIPE, errno.EIO):
                        raise
                    raise SandboxIOError(
                        errno.EPIPE, "the process no longer reads its stdin (it ended or "
                        "closed it)"
                    ) from None
                self._line_start = buf[n - 1] == 0x0A if n else self._line_start
                buf = buf[n:]

    def close_stdin(self) -> None:
        """Closes the process's stdin: it reads EOF (idempotent). On a terminal, end-of-file
        is typed (Ctrl-D; twice after a partial line, as at a keyboard) and no more input is
        taken: the terminal itself stays, for the output and `resize`."""
        with self._stdin_lock:
            fd = self._stdin
            if self.tty and fd is not None and not self._done.is_set():
                eof = EOF if self._line_start else EOF + EOF
                try:
                    os.write(fd, eof)
                except OSError:
                    pass  # the terminal is gone: the process has ended
            self._close_stdin_fd()

    def _close_stdin_fd(self) -> None:
        fd, self._stdin = self._stdin, None
        if fd is not None:
            os.close(fd)

    def resize(self, rows: int, cols: int) -> None:
        """Sets the window of the process's terminal to `rows` x `cols` (the kernel sends
        SIGWINCH to its foreground process group). InvalidSpec without `tty=True` or for an
        empty window; SandboxIOError once the process has ended."""
        if not self.tty:
            raise InvalidSpec("resize: this process has no terminal (start it with tty=True)")
        size = checked_size((rows, cols))
        self._attached.wait(_ATTACH_WAIT)
        with self._master_lock:
            if self._master is None or self._done.is_set():
                raise SandboxIOError(errno.EIO, "the terminal of this process is gone (it ended)")
            winsize = struct.pack("HHHH", size["rows"], size["cols"], 0, 0)
            try:
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, winsize)
            except OSError as e:
                raise SandboxIOError(e.errno or errno.EIO, f"resize the terminal: {e}") from None

    # ---- signals ---------------------------------------------------------------------------

    def signal(self, sig: int) -> bool:
        """Sends `sig` to the command (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 are
        forwarded by its init; SIGKILL ends it and everything it started). False when the
        process had already ended; InvalidSpec for other signals."""
        if int(sig) in FORWARDED_SIGNALS and self._done.is_set():
            # The supervisor has reported the end: nothing of the call is left to signal
            # (its init may still be exiting, which the kernel would count as a delivery).
            return False
        return self._call.signal(int(sig))

    def terminate(self) -> bool:
        """`signal(SIGTERM)`."""
        return self.signal(signals.SIGTERM)

    def kill(self) -> bool:
        """Ends the process and everything it started (SIGKILL)."""
        return self.signal(signals.SIGKILL)

    # ---- waiting and output ----------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> RunResult:
        """Waits for the end and returns the supervisor's report. Raises TimeoutError when
        `timeout` seconds pass first (the process keeps running)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"process {self.argv!r} still running after {timeout} s")
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def iter_output(self, timeout: float | None = None) -> Iterator[OutputChunk]:
        """Yields the output chunks from the start, live, until the process ends. With
        `timeout`, raises TimeoutError when no chunk comes for that long."""
        i = 0
        while True:
            with self._cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while i >= len(self._chunks) and not self._done.is_set():
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"no output from {self.argv!r} for {timeout} s")
                    self._cond.wait(left)
                if i >= len(self._chunks):
                    return
                chunk = self._chunks[i]
            i += 1
            yield chunk

    def read_output(self, start: int = 0, timeout: float | None = None) -> list[OutputChunk]:
        """The output chunks from index `start` on (chunks are numbered from 0 in arrival
        order), waiting up to `timeout` seconds for one when there is none yet. An empty list
        means the wait timed out, or the process ended with nothing after `start` (then
        `running` is False). For callers that poll or resume, such as the HTTP service."""
        with self._cond:
            if start >= len(self._chunks) and not self._done.is_set():
                self._cond.wait(timeout)
            return self._chunks[start:]

    def iter_stdout(self, timeout: float | None = None) -> Iterator[bytes]:
        """The stdout chunks of `iter_output`."""
        return (c.data for c in self.iter_output(timeout) if c.stream == "stdout")

    def iter_stderr(self, timeout: float | None = None) -> Iterator[bytes]:
        """The stderr chunks of `iter_output`."""
        return (c.data for c in self.iter_output(timeout) if c.stream == "stderr")

    def iter_lines(
        self, stream: Stream = "stdout", timeout: float | None = None
    ) -> Iterator[bytes]:
        """Complete lines (with their newline) of one stream as they come; the last line
        without a newline at the end."""
        pending = b""
        for chunk in self.iter_output(timeout):
            if chunk.stream != stream:
                continue
            pending += chunk.data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending

    def _join(self, timeout: float) -> None:
        self._thread.join(timeout)


class SandboxProcesses:
    """Background processes and ports, mixed into `cellblock.Sandbox` (which provides the
    native session, the call accounting and the policy)."""

    _native: NativeSession
    _secrets: list[Secret]
    #: The session's environment as it holds it (None: none).
    _environment: Resolved | None
    _lock: threading.Lock
    #: Started processes not yet ended (the lock guards it).
    _procs: list[Process]

    def _call(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _call_policy(self, **fields: Any) -> Policy:
        raise NotImplementedError

    def _hold_active(self, delta: int) -> None:
        raise NotImplementedError

    def start(
        self,
        argv: Sequence[str] | str,
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
        tty: bool = False,
        tty_size: SizeArg = None,
    ) -> Process:
        """Starts a command in the background and returns its `Process` at once.

        `argv`: a list, or a str run by `/bin/sh -c`. `stdin` given: written, then closed;
        left out: kept open for `Process.write_stdin` / `close_stdin`. No wall-clock timeout
        unless `timeout` is given (the process lives until it ends, is killed, or the session
        closes); `cpu_time` and `max_output` default to the session's per-call limits.
        `on_output(stream, data)` (1 stdout, 2 stderr) gets the output live, on the process's
        supervisor thread. A running process keeps the session from idling.

        `tty=True` gives it a terminal of the sandbox's own as stdin, stdout and stderr (output
        merged into stdout), of `tty_size=(rows, cols)` (default 24x80, or a function giving
        the current size, followed while it runs); `stdin` bytes are typed, then end-of-file.
        """
        argv = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        if not argv:
            raise InvalidSpec("argv is empty")
        with self._call():
            policy = self._call_policy(
                timeout=timeout, cpu_time=cpu_time, max_output=max_output, cwd=cwd,
                profile=profile, seccomp=seccomp, env=env,
            )
            compiled = resolve_seccomp(argv, policy.profile, policy.seccomp)
            terminal = tty_section(tty, tty_size)
            spec = build_spec(argv, policy, normalize_secrets(secrets), compiled, terminal,
                              self._environment)
            if timeout is None:
                spec["limits"]["timeout"] = None
            data = stdin.encode() if isinstance(stdin, str) else stdin
            data = data if data is None else typed_input(data, terminal is not None)
            try:
                call = self._native.start(
                    json.dumps(spec), data, compiled.bpf if compiled else None,
                    stream_stdin=data is None,
                )
            except CellblockError as e:
                call_secrets = self._secrets + normalize_secrets(secrets)
                raise redact_error(e, redactor_for(call_secrets)) from None
            self._hold_active(1)
            try:
                proc = Process(call, argv, on_output, self._process_ended, tty,
                               window_source(tty, tty_size))
            except BaseException:
                self._hold_active(-1)
                raise
            with self._lock:
                self._procs.append(proc)
        return proc

    def _process_ended(self, proc: Process) -> None:
        with self._lock:
            procs = self._procs
            if proc in procs:
                procs.remove(proc)
        self._hold_active(-1)
        if proc.result is not None:
            notify_run("session.start", proc.result, self)

    def processes(self) -> list[Process]:
        """The background processes of this session that are still running."""
        with self._lock:
            return [p for p in self._procs if p.running]

    def expose(self, port: int, host: str = "127.0.0.1", host_port: int = 0) -> ExposedPort:
        """Makes the sandbox's `127.0.0.1:port` reachable from the host at `host:host_port`
        (loopback and a free port by default), until the session closes. Each connection is
        forwarded by the supervisor into the sandbox's network namespace; nothing else of the
        sandbox is reachable. A connection with nothing listening inside is reset."""
        if not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidSpec(f"expose: port must be 1-65535, got {port!r}")
        if not isinstance(host_port, int) or not 0 <= host_port < 65536:
            raise InvalidSpec(f"expose: host_port must be 0-65535, got {host_port!r}")
        with self._call():
            bound_host, bound_port = self._native.expose(port, host, host_port)
        return ExposedPort(port=port, host=bound_host, host_port=bound_port)

    def exposed_ports(self) -> list[ExposedPort]:
        """The ports forwarded by `expose`."""
        return [ExposedPort(p, h, hp) for p, h, hp in self._native.exposed()]

    def _end_processes(self) -> None:
        """After the native session closed (which ended every process): collect the reports."""
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            p._join(_CLOSE_JOIN)
