"""The anthropic SDK's own EnvironmentWorker, with cellblock's agent toolset, against a local
stand-in of the Managed Agents endpoints (tests/managed_agents_standin.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cellblock import cli
from cellblock.observe import SessionRecord, add_session_observer, remove_session_observer
from cellblock.policy import Policy

pytest.importorskip("anthropic.lib.environments", reason="needs cellblock[managed-agents]")
from anthropic import AsyncAnthropic
from managed_agents_standin import SKILL_TEXT, StandIn, serve_in_thread

from cellblock.integrations.managed_agents import make_worker
from conftest import IS_ROOT, SETPRIV, share_tree

SECRET = "s3cr3t-token-value-42"
CONFIG = f"""
memory = "128M"
pids = 64
env = {{ POLICY_MARK = "from-config" }}
secrets = {{ API_TOKEN = "{SECRET}" }}
"""


def script(port: int) -> list[tuple[str, dict[str, Any]]]:
    """Every toolset tool, plus escape attempts (index -> expectation in the test)."""
    return [
        ("bash", {"command": "id -u; hostname; test -e /work && echo work-visible || "
                             "echo work-invisible; echo key=${ANTHROPIC_ENVIRONMENT_KEY:-unset}; "
                             "cd /tmp && export GREETING=hello; echo mark=$POLICY_MARK"}),  # 0
        ("bash", {"command": "pwd; echo $GREETING; echo $API_TOKEN"}),                       # 1
        ("write", {"file_path": "notes/a.txt", "content": "alpha\nbeta\n"}),                 # 2
        ("read", {"file_path": "notes/a.txt"}),                                              # 3
        ("edit", {"file_path": "/workspace/notes/a.txt", "old_string": "beta",
                  "new_string": "gamma"}),                                                   # 4
        ("read", {"file_path": "notes/a.txt", "view_range": [2, 2]}),                        # 5
        ("glob", {"pattern": "**/*.txt"}),                                                   # 6
        ("grep", {"pattern": "gam+a"}),                                                      # 7
        ("read", {"file_path": "/etc/passwd"}),                                              # 8
        ("write", {"file_path": "../escape.txt", "content": "x"}),                           # 9
        ("bash", {"command": "ln -s / /workspace/root-link && "
                             "cat /workspace/skills/greeting/SKILL.md"}),                    # 10
        ("read", {"file_path": "root-link/etc/hostname"}),                                   # 11
        ("bash", {"command": f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null "
                             "&& echo api-reachable || echo api-unreachable"}),              # 12
        ("bash", {"command": "python3 -c 'x = bytearray(400 << 20); print(1 + 1)'"}),        # 13
        ("bash", {"command": "echo out; exit 3"}),                                           # 14
        ("grep", {"pattern": "(unclosed"}),                                                  # 15
    ]


async def serve_one_item(standin: StandIn, workdir: Path, policy: Policy,
                         memory_sync_interval: float | None = None) -> None:
    runner = await standin.start()
    if not standin.script:
        standin.script = script(standin.port)  # the script names the stand-in's own port
    try:
        async with AsyncAnthropic(auth_token="env-key-test", base_url=standin.url,
                                  max_retries=0) as client:
            worker = make_worker(client, environment_id=standin.environment_id,
                                 environment_key="env-key-test", policy=policy,
                                 workdir=workdir, max_idle=5,
                                 memory_sync_interval=memory_sync_interval)
            task = asyncio.create_task(worker.run())
            for _ in range(1200):
                if standin.stopped.is_set() or task.done():
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    finally:
        await runner.cleanup()


def test_sdk_worker_runs_every_tool_in_one_sandbox(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", "host-key-must-not-leak")
    cfg = tmp_path / "policy.toml"
    cfg.write_text(CONFIG)
    workdir = tmp_path / "work"
    workdir.mkdir()
    sessions: list[SessionRecord] = []
    timeline: list[str] = []

    def observe(record: SessionRecord) -> None:
        sessions.append(record)
        timeline.append(f"sandbox-{record.change}")

    standin = StandIn(script=[])
    stop = standin.stop

    async def stop_and_note(request: Any) -> Any:
        timeline.append("work-stop")
        return await stop(request)

    standin.stop = stop_and_note  # type: ignore[method-assign]
    add_session_observer(observe)
    try:
        asyncio.run(serve_one_item(standin, workdir, Policy.from_toml(cfg)))
    finally:
        remove_session_observer(observe)

    kinds = [k for k, _ in standin.seen]
    assert kinds[0] == "poll" and "ack" in kinds and "heartbeat" in kinds, kinds
    assert kinds.count("stop") == 1 and kinds.count("result") == len(standin.script), kinds
    text = {i: standin.result_text(i) for i in range(len(standin.script))}

    uid, host, work, key, mark = text[0][0].splitlines()
    assert (uid, work, key, mark) == ("0", "work-invisible", "key=unset", "mark=from-config")
    assert host != socket.gethostname() and host == "cellblock"
    assert text[1] == ("/tmp\nhello\n[REDACTED:API_TOKEN]", False)   # stateful, secret redacted
    assert text[2] == ("wrote 11 bytes to notes/a.txt", False)
    assert text[3] == ("alpha\nbeta\n", False)
    assert text[4] == ("edited /workspace/notes/a.txt (1 replacement(s))", False)
    assert text[5] == ("gamma", False)
    assert text[6] == ("/workspace/notes/a.txt", False)
    assert text[7] == ("/workspace/notes/a.txt:2:gamma", False)
    assert text[8] == ("read: path '/etc/passwd' is outside the session's working directory", True)
    assert text[9] == ("write: path '../escape.txt' is outside the session's working directory",
                       True)
    assert not (tmp_path / "escape.txt").exists() and not Path("/escape.txt").exists()
    assert text[10] == (SKILL_TEXT.rstrip("\n"), False)          # the SDK's skill, in the sandbox
    assert text[11] == ("read: path 'root-link/etc/hostname' passes through a symlink, "
                        "which is not followed", True)
    assert text[12] == ("api-unreachable", False)                 # no network but its own lo
    assert text[13][1] and not text[13][0].endswith("2"), text[13]  # memory = 128M, from config
    assert text[14] == ("out", True)
    assert text[15][1] and text[15][0].startswith("grep: invalid regex:"), text[15]

    # One sandbox for the item, closed before the SDK stopped the work item.
    assert [r.change for r in sessions] == ["open", "close"], sessions
    assert timeline.index("sandbox-close") < timeline.index("work-stop"), timeline
    assert not list((workdir / "skills").iterdir())  # the SDK removed its skill staging


@pytest.fixture(scope="module")
def nobody_sdk_dir(nobody_dir: Path) -> Iterator[Path]:
    """World-readable copies of what the integration imports beyond cellblock's own closure
    (the anthropic SDK, which cellblock's CLI imports only lazily), for uid 65534."""
    code = ("import asyncio, json, sys, sysconfig, cellblock.integrations.managed_agents\n"
            "from anthropic import AsyncAnthropic\n"
            "async def touch():\n"  # the HTTP stack is imported at the first request
            "    async with AsyncAnthropic(auth_token='x', base_url='http://127.0.0.1:9',\n"
            "                              max_retries=0) as c:\n"
            "        try:\n"
            "            await c.beta.sessions.retrieve('s')\n"
            "        except Exception:\n"
            "            pass\n"
            "asyncio.run(touch())\n"
            "site = sysconfig.get_paths()['purelib']\n"
            "print(json.dumps(sorted({m.__file__[len(site) + 1:].split('/')[0] "
            "for m in list(sys.modules.values()) "
            "if (getattr(m, '__file__', None) or '').startswith(site + '/')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    site = Path(sysconfig.get_paths()["purelib"])
    tmp = Path(tempfile.mkdtemp(prefix="cellblock-nobody-sdk-"))
    try:
        for name in json.loads(out.stdout):
            if name != "cellblock" and not (nobody_dir / name).exists():
                share_tree(site / name, tmp / name)
        for meta in site.glob("anthropic-*.dist-info"):
            share_tree(meta, tmp / meta.name)
        for root, dirs, _ in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        tmp.chmod(0o755)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("as_nobody", [False, True], ids=["root" if IS_ROOT else "user", "nobody"])
def test_cli_worker_serves_a_session(tmp_path: Path, as_nobody: bool,
                                     request: pytest.FixtureRequest) -> None:
    """`cellblock worker --environment ID --config FILE` in its own process (as uid 65534 too)."""
    # Calls 1 and 3 come from a second session thread: the SDK runs them with that thread
    # current, and its shell is not the primary thread's.
    standin = StandIn(script=[("bash", {"command": "cd /tmp; export X=kept"}),
                              ("bash", {"command": "mkdir -p /tmp/b && cd /tmp/b; X=b"}),
                              ("bash", {"command": "id -u; pwd; echo $X $POLICY_MARK"}),
                              ("bash", {"command": "pwd; echo $X"})],
                      threads={1: "sthr_b", 3: "sthr_b"})
    thread, loop = serve_in_thread(standin)
    env = {"PATH": os.environ["PATH"], "ANTHROPIC_BASE_URL": standin.url,
           "ANTHROPIC_ENVIRONMENT_KEY": "env-key-test"}
    if as_nobody:
        nobody_dir = request.getfixturevalue("nobody_dir")
        sdk_dir = request.getfixturevalue("nobody_sdk_dir")
        tmp_path = Path(tempfile.mkdtemp(dir=nobody_dir / "tmp"))  # readable by uid 65534
        tmp_path.chmod(0o755)
        argv = [*SETPRIV, "/usr/bin/python3", "-m", "cellblock.cli"]
        env |= {"PYTHONPATH": f"{nobody_dir}:{sdk_dir}", "HOME": "/nonexistent",
                "TMPDIR": str(nobody_dir / "tmp")}
    else:
        argv = [sys.executable, "-m", "cellblock.cli"]
        env |= {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    cfg = tmp_path / "policy.toml"
    cfg.write_text(CONFIG)
    cfg.chmod(0o644)
    proc = subprocess.Popen([*argv, "worker", "--environment", standin.environment_id,
                             "--config", str(cfg), "--max-idle", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the item is stopped, or the worker died
            if standin.stopped.wait(0.1) or proc.poll() is not None:
                break
        stopped = standin.stopped.is_set()
        # The worker reads the stop's answer, then polls again: end it only after two more
        # polls (bounded), so SIGTERM does not land inside the SDK's shielded stop call.
        def polls() -> int:
            return sum(1 for kind, _ in standin.seen if kind == "poll")
        after_stop = polls()
        for _ in range(300):
            if not stopped or proc.poll() is not None or polls() >= after_stop + 2:
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # and close its pipes: a hung worker fails this test only
            proc.communicate()
            raise
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    assert stopped, err
    assert standin.result_text(0) == ("(no output)", False), err  # the SDK's text for ""
    assert standin.result_text(2) == ("0\n/tmp\nkept from-config", False), err
    assert standin.result_text(3) == ("/tmp/b\nb", False), err
    assert proc.returncode == 128 + 15, (proc.returncode, err)


def test_cli_worker_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('memory = "lots"\n')
    monkeypatch.delenv("ANTHROPIC_ENVIRONMENT_KEY", raising=False)
    base = ["worker", "--environment", "env_x"]
    for argv, message in (
        ([*base, "--config", str(bad)], "InvalidSpec: memory"),
        (base, "InvalidSpec: worker: no environment key (set ANTHROPIC_ENVIRONMENT_KEY)"),
        (["worker"], "the following arguments are required: --environment"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2
        assert err.startswith(f"cellblock: error: {message}"), err

    # A rejected key ends the SDK's poll loop for good (in a process of its own: the SDK
    # leaves tasks and clients behind when its loop fails, which this process would report).
    rejecting = StandIn(script=[], reject_key=True)
    thread, loop = serve_in_thread(rejecting)
    env = {**os.environ, "ANTHROPIC_ENVIRONMENT_KEY": "wrong-key",
           "ANTHROPIC_BASE_URL": rejecting.url}
    try:
        r = subprocess.run([sys.executable, "-m", "cellblock.cli", *base], env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert r.returncode == 2, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("cellblock: error: AuthenticationError: "), r.stderr
    assert "401" in last and "invalid environment key" in last, r.stderr


def test_memory_stores_and_limits_of_the_toolset(tmp_path: Path) -> None:
    """Memory stores (where the SDK mounts them) reach the sandbox and the agent's edits come
    back to the host; read-only stores refuse writes; the config's call timeout is a ceiling."""
    from anthropic.lib.tools.agent_toolset import AgentToolContext

    from cellblock.integrations.managed_agents import cellblock_toolset

    workdir, notes, shared = tmp_path / "work", tmp_path / "mnt" / "notes", tmp_path / "shared"
    for d in (workdir, notes, shared):
        d.mkdir(parents=True)
    (notes / "todo.md").write_text("- one\n")
    (shared / "rules.md").write_text("be nice\n")
    ctx = AgentToolContext(workdir=workdir, allowed_roots=[notes, shared],
                           read_only_roots=[shared])
    tools = {t.name: t for t in cellblock_toolset(ctx, Policy(timeout=2))}

    async def main() -> list[Any]:
        calls: list[tuple[str, dict[str, Any]]] = [
            ("read", {"file_path": str(notes / "todo.md")}),
            ("edit", {"file_path": str(notes / "todo.md"), "old_string": "one",
                      "new_string": "two"}),
            ("write", {"file_path": str(shared / "rules.md"), "content": "be mean\n"}),
            ("bash", {"command": f"cat /workspace/.mounts{shared}/rules.md"}),
            ("bash", {"command": "sleep 30", "timeout_ms": 60_000}),
        ]
        out: list[Any] = []
        for name, args in calls:
            try:
                out.append(await tools[name].call(args))
            except Exception as e:  # the SDK turns a ToolError into an error result
                out.append(f"{type(e).__name__}: {e}")
        await tools["bash"].close()  # type: ignore[misc]
        return out

    out = asyncio.run(main())
    assert out[0] == "- one\n"
    assert out[1] == f"edited {notes / 'todo.md'} (1 replacement(s))"
    assert (notes / "todo.md").read_text() == "- two\n"          # synced back to the host
    assert out[2] == f"ToolError: write: {shared / 'rules.md'} is inside a read-only directory"
    assert out[3] == "be nice"
    assert (shared / "rules.md").read_text() == "be nice\n"
    assert out[4] == "ToolError: \ncommand timed out after 2s"  # the SDK's words


def _thread(session: str, thread: str | None) -> Any:
    """The SDK's record of a session thread, as its session runner sets it for a tool call."""
    from contextlib import AsyncExitStack

    from cellblock.integrations.managed_agents._sdk import SessionThread

    return SessionThread((session, thread), AsyncExitStack())


def test_bash_keeps_one_shell_per_session_thread(tmp_path: Path) -> None:
    """Like the SDK's bash, each session thread has its own shell: two threads running at
    once keep their own cwd, variables, functions, aliases and options, and two calls of one
    thread at once run in turn (neither's state overwrites the other's)."""
    from anthropic.lib.tools.agent_toolset import AgentToolContext

    from cellblock.integrations.managed_agents import cellblock_toolset
    from cellblock.integrations.managed_agents._sdk import current_session_thread

    ctx = AgentToolContext(workdir=tmp_path)
    bash = next(t for t in cellblock_toolset(ctx) if t.name == "bash")
    a, b = _thread("sesn_1", None), _thread("sesn_1", "sthr_b")

    async def call(thread: Any, command: str) -> str:
        current_session_thread.set(thread)
        try:
            return str(await bash.call({"command": command}))
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    async def main() -> list[str]:
        first = await asyncio.gather(
            call(a, "cd /tmp; export X=from-a; fa() { echo fn-a; }; sleep 1; set -o noglob"),
            call(b, "mkdir -p sub && cd sub; X=from-b; alias gb='echo alias-b'; sleep 1"),
            # Same thread as `a`, at the same time: runs after it, sees its state.
            call(a, "export Y=also-a"),
        )
        second = await asyncio.gather(
            call(a, "pwd; echo $X $Y; fa; type gb &>/dev/null || echo no-gb; set -o | grep noglob"),
            call(b, "pwd; echo $X $Y; gb; type fa &>/dev/null || echo no-fa; set -o | grep noglob"),
        )
        restarted = [await call(b, "echo $X"),
                     str(await bash.call({"restart": True, "command": "pwd; echo ${X:-unset}"})),
                     await call(a, "echo $X")]
        await a.exit_stack.aclose()  # the SDK closes a thread's stack when the thread ends
        gone = await call(a, "echo ${X:-unset}")
        await bash.close()  # type: ignore[misc]
        return [*first, *second, *restarted, gone]

    out = asyncio.run(main())
    assert out[:3] == ["", "", ""], out
    assert out[3].splitlines() == ["/tmp", "from-a also-a", "fn-a",
                                   "no-gb", "noglob         \ton"], out[3]
    assert out[4].splitlines() == ["/workspace/sub", "from-b", "alias-b",
                                   "no-fa", "noglob         \toff"], out[4]
    # restart with a command restarts the shell of the calling thread (b), then runs it
    assert out[5:8] == ["from-b", "/workspace\nunset", "from-a"], out[5:8]
    assert out[8] == "unset", out[8]  # the ended thread's shell state is gone


def _running(marker: bytes) -> list[int]:
    """Host pids whose command line is exactly `sleep <marker>` (the marker is this test's)."""
    pids = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() == b"sleep\0" + marker + b"\0":
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("how", ["interrupt", "sdk-timeout"])
def test_interrupted_bash_call_leaves_no_process(tmp_path: Path, how: str) -> None:
    """The SDK interrupts a tool call by cancelling its task (a session interrupt, or its
    per-call timeout's cancel scope): the sandboxed `sleep` is killed at once, not left
    running until its own timeout, and the shell serves the next call."""
    import anyio
    from anthropic.lib.tools.agent_toolset import AgentToolContext

    from cellblock.integrations.managed_agents import cellblock_toolset

    marker = f"600.{os.getpid()}{len(how)}".encode()
    bash = next(t for t in cellblock_toolset(AgentToolContext(workdir=tmp_path))
                if t.name == "bash")

    async def main() -> tuple[list[int], list[int], str]:
        await bash.call({"command": "export KEPT=yes"})
        seen: list[int] = []

        async def watch() -> None:
            while not seen:
                seen.extend(_running(marker))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        if how == "interrupt":
            task = asyncio.create_task(bash.call({"command": f"sleep {marker.decode()}"}))
            for _ in range(200):
                if seen:
                    break
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with anyio.move_on_after(3):  # how the SDK's RunningCall.timeout ends a call
                await bash.call({"command": f"sleep {marker.decode()}"})
        watcher.cancel()
        after = [1]
        for _ in range(100):  # the kill is asynchronous to the cancelled task
            after = _running(marker)
            if not after:
                break
            await asyncio.sleep(0.05)
        if after:  # still running: the next call would wait for it
            return seen, after, ""
        return seen, after, str(await bash.call({"command": "echo $KEPT"}))

    async def run() -> tuple[list[int], list[int], str]:
        try:
            return await main()
        finally:
            await bash.close()  # type: ignore[misc]  # ends the sandbox, and so any leftover

    seen, after, nxt = asyncio.run(run())
    assert seen, "the sleep never showed up"  # it really ran before the interrupt
    assert after == [], after
    assert nxt == "yes"


def test_bash_timeout_is_capped_like_the_sdk() -> None:
    from cellblock.integrations.managed_agents._sdk import BASH_DEFAULT_TIMEOUT
    from cellblock.integrations.managed_agents.tools import bash_timeout

    assert bash_timeout(None, Policy()) == BASH_DEFAULT_TIMEOUT
    assert bash_timeout(0, Policy()) == BASH_DEFAULT_TIMEOUT
    assert bash_timeout(86_400_000, Policy()) == BASH_DEFAULT_TIMEOUT   # a model's huge ask
    assert bash_timeout(1500, Policy()) == 1.5
    assert bash_timeout(60_000, Policy(timeout=2)) == 2                 # the operator's ceiling


def test_bash_output_is_the_sdks(tmp_path: Path) -> None:
    """The SDK's own output assembly: stdout then stderr (stderr first on failure), and past
    its BASH_OUTPUT_LIMIT the start plus the name of a file, in the sandbox, with all of it,
    which `read` (with view_range) and `grep` open and `write` may not touch."""
    import re

    from anthropic.lib.tools.agent_toolset import AgentToolContext

    from cellblock.integrations.managed_agents import cellblock_toolset
    from cellblock.integrations.managed_agents._sdk import BASH_OUTPUT_LIMIT

    tools = {t.name: t for t in cellblock_toolset(AgentToolContext(workdir=tmp_path))}

    async def call(name: str, args: dict[str, Any]) -> str:
        try:
            return str(await tools[name].call(args))
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    async def main() -> list[str]:
        out = [await call("bash", {"command": "echo out; echo err >&2"}),
               await call("bash", {"command": "echo out; echo err >&2; false"}),
               await call("bash", {"command": "seq 1 20000"})]
        saved = re.search(r"saved to: (\S+)", out[2])
        path = saved.group(1) if saved else "/nonexistent"
        out += [path,
                await call("read", {"file_path": path, "view_range": [19999, 20000]}),
                await call("grep", {"pattern": "^12345$", "path": path}),
                await call("write", {"file_path": path, "content": "x"}),
                await call("bash", {"command": f"rm {path}; ln -s /etc/hostname {path}"}),
                await call("read", {"file_path": path})]
        await tools["bash"].close()  # type: ignore[misc]
        return out

    out = asyncio.run(main())

    async def reference() -> list[str]:
        # The SDK's own bash on the host, for two harmless commands: the same text.
        from anthropic.lib.tools.agent_toolset import beta_bash_tool

        ref = beta_bash_tool(AgentToolContext(workdir=tmp_path))
        texts = []
        for command in ("echo out; echo err >&2", "echo out; echo err >&2; false"):
            try:
                texts.append(str(await ref.call({"command": command})))
            except Exception as e:
                texts.append(f"{type(e).__name__}: {e}")
        from anthropic.lib.tools._beta_functions import aclose_runnable_tool

        await aclose_runnable_tool(ref)  # ends the host shell
        return texts

    assert out[:2] == asyncio.run(reference()) == ["out\n\nerr", "ToolError: err\n\nout"]
    assert len(out[2]) < BASH_OUTPUT_LIMIT + 300 and out[2].startswith("1\n2\n3\n"), out[2][-300:]
    assert "lines truncated] Full output saved to: /tmp/.cellblock-bash/default/" in out[2]
    assert out[4] == "19999\n20000"
    assert out[5] == f"{out[3]}:12345:12345"
    assert out[6].startswith("ToolError: write: path ") and "outside" in out[6], out[6]
    assert out[8].startswith("ToolError: read: ") and "symlink" in out[8], out[8]


def test_memory_stores_through_the_sdks_own_path(tmp_path: Path) -> None:
    """The session names memory stores in its resources; the SDK's worker downloads them (with
    the work item's sessions token) to their mount paths, the sandbox gets them at the mapped
    paths; `write`/`edit` of a memory file go through the SDK's own memory write (saved to the
    store during the call, refusals reach the agent), bash's changes are copied back to the
    host and the SDK's final sync uploads them; a read-only store refuses `write` and never
    uploads."""
    workdir, notes = tmp_path / "work", tmp_path / "mnt" / "notes"
    workdir.mkdir()
    inside_notes = f"/workspace/.mounts{notes}"          # a mount path outside the workdir
    inside_shared = "/workspace/memory/shared"           # no mount path: {workdir}/memory/<name>
    standin = StandIn(
        script=[
            ("bash", {"command": f"cat {inside_notes}/todo.md {inside_shared}/rules.md"}),
            ("edit", {"file_path": str(notes / "todo.md"), "old_string": "one",
                      "new_string": "two"}),
            ("bash", {"command": f"echo '- new' > {inside_notes}/new.md"}),
            ("write", {"file_path": str(workdir / "memory/shared/rules.md"),
                       "content": "be mean\n"}),
            ("bash", {"command": f"echo mean > {inside_shared}/rules.md; "
                                 f"ls -A {inside_notes}"}),
            # The SDK's memory write refuses its own marker file: nothing is written.
            ("write", {"file_path": str(notes / ".anthropic-memory-store"), "content": "x"}),
            ("bash", {"command": f"head -c 8 {inside_notes}/.anthropic-memory-store"}),
        ],
        memory_stores=[
            {"memory_store_id": "memstore_notes", "access": "read_write",
             "mount_path": str(notes), "name": "notes"},
            {"memory_store_id": "memstore_shared", "access": "read_only", "name": "shared"},
        ],
        memories={"memstore_notes": {"/todo.md": "- one\n"},
                  "memstore_shared": {"/rules.md": "be nice\n"}},
    )
    asyncio.run(serve_one_item(standin, workdir, Policy(), memory_sync_interval=15.0))

    text = {i: standin.result_text(i) for i in range(len(standin.script))}
    assert text[0] == ("- one\nbe nice", False), text[0]     # downloaded by the SDK, in the sandbox
    assert text[1] == (f"edited {notes / 'todo.md'} (1 replacement(s))", False)
    assert text[3][1] and "read-only" in text[3][0], text[3]
    assert text[4] == (".anthropic-memory-store\nnew.md\ntodo.md", False), text[4]
    assert text[5][1] and "marks the folder as a memory store" in text[5][0], text[5]
    assert text[6] == ("version ", False), text[6]
    # The edit went through the SDK's memory write, during the call (before its result).
    order = [(k, d if k != "result" else d["tool_use_id"]) for k, d in standin.seen]
    assert order.index(("memory-update", ("memstore_notes", "/todo.md"))) < order.index(
        ("result", "sevt_tool01")), order
    # The SDK's final sync uploaded the agent's changes; the read-only store got nothing.
    assert standin.memories["memstore_notes"] == {"/todo.md": "- two\n", "/new.md": "- new\n"}
    assert standin.memories["memstore_shared"] == {"/rules.md": "be nice\n"}
    writes = [d for k, d in standin.seen if k.startswith("memory-")]
    assert sorted(writes) == [("memstore_notes", "/new.md"), ("memstore_notes", "/todo.md")]
    assert not notes.exists()  # the SDK removed its staging of the store


def test_session_interrupt_stops_the_running_bash_call(tmp_path: Path) -> None:
    """Through the SDK's own session runner: the thread of a running `sleep` goes idle (the
    session interrupted it), the SDK cancels the call and the sandboxed process is killed at
    once; the next call is served."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = f"600.{os.getpid()}7".encode()
    standin = StandIn(script=[("bash", {"command": f"sleep {marker.decode()}"}),
                              ("bash", {"command": "echo next"})],
                      threads={0: "sthr_i"}, interrupts={0: 3.0})
    seen: list[int] = []
    after: list[int] = [-1]

    async def main() -> None:
        standin.hold = asyncio.Event()

        async def watch() -> None:
            # Until the next call's result: the sleep shows up; then, with the session (and
            # its sandbox) still open, it must be gone.
            while "sevt_tool01" not in standin.results:
                seen.extend(_running(marker))
                await asyncio.sleep(0.05)
            for _ in range(100):
                after[:] = _running(marker)
                if not after:
                    break
                await asyncio.sleep(0.05)
            assert standin.hold is not None
            standin.hold.set()

        watcher = asyncio.create_task(watch())
        try:
            await serve_one_item(standin, workdir, Policy())
        finally:
            watcher.cancel()

    asyncio.run(main())
    assert seen, "the sleep never ran"
    assert after == [], after
    assert standin.result_text(0) == (  # the SDK's words for a call it stopped
        "tool 'bash' was stopped, and may have already done some or all of its work", True)
    assert standin.result_text(1) == ("next", False)
    kinds = [k for k, _ in standin.seen]
    assert kinds.index("interrupt") < kinds.index("result"), kinds
