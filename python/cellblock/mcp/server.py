"""The MCP server (official SDK, FastMCP): tools that run code and commands and handle files
in sandboxes, through `cellblock.aio`.

Without `session_id` a run gets a fresh sandbox of its own; with one, the session of that id
is used (opened on first use, kept until `close_session` or the server's exit), so files and
a stateful interpreter persist between calls; background processes (`start_process`,
`process_output`, `stop_process`) live in a session until they end or it closes. Results
are structured (`structuredContent` follows each tool's output schema) and `isError` is set
when a run exits non-zero, is killed (timeout, memory, ...), or something was refused (a
seccomp or network violation, a path outside the sandbox).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from cellblock import aio
from cellblock.errors import CellblockError, InvalidSpec
from cellblock.result import RunResult
from cellblock.runtimes.warm import CodeResult

#: Sessions one server keeps open at once.
MAX_SESSIONS = 32

#: Seconds a session may stay unused before it is closed (its files and state are lost).
DEFAULT_IDLE_TIMEOUT_S = 900.0

#: Default and largest per-call timeout, seconds.
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 600.0

SessionId = Annotated[
    str | None,
    Field(max_length=128, pattern=r"^[A-Za-z0-9_.-]+$",
          description="Session to use (opened on first use); none: a fresh sandbox."),
]
NamedSession = Annotated[
    str,
    Field(max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="Session to use."),
]
#: Longest process_output waits for new output, seconds.
MAX_WAIT_S = 30.0

Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds.")]


class RunOutput(BaseModel):
    """What a run did, as the supervisor reported it."""

    ok: bool = Field(description="Exited with status 0, nothing refused.")
    reason: str = Field(description="exited, signaled, timeout, memory, cpu_time, ...")
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool
    value: str | None = Field(None, description="repr of the last expression (sessions).")
    error: str | None = Field(None, description="Traceback of an uncaught exception.")
    violations: list[dict[str, Any]]
    wall_time_s: float
    session_id: str | None


class FileWritten(BaseModel):
    """A file written in a session."""

    session_id: str
    path: str
    size: int


class FileContent(BaseModel):
    """A file read from a session: text if it is UTF-8, else only base64."""

    session_id: str
    path: str
    size: int
    text: str | None
    base64: str


class Listing(BaseModel):
    """A directory of a session."""

    session_id: str
    path: str
    entries: list[dict[str, Any]]


class Closed(BaseModel):
    """The outcome of close_session."""

    session_id: str
    closed: bool = Field(description="False when no such session was open.")


class ProcessStarted(BaseModel):
    """A background process started in a session."""

    session_id: str
    process_id: str


class ProcessOutput(BaseModel):
    """Output of a background process from chunk `start` on; `next` is the `start` of the
    following call. Once it ended: its exit status and reason."""

    session_id: str
    process_id: str
    stdout: str
    stderr: str
    next: int
    running: bool
    exit_code: int | None = None
    reason: str | None = None


class Sessions:
    """The server's sessions by id, and their background processes."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self._open: dict[str, aio.Sandbox] = {}
        self._procs: dict[str, dict[str, aio.Process]] = {}
        self._lock = asyncio.Lock()
        self.idle_timeout = idle_timeout

    async def get(self, session_id: str) -> aio.Sandbox:
        """The session `session_id`, opened if new (or if it expired: a session unused for
        `idle_timeout` seconds is closed by the core's idle timer)."""
        async with self._lock:
            for name in [n for n, sb in self._open.items() if not sb.is_open]:
                del self._open[name]  # expired
                self._procs.pop(name, None)
            sb = self._open.get(session_id)
            if sb is None:
                if len(self._open) >= MAX_SESSIONS:
                    raise InvalidSpec(f"{MAX_SESSIONS} sessions are open: close one first")
                sb = await aio.Sandbox(idle_timeout=self.idle_timeout).open()
                self._open[session_id] = sb
            return sb

    def add_process(self, session_id: str, proc: aio.Process) -> str:
        """Registers a session's process; its id (unique within the session)."""
        procs = self._procs.setdefault(session_id, {})
        process_id = f"p{len(procs) + 1}"
        procs[process_id] = proc
        return process_id

    def process(self, session_id: str, process_id: str) -> aio.Process:
        """A process of an open session (InvalidSpec if there is none of that id)."""
        sb = self._open.get(session_id)
        proc = self._procs.get(session_id, {}).get(process_id)
        if sb is None or not sb.is_open or proc is None:
            raise InvalidSpec(f"no process {process_id!r} in this session")
        return proc

    async def close(self, session_id: str) -> bool:
        """Closes a session (ending its processes); whether it was open."""
        async with self._lock:
            sb = self._open.pop(session_id, None)
            self._procs.pop(session_id, None)
        if sb is None:
            return False
        await sb.close()
        return True

    async def close_all(self) -> None:
        """Closes every session."""
        for session_id in list(self._open):
            await self.close(session_id)


def _result(model: BaseModel, is_error: bool) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=model.model_dump_json())],
        structuredContent=model.model_dump(mode="json"),
        isError=is_error,
    )


def _run_output(r: RunResult, session_id: str | None) -> CallToolResult:
    code = r if isinstance(r, CodeResult) else None
    out = RunOutput(
        ok=r.ok and not r.violations and not (code and code.error), reason=r.reason,
        exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr,
        truncated=r.stdout_truncated or r.stderr_truncated,
        value=code.value if code else None, error=code.error if code else None,
        violations=r.violations, wall_time_s=r.wall_time_s, session_id=session_id,
    )
    return _result(out, is_error=not out.ok)


def _refused(e: CellblockError) -> ToolError:
    """A refused call: the SDK answers it with isError and the error's class and message."""
    return ToolError(f"{type(e).__name__}: {e}")


#: The request context FastMCP passes to a tool that asks for it.
Ctx = Context[Any, Any, Any]

#: Where the streamable-http auth middleware leaves the caller's token name (request.state).
TOKEN_STATE = "cellblock_token"


def _owned(ctx: Ctx | None, session_id: str) -> str:
    """The key of a caller's session: over HTTP with tokens, sessions are per token (one
    token never reaches another's session of the same name)."""
    request = ctx.request_context.request if ctx is not None else None
    state = getattr(request, "state", None)
    owner = getattr(state, TOKEN_STATE, "") if state is not None else ""
    return f"{owner}\0{session_id}"


_COMMANDS = {"python": ["python3", "-c"], "node": ["node", "-e"]}


def build_server(
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S, sessions: Sessions | None = None,
    **settings: Any,
) -> FastMCP:
    """The MCP server with cellblock's tools (`settings` go to FastMCP: host, port, ...);
    sessions unused for `idle_timeout` seconds are closed. Without `sessions` the server owns
    its sessions and closes them when its MCP session ends (stdio: one per process). Over
    HTTP each client has an MCP session of its own: pass `sessions`, shared by all of them,
    and close them at the server's exit."""
    owned = sessions is None
    store = Sessions(idle_timeout) if sessions is None else sessions

    @asynccontextmanager
    async def lifespan(server: FastMCP) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if owned:
                await store.close_all()

    mcp = FastMCP("cellblock", lifespan=lifespan, **settings)

    @mcp.tool()
    async def run_code(
        language: Literal["python", "node"], code: str, timeout_s: Timeout = DEFAULT_TIMEOUT_S,
        session_id: SessionId = None, ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, RunOutput]:
        """Runs Python or JavaScript in a sandbox. In a session the interpreter is stateful
        (variables persist across calls) and `value` is the last expression's repr."""
        try:
            if session_id is None:
                r: RunResult = await aio.run([*_COMMANDS[language], code], timeout=timeout_s)
            else:
                sb = await store.get(_owned(ctx, session_id))
                run = sb.run_python if language == "python" else sb.run_node
                r = await run(code, stateful=True, timeout=timeout_s)
        except CellblockError as e:
            raise _refused(e) from None
        return _run_output(r, session_id)

    @mcp.tool()
    async def run_command(
        command: str, timeout_s: Timeout = DEFAULT_TIMEOUT_S, session_id: SessionId = None,
        ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, RunOutput]:
        """Runs a shell command (`/bin/sh -c`) in a sandbox (a session's, if given)."""
        argv = ["/bin/sh", "-c", command]
        try:
            if session_id is None:
                r = await aio.run(argv, timeout=timeout_s)
            else:
                r = await (await store.get(_owned(ctx, session_id))).run(argv, timeout=timeout_s)
        except CellblockError as e:
            raise _refused(e) from None
        return _run_output(r, session_id)

    @mcp.tool()
    async def write_file(
        path: str, content: str, session_id: NamedSession = "default", is_base64: bool = False,
        ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, FileWritten]:
        """Writes a file in a session (relative paths are under /workspace)."""
        try:
            data = base64.b64decode(content, validate=True) if is_base64 else content.encode()
            await (await store.get(_owned(ctx, session_id))).write_file(path, data)
        except (CellblockError, ValueError) as e:
            raise _refused(e if isinstance(e, CellblockError) else InvalidSpec(str(e))) from None
        return _result(FileWritten(session_id=session_id, path=path, size=len(data)), False)

    @mcp.tool()
    async def read_file(
        path: str, session_id: NamedSession = "default", ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, FileContent]:
        """Reads a file of a session."""
        try:
            data = await (await store.get(_owned(ctx, session_id))).read_file(path)
        except CellblockError as e:
            raise _refused(e) from None
        try:
            text: str | None = data.decode()
        except UnicodeDecodeError:
            text = None
        return _result(FileContent(session_id=session_id, path=path, size=len(data), text=text,
                                   base64=base64.b64encode(data).decode()), False)

    @mcp.tool()
    async def list_files(
        path: str = "/workspace", session_id: NamedSession = "default", ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, Listing]:
        """Lists a directory of a session."""
        try:
            entries = await (await store.get(_owned(ctx, session_id))).list_dir(path)
        except CellblockError as e:
            raise _refused(e) from None
        return _result(Listing(session_id=session_id, path=path,
                               entries=[e.model_dump() for e in entries]), False)

    @mcp.tool()
    async def close_session(
        session_id: NamedSession, ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, Closed]:
        """Closes a session: its processes are killed and its files are gone."""
        closed = await store.close(_owned(ctx, session_id))
        return _result(Closed(session_id=session_id, closed=closed), False)

    @mcp.tool()
    async def start_process(
        command: str, session_id: NamedSession = "default",
        timeout_s: Timeout | None = None, ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, ProcessStarted]:
        """Starts a shell command (`/bin/sh -c`) in the background in a session (a server,
        a watcher, ...): it runs until it ends, `stop_process`, or the session closes. Read
        its output with `process_output`."""
        key = _owned(ctx, session_id)
        try:
            sb = await store.get(key)
            proc = await sb.start(command, timeout=timeout_s, stdin=b"")
        except CellblockError as e:
            raise _refused(e) from None
        started = ProcessStarted(session_id=session_id, process_id=store.add_process(key, proc))
        return _result(started, False)

    @mcp.tool()
    async def process_output(
        process_id: str, session_id: NamedSession = "default",
        start: Annotated[int, Field(ge=0, description="First chunk (the last call's next).")] = 0,
        wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S,
                                       description="Seconds to wait for new output.")] = 1.0,
        ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, ProcessOutput]:
        """The output of a background process from chunk `start` on (waiting up to `wait_s`
        seconds for some), whether it still runs, and how it ended."""
        try:
            proc = store.process(_owned(ctx, session_id), process_id)
        except CellblockError as e:
            raise _refused(e) from None
        deadline = time.monotonic() + wait_s
        chunks = await proc.read_output(start, 0)
        while not chunks and proc.running and time.monotonic() < deadline:
            chunks = await proc.read_output(start, deadline - time.monotonic())
        r = proc.result
        out = ProcessOutput(
            session_id=session_id, process_id=process_id,
            stdout="".join(c.data.decode("utf-8", "replace") for c in chunks
                           if c.stream == "stdout"),
            stderr="".join(c.data.decode("utf-8", "replace") for c in chunks
                           if c.stream == "stderr"),
            next=start + len(chunks), running=r is None,
            exit_code=None if r is None else r.exit_code, reason=None if r is None else r.reason,
        )
        return _result(out, is_error=r is not None and not r.ok)

    @mcp.tool()
    async def stop_process(
        process_id: str, session_id: NamedSession = "default", ctx: Ctx | None = None,
    ) -> Annotated[CallToolResult, RunOutput]:
        """Stops a background process (and all it started); its report."""
        try:
            proc = store.process(_owned(ctx, session_id), process_id)
            proc.kill()
            r = await proc.wait(MAX_TIMEOUT_S)
        except CellblockError as e:
            raise _refused(e) from None
        output = _run_output(r, session_id)
        output.isError = False  # stopping it is what was asked
        return output

    return mcp
