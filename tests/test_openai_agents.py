"""The OpenAI Agents SDK's `SandboxAgent`, driven by its own `agents.testing.ScriptedModel`,
running its shell and file tools in cellblock through `CellblockSandboxClient`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
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
from conftest import SETPRIV, share_tree

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
            # ... and the files API never leaves the scratch mounts, even through a link.
            with pytest.raises(FileNotFoundError, match="outside the sandbox's scratch mounts"):
                await session.read("root/etc/hostname")
            assert (await session.exec("hostname")).stdout == b"cellblock\n"
            with pytest.raises(NotImplementedError, match="issue 14"):
                await session.pty_exec_start("bash")
        await client.delete(session)

    asyncio.run(main())


#: Run as root first (to learn which installed packages it imports), then as uid 65534.
NOBODY_SCRIPT = '''
import asyncio, io, json, sys, sysconfig
from cellblock.integrations.openai_agents import CellblockSandboxClient

async def main():
    client = CellblockSandboxClient()
    session = await client.create()
    async with session:
        await session.write("n.txt", io.BytesIO(b"written"))
        res = await session.exec("id -u; cat n.txt")
    await client.delete(session)
    return res.stdout.decode()

out = asyncio.run(main())
site = sysconfig.get_paths()["purelib"]
tops = sorted({m.__file__[len(site) + 1:].split("/")[0] for m in list(sys.modules.values())
               if (getattr(m, "__file__", None) or "").startswith(site + "/")})
print(json.dumps({"out": out, "tops": tops}))
'''


def test_client_as_nobody(nobody_dir: Path, tmp_path: Path) -> None:
    """The same client, exec and files, called by a process running as uid 65534."""
    first = subprocess.run([sys.executable, "-c", NOBODY_SCRIPT], capture_output=True,
                           text=True, check=True, timeout=120)
    report = json.loads(first.stdout.splitlines()[-1])
    assert report["out"] == "0\nwritten"
    site = Path(sysconfig.get_paths()["purelib"])
    extra = Path(tempfile.mkdtemp(prefix="cellblock-nobody-oa-"))
    try:
        for name in report["tops"]:
            if name != "cellblock" and not (nobody_dir / name).exists():
                share_tree(site / name, extra / name)
        for meta in site.glob("openai_agents-*.dist-info"):
            share_tree(meta, extra / meta.name)
        for root, dirs, _ in os.walk(extra):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        extra.chmod(0o755)
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{nobody_dir}:{extra}",
               "HOME": "/nonexistent", "TMPDIR": str(nobody_dir / "tmp")}
        r = subprocess.run([*SETPRIV, "/usr/bin/python3", "-c", NOBODY_SCRIPT], env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(extra, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["out"] == "0\nwritten"
