"""The interactive terminal of the HTTP service: a WebSocket per tty run.

`WS /v1/sessions/{id}/terminal` runs one command of the session on a terminal, as
`Sandbox.run(argv, tty=True, tty_input=keyboard, tty_size=window)` does in-process:

- the client's first message (text) is the run, a `CommandRun` (JSON);
- then binary frames from the client are keystrokes, typed into the terminal as they come
  (Ctrl-C is the byte 0x03: the sandbox's own line discipline turns it into SIGINT), and
  text frames are control messages (`TerminalMessage`: `{"type": "resize", "rows", "cols"}`);
- binary frames from the service are the terminal's output, live (redacted, within the cap);
- the last frame is text: `{"type": "result", "result": RunReport}` or
  `{"type": "error", "problem": problem+json}`; then the service closes the socket.

Closing the socket first kills the run. Errors found before the socket is accepted (no valid
token: Unauthorized; not the token's session: SessionClosed) are the HTTP answer to the
upgrade, problem+json, when the server can send one (else an error frame). Background
processes on a terminal need no socket: `POST .../processes` with `tty`, their output as
server-sent events, `.../stdin` and `.../resize` (see `cellblock.service.processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.websockets import WebSocketState

from cellblock.errors import CellblockError, InvalidSpec
from cellblock.service.auth import TokenRecord, TokenStore
from cellblock.service.models import CommandRun, RunReport, TerminalMessage
from cellblock.service.problems import (
    PROBLEM_JSON,
    InternalError,
    RequestTooLarge,
    Unauthorized,
    problem_body,
)
from cellblock.service.registry import Registry, Session
from cellblock.terminal import DEFAULT_SIZE, WindowSize, checked_size

router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["runs"])

#: Close code after the last frame, and for a client that broke the protocol.
NORMAL, POLICY = 1000, 1008


def _token(ws: WebSocket) -> TokenRecord:
    store: TokenStore = ws.app.state.tokens
    scheme, _, token = ws.headers.get("authorization", "").partition(" ")
    record = store.lookup(token.strip()) if scheme.lower() == "bearer" else None
    if record is None:
        raise Unauthorized("a valid bearer token is required")
    return record


def _invalid(e: ValidationError) -> InvalidSpec:
    errors = e.errors()
    if not errors:
        return InvalidSpec("invalid message")
    loc = ".".join(str(x) for x in errors[0]["loc"])
    return InvalidSpec(f"{loc}: {errors[0]['msg']}")


async def _refuse(ws: WebSocket, error: CellblockError) -> None:
    """Answers the upgrade with the error's problem+json (or, when the server cannot send an
    HTTP answer to a WebSocket request, accepts and sends it as the error frame)."""
    from fastapi.responses import JSONResponse

    body = problem_body(error)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        headers = {"WWW-Authenticate": "Bearer"} if body["status"] == 401 else None
        await ws.send_denial_response(JSONResponse(
            body, status_code=body["status"], media_type=PROBLEM_JSON, headers=headers))
        return
    await ws.accept()
    await ws.send_json({"type": "error", "problem": body})
    await ws.close(POLICY)


@router.websocket("/terminal")
async def terminal(ws: WebSocket, session_id: str) -> None:
    """An interactive tty run (see the module's description)."""
    registry: Registry = ws.app.state.registry
    try:
        tok = _token(ws)
        sess = registry.get_session(tok, session_id)
    except CellblockError as e:
        await _refuse(ws, e)
        return
    await ws.accept()
    try:
        text = await ws.receive_text()
        if len(text) > tok.max_request_bytes:
            raise RequestTooLarge(f"the run of {len(text)} bytes exceeds the limit of "
                                  f"{tok.max_request_bytes}")
        try:
            body = CommandRun.model_validate_json(text)
        except ValidationError as e:
            raise _invalid(e) from None
        async with registry.run_slot(tok):
            report = await _serve(ws, tok, sess, body)
        await ws.send_json({"type": "result", "result": report.model_dump(mode="json")})
    except WebSocketDisconnect:
        return  # the client left: the run (if any) was killed by _serve
    except CellblockError as e:
        await _send_error(ws, e)
        return
    except Exception as e:
        await _send_error(ws, InternalError(f"{type(e).__name__}: {e}"))
        return
    await ws.close(NORMAL)


async def _send_error(ws: WebSocket, error: CellblockError) -> None:
    if ws.client_state is WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "error", "problem": problem_body(error)})
            await ws.close(NORMAL)


async def _serve(ws: WebSocket, tok: TokenRecord, sess: Session, body: CommandRun
                 ) -> RunReport:
    """Runs `body` on a terminal fed by the socket; its report."""
    if body.tty_size is not None:
        checked_size(body.tty_size)
    window: list[WindowSize] = [tuple(body.tty_size or DEFAULT_SIZE)]  # type: ignore[list-item]
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[bytes] = asyncio.Queue()

    def on_output(stream: int, data: bytes) -> None:  # on the supervisor's thread
        loop.call_soon_threadsafe(output.put_nowait, data)

    from cellblock.service.app import _call_kwargs  # app imports this module

    kwargs = _call_kwargs(body)
    kwargs.pop("tty", None)
    kwargs["tty_size"] = lambda: window[0]
    # The run's keyboard: a pipe whose write end the socket's keystrokes go to.
    keys_r, keys_w = os.pipe()
    run = asyncio.ensure_future(sess.sandbox.run(
        body.argv, tty=True, tty_input=keys_r, on_output=on_output, **kwargs))
    keys = asyncio.ensure_future(_keystrokes(ws, tok, keys_w, window))
    sender = asyncio.ensure_future(_send_output(ws, output))
    try:
        await asyncio.wait({run, keys}, return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            # The client left or broke the protocol: the run is killed (as a closed request
            # kills an HTTP run), and what ended the keystrokes is raised.
            run.cancel()
            await asyncio.wait({run})
            keys.result()
            raise WebSocketDisconnect(POLICY)
        result = run.result()
        await output.join()  # every chunk of output is sent before the result
        return RunReport.of(result)
    finally:
        for task in (keys, sender):
            task.cancel()
        await asyncio.wait({keys, sender})
        os.close(keys_w)
        os.close(keys_r)


async def _send_output(ws: WebSocket, output: asyncio.Queue[bytes]) -> None:
    while True:
        data = await output.get()
        try:
            await ws.send_bytes(data)
        finally:
            output.task_done()


async def _keystrokes(ws: WebSocket, tok: TokenRecord, keys: int, window: list[WindowSize]
                      ) -> None:
    """Types what the socket sends until it closes (then returns)."""
    os.set_blocking(keys, False)
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        data: bytes | None = message.get("bytes")
        if data is not None:
            await _type(keys, data)
            continue
        text = message.get("text") or ""
        if len(text) > tok.max_request_bytes:
            raise RequestTooLarge(f"a message of {len(text)} bytes exceeds the limit of "
                                  f"{tok.max_request_bytes}")
        try:
            control = TerminalMessage.model_validate_json(text)
        except ValidationError as e:
            raise _invalid(e) from None
        window[0] = (control.rows, control.cols)


async def _type(fd: int, data: bytes) -> None:
    """Writes to the keyboard pipe without blocking the loop (waits while it is full: the
    program is not reading its terminal)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await asyncio.sleep(0.01)
        except OSError as e:
            if e.errno == errno.EPIPE:
                return  # the run has ended: nothing reads the keys anymore
            raise
