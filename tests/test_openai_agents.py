"""The OpenAI Agents SDK's `SandboxAgent`, driven by its own `agents.testing.ScriptedModel`,
running its shell and file tools in cellblock through `CellblockSandboxClient`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("agents.sandbox", reason="needs cellblock[openai-agents]")
from agents import Runner
from agents.run_config import RunConfig, SandboxRunConfig
from agents.sandbox import SandboxAgent
from agents.sandbox.errors import InvalidManifestPathError, PtySessionNotFoundError
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseCustomToolCall

from cellblock.integrations.openai_agents import (
    CellblockSandboxClient,
    CellblockSandboxClientOptions,
)
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
            # PTY calls: a command that ends within the yield gives its output and status
            # (stdout and stderr together, as a terminal shows them) and no session id.
            done = await session.pty_exec_start("hostname; echo err >&2; exit 3",
                                                yield_time_s=10)
            assert (done.process_id, done.exit_code) == (None, 3), done
            assert done.output == b"cellblock\nerr\n", done
            with pytest.raises(PtySessionNotFoundError):
                await session.pty_write_stdin(session_id=1, chars="x")
            # A process still running at the yield keeps its id; terminate_all ends it.
            inner = session._inner
            sleeper = await session.pty_exec_start("sleep 300", yield_time_s=0.3)
            assert sleeper.process_id is not None and sleeper.exit_code is None
            assert [p.argv[-1] for p in inner.sandbox.processes()] == ["sleep 300"]
            await session.pty_terminate_all()
            proc_gone = [p.wait(30).reason for p in inner.sandbox.processes()]
            assert inner.sandbox.processes() == [], proc_gone
            with pytest.raises(PtySessionNotFoundError):
                await session.pty_write_stdin(session_id=sleeper.process_id, chars="")
        await client.delete(session)

    asyncio.run(main())


#: Run as root first (to learn which installed packages it imports), then as uid 65534.
NOBODY_SCRIPT = '''
import asyncio, io, json, sys, sysconfig, time, urllib.request
from cellblock.integrations.openai_agents import (
    CellblockSandboxClient, CellblockSandboxClientOptions)

def get(url):
    for _ in range(300):  # the server inside needs a moment to listen
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)

async def main():
    client = CellblockSandboxClient()
    session = await client.create(options=CellblockSandboxClientOptions(exposed_ports=(8000,)))
    async with session:
        await session.write("n.txt", io.BytesIO(b"written"))
        res = await session.exec("id -u; cat n.txt")
        srv = await session.pty_exec_start("python3 -m http.server 8000 --bind 127.0.0.1",
                                           yield_time_s=0.3)
        ep = await session.resolve_exposed_port(8000)
        served = await asyncio.to_thread(get, ep.url_for("http") + "/n.txt")
        cat = await session.pty_exec_start("cat", tty=True, yield_time_s=0.3)
        echo = await session.pty_write_stdin(session_id=cat.process_id, chars="ping\\n",
                                             yield_time_s=2)
    await client.delete(session)
    return {"exec": res.stdout.decode(), "served": served, "host": ep.host,
            "server_running": srv.process_id is not None, "echo": echo.output.decode(),
            "cat_running": echo.process_id is not None}

out = asyncio.run(main())
site = sysconfig.get_paths()["purelib"]
tops = sorted({m.__file__[len(site) + 1:].split("/")[0] for m in list(sys.modules.values())
               if (getattr(m, "__file__", None) or "").startswith(site + "/")})
print(json.dumps({"out": out, "tops": tops}))
'''


EXPECTED_NOBODY_OUT = {"exec": "0\nwritten", "served": "written", "host": "127.0.0.1",
                       "server_running": True, "echo": "ping\n", "cat_running": True}


def test_client_as_nobody(nobody_dir: Path, tmp_path: Path) -> None:
    """The same client (exec, files, a PTY process reading streamed input, an exposed port
    serving a file on the host's loopback), called by a process running as root, then as
    uid 65534."""
    first = subprocess.run([sys.executable, "-c", NOBODY_SCRIPT], capture_output=True,
                           text=True, check=True, timeout=120)
    report = json.loads(first.stdout.splitlines()[-1])
    assert report["out"] == EXPECTED_NOBODY_OUT, report["out"]
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
    assert json.loads(r.stdout.splitlines()[-1])["out"] == EXPECTED_NOBODY_OUT


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


def _session_id(call: ModelCall) -> int:
    """The PTY session id the SDK's exec_command tool reported in the last tool output."""
    last = [i for i in call.input if isinstance(i, dict)
            and i.get("type") == "function_call_output"][-1]
    match = re.search(r"Process running with session ID (\d+)", str(last["output"]))
    assert match, last
    return int(match.group(1))


def _http_get(url: str) -> tuple[int, str]:
    for _ in range(300):  # the server inside needs a moment to listen
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


def test_sandbox_agent_pty_and_exposed_port(tmp_path: Path) -> None:
    """The SDK's exec_command/write_stdin tools: a background http.server on a port the
    session exposes (the test fetches a workspace file through the SDK's resolved endpoint
    on loopback), an interactive `python3 -i` fed through write_stdin, and the SDK's own
    refusal of stdin for a process started without tty. The interactive process is in the
    sandbox: it cannot see a file the test made on the host. Deleting the session ends the
    server and its forward."""
    host_file = tmp_path / "host-only.txt"
    host_file.write_text("host")
    probe = f"import os; print('host-file', os.path.exists({str(host_file)!r}))\n"
    model = ScriptedModel([
        [function_call("exec_command", {"cmd": "python3 -m http.server 8000 --bind 127.0.0.1",
                                        "yield_time_ms": 500}, call_id="srv")],
        [function_call("exec_command", {"cmd": "python3 -i", "tty": True,
                                        "yield_time_ms": 1000}, call_id="py")],
        ModelStep.respond(lambda call: [function_call(
            "write_stdin", {"session_id": _session_id(call), "yield_time_ms": 2000,
                            "chars": "print(6 * 7)\nimport socket; print(socket.gethostname())\n"
                                     + probe},
            call_id="w1")]),
        ModelStep.respond(lambda call: [function_call(
            "write_stdin", {"session_id": _session_id(call), "chars": "exit(5)\n",
                            "yield_time_ms": 5000}, call_id="w2")]),
        [assistant_message("done")],
    ])
    agent = SandboxAgent(name="t", model=model, instructions="test")
    client = CellblockSandboxClient()

    async def main() -> tuple[Any, list[str], tuple[int, str], str]:
        session = await client.create(
            options=CellblockSandboxClientOptions(exposed_ports=(8000,)))
        await session.start()
        await session.write("served.txt", io.BytesIO(SECRET.encode()))
        result = await Runner.run(agent, "go", run_config=RunConfig(
            sandbox=SandboxRunConfig(client=client, session=session)))
        endpoint = await session.resolve_exposed_port(8000)
        got = await asyncio.to_thread(_http_get, endpoint.url_for("http") + "/served.txt")
        # The server started by the first call is still running: stdin refused (no tty)
        # with the SDK's own advice.
        srv_id = int(re.findall(r"session ID (\d+)", outputs(result)[0])[0])
        from agents.sandbox.capabilities.tools.shell_tool import WriteStdinArgs, WriteStdinTool
        refused = await WriteStdinTool(session=session).run(
            WriteStdinArgs(session_id=srv_id, chars="x"))
        await client.delete(session)
        return result, [endpoint.host, str(endpoint.port)], got, refused

    result, (host, port), got, refused = asyncio.run(main())
    assert result.final_output == "done"
    out = outputs(result)
    assert len(out) == 4, out
    assert "Process running with session ID" in out[0], out[0]
    assert "Process running with session ID" in out[1], out[1]
    assert "42\n" in out[2] and "cellblock\n" in out[2], out[2]
    assert "host-file False\n" in out[2] and host_file.read_text() == "host", out[2]
    assert "Process exited with code 5" in out[3], out[3]
    assert host == "127.0.0.1" and got == (200, SECRET)
    assert "Start the command with `tty=true`" in refused, refused
    # The session is gone: so are its server and its forward.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5).close()


def test_exposed_ports_are_made_again_on_resume() -> None:
    """A resumed session (from serialized state) forwards its ports anew; only the state's
    ports resolve (the SDK's own refusal for others)."""
    from agents.sandbox.errors import ExposedPortUnavailableError

    async def main() -> list[str]:
        client = CellblockSandboxClient()
        first = await client.create(options=CellblockSandboxClientOptions(exposed_ports=(8000,)))
        payload = json.dumps(client.serialize_session_state(first.state), default=str)
        await client.delete(first)
        resumed = await client.resume(client.deserialize_session_state(json.loads(payload)))
        bodies = []
        async with resumed:
            assert resumed.state.exposed_ports == (8000,)
            await resumed.write("r.txt", io.BytesIO(b"resumed"))
            await resumed.pty_exec_start("python3 -m http.server 8000 --bind 127.0.0.1",
                                         yield_time_s=0.3)
            endpoint = await resumed.resolve_exposed_port(8000)
            bodies.append((await asyncio.to_thread(
                _http_get, endpoint.url_for("http") + "/r.txt"))[1])
            with pytest.raises(ExposedPortUnavailableError):
                await resumed.resolve_exposed_port(8001)
        await client.delete(resumed)
        return bodies

    assert asyncio.run(main()) == ["resumed"]


def test_pty_output_cap_and_port_conflicts() -> None:
    """A PTY process's output counts against the policy's max_output (past it the process is
    killed, as any call); a port the allowlist hands to the host's loopback is refused with a
    typed error naming it when the session opens."""
    from cellblock.errors import InvalidSpec

    async def main() -> tuple[int, int | None, int | None]:
        client = CellblockSandboxClient()
        conflict = await client.create(options=CellblockSandboxClientOptions(
            exposed_ports=(8000,), policy=Policy(allow_net=["127.0.0.1:8000"])))
        with pytest.raises(InvalidSpec, match="port 8000"):
            await conflict.start()
        await client.delete(conflict)
        capped = await client.create(options=CellblockSandboxClientOptions(
            policy=Policy(max_output="1K")))
        async with capped:
            cat = await capped.pty_exec_start("cat", tty=True, yield_time_s=0.3)
            assert cat.process_id is not None
            flood = await capped.pty_write_stdin(session_id=cat.process_id,
                                                 chars="x" * 3000 + "\n", yield_time_s=5)
            assert (await capped.exec("echo alive")).stdout == b"alive\n"
        await client.delete(capped)
        return len(flood.output), flood.exit_code, flood.process_id

    assert asyncio.run(main()) == (1024, 137, None)
