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


def _tar(*members: tuple[str, str, str]) -> io.BytesIO:
    """A tar of (kind, name, data-or-link-target) members, kind: file, dir, symlink, hardlink."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for kind, name, data in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE}[kind]
            info.linkname = data
            tar.addfile(info)
    buf.seek(0)
    return buf


def test_workspace_archive_and_file_ops(tmp_path: Path) -> None:
    """mkdir/ls/rm directly; persist leaves out the SDK's skip paths; hydrate takes an
    archive's inner links and refuses hostile archives (`..`, absolute names, a link out of
    the workspace, a member under an archived link, a hard link) with the SDK's error,
    changing nothing in the sandbox or on the host."""
    from agents.sandbox.errors import WorkspaceArchiveWriteError

    from cellblock.errors import InvalidSpec

    marker = tmp_path / "outside"

    async def main() -> None:
        client = CellblockSandboxClient()
        session = await client.create()
        async with session:
            await session.mkdir("deep/er/est", parents=True)
            await session.write("deep/er/est/f.txt", io.BytesIO(b"f"))
            assert [e.path for e in await session.ls("deep/er")] == ["/workspace/deep/er/est"]
            await session.rm("deep/er/est/f.txt")
            assert await session.ls("deep/er/est") == []
            await session.rm("deep", recursive=True)
            assert (await session.exec("ls -A /workspace")).stdout == b""

            await session.write("keep.txt", io.BytesIO(b"keep"))
            await session.write("cache/big.bin", io.BytesIO(b"x" * 10))
            session.register_persist_workspace_skip_path("cache")
            import tarfile
            with tarfile.open(fileobj=await session.persist_workspace()) as tar:
                names = sorted(m.name for m in tar.getmembers())
            assert names == [".", "./keep.txt"], names

            await session.hydrate_workspace(_tar(("dir", "d", ""), ("file", "d/f.txt", "inner"),
                                                 ("symlink", "l", "d/f.txt")))
            res = await session.exec("readlink l; cat l")
            assert res.stdout == b"d/f.txt\ninner", res

            before = (await session.exec("find /workspace | sort")).stdout
            hostile = {
                "dotdot": _tar(("file", "../evil.txt", "x")),
                "absolute": _tar(("file", f"{marker}/evil.txt", "x")),
                "link-out": _tar(("symlink", "up", f"../../..{marker}")),
                "absolute-link": _tar(("symlink", "etc", "/etc")),
                "under-link": _tar(("symlink", "d2", "d"), ("file", "d2/x.txt", "x")),
                "hardlink": _tar(("hardlink", "pw", "/etc/passwd")),
            }
            for name, archive in hostile.items():
                with pytest.raises(WorkspaceArchiveWriteError) as info:
                    await session.hydrate_workspace(archive)
                assert info.value.context.get("reason"), (name, info.value.context)
            assert (await session.exec("find /workspace | sort")).stdout == before
            assert not marker.exists()

            # Users the sandbox cannot be are refused, not silently run as root.
            for call in (session.exec("id -u", user="alice"),
                         session.read(Path("keep.txt"), user="alice"),
                         session.write(Path("k2.txt"), io.BytesIO(b"k"), user="alice"),
                         session.mkdir("m", user="alice"), session.rm("keep.txt", user="alice")):
                with pytest.raises(InvalidSpec, match="user 'alice' is not supported"):
                    await call
            assert (await session.exec("id -u", user="root")).stdout == b"0\n"
            assert (await session.read(Path("keep.txt"))).read() == b"keep"
        await client.delete(session)

    asyncio.run(main())


def test_exposed_ports_are_refused_until_supported() -> None:
    from agents.sandbox.errors import ExposedPortUnavailableError

    from cellblock.errors import InvalidSpec
    from cellblock.integrations.openai_agents import (
        CellblockSandboxClientOptions,
        CellblockSandboxSession,
    )

    async def main() -> None:
        client = CellblockSandboxClient()
        with pytest.raises(InvalidSpec, match=r"exposed_ports \[8080\]: .*no exposed ports"):
            await client.create(options=CellblockSandboxClientOptions(exposed_ports=(8080,)))
        session = await client.create()
        state = session.state.model_copy(update={"exposed_ports": (8080,)})
        with pytest.raises(InvalidSpec, match="exposed_ports"):
            await client.resume(state)
        # The SDK's own refusal for a port the session was not created with.
        with pytest.raises(ExposedPortUnavailableError):
            await session.resolve_exposed_port(8080)
        # ... and its default for a backend without ports (no override of ours).
        assert "_resolve_exposed_port" not in vars(CellblockSandboxSession)
        await client.delete(session)

    asyncio.run(main())
