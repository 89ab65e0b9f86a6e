"""Routes of background processes and exposed ports of a session (`Sandbox.start`,
`Sandbox.expose` over HTTP).

A running process holds one of its token's concurrent runs until it ends; closing the session
(or stopping the service) ends it. Its output is kept (within `max_output`) and served as
server-sent events from any chunk index on, so a client that lost its stream resumes where it
was (`Last-Event-ID` or `?start=`). Ports are exposed on the loopback of the SERVICE's machine.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal as signals
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from cellblock.errors import CellblockError
from cellblock.service.deps import Sess, Token
from cellblock.service.models import (
    PortExpose,
    PortInfo,
    ProcessInfo,
    ProcessSignal,
    ProcessStart,
    RunReport,
    TerminalResize,
)
from cellblock.service.problems import WaitTimeout, problem_body
from cellblock.service.registry import Registry, ServedProcess, new_id

#: How long DELETE waits for a killed process's report, seconds.
KILL_WAIT_S = 10.0

_SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}
_RAW_BODY = {"requestBody": {"required": False, "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def info_of(served: ServedProcess) -> ProcessInfo:
    """The public description of a served process."""
    proc = served.proc
    result = proc.result
    return ProcessInfo(
        id=served.id, argv=proc.argv, state="running" if proc.running else "ended",
        tty=proc.tty,
        returncode=proc.returncode, result=None if result is None else RunReport.of(result),
    )


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


async def _hold_run(registry: Registry, tok: Token, served: ServedProcess) -> None:
    """Holds the token's run until the process ends (however it ends)."""
    try:
        with contextlib.suppress(Exception):
            await served.proc.wait()
    finally:
        await registry.release_run(tok)


router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["processes"])


@router.post("/processes", status_code=201)
async def start_process(tok: Token, sess: Sess, body: ProcessStart, request: Request
                        ) -> ProcessInfo:
    """Starts a background process (it holds one of the token's concurrent runs until it
    ends); returns at once with its id."""
    registry = _registry(request)
    fields = body.model_dump(
        exclude={"argv", "shell", "stdin", "stdin_base64", "secrets"}, exclude_none=True)
    if not fields.get("env"):
        fields.pop("env", None)
    stdin = body.stdin_base64 if body.stdin_base64 is not None else body.stdin
    argv: list[str] | str = body.argv if body.argv is not None else str(body.shell)
    await registry.take_run(tok)
    try:
        proc = await sess.sandbox.start(argv, stdin=stdin,
                                        secrets=dict(body.secrets) or None, **fields)
    except BaseException:
        await registry.release_run(tok)
        raise
    served = ServedProcess(id=new_id("prc"), proc=proc)
    served.holder = asyncio.ensure_future(_hold_run(registry, tok, served))
    sess.add_process(served)
    return info_of(served)


@router.get("/processes")
async def list_processes(sess: Sess) -> list[ProcessInfo]:
    """The session's processes: running ones and the latest ended ones."""
    return [info_of(p) for p in sess.processes.values()]


@router.get("/processes/{process_id}")
async def get_process(sess: Sess, process_id: str) -> ProcessInfo:
    """One process: its state, and its report once it ended."""
    return info_of(sess.get_process(process_id))


@router.get("/processes/{process_id}/output", responses=_SSE)
async def process_output(
    sess: Sess, process_id: str,
    start: Annotated[int | None, Query(ge=0, le=1 << 40)] = None,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
    """The process's output as server-sent events, from its first chunk (or from `start`, or
    after the `Last-Event-ID` a reconnecting client sends): `stdout`/`stderr` events (JSON
    `{"base64", "text"}`, `id` = chunk index), live, then `result` (a RunReport) or `error`.
    Leaving the stream does not stop the process."""
    served = sess.get_process(process_id)
    first = start or 0
    if start is None and last_event_id is not None and last_event_id.isdigit():
        first = int(last_event_id) + 1
    return StreamingResponse(_output_events(served, first), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


async def _output_events(served: ServedProcess, first: int) -> AsyncIterator[str]:
    index = first
    async for chunk in served.proc.iter_output(first):
        data = {"base64": base64.b64encode(chunk.data).decode(),
                "text": chunk.data.decode("utf-8", "replace")}
        yield f"id: {index}\nevent: {chunk.stream}\ndata: {json.dumps(data)}\n\n"
        index += 1
    try:
        report = RunReport.of(await served.proc.wait())
        yield f"event: result\ndata: {report.model_dump_json()}\n\n"
    except CellblockError as e:
        yield f"event: error\ndata: {json.dumps(problem_body(e))}\n\n"


@router.post("/processes/{process_id}/stdin", status_code=204, openapi_extra=_RAW_BODY)
async def write_stdin(sess: Sess, process_id: str, request: Request,
                      close: bool = False) -> None:
    """Writes the raw body to the process's stdin, as it arrives (`close=true`: then closes
    stdin, so the process reads EOF). SandboxIOError once stdin is closed."""
    proc = sess.get_process(process_id).proc
    async for chunk in request.stream():
        if chunk:
            await proc.write_stdin(chunk)
    if close:
        await proc.close_stdin()


@router.post("/processes/{process_id}/resize", status_code=204)
async def resize_terminal(sess: Sess, process_id: str, body: TerminalResize) -> None:
    """Sets the window of the process's terminal (InvalidSpec without `tty`; SandboxIOError
    once it ended)."""
    await sess.get_process(process_id).proc.resize(body.rows, body.cols)


@router.post("/processes/{process_id}/signal")
async def signal_process(sess: Sess, process_id: str, body: ProcessSignal) -> dict[str, bool]:
    """Sends a signal (`delivered` false: the process had already ended)."""
    proc = sess.get_process(process_id).proc
    return {"delivered": proc.signal(getattr(signals, f"SIG{body.signal}"))}


@router.post("/processes/{process_id}/wait")
async def wait_process(
    sess: Sess, process_id: str,
    timeout: Annotated[float | None, Query(gt=0, le=7 * 24 * 3600.0)] = None,
) -> RunReport:
    """Waits for the process to end and returns its report (WaitTimeout, 408, after
    `timeout` seconds: the process keeps running)."""
    proc = sess.get_process(process_id).proc
    try:
        return RunReport.of(await proc.wait(timeout))
    except TimeoutError:
        raise WaitTimeout(f"process {process_id} still running after {timeout} s") from None


@router.delete("/processes/{process_id}")
async def kill_process(sess: Sess, process_id: str) -> ProcessInfo:
    """Kills the process and everything it started; returns it once its report is in."""
    served = sess.get_process(process_id)
    served.proc.kill()
    with contextlib.suppress(Exception):
        await served.proc.wait(KILL_WAIT_S)
    return info_of(served)


@router.post("/ports", status_code=201)
async def expose_port(sess: Sess, body: PortExpose) -> PortInfo:
    """Forwards `host:host_port` OF THE SERVICE'S MACHINE (its loopback) to `port` inside the
    sandbox, until the session closes."""
    exposed = await sess.sandbox.expose(body.port, body.host, body.host_port)
    return PortInfo(port=exposed.port, host=exposed.host, host_port=exposed.host_port)


@router.get("/ports")
async def list_ports(sess: Sess) -> list[PortInfo]:
    """The session's exposed ports."""
    return [PortInfo(port=p.port, host=p.host, host_port=p.host_port)
            for p in sess.sandbox.exposed_ports()]
