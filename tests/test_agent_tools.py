"""Tool bindings (cellblock.agent.bindings, mcp_tools) against the scripted Anthropic server:
MCP servers as tool sources through the official MCP client, over stdio (a server process the
client starts) and streamable HTTP (a server process this test starts on 127.0.0.1), and
`@tool` Python functions; every result passes through the agent's redactor.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_anthropic import message, text, tool_use
from test_orchestration import api, serve  # noqa: F401 (api: fixture)

from cellblock.agent import Agent
from cellblock.agent.bindings import FunctionTools, tool
from cellblock.agent.mcp_tools import McpServer
from cellblock.agent.spec import AgentSpec, Team
from cellblock.errors import InvalidSpec

pytestmark = pytest.mark.usefixtures("api")

SERVER = Path(__file__).parent / "mcp_tools_server.py"
SECRET = "sk-mcp-5be1c0ffee7e57a11"
MODEL = "claude-sonnet-4-6"


def server_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LEAKY_VALUE": SECRET,
            "PYTHONPATH": os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def http_server() -> Iterator[str]:
    """The MCP server as a process of its own, serving streamable HTTP on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(port)],
                            env=server_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no MCP server"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def mcp_script() -> list[Any]:
    return [
        message(tool_use("calc__add", {"a": 2, "b": 40}, "t1"),
                tool_use("calc__pid", {}, "t2"), tool_use("calc__leak", {}, "t3"),
                tool_use("calc__fail", {}, "t4")),
        message(text("42")),
    ]


def check_mcp_run(server: Any, result: Any) -> int:
    """Asserts on what the model saw; returns the MCP server's pid."""
    assert result.stop_reason == "end_turn" and result.final_text == "42"
    tools = {t["name"]: t for t in server.requests[0]["tools"]}
    assert {"calc__add", "calc__pid", "calc__leak", "calc__fail"} <= set(tools)
    assert tools["calc__add"]["input_schema"]["properties"]["a"]["type"] == "integer"
    assert tools["calc__add"]["description"] == "Add two integers."
    results = {r["tool_use_id"]: r for r in server.tool_results()}
    assert results["t1"]["content"] == "42" and not results["t1"]["is_error"]
    assert results["t3"]["content"] == "the value is [REDACTED:API_TOKEN]"
    assert results["t4"]["is_error"] and "this tool always fails" in results["t4"]["content"]
    assert SECRET not in json.dumps(server.requests)
    assert result.redactions.get("API_TOKEN") == 1
    pid = int(results["t2"]["content"])
    assert pid != os.getpid()
    return pid


def test_mcp_stdio_server_tools_are_called_and_redacted(monkeypatch):
    calc = McpServer(name="calc", command=[sys.executable, str(SERVER)], env=server_env())
    agent = Agent(model=MODEL, tools=["run_shell"], tool_sources=[calc],
                  secrets={"API_TOKEN": SECRET})
    with serve(mcp_script(), monkeypatch) as server:
        result = agent.run("add")
    pid = check_mcp_run(server, result)
    # The server was a real process of its own, started for the run and ended with it.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_mcp_streamable_http_server_tools_through_a_team_spec(monkeypatch, http_server):
    team = Team([AgentSpec(name="calc-user", tools=[],
                           mcp_servers=[McpServer(name="calc", url=http_server)],
                           credentials=["API_TOKEN"])],
                secrets={"API_TOKEN": SECRET})
    with serve(mcp_script(), monkeypatch) as server:
        result = team.build("calc-user").run("add")
    check_mcp_run(server, result)
    # Only the MCP tools were offered: the agent had no built-in ones.
    assert {t["name"] for t in server.requests[0]["tools"]} == {
        "calc__add", "calc__pid", "calc__leak", "calc__fail"}


def test_mcp_tool_filter_and_bad_servers():
    only_add = McpServer(name="calc", command=[sys.executable, str(SERVER)], env=server_env(),
                         tools=["add"])
    conn = only_add.open()
    try:
        assert [s["name"] for s in conn.schemas] == ["calc__add"]
    finally:
        conn.close()
    with pytest.raises(InvalidSpec, match="exactly one of command or url"):
        McpServer(name="x")
    with pytest.raises(InvalidSpec, match="exactly one of command or url"):
        McpServer(name="x", command=["a"], url="http://127.0.0.1:1/mcp")
    with pytest.raises(InvalidSpec, match="mcp server 'gone'"):
        McpServer(name="gone", command=[sys.executable, "-c", "pass"]).open()


@tool
def forecast(city: str, days: int = 1) -> dict[str, Any]:
    """The weather for a city."""
    return {"city": city, "days": days, "api_key_used": SECRET}


def test_python_function_tools_are_typed_from_the_signature_and_redacted(monkeypatch):
    b64 = base64.b64encode(SECRET.encode()).decode()

    @tool(name="b64")
    def encoded_key() -> str:
        """The API key, base64-encoded."""
        return b64

    schema = forecast.schema_for_model()
    assert schema["name"] == "forecast" and schema["description"] == "The weather for a city."
    props = schema["input_schema"]["properties"]
    assert props["city"]["type"] == "string" and props["days"]["type"] == "integer"
    assert props["days"]["default"] == 1 and schema["input_schema"]["required"] == ["city"]
    assert forecast("Oslo") == {"city": "Oslo", "days": 1, "api_key_used": SECRET}

    script = [
        message(tool_use("forecast", {"city": "Oslo", "days": 3}, "t1"),
                tool_use("forecast", {"city": 7}, "t2"),
                tool_use("b64", {}, "t3")),
        message(text("done")),
    ]
    agent = Agent(model=MODEL, tools=[], tool_sources=[FunctionTools([forecast, encoded_key])],
                  secrets={"API_TOKEN": SECRET})
    with serve(script, monkeypatch) as server:
        result = agent.run("weather")
    results = {r["tool_use_id"]: r for r in server.tool_results()}
    assert json.loads(results["t1"]["content"]) == {
        "city": "Oslo", "days": 3, "api_key_used": "[REDACTED:API_TOKEN]"}
    assert results["t2"]["is_error"] and "invalid input for forecast" in results["t2"]["content"]
    # The secret in base64 is redacted as well (the redactor knows its encodings).
    assert results["t3"]["content"] == "[REDACTED:API_TOKEN]"
    sent = json.dumps(server.requests)
    assert SECRET not in sent and b64 not in sent and result.stop_reason == "end_turn"
    assert [c.reason for c in result.tool_calls] == ["ok", "invalid_input", "ok"]


def test_tool_decorator_refuses_untyped_functions():
    def untyped(x):  # type: ignore[no-untyped-def]
        return x

    with pytest.raises(InvalidSpec, match="no type hint"):
        tool(untyped)
    with pytest.raises(InvalidSpec, match="tool name"):
        tool(name="has space")(forecast.func)
    with pytest.raises(InvalidSpec, match="two tools are named"):
        Agent(model=MODEL, tools=["run_shell"],
              tool_sources=[FunctionTools([forecast]), FunctionTools([forecast])]).run("x")


def test_team_agents_name_their_function_tools(monkeypatch):
    team = Team([AgentSpec(name="weather", tools=["forecast", "run_shell"])],
                functions=[forecast], secrets={})
    script = [message(tool_use("forecast", {"city": "Bergen"}, "t1"),
                      tool_use("run_shell", {"command": "echo in-sandbox"}, "t2")),
              message(text("rainy"))]
    with serve(script, monkeypatch) as server:
        result = team.build("weather").run("weather in Bergen")
    assert {t["name"] for t in server.requests[0]["tools"]} == {"forecast", "run_shell"}
    results = {r["tool_use_id"]: r["content"] for r in server.tool_results()}
    assert json.loads(results["t1"])["city"] == "Bergen" and "in-sandbox" in results["t2"]
    assert result.final_text == "rainy"
    with pytest.raises(InvalidSpec, match="unknown tools"):
        Team([AgentSpec(name="weather", tools=["forecast"])])
