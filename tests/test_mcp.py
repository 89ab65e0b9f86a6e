"""`cellblock mcp` driven over stdio by the official MCP SDK's client session: the tools are
listed with schemas, results are structured, and isError is set on a non-zero exit, a
timeout and a refusal (a path outside the sandbox)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = {"run_code", "run_command", "write_file", "read_file", "list_files", "close_session"}


async def with_server(scenario: Any) -> None:
    params = StdioServerParameters(command=sys.executable, args=["-m", "cellblock.cli", "mcp"])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await scenario(session)


def test_tools_over_stdio() -> None:
    async def scenario(s: ClientSession) -> None:
        listed = {t.name: t for t in (await s.list_tools()).tools}
        assert set(listed) == TOOLS
        assert listed["run_code"].outputSchema is not None
        assert set(listed["run_code"].inputSchema["properties"]) == {
            "language", "code", "timeout_s", "session_id"}

        r = await s.call_tool("run_code", {"language": "python", "code": "print(6 * 7)"})
        assert r.isError is False
        assert r.structuredContent is not None
        assert r.structuredContent["stdout"] == "42\n" and r.structuredContent["ok"] is True

        r = await s.call_tool("run_code", {"language": "node", "code": "console.log(2 + 3)"})
        assert (r.isError, r.structuredContent and r.structuredContent["stdout"]) == (False, "5\n")

        await s.call_tool("run_code", {"language": "python", "code": "n = 41", "session_id": "s1"})
        r = await s.call_tool("run_code", {"language": "python", "code": "n + 1",
                                           "session_id": "s1"})
        assert r.structuredContent and r.structuredContent["value"] == "42"

        r = await s.call_tool("write_file", {"path": "notes/a.txt", "content": "hello",
                                             "session_id": "s1"})
        assert r.isError is False
        r = await s.call_tool("run_command", {"command": "cat notes/a.txt", "session_id": "s1"})
        assert r.structuredContent and r.structuredContent["stdout"] == "hello"
        r = await s.call_tool("read_file", {"path": "notes/a.txt", "session_id": "s1"})
        assert r.structuredContent and r.structuredContent["text"] == "hello"
        r = await s.call_tool("list_files", {"path": "notes", "session_id": "s1"})
        assert r.structuredContent and [e["name"] for e in r.structuredContent["entries"]] == [
            "a.txt"]

        r = await s.call_tool("run_command", {"command": "echo out; exit 3"})
        assert r.isError is True and r.structuredContent is not None
        assert (r.structuredContent["exit_code"], r.structuredContent["stdout"]) == (3, "out\n")

        r = await s.call_tool("run_code", {"language": "python", "code": "1/0"})
        assert r.isError is True

        r = await s.call_tool("run_command", {"command": "sleep 30", "timeout_s": 0.5})
        assert r.isError is True
        assert r.structuredContent and r.structuredContent["reason"] == "timeout"

        r = await s.call_tool("read_file", {"path": "../../etc/shadow", "session_id": "s1"})
        assert r.isError is True
        assert r.content[0].type == "text" and "PathEscape" in r.content[0].text

        r = await s.call_tool("close_session", {"session_id": "s1"})
        assert r.structuredContent == {"session_id": "s1", "closed": True}
        r = await s.call_tool("run_code", {"language": "python", "code": "n",
                                           "session_id": "s1"})
        assert r.isError is True and r.structuredContent is not None
        assert "NameError" in (r.structuredContent["error"] or ""), "the session was not fresh"

        r = await s.call_tool("run_code", {"language": "ruby", "code": "1"})
        assert r.isError is True

    asyncio.run(with_server(scenario))


def test_refused_syscall_is_an_error() -> None:
    """Code that survives a refused call (unshare answers EPERM) still exits 0, but the
    refusal is reported by the supervisor, and the tool result is an error."""
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print('refused' if libc.unshare(0x10000000) else 'allowed', ctypes.get_errno())\n")

    async def scenario(s: ClientSession) -> None:
        r = await s.call_tool("run_code", {"language": "python", "code": code})
        assert r.structuredContent is not None
        assert (r.structuredContent["exit_code"], r.structuredContent["stdout"]) == (
            0, "refused 1\n")
        assert [v["kind"] for v in r.structuredContent["violations"]] == ["seccomp"]
        assert r.isError is True and r.structuredContent["ok"] is False

    asyncio.run(with_server(scenario))


def test_streamable_http_transport() -> None:
    """The same tools over streamable HTTP on loopback."""
    from mcp.client.streamable_http import streamable_http_client
    from service_fixtures import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cellblock.cli", "mcp", "--transport", "streamable-http",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def scenario() -> None:
        url = f"http://127.0.0.1:{port}/mcp"
        deadline = time.monotonic() + 60
        while True:
            try:
                async with streamable_http_client(url) as (read, write, _), \
                        ClientSession(read, write) as s:
                    await s.initialize()
                    r = await s.call_tool("run_command", {"command": "echo over-http"})
                    assert r.isError is False and r.structuredContent is not None
                    assert r.structuredContent["stdout"] == "over-http\n"
                    return
            except* (OSError, httpx.TransportError):
                assert time.monotonic() < deadline, "the MCP server did not start"
                await asyncio.sleep(0.3)

    try:
        asyncio.run(scenario())
    finally:
        server.terminate()
        server.wait(30)
