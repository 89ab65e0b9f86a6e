"""`cellblock mcp` driven over stdio by the official MCP SDK's client session: the tools are
listed with schemas, results are structured, and isError is set on a non-zero exit, a
timeout and a refusal (a path outside the sandbox)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOLS = {"run_code", "run_command", "write_file", "read_file", "list_files", "close_session"}


async def with_server(scenario: Any, *options: str) -> None:
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "cellblock.cli", "mcp", *options])
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


def test_streamable_http_transport(tmp_path: Path) -> None:
    """The same tools over streamable HTTP on loopback, with a bearer token of the tokens file
    `cellblock serve` uses: none or a wrong one is refused (401 problem+json)."""
    from mcp.client.streamable_http import streamable_http_client
    from service_fixtures import free_port

    from cellblock.service.auth import TokenLimits, add_token

    tokens = tmp_path / "tokens.json"
    token, other = (add_token(tokens, name, TokenLimits()) for name in ("agent", "other"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "cellblock.cli", "mcp", "--transport", "streamable-http",
         "--port", str(port), "--tokens", str(tokens)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"

    @contextlib.asynccontextmanager
    async def session_as(bearer: str) -> AsyncIterator[ClientSession]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {bearer}"}) as http, \
                streamable_http_client(url, http_client=http) as (read, write, _), \
                ClientSession(read, write) as s:
            await s.initialize()
            yield s

    async def scenario() -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with session_as(token) as s:
                    r = await s.call_tool("run_command", {"command": "echo over-http"})
                    assert r.isError is False and r.structuredContent is not None
                    assert r.structuredContent["stdout"] == "over-http\n"
                    r = await s.call_tool("write_file", {"path": "mine.txt", "content": "A"})
                    assert r.isError is False
                break
            except* (OSError, httpx.TransportError):
                assert time.monotonic() < deadline, "the MCP server did not start"
                await asyncio.sleep(0.3)
        async with session_as(other) as s:  # the same session name, another token's session
            r = await s.call_tool("read_file", {"path": "mine.txt"})
            assert r.isError is True and "SandboxIOError" in r.content[0].text  # type: ignore[union-attr]
        async with session_as(token) as s:  # a new MCP session of the first token: its own
            r = await s.call_tool("read_file", {"path": "mine.txt"})
            assert r.structuredContent and r.structuredContent["text"] == "A"

    try:
        asyncio.run(scenario())
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        for headers in ({}, {"Authorization": "Bearer cbk_forged"},
                        {"Authorization": f"Basic {token}"}):
            r = httpx.post(url, json=hello, headers=headers)
            assert r.status_code == 401 and r.json()["title"] == "Unauthorized", r.text
    finally:
        server.terminate()
        server.wait(30)


def test_streamable_http_without_tokens_only_on_loopback() -> None:
    for args, refused in ((["--host", "0.0.0.0", "--no-auth"], "--no-auth is refused"),
                          ([], "needs --tokens")):
        done = subprocess.run(
            [sys.executable, "-m", "cellblock.cli", "mcp", "--transport", "streamable-http",
             "--port", "1", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "InvalidSpec" in done.stderr and refused in done.stderr


def test_session_ids_are_validated_and_idle_sessions_expire() -> None:
    async def scenario(s: ClientSession) -> None:
        for bad in ("../etc", "a/b", "", "x" * 200):
            r = await s.call_tool("write_file", {"path": "a", "content": "x",
                                                 "session_id": bad})
            assert r.isError is True, bad
        await s.call_tool("run_code", {"language": "python", "code": "n = 1",
                                       "session_id": "idle"})
        r = await s.call_tool("run_code", {"language": "python", "code": "n",
                                           "session_id": "idle"})
        assert r.structuredContent and r.structuredContent["value"] == "1"
        await asyncio.sleep(3.0)  # past the idle timeout of 1 s (the idle timer looks each s)
        r = await s.call_tool("run_code", {"language": "python", "code": "n",
                                           "session_id": "idle"})
        assert r.structuredContent is not None
        assert "NameError" in (r.structuredContent["error"] or ""), "the session did not expire"

    asyncio.run(with_server(scenario, "--idle-timeout", "1"))
