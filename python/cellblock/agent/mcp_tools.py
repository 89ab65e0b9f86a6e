"""MCP servers as tool sources, through the official MCP client (`mcp` package).

Each run opens its own connection: a stdio server process started from `command`, or a
streamable HTTP endpoint at `url`. The client is asynchronous and the loop is not, so the
connection lives on an event loop in a thread of its own, and each tool call is submitted to
it and awaited. The model sees the server's tools as `<server>__<tool>`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cellblock.agent.bindings import check_tool_name, outcome
from cellblock.agent.tools import ToolOutcome
from cellblock.errors import InvalidSpec

if TYPE_CHECKING:
    from mcp import ClientSession

#: Seconds to connect, initialize and list the tools.
CONNECT_TIMEOUT_S = 30.0


class McpServer(BaseModel):
    """An MCP server an agent takes tools from: `command` (stdio) or `url` (streamable HTTP)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,30}$")
    command: list[str] | None = None
    url: str | None = None
    #: Environment of a stdio server process (the MCP client's safe defaults otherwise).
    env: dict[str, str] | None = None
    #: Only these tools of the server (all when None).
    tools: list[str] | None = None
    #: Seconds one tool call may take.
    timeout: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServer:
        if (self.command is None) == (self.url is None) or self.command == []:
            raise InvalidSpec(f"mcp server {self.name!r}: give exactly one of command or url")
        return self

    def open(self) -> McpConnection:
        return McpConnection(self)


class McpConnection:
    """An open MCP client session, its tools as schemas for the model."""

    def __init__(self, server: McpServer) -> None:
        self.server = server
        self.schemas: list[dict[str, Any]] = []
        self._names: dict[str, str] = {}
        self._session: ClientSession | None = None
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"mcp-{server.name}")
        self._thread.start()
        if not self._ready.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise InvalidSpec(f"mcp server {server.name!r}: no answer in {CONNECT_TIMEOUT_S}s")
        if self._error is not None:
            self.close()
            raise InvalidSpec(f"mcp server {server.name!r}: {_describe(self._error)}")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # reported to open(), or ends the connection
            self._error = self._error or e
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client
        from mcp.client.streamable_http import streamable_http_client

        self._stop = asyncio.Event()
        s = self.server
        async with AsyncExitStack() as stack:
            if s.command is not None:
                params = StdioServerParameters(command=s.command[0], args=s.command[1:],
                                               env=s.env)
                read, write = await stack.enter_async_context(stdio_client(params))
            else:
                assert s.url is not None
                read, write, _ = await stack.enter_async_context(streamable_http_client(s.url))
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            cursor: str | None = None
            while True:
                page = await session.list_tools(cursor)
                for t in page.tools:
                    if s.tools is None or t.name in s.tools:
                        exposed = check_tool_name(f"{s.name}__{t.name}")
                        self._names[exposed] = t.name
                        self.schemas.append({"name": exposed,
                                             "description": t.description or t.name,
                                             "input_schema": t.inputSchema})
                cursor = page.nextCursor
                if not cursor:
                    break
            self._session = session
            self._ready.set()
            await self._stop.wait()

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        import time

        started = time.monotonic()
        if self._session is None or not self._thread.is_alive():
            return outcome(f"mcp server {self.server.name!r} is gone", is_error=True,
                           started=started)
        args = raw_input if isinstance(raw_input, dict) else {}
        future = asyncio.run_coroutine_threadsafe(
            self._session.call_tool(self._names[name], args), self._loop)
        try:
            result = future.result(self.server.timeout)
        except TimeoutError:
            future.cancel()
            return outcome(f"{name}: no result in {self.server.timeout}s", is_error=True,
                           started=started)
        from mcp.types import TextContent

        parts = [c.text for c in result.content if isinstance(c, TextContent)]
        if not parts and result.structuredContent is not None:
            parts = [json.dumps(result.structuredContent)]
        return outcome("\n".join(parts) or "(no content)", is_error=bool(result.isError),
                       started=started)

    def close(self) -> None:
        """Ends the session (a stdio server process is terminated by the client)."""
        stop = self._stop
        if stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._thread.join(10.0)


def _describe(e: BaseException) -> str:
    # anyio wraps failures of the transport's task group in an exception group.
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"
