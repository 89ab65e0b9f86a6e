"""`cellblock.Client(url, token)`: the HTTP service's Python client, with the surface of the
in-process API, so code moves to a remote service by one line:

    sb = cellblock.Sandbox(memory="256M")                                  # in-process
    sb = cellblock.Client(url, token).Sandbox(memory="256M")                # remote

Errors are raised as the same exception classes (`InvalidSpec`, `SessionClosed`, ...), plus
the service's own (`Unauthorized`, `LimitExceeded`, `RequestTooLarge`, `NotFound`).
A session is reachable from any process by its id: `Client(url, token).connect(id)`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from cellblock.batch import Job, JobError, Outcome
from cellblock.credentials import normalize_credentials
from cellblock.errors import InvalidSpec, SandboxIOError, SessionClosed
from cellblock.files import CHUNK_SIZE, DEFAULT_MAX_READ, DirEntry, FileData
from cellblock.files import _chunks as file_chunks
from cellblock.fork import DEFAULT_FORK_TIMEOUT, ForkReport
from cellblock.policy import Policy
from cellblock.process import ExposedPort
from cellblock.remote_process import RemoteProcess
from cellblock.result import RunResult
from cellblock.runtimes.warm import CodeResult
from cellblock.sandbox import OutputCallback
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import SecretsArg, normalize_secrets
from cellblock.service.models import (
    BatchStatus,
    PortInfo,
    ProcessInfo,
    RunReport,
    SessionForked,
    SessionInfo,
)
from cellblock.service.problems import Cancelled, error_from_problem
from cellblock.sizes import parse_size
from cellblock.terminal import SizeArg, tty_section

if TYPE_CHECKING:
    import httpx

#: Seconds to wait for the service to accept a connection (runs themselves may take long).
CONNECT_TIMEOUT_S = 10.0


def _drop_none(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _remote_isolation(fields: dict[str, Any]) -> dict[str, Any]:
    """Checks and converts what a remote run or session takes beyond limits: `environment`
    travels as a name (the service resolves it in its own store); credentials travel with
    their values (sent once, over this authenticated connection; the service never sends
    them back); `tls_ca_bundle`, a PEM file of THIS host, is read here and its content sent
    (a path would name a file of the service's machine). `rootfs`, a directory of this host,
    is refused (InvalidSpec)."""
    if fields.pop("rootfs", None) is not None:
        raise InvalidSpec("rootfs names a directory of this host: it cannot be sent to the "
                          "service (use environment=NAME, built on the service's machine)")
    bundle = fields.pop("tls_ca_bundle", None)
    if bundle is not None:
        try:
            fields["tls_ca_pem"] = Path(bundle).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidSpec(f"tls_ca_bundle: cannot read {bundle}: {e}") from None
    creds = fields.pop("credentials", None)
    if creds:
        fields["credentials"] = [
            {**c.model_dump(mode="json", exclude={"value"}), "value": c.value.get_secret_value()}
            for c in normalize_credentials(creds)
        ]
    return fields


def _call_body(stdin: bytes | str | None, secrets: SecretsArg, seccomp: object,
               fields: Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of a call's arguments: binary stdin as base64, secrets by value."""
    if seccomp is not None:
        raise InvalidSpec("seccomp policies cannot be sent to the service: use profile")
    body = _drop_none(fields)
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        body["stdin_base64"] = base64.b64encode(bytes(stdin)).decode()
    elif stdin is not None:
        body["stdin"] = stdin
    if secrets:
        body["secrets"] = {s.name: s.value.get_secret_value()
                           for s in normalize_secrets(secrets)}
    return body


class Client:
    """A connection to `cellblock serve` at `url`, acting for one bearer token."""

    def __init__(self, url: str, token: str, *, timeout: float | None = None) -> None:
        import httpx  # the `service` extra: importing cellblock does not need it

        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the HTTP connections (sessions stay open on the service)."""
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a problem+json answer is raised as its exception class."""
        response = self._http.request(method, path, **kwargs)
        self.raise_for_problem(response)
        return response

    @staticmethod
    def raise_for_problem(response: httpx.Response) -> None:
        """Raises the exception a 4xx/5xx answer names."""
        if response.status_code < 400:
            return
        try:
            body = json.loads(response.read())
        except ValueError:
            body = None
        raise error_from_problem(body, response.status_code)

    def stream_bytes(
        self, path: str, params: dict[str, Any], chunk_size: int
    ) -> Iterator[bytes]:
        """GETs a streamed body: the request is made (and a problem raised) now; the chunks
        come as they are iterated (SandboxIOError if the body is cut short)."""
        response = self._http.send(self._http.build_request("GET", path, params=params),
                                   stream=True)
        try:
            self.raise_for_problem(response)
        except BaseException:
            response.close()
            raise
        return self._body_chunks(response, chunk_size, str(params.get("path")))

    @staticmethod
    def _body_chunks(response: httpx.Response, chunk_size: int, what: str) -> Iterator[bytes]:
        import httpx

        try:
            yield from response.iter_bytes(chunk_size)
        except httpx.TransportError as e:
            raise SandboxIOError(f"{what}: the download was cut short: {e}") from None
        finally:
            response.close()

    def post_run(self, path: str, body: dict[str, Any],
                 cancel: threading.Event | None = None) -> RunReport:
        """POSTs a run; its report. With `cancel`, the request is made on a connection of its
        own, which is shut down when `cancel` is set: the service then kills the run, and
        `Cancelled` is raised (the report of a killed run cannot come back)."""
        if cancel is None:
            return RunReport.model_validate(self.request("POST", path, json=body).json())
        with self._cancellable(cancel) as http:
            response = http.post(path, json=body)
        self.raise_for_problem(response)
        return RunReport.model_validate(response.json())

    def stream_run(self, path: str, body: dict[str, Any], on_output: OutputCallback,
                   cancel: threading.Event | None = None) -> RunReport:
        """POSTs a streaming run: calls `on_output(stream, data)` per event; the report.
        `cancel` as for `post_run`."""
        from httpx_sse import connect_sse

        with contextlib.ExitStack() as stack:
            http = self._http if cancel is None else stack.enter_context(
                self._cancellable(cancel))
            events = stack.enter_context(connect_sse(http, "POST", path, json=body))
            self.raise_for_problem(events.response)
            for event in events.iter_sse():
                data = json.loads(event.data)
                if event.event in ("stdout", "stderr"):
                    on_output(1 if event.event == "stdout" else 2, base64.b64decode(data["base64"]))
                elif event.event == "result":
                    return RunReport.model_validate(data)
                elif event.event == "error":
                    raise error_from_problem(data, int(data.get("status", 500)))
        raise SandboxIOError("the service ended the stream without a result")

    @contextlib.contextmanager
    def _cancellable(self, cancel: threading.Event) -> Iterator[httpx.Client]:
        """A one-connection client whose socket is shut down once `cancel` is set (that wakes
        a blocked read, unlike closing it); transport errors after that raise `Cancelled`."""
        import httpx

        sockets: list[socket.socket] = []

        def trace(name: str, info: dict[str, Any]) -> None:
            if name == "connection.connect_tcp.complete":
                sockets.append(info["return_value"].get_extra_info("socket"))

        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                if cancel.wait(0.05):
                    for sock in sockets:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                    return

        http = httpx.Client(base_url=self._http.base_url, headers=self._http.headers,
                            timeout=self._http.timeout, event_hooks={"request": [
                                lambda request: request.extensions.update(trace=trace)]})
        watcher = threading.Thread(target=watch, name="cellblock-cancel", daemon=True)
        watcher.start()
        try:
            if cancel.is_set():
                raise Cancelled("the call was cancelled before it was sent")
            yield http
        except httpx.TransportError as e:
            if cancel.is_set():
                raise Cancelled("the call was cancelled: the service killed its run") from None
            raise SandboxIOError(f"the connection to the service failed: {e}") from None
        finally:
            done.set()
            watcher.join()
            http.close()

    # ---- sessions ----------------------------------------------------------------------------

    def Sandbox(
        self,
        policy: Policy | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        lifetime: float | None = None,
        **kwargs: Any,
    ) -> RemoteSandbox:
        """Opens a session on the service: arguments as for `cellblock.Sandbox`, plus
        `labels` (metadata) and `lifetime` (seconds until the service closes it).
        `environment`, `credentials` and a policy's `tls_ca_bundle` as for `Client.run`;
        `rootfs` is refused (InvalidSpec)."""
        fields: dict[str, Any] = policy.model_dump(exclude_unset=True) if policy else {}
        if fields.pop("seccomp", None) is not None or kwargs.pop("seccomp", None) is not None:
            raise InvalidSpec("seccomp policies cannot be sent to the service: use profile")
        # The policy's credentials and the keyword's add up, as in-process.
        credentials = [*(policy.credentials if policy else []),
                       *normalize_credentials(kwargs.pop("credentials", None))]
        fields.pop("credentials", None)
        fields.update(_drop_none(kwargs))
        fields = _remote_isolation({**fields, "credentials": credentials})
        if "warm" in fields:
            fields["warm"] = list(fields["warm"])
        if "secrets" in fields:
            fields["secrets"] = {
                s.name: s.value.get_secret_value() for s in normalize_secrets(fields["secrets"])
            }
        fields["labels"] = dict(labels or {})
        if lifetime is not None:
            fields["lifetime_s"] = lifetime
        info = SessionInfo.model_validate(self.request("POST", "/v1/sessions", json=fields).json())
        return RemoteSandbox(self, info)

    def connect(self, session_id: str) -> RemoteSandbox:
        """The open session `session_id` (made by this token, from any process)."""
        info = self.request("GET", f"/v1/sessions/{session_id}").json()
        return RemoteSandbox(self, SessionInfo.model_validate(info))

    def sessions(self, **labels: str) -> list[SessionInfo]:
        """This token's open sessions whose labels include `labels`."""
        params = [("label", f"{k}={v}") for k, v in labels.items()]
        data = self.request("GET", "/v1/sessions", params=params).json()
        return [SessionInfo.model_validate(d) for d in data]

    # ---- one-shot runs and batches -----------------------------------------------------------

    def run(
        self, argv: Sequence[str], *, on_output: OutputCallback | None = None,
        stdin: bytes | str | None = None, secrets: SecretsArg = None,
        cancel: threading.Event | None = None, **kwargs: Any,
    ) -> RunResult:
        """`cellblock.run` on the service (a fresh sandbox per call); `cancel` as for
        `RemoteSandbox.run`. `environment` names an environment of the service's store;
        `credentials` are sent to the service, which substitutes them at its egress proxy;
        `tls_ca_bundle` (a PEM file of this host) is read and its content sent; `rootfs` (a
        directory of this host) is refused (InvalidSpec)."""
        body = {"argv": list(argv), **_call_body(stdin, secrets, kwargs.pop("seccomp", None),
                                                 _remote_isolation(dict(kwargs)))}
        if on_output is not None:
            return self.stream_run("/v1/run/stream", body, on_output, cancel).to_result()
        return self.post_run("/v1/run", body, cancel).to_result()

    def submit(self, jobs: Iterable[Job], concurrency: int | None = None) -> str:
        """Submits a batch; returns its id (poll with `batch`)."""
        body = {"jobs": [j.model_dump(mode="json") for j in jobs], "concurrency": concurrency}
        return str(self.request("POST", "/v1/batches", json=body).json()["id"])

    def batch(self, batch_id: str, results: bool = False) -> BatchStatus:
        """A batch's progress (and outcomes)."""
        data = self.request("GET", f"/v1/batches/{batch_id}",
                            params={"results": str(results).lower()}).json()
        return BatchStatus.model_validate(data)

    def cancel_batch(self, batch_id: str) -> BatchStatus:
        """Cancels a batch (running jobs are killed)."""
        return BatchStatus.model_validate(
            self.request("DELETE", f"/v1/batches/{batch_id}").json())

    def run_many(
        self, jobs: Iterable[Job], concurrency: int | None = None, poll: float = 0.2
    ) -> list[Outcome]:
        """`cellblock.run_many` on the service: outcomes in job order."""
        listed = list(jobs)
        batch_id = self.submit(listed, concurrency)
        while (status := self.batch(batch_id)).state == "running":
            time.sleep(poll)
        by_id: dict[str, Outcome] = {}
        for o in self.batch(batch_id, results=True).results or []:
            if o.result is not None:
                by_id[o.job_id] = o.result.to_result()
            else:
                err = o.error or {}
                by_id[o.job_id] = JobError(kind=err.get("kind", "ServiceError"),
                                           message=err.get("message", ""))
        if status.state == "cancelled":
            raise SessionClosed(f"batch {batch_id} was cancelled")
        return [by_id[j.id] for j in listed if j.id in by_id]


class RemoteSandbox:
    """A session on the service, with `cellblock.Sandbox`'s methods (plus `id`, `labels`,
    `set_timeout`). Closing it (or leaving ``with``) closes the session on the service."""

    def __init__(self, client: Client, info: SessionInfo) -> None:
        self._client = client
        self.id = info.id
        self._info = info
        self._fork_report: ForkReport | None = (
            info.fork if isinstance(info, SessionForked) else None
        )

    @classmethod
    def connect(cls, client: Client, session_id: str) -> RemoteSandbox:
        """Reconnects to an open session by id, from any process (`Client.connect`)."""
        return client.connect(session_id)

    def _path(self, suffix: str = "") -> str:
        return f"/v1/sessions/{self.id}{suffix}"

    def _post(self, suffix: str, body: dict[str, Any] | None = None) -> Any:
        return self._client.request("POST", self._path(suffix), json=body).json()

    # ---- life --------------------------------------------------------------------------------

    def info(self) -> SessionInfo:
        """The session's current description (SessionClosed once it is gone)."""
        self._info = SessionInfo.model_validate(
            self._client.request("GET", self._path()).json())
        return self._info

    @property
    def labels(self) -> dict[str, str]:
        """The session's labels (as last seen)."""
        return dict(self._info.labels)

    def set_labels(self, labels: Mapping[str, str]) -> None:
        """Replaces the session's labels."""
        self._info = SessionInfo.model_validate(self._client.request(
            "PUT", self._path("/labels"), json=dict(labels)).json())

    def set_timeout(self, seconds: float) -> None:
        """The service closes the session `seconds` from now (extends or shortens it)."""
        self._info = SessionInfo.model_validate(self._post("/timeout", {"seconds": seconds}))

    def open(self) -> Self:
        """The session is open from creation on; returns it (raises once closed)."""
        self.info()
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the session on the service. Idempotent."""
        try:
            self._client.request("DELETE", self._path())
        except SessionClosed:
            pass

    @property
    def is_open(self) -> bool:
        """Whether the service still holds the session open."""
        try:
            return self.info().state != "closed"
        except SessionClosed:
            return False

    @property
    def enforcement(self) -> dict[str, str | None]:
        """What enforces each session-wide limit."""
        return dict(self._client.request("GET", self._path("/enforcement")).json())

    def set_network(self, allow: Sequence[str]) -> list[dict[str, Any]]:
        """`Sandbox.set_network` on the service: the connections it cut."""
        if isinstance(allow, str):
            raise InvalidSpec("allow: a list of patterns, not a string")
        cut: list[dict[str, Any]] = self._post("/network", {"allow": list(allow)})
        return cut

    def fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> RemoteSandbox:
        """`Sandbox.fork` on the service: a new session (of this token, with this one's
        labels and closing time) with a copy of the workspace and the kernel's state."""
        info = self._post("/fork", {"timeout": timeout})
        return RemoteSandbox(self._client, SessionForked.model_validate(info))

    def prepare_fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> None:
        """`Sandbox.prepare_fork` on the service."""
        self._client.request("POST", self._path("/fork/prepare"), json={"timeout": timeout})

    @property
    def fork_report(self) -> ForkReport | None:
        """What the fork carried, when this handle was made by `fork()` (else None)."""
        return self._fork_report

    def pause(self) -> None:
        """Freezes every process of the session."""
        self._post("/pause")

    def resume(self) -> None:
        """Thaws a paused session."""
        self._post("/resume")

    @property
    def paused_seconds(self) -> float:
        """Seconds this session spent frozen by `auto_pause`, the current pause included."""
        return self.info().paused_seconds

    def idle_deadline(self) -> float | None:
        """When the idle timeout closes this session (this process's monotonic clock), if
        it will."""
        left = self.info().idle_close_in
        return None if left is None else time.monotonic() + left

    def pause_deadline(self) -> float | None:
        """When `auto_pause` freezes this idle session (this process's monotonic clock), if
        it will."""
        left = self.info().auto_pause_in
        return None if left is None else time.monotonic() + left

    # ---- commands and code -------------------------------------------------------------------

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
        """`Sandbox.run` on the service; `on_output` receives the output live (SSE).
        `seccomp` policies cannot travel (InvalidSpec: use `profile`). Setting `cancel` closes
        the request, which makes the service kill the run, and raises `Cancelled`.
        `tty`, `tty_size` and `tty_input` as in-process: a run with keystrokes from
        `tty_input` or a window following a function goes through the service's terminal
        WebSocket (see `cellblock.service.terminal`)."""
        tty_section(tty, tty_size)  # the in-process checks and errors, before any request
        if tty_input is not None and not tty:
            raise InvalidSpec("tty_input: given without tty=True")
        interactive = tty and (tty_input is not None or callable(tty_size))
        fixed = None if tty_size is None or callable(tty_size) else list(tty_size)
        body = {"argv": list(argv), **_call_body(stdin, secrets, seccomp, {
            "timeout": timeout, "cpu_time": cpu_time, "max_output": max_output,
            "env": dict(env) if env else None, "cwd": cwd, "profile": profile,
            "tty": tty or None, "tty_size": fixed})}
        if interactive:
            from cellblock.remote_terminal import run_on_terminal

            return run_on_terminal(self._client, self._path("/terminal"), body,
                                   on_output=on_output, cancel=cancel, tty_input=tty_input,
                                   tty_size=tty_size).to_result()
        if on_output is not None:
            return self._client.stream_run(self._path("/run/stream"), body, on_output,
                                           cancel).to_result()
        return self._client.post_run(self._path("/run"), body, cancel).to_result()

    def run_shell(self, script: str, **kwargs: Any) -> RunResult:
        """`Sandbox.run_shell` on the service."""
        return self.run(["/bin/sh", "-c", script], **kwargs)

    def run_python(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_python` on the service (same keyword arguments; `cancel` as for
        `run`)."""
        return self._code("/python", code, stateful, **kwargs)

    def run_node(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_node` on the service."""
        return self._code("/node", code, stateful, **kwargs)

    def _code(
        self, suffix: str, code: str, stateful: bool, *,
        timeout: float | None = None, cpu_time: float | None = None,
        max_output: int | str | None = None, stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None, cwd: str | None = None,
        secrets: SecretsArg = None, cancel: threading.Event | None = None,
    ) -> CodeResult:
        body = {"code": code, "stateful": stateful, **_call_body(stdin, secrets, None, {
            "timeout": timeout, "cpu_time": cpu_time, "max_output": max_output,
            "env": dict(env) if env else None, "cwd": cwd})}
        return self._client.post_run(self._path(suffix), body, cancel).to_result()

    # ---- files -------------------------------------------------------------------------------

    def write_file(self, path: str, data: FileData) -> None:
        """`Sandbox.write_file` on the service. Bytes and text are sent whole; a binary file
        object or an iterable of chunks is streamed (chunked upload, never held whole)."""
        if isinstance(data, (bytes, bytearray, memoryview, str)):
            content: bytes | Iterator[bytes] = (
                data.encode() if isinstance(data, str) else bytes(data))
        else:
            content = file_chunks(data)
        self._client.request("PUT", self._path("/files"), params={"path": path},
                             content=content,
                             headers={"Content-Type": "application/octet-stream"})

    def read_file(self, path: str, *, max_size: int | str = DEFAULT_MAX_READ) -> bytes:
        """`Sandbox.read_file` on the service (FileTooLarge past `max_size`, default 64 MiB)."""
        return b"".join(self.iter_file(path, max_size=max_size))

    def iter_file(
        self, path: str, *, chunk_size: int = CHUNK_SIZE, max_size: int | str | None = None
    ) -> Iterator[bytes]:
        """`Sandbox.iter_file` on the service: the file as it streams from the service, in
        chunks of at most `chunk_size` bytes. As in-process, the file is opened (and errors
        raised) by this call, before iteration."""
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise InvalidSpec(f"iter_file: chunk_size must be a positive int, got {chunk_size!r}")
        params: dict[str, Any] = {"path": path}
        if max_size is not None:
            params["max_size"] = parse_size(max_size, "max_size")
        return self._client.stream_bytes(self._path("/files"), params, chunk_size)

    def make_dirs(self, path: str) -> None:
        """`Sandbox.make_dirs` on the service."""
        self._client.request("POST", self._path("/dir"), params={"path": path})

    def list_dir(self, path: str = "/workspace") -> list[DirEntry]:
        """`Sandbox.list_dir` on the service."""
        data = self._client.request("GET", self._path("/dir"), params={"path": path}).json()
        return [DirEntry.model_validate(e) for e in data]

    def remove(self, path: str, recursive: bool = False) -> None:
        """`Sandbox.remove` on the service."""
        self._client.request("DELETE", self._path("/files"),
                             params={"path": path, "recursive": str(recursive).lower()})

    def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """`Sandbox.upload` on the service: a host file or tree into the sandbox."""
        src = Path(local)
        if src.is_dir():
            self.make_dirs(path)
            for child in sorted(src.iterdir()):
                self.upload(child, posixpath.join(path, child.name))
        else:
            with src.open("rb") as f:
                self.write_file(path, f)

    def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """`Sandbox.download` on the service (symlinks in the sandbox are skipped)."""
        dst = Path(local)
        parent, name = posixpath.split(path.rstrip("/") or "/")
        entries = {e.name: e for e in self.list_dir(parent or "/workspace")} if name else {}
        if not name or (name in entries and entries[name].kind == "dir"):
            dst.mkdir(parents=True, exist_ok=True)
            for entry in self.list_dir(path):
                if entry.kind in ("file", "dir"):
                    self.download(posixpath.join(path, entry.name), dst / entry.name)
        else:
            with dst.open("wb") as f:
                for chunk in self.iter_file(path):
                    f.write(chunk)

    # ---- background processes and ports -----------------------------------------------------

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
    ) -> RemoteProcess:
        """`Sandbox.start` on the service: a `RemoteProcess` (it holds one of the token's
        concurrent runs until it ends). `on_output` is called on a thread of its own.
        `tty`/`tty_size` as in-process; a window function is followed from a thread here
        (each change is a `resize`)."""
        tty_section(tty, tty_size)  # the in-process checks and errors, before any request
        command = {"shell": argv} if isinstance(argv, str) else {"argv": list(argv)}
        follow = tty_size if callable(tty_size) else None
        initial = follow() if follow is not None else tty_size
        assert not callable(initial)
        body = {**command, **_call_body(stdin, secrets, seccomp, {
            "timeout": timeout, "cpu_time": cpu_time, "max_output": max_output,
            "env": dict(env) if env else None, "cwd": cwd, "profile": profile,
            "tty": tty or None, "tty_size": None if initial is None else list(initial)})}
        info = ProcessInfo.model_validate(self._post("/processes", body))
        proc = RemoteProcess(self._client, self._path(), info, on_output)
        if follow is not None:
            from cellblock.remote_terminal import follow_window

            follow_window(proc.resize, lambda: proc.running, follow)
        return proc

    def processes(self) -> list[RemoteProcess]:
        """The session's background processes still running."""
        data = self._client.request("GET", self._path("/processes")).json()
        infos = [ProcessInfo.model_validate(d) for d in data]
        return [RemoteProcess(self._client, self._path(), i) for i in infos
                if i.state == "running"]

    def expose(self, port: int, host: str = "127.0.0.1", host_port: int = 0) -> ExposedPort:
        """`Sandbox.expose` on the service: the address is on the SERVICE's machine (its
        loopback: `host` may be 127.0.0.1 or ::1)."""
        p = PortInfo.model_validate(self._post("/ports", {
            "port": port, "host": host, "host_port": host_port}))
        return ExposedPort(port=p.port, host=p.host, host_port=p.host_port)

    def exposed_ports(self) -> list[ExposedPort]:
        """The session's exposed ports (addresses on the service's machine)."""
        data = self._client.request("GET", self._path("/ports")).json()
        return [ExposedPort(port=p.port, host=p.host, host_port=p.host_port)
                for p in (PortInfo.model_validate(d) for d in data)]

    def __repr__(self) -> str:
        return f"<cellblock.RemoteSandbox {self.id}>"
