"""`RemoteProcess`: a background process of a `RemoteSandbox` (`start` through the service),
with the members of `cellblock.Process`. Its output comes as server-sent events from the
first chunk; a stream cut short is resumed from the last chunk seen."""

from __future__ import annotations

import base64
import json
import signal as signals
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cellblock.errors import InvalidSpec, SandboxIOError
from cellblock.process import OutputChunk, Stream
from cellblock.result import RunResult
from cellblock.sandbox import OutputCallback
from cellblock.service.models import ProcessInfo, RunReport
from cellblock.service.problems import error_from_problem

if TYPE_CHECKING:
    from cellblock.client import Client

#: Times a cut output stream is resumed before SandboxIOError.
RESUMES = 3

_NAMES = {int(getattr(signals, f"SIG{n}")): n
          for n in ("TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "KILL")}


class RemoteProcess:
    """A process started by `RemoteSandbox.start` (`id`: the service's id for it)."""

    def __init__(self, client: Client, session_path: str, info: ProcessInfo,
                 on_output: OutputCallback | None = None) -> None:
        self._client = client
        self.id = info.id
        self.argv = info.argv
        #: Whether the process runs on a terminal (`start(..., tty=True)`).
        self.tty = info.tty
        self._path = f"{session_path}/processes/{info.id}"
        self._info = info
        if on_output is not None:
            threading.Thread(target=self._feed, args=(on_output,), daemon=True,
                             name=f"cellblock-remote-{info.id}").start()

    def _feed(self, on_output: OutputCallback) -> None:
        for chunk in self.iter_output():
            on_output(1 if chunk.stream == "stdout" else 2, chunk.data)

    # ---- state -----------------------------------------------------------------------------

    def info(self) -> ProcessInfo:
        """The process as the service sees it now."""
        self._info = ProcessInfo.model_validate(
            self._client.request("GET", self._path).json())
        return self._info

    @property
    def running(self) -> bool:
        """Whether the process has not ended yet."""
        return self._info.state == "running" and self.info().state == "running"

    @property
    def result(self) -> RunResult | None:
        """The supervisor's report once the process ended, else None."""
        report = self.info().result
        return None if report is None else report.to_result()

    @property
    def returncode(self) -> int | None:
        """The exit status, or minus the signal that ended it; None while it runs."""
        return self.info().returncode

    def __repr__(self) -> str:
        return f"<cellblock.RemoteProcess {self.id} {self.argv!r}>"

    # ---- stdin and signals -----------------------------------------------------------------

    def write_stdin(self, data: bytes | str) -> None:
        """Writes to the process's stdin (SandboxIOError once it is closed)."""
        body = data.encode() if isinstance(data, str) else bytes(data)
        self._client.request("POST", f"{self._path}/stdin", content=body,
                             headers={"Content-Type": "application/octet-stream"})

    def close_stdin(self) -> None:
        """Closes the process's stdin: it reads EOF."""
        self._client.request("POST", f"{self._path}/stdin", params={"close": "true"})

    def resize(self, rows: int, cols: int) -> None:
        """Sets the window of the process's terminal to `rows` x `cols` (InvalidSpec without
        `tty=True` or for an empty window; SandboxIOError once the process has ended)."""
        self._client.request("POST", f"{self._path}/resize", json={"rows": rows, "cols": cols})

    def signal(self, sig: int) -> bool:
        """Sends `sig` (TERM, INT, HUP, QUIT, USR1, USR2 or KILL); False when the process had
        already ended; InvalidSpec for other signals."""
        name = _NAMES.get(int(sig))
        if name is None:
            raise InvalidSpec(f"signal {int(sig)} cannot be sent to a process")
        return bool(self._client.request("POST", f"{self._path}/signal",
                                         json={"signal": name}).json()["delivered"])

    def terminate(self) -> bool:
        """`signal(SIGTERM)`."""
        return self.signal(signals.SIGTERM)

    def kill(self) -> bool:
        """Ends the process and everything it started; returns once its report is in."""
        running = self._info.state == "running"
        self._info = ProcessInfo.model_validate(
            self._client.request("DELETE", self._path).json())
        return running

    # ---- waiting and output ----------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> RunResult:
        """The supervisor's report once the process ends; TimeoutError (the service's
        `WaitTimeout`) after `timeout` seconds, the process still running."""
        params = {} if timeout is None else {"timeout": timeout}
        report = RunReport.model_validate(
            self._client.request("POST", f"{self._path}/wait", params=params).json())
        return report.to_result()

    def iter_output(self, timeout: float | None = None) -> Iterator[OutputChunk]:
        """The output chunks from the start, live, until the process ends (TimeoutError when
        none comes for `timeout` seconds)."""
        import httpx
        from httpx_sse import connect_sse

        index, resumes = 0, 0
        while True:
            try:
                with connect_sse(self._client._http, "GET", f"{self._path}/output",
                                 params={"start": index},
                                 timeout=httpx.Timeout(None, read=timeout, connect=10.0)
                                 ) as events:
                    self._client.raise_for_problem(events.response)
                    for event in events.iter_sse():
                        data: Any = json.loads(event.data)
                        if event.event in ("stdout", "stderr"):
                            index = int(event.id) + 1 if event.id else index + 1
                            stream: Stream = "stdout" if event.event == "stdout" else "stderr"
                            yield OutputChunk(stream, base64.b64decode(data["base64"]))
                        elif event.event == "result":
                            return
                        elif event.event == "error":
                            raise error_from_problem(data, int(data.get("status", 500)))
            except httpx.ReadTimeout:
                raise TimeoutError(f"no output from {self.argv!r} for {timeout} s") from None
            except httpx.TransportError as e:
                resumes += 1
                if resumes > RESUMES:
                    raise SandboxIOError(f"the output stream of {self.id} was cut: {e}") from None
                continue
            raise SandboxIOError("the service ended the output stream without a result")

    def iter_stdout(self, timeout: float | None = None) -> Iterator[bytes]:
        """The stdout chunks of `iter_output`."""
        return (c.data for c in self.iter_output(timeout) if c.stream == "stdout")

    def iter_stderr(self, timeout: float | None = None) -> Iterator[bytes]:
        """The stderr chunks of `iter_output`."""
        return (c.data for c in self.iter_output(timeout) if c.stream == "stderr")

    def iter_lines(
        self, stream: Stream = "stdout", timeout: float | None = None
    ) -> Iterator[bytes]:
        """Complete lines (with their newline) of one stream as they come."""
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
