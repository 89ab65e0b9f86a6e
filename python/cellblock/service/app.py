"""The HTTP/JSON service as a FastAPI app: `create_app(tokens)`.

Every route authenticates the bearer token, finds the token's own session or batch, and calls
`cellblock.aio`; errors leave as problem+json named like the Python exceptions. Background
processes (live output as server-sent events, stdin, signals, wait, kill) and exposed ports
(on the service machine's loopback) are served by `cellblock.service.processes`; interactive
terminals (a WebSocket per tty run) by `cellblock.service.terminal`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellblock import aio
from cellblock.errors import CellblockError, InvalidSpec
from cellblock.files import CHUNK_SIZE, DirEntry
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.service.auth import TokenRecord, TokenStore
from cellblock.service.deps import Path, Sess, Token
from cellblock.service.isolation import ca_bundle_file, known_environment
from cellblock.service.models import (
    BatchCreate,
    BatchStatus,
    CodeRun,
    CommandRun,
    ForkRequest,
    NetworkSet,
    OneShotRun,
    RunReport,
    SessionCreate,
    SessionForked,
    SessionInfo,
    SetTimeout,
)
from cellblock.service.problems import (
    PROBLEM_JSON,
    InternalError,
    NotFound,
    RequestTooLarge,
    ServiceError,
    Unauthorized,
    problem_body,
)
from cellblock.service.processes import router as process_routes
from cellblock.service.registry import (
    BATCH_RETENTION_S,
    DEFAULT_MAX_SESSIONS,
    Batch,
    Registry,
    Session,
    new_id,
)
from cellblock.service.terminal import router as terminal_routes

#: Largest body accepted from a request whose token is unknown (it gets 401 anyway).
ANONYMOUS_MAX_BODY = 64 << 10

#: Chunk size of streamed file downloads.
CHUNK = CHUNK_SIZE
#: Largest `max_size` a download may ask for (the core's "no cap").
_UNLIMITED = (1 << 64) - 1

T = TypeVar("T")

_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "An error (problem+json)."}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: _PROBLEM for code in (401, 403, 404, 408, 409, 413, 422, 429, 500, 503, 504)
}


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class BodyLimit:
    """ASGI middleware: refuses bodies larger than the token's `max_request_bytes` with 413,
    by Content-Length up front and by counting while the body streams in."""

    def __init__(self, app: ASGIApp, tokens: TokenStore) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        record = self.tokens.lookup(token) if token else None
        limit = record.max_request_bytes if record else ANONYMOUS_MAX_BODY
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await problem(RequestTooLarge(f"body of {int(declared)} bytes exceeds the "
                                          f"limit of {limit}"))(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        await self.app(scope, counted, send)


class _TooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body exceeds the limit of {limit} bytes")


def problem(error: CellblockError, status: int | None = None) -> JSONResponse:
    """The problem+json response of an error."""
    body = problem_body(error, status)
    headers = {"WWW-Authenticate": "Bearer"} if body["status"] == 401 else None
    return JSONResponse(body, status_code=body["status"], media_type=PROBLEM_JSON,
                        headers=headers)


def create_app(tokens: TokenStore, max_sessions: int = DEFAULT_MAX_SESSIONS,
               batch_retention_s: float = BATCH_RETENTION_S) -> FastAPI:
    """The service's ASGI app, accepting the given tokens, holding at most `max_sessions`
    sessions in all and keeping finished batches `batch_retention_s` seconds."""
    registry = Registry(max_sessions, batch_retention_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start_reaper()
        try:
            yield
        finally:
            # Graceful shutdown: no sandbox outlives the service.
            await registry.close_all()

    app = FastAPI(
        title="cellblock", version="1", lifespan=lifespan, responses=_ERRORS,
        description="Sandboxed runs and sessions over HTTP. Errors are problem+json whose "
        "title names the Python exception class (InvalidSpec, SessionClosed, PathEscape, ...).",
    )
    app.state.registry = registry
    app.state.tokens = tokens
    app.add_middleware(BodyLimit, tokens=tokens)
    _install_error_handlers(app)
    app.include_router(process_routes)
    app.include_router(terminal_routes)

    async def run_report(
        tok: TokenRecord, request: Request, call: Awaitable[RunResult]
    ) -> RunReport:
        async with registry.run_slot(tok):
            return RunReport.of(await _unless_disconnected(request, call))

    # ---- health --------------------------------------------------------------------------

    @app.get("/v1/health", tags=["service"])
    async def health() -> dict[str, str]:
        """Liveness (no token needed)."""
        return {"status": "ok"}

    # ---- sessions ------------------------------------------------------------------------

    @app.post("/v1/sessions", status_code=201, tags=["sessions"])
    async def create_session(tok: Token, body: SessionCreate) -> SessionInfo:
        """Opens a session (a persistent sandbox) owned by this token."""
        fields = body.model_dump(exclude={"labels", "lifetime_s", "warm", "idle_timeout",
                                          "auto_pause", "secrets", "env", "credentials",
                                          "tls_ca_pem"},
                                 exclude_none=True)
        await known_environment(body.environment)
        async with registry.session_slot(tok):
            # The proxy loads the bundle when the session opens: the file is gone after.
            with ca_bundle_file(body.tls_ca_pem) as bundle:
                sandbox = await aio.Sandbox(
                    Policy.build(**fields, env=body.env, tls_ca_bundle=bundle),
                    secrets=body.secrets or None, credentials=list(body.credentials) or None,
                    idle_timeout=body.idle_timeout, auto_pause=body.auto_pause,
                    warm=tuple(body.warm),
                ).open()
            now = time.time()
            session = Session(
                id=new_id("ses"), owner=tok.name, sandbox=sandbox, labels=dict(body.labels),
                created_at=now, expires_at=now + body.lifetime_s,
            )
            registry.add_session(session)
        return session.info()

    @app.get("/v1/sessions", tags=["sessions"])
    async def list_sessions(
        tok: Token, label: Annotated[list[str], Query(max_length=64)] = [],  # noqa: B006
    ) -> list[SessionInfo]:
        """This token's sessions; each `label=key=value` must match."""
        wanted = dict(item.partition("=")[::2] for item in label)
        return [s.info() for s in registry.list_sessions(tok, wanted)]

    @app.get("/v1/sessions/{session_id}", tags=["sessions"])
    async def get_session(sess: Sess) -> SessionInfo:
        """One session (SessionClosed if it is not this token's open session)."""
        return sess.info()

    @app.delete("/v1/sessions/{session_id}", tags=["sessions"])
    async def close_session(sess: Sess) -> SessionInfo:
        """Closes the session: kills its processes, frees its workspace."""
        await registry.close_session(sess)
        return sess.info()

    @app.post("/v1/sessions/{session_id}/timeout", tags=["sessions"])
    async def set_timeout(sess: Sess, body: SetTimeout) -> SessionInfo:
        """The session now closes `seconds` from now."""
        sess.expires_at = time.time() + body.seconds
        return sess.info()

    @app.put("/v1/sessions/{session_id}/labels", tags=["sessions"])
    async def set_labels(
        sess: Sess, labels: Annotated[dict[str, str], Body(max_length=64)]
    ) -> SessionInfo:
        """Replaces the session's labels."""
        sess.labels = labels
        return sess.info()

    @app.post("/v1/sessions/{session_id}/pause", tags=["sessions"])
    async def pause(sess: Sess) -> SessionInfo:
        """Freezes every process of the session."""
        await sess.sandbox.pause()
        sess.paused = True
        return sess.info()

    @app.post("/v1/sessions/{session_id}/resume", tags=["sessions"])
    async def resume(sess: Sess) -> SessionInfo:
        """Thaws a paused session."""
        await sess.sandbox.resume()
        sess.paused = False
        return sess.info()

    @app.post("/v1/sessions/{session_id}/network", tags=["sessions"])
    async def set_network(sess: Sess, body: NetworkSet) -> list[dict[str, Any]]:
        """Replaces the session's egress allowlist; returns the connections it cut."""
        return await sess.sandbox.set_network(body.allow)

    @app.post("/v1/sessions/{session_id}/fork", status_code=201, tags=["sessions"])
    async def fork_session(tok: Token, sess: Sess, body: ForkRequest) -> SessionForked:
        """Forks the session (`Sandbox.fork`): a new session of this token, isolated from
        it, with a copy of its workspace and of its stateful Python kernel's globals; the
        labels and the closing time are the parent's."""
        async with registry.session_slot(tok):
            child = await sess.sandbox.fork(timeout=body.timeout)
            report = child.fork_report
            assert report is not None  # set by every fork
            session = Session(
                id=new_id("ses"), owner=tok.name, sandbox=child, labels=dict(sess.labels),
                created_at=time.time(), expires_at=sess.expires_at,
            )
            registry.add_session(session)
        return SessionForked(**session.info().model_dump(), fork=report)

    @app.post("/v1/sessions/{session_id}/fork/prepare", status_code=204, tags=["sessions"])
    async def prepare_fork(sess: Sess, body: ForkRequest) -> None:
        """Opens the next fork's session ahead (`Sandbox.prepare_fork`)."""
        await sess.sandbox.prepare_fork(timeout=body.timeout)

    @app.get("/v1/sessions/{session_id}/enforcement", tags=["sessions"])
    async def enforcement(sess: Sess) -> dict[str, str | None]:
        """What enforces each session-wide limit."""
        return await sess.sandbox.enforcement()

    # ---- runs in a session ---------------------------------------------------------------

    @app.post("/v1/sessions/{session_id}/run", tags=["runs"])
    async def session_run(tok: Token, sess: Sess, body: CommandRun, request: Request
                          ) -> RunReport:
        """Runs a command in the session."""
        return await run_report(tok, request, sess.sandbox.run(body.argv, **_call_kwargs(body)))

    @app.post("/v1/sessions/{session_id}/run/stream", tags=["runs"],
              responses={200: {"content": {"text/event-stream": {}}}})
    async def session_run_stream(tok: Token, sess: Sess, body: CommandRun) -> StreamingResponse:
        """Runs a command with its output as server-sent events: `stdout` and `stderr`
        events (JSON `{"base64", "text"}`), then one `result` (a RunReport) or `error`
        (a problem). Disconnecting kills the run."""
        return await _sse(registry, tok, sess.sandbox.stream(body.argv, **_call_kwargs(body)))

    @app.post("/v1/sessions/{session_id}/python", tags=["runs"])
    async def session_python(tok: Token, sess: Sess, body: CodeRun, request: Request
                             ) -> RunReport:
        """Runs Python in the session's warm interpreter (`value`: repr of the last
        expression; `error`: the traceback)."""
        return await run_report(tok, request, sess.sandbox.run_python(
            body.code, stateful=body.stateful, **_call_kwargs(body)))

    @app.post("/v1/sessions/{session_id}/node", tags=["runs"])
    async def session_node(tok: Token, sess: Sess, body: CodeRun, request: Request
                           ) -> RunReport:
        """Runs JavaScript in the session's warm Node runtime."""
        return await run_report(tok, request, sess.sandbox.run_node(
            body.code, stateful=body.stateful, **_call_kwargs(body)))

    # ---- files ---------------------------------------------------------------------------

    @app.put("/v1/sessions/{session_id}/files", status_code=204, tags=["files"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string",
                                                         "format": "binary"}}}}})
    async def put_file(sess: Sess, request: Request, path: Path) -> Response:
        """Writes a file (the raw body; parents created). Relative paths are under
        /workspace; nothing outside the sandbox is reachable (PathEscape). The body is
        written as it arrives (never held whole); a body cut short or too large leaves no
        partial file."""
        try:
            await sess.sandbox.write_file(path, request.stream())
        except (StarletteHTTPException, ClientDisconnect):
            with contextlib.suppress(CellblockError):
                await sess.sandbox.remove(path)
            raise
        return Response(status_code=204)

    @app.get("/v1/sessions/{session_id}/files", tags=["files"],
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def get_file(
        sess: Sess, path: Path,
        max_size: Annotated[int | None, Query(ge=0, le=_UNLIMITED)] = None,
    ) -> StreamingResponse:
        """Reads a file, streamed as it is read (secrets redacted); `max_size`: refuse files
        larger than that many bytes (FileTooLarge) before sending any."""
        chunks = await sess.sandbox.iter_file(path, chunk_size=CHUNK, max_size=max_size)
        return StreamingResponse(chunks, media_type="application/octet-stream")

    @app.delete("/v1/sessions/{session_id}/files", status_code=204, tags=["files"])
    async def remove_file(sess: Sess, path: Path, recursive: bool = False) -> Response:
        """Removes a file, symlink or empty directory (`recursive`: a whole tree)."""
        await sess.sandbox.remove(path, recursive)
        return Response(status_code=204)

    @app.get("/v1/sessions/{session_id}/dir", tags=["files"])
    async def list_dir(sess: Sess, path: Path = "/workspace") -> list[DirEntry]:
        """The entries of a directory, sorted by name."""
        return await sess.sandbox.list_dir(path)

    @app.post("/v1/sessions/{session_id}/dir", status_code=204, tags=["files"])
    async def make_dirs(sess: Sess, path: Path) -> Response:
        """Creates a directory and its missing parents."""
        await sess.sandbox.make_dirs(path)
        return Response(status_code=204)

    # ---- one-shot runs and batches -------------------------------------------------------

    @app.post("/v1/run", tags=["runs"])
    async def one_shot(tok: Token, body: OneShotRun, request: Request) -> RunReport:
        """Runs a command in a fresh sandbox, destroyed after."""
        await known_environment(body.environment)
        with ca_bundle_file(body.tls_ca_pem) as bundle:
            return await run_report(tok, request, aio.run(
                body.argv, **_one_shot_kwargs(body), tls_ca_bundle=bundle))

    @app.post("/v1/run/stream", tags=["runs"],
              responses={200: {"content": {"text/event-stream": {}}}})
    async def one_shot_stream(tok: Token, body: OneShotRun) -> StreamingResponse:
        """A one-shot run with its output as server-sent events (as the session's)."""
        await known_environment(body.environment)
        files = contextlib.ExitStack()
        bundle = files.enter_context(ca_bundle_file(body.tls_ca_pem))
        try:
            live = aio.stream(body.argv, **_one_shot_kwargs(body), tls_ca_bundle=bundle)
            return await _sse(registry, tok, live, cleanup=files.close)
        except BaseException:
            files.close()
            raise

    @app.post("/v1/batches", status_code=202, tags=["batches"])
    async def submit_batch(tok: Token, body: BatchCreate) -> BatchStatus:
        """Submits jobs; they run in the background (each holding one of the token's
        concurrent runs). Poll `GET /v1/batches/{id}`."""
        if len(body.jobs) > tok.max_batch_jobs:
            raise InvalidSpec(f"{len(body.jobs)} jobs exceed the limit of {tok.max_batch_jobs}")
        registry.check_batch_room(tok)
        batch = Batch(id=new_id("bat"), owner=tok.name, jobs=list(body.jobs))
        batch.task = asyncio.ensure_future(_run_batch(registry, tok, batch, body.concurrency))
        registry.add_batch(batch)
        return batch.status(with_results=False)

    @app.get("/v1/batches/{batch_id}", tags=["batches"])
    async def batch_status(tok: Token, batch_id: str, results: bool = False) -> BatchStatus:
        """A batch's progress (`results=true`: the outcomes of the finished jobs)."""
        return registry.get_batch(tok, batch_id).status(with_results=results)

    @app.delete("/v1/batches/{batch_id}", tags=["batches"])
    async def cancel_batch(tok: Token, batch_id: str, forget: bool = False) -> BatchStatus:
        """Cancels a batch: running jobs are killed, the rest never start (`forget`: also
        drop it and its results now, rather than after the retention time)."""
        batch = registry.get_batch(tok, batch_id)
        if batch.task is not None and not batch.task.done():
            batch.cancelled = True
            batch.task.cancel()
            await asyncio.wait({batch.task})
        if forget:
            registry.batches.pop(batch.id, None)
        return batch.status(with_results=False)

    return app


def _call_kwargs(body: CommandRun | CodeRun) -> dict[str, Any]:
    """Keyword arguments of a session call (None values are left to the session)."""
    fields = body.model_dump(
        exclude={"argv", "code", "stateful", "stdin", "stdin_base64", "secrets"},
        exclude_none=True,
    )
    if not fields.get("env"):
        fields.pop("env", None)
    stdin = body.stdin_base64 if body.stdin_base64 is not None else body.stdin
    if stdin is not None:
        fields["stdin"] = stdin
    if body.secrets:
        fields["secrets"] = dict(body.secrets)
    return fields


def _one_shot_kwargs(body: OneShotRun) -> dict[str, Any]:
    fields = _call_kwargs(body)
    # The models themselves (values stay SecretStr until the run spec is built).
    fields.pop("credentials", None)
    fields.pop("tls_ca_pem", None)
    if body.credentials:
        fields["credentials"] = list(body.credentials)
    return fields


async def _unless_disconnected(request: Request, call: Awaitable[T]) -> T:
    """Awaits a run, killing it if the client goes away first (closing the request is how a
    client cancels a call: an event of its own cannot travel)."""
    task = asyncio.ensure_future(call)

    async def disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnect())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()  # aio kills the run and returns once its processes are gone
        await asyncio.wait({task})
        raise ServiceError("the client closed the request: the run was killed")
    return task.result()


async def _run_batch(
    registry: Registry, tok: TokenRecord, batch: Batch, concurrency: int | None
) -> None:
    slots = asyncio.Semaphore(min(concurrency or tok.max_concurrent_runs,
                                  tok.max_concurrent_runs))

    async def one(job: Any) -> None:
        async with slots, registry.run_slot(tok, wait=True):
            batch.outcomes.append((job, await aio.run_job(job)))

    tasks = [asyncio.ensure_future(one(job)) for job in batch.jobs]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        batch.finished_at = time.monotonic()


async def _sse(registry: Registry, tok: TokenRecord, live: aio.LiveRun,
               cleanup: Callable[[], None] | None = None) -> StreamingResponse:
    """Streams a live run as server-sent events. The run slot is taken before the response
    starts (LimitExceeded is a plain 429); leaving the stream early kills the run. `cleanup`
    runs once the run is over."""
    slot = contextlib.AsyncExitStack()
    await slot.enter_async_context(registry.run_slot(tok))
    if cleanup is not None:
        slot.callback(cleanup)

    async def events() -> AsyncIterator[str]:
        async with slot:
            try:
                async with live:
                    async for chunk in live:
                        name = "stdout" if chunk.stream == 1 else "stderr"
                        data = {"base64": base64.b64encode(chunk.data).decode(),
                                "text": chunk.data.decode("utf-8", "replace")}
                        yield f"event: {name}\ndata: {json.dumps(data)}\n\n"
                    report = RunReport.of(await live.result())
                yield f"event: result\ndata: {report.model_dump_json()}\n\n"
            except CellblockError as e:
                yield f"event: error\ndata: {json.dumps(problem_body(e))}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


def _install_error_handlers(app: FastAPI) -> None:
    async def cellblock_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, CellblockError)
        return problem(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return problem(InvalidSpec(f"{loc}: {first.get('msg', 'invalid request')}"))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kinds: dict[int, Callable[[str], CellblockError]] = {
            404: NotFound, 413: RequestTooLarge, 401: Unauthorized,
        }
        error = kinds.get(exc.status_code, ServiceError)(str(exc.detail))
        return problem(error, status=exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return problem(InternalError(f"{type(exc).__name__}: {exc}"))

    app.add_exception_handler(CellblockError, cellblock_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
