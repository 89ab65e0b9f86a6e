"""The MCP server (official SDK, FastMCP): tools that run code and commands and handle files
in sandboxes, through `cellblock.aio`.

Without `session_id` a run gets a fresh sandbox of its own; with one, the session of that id
is used (opened on first use, kept until `close_session` or the server's exit), so files and
a stateful interpreter persist between calls. Results are structured (`structuredContent`
follows each tool's output schema) and `isError` is set when a run exits non-zero, is killed
(timeout, memory, ...), or something was refused (a seccomp or network violation, a path
outside the sandbox).
"""

from __future__ import annotations

import asyncio
import base64
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


class Sessions:
    """The server's sessions by id."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self._open: dict[str, aio.Sandbox] = {}
        self._lock = asyncio.Lock()
        self.idle_timeout = idle_timeout

    async def get(self, session_id: str) -> aio.Sandbox:
        """The session `session_id`, opened if new (or if it expired: a session unused for
        `idle_timeout` seconds is closed by the core's idle timer)."""
        async with self._lock:
            for name in [n for n, sb in self._open.items() if not sb.is_open]:
                del self._open[name]  # expired
            sb = self._open.get(session_id)
            if sb is None:
                if len(self._open) >= MAX_SESSIONS:
                    raise InvalidSpec(f"{MAX_SESSIONS} sessions are open: close one first")
                sb = await aio.Sandbox(idle_timeout=self.idle_timeout).open()
                self._open[session_id] = sb
            return sb

    async def close(self, session_id: str) -> bool:
        """Closes a session; whether it was open."""
        async with self._lock:
            sb = self._open.pop(session_id, None)
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

    return mcp
