"""The OpenAI Agents SDK's `SandboxAgent`, driven by its own `agents.testing.ScriptedModel`,
running its shell and file tools in cellblock through `CellblockSandboxClient`."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import pytest

pytest.importorskip("agents.sandbox", reason="needs cellblock[openai-agents]")
from agents import Runner
from agents.run_config import RunConfig, SandboxRunConfig
from agents.sandbox import SandboxAgent
from agents.sandbox.errors import InvalidManifestPathError
from agents.testing import ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseCustomToolCall

from cellblock.integrations.openai_agents import CellblockSandboxClient
from cellblock.observe import SessionRecord, add_session_observer, remove_session_observer
from cellblock.policy import Policy

SECRET = "openai-agents-secret-0042"
PATCH = "*** Begin Patch\n*** Add File: notes/hello.txt\n+hello from apply_patch\n*** End Patch\n"


def outputs(result: Any) -> list[str]:
    return [str(item.output) for item in result.new_items
            if type(item).__name__ == "ToolCallOutputItem"]


def test_sandbox_agent_runs_shell_and_files_in_cellblock() -> None:
    model = ScriptedModel([
        [function_call("exec_command", {"cmd": "id -u; hostname; test -e /work && echo "
                                                "work-visible || echo work-invisible; pwd"},
                       call_id="c1")],
        [ResponseCustomToolCall(type="custom_tool_call", call_id="c2", name="apply_patch",
                                input=PATCH)],
        [function_call("exec_command", {"cmd": "cat notes/hello.txt; echo; echo mark=$MARK; "
                                                "echo token=$TOKEN"},
                       call_id="c3")],
        [assistant_message("done")],
    ])
    agent = SandboxAgent(name="t", model=model, instructions="test")
    client = CellblockSandboxClient(Policy(env={"MARK": "from-policy"}, memory="256M",
                                           secrets={"TOKEN": SECRET}))
    sessions: list[SessionRecord] = []
    add_session_observer(sessions.append)
    try:
        result = asyncio.run(Runner.run(
            agent, "go", run_config=RunConfig(sandbox=SandboxRunConfig(client=client))))
    finally:
        remove_session_observer(sessions.append)
    assert result.final_output == "done"
    out = outputs(result)
    assert len(out) == 3, out
    assert "0\ncellblock\nwork-invisible\n/workspace" in out[0], out[0]
    assert socket.gethostname() != "cellblock"
    assert "hello from apply_patch\nmark=from-policy\ntoken=[REDACTED:TOKEN]" in out[2], out[2]
    assert [r.change for r in sessions] == ["open", "close"], sessions


def test_session_files_persist_and_limits() -> None:
    async def main() -> None:
        client = CellblockSandboxClient(Policy(secrets={"TOKEN": SECRET}))
        session = await client.create()
        payload = json.dumps(client.serialize_session_state(session.state), default=str)
        assert SECRET not in payload and '"type": "cellblock"' in payload  # no secret in state
        resumed = await client.resume(client.deserialize_session_state(json.loads(payload)))
        async with resumed:
            res = await resumed.exec("echo $TOKEN")
            assert res.stdout == b"[REDACTED:TOKEN]\n"  # secrets come from the client
        await client.delete(resumed)
        async with session:
            await session.write("a/b.txt", io.BytesIO(b"data"))
            assert (await session.read("a/b.txt")).read() == b"data"
            assert [e.path for e in await session.ls("a")] == ["/workspace/a/b.txt"]
            tar = await session.persist_workspace()
            res = await session.exec("rm -r a && ls")
            assert res.exit_code == 0 and res.stdout == b""
            await session.hydrate_workspace(tar)
            assert (await session.read("a/b.txt")).read() == b"data"
            # Escapes: the SDK refuses paths outside the root; a symlink made inside the
            # sandbox resolves in the sandbox's own filesystem, never the host's.
            with pytest.raises(InvalidManifestPathError, match="must not escape root"):
                await session.read("../../etc/hostname")
            assert (await session.exec("ln -s / /workspace/root")).exit_code == 0
            assert (await session.read("root/etc/hostname")).read() == b"cellblock\n"
            assert (await session.exec("hostname")).stdout == b"cellblock\n"
            with pytest.raises(NotImplementedError, match="issue 14"):
                await session.pty_exec_start("bash")
        await client.delete(session)

    asyncio.run(main())
