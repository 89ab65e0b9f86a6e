"""cellblock.aio: async runs, sessions and batches; cancelling a task kills the sandboxed
processes (checked on the host's /proc), and output is read live."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import AsyncIterator

import anyio  # Starlette's task model (the service's dependency)
import pytest

import cellblock
from cellblock import aio
from conftest import processes_with_argv, wait_for


def unique_sleep() -> list[str]:
    """A `sleep` command line no other process has, to find it in /proc."""
    return ["sleep", f"{600 + secrets.randbelow(10**6) / 10**6:.6f}"]


async def appears(argv: list[str]) -> list[int]:
    deadline = time.monotonic() + 30
    while not (pids := processes_with_argv(argv)):
        assert time.monotonic() < deadline, f"{argv} never started"
        await asyncio.sleep(0.02)
    return pids


def test_run_is_the_sync_run() -> None:
    r = asyncio.run(aio.run(["python3", "-c", "print(6 * 7)"], memory="128M"))
    assert isinstance(r, cellblock.RunResult)
    assert (r.stdout, r.reason, r.exit_code) == ("42\n", "exited", 0)


def test_errors_are_the_same_classes() -> None:
    with pytest.raises(cellblock.InvalidSpec):
        asyncio.run(aio.run([]))
    with pytest.raises(cellblock.CommandNotFound):
        asyncio.run(aio.run(["/nonexistent/binary"]))


def test_cancelling_a_run_kills_its_process() -> None:
    argv = unique_sleep()

    async def scenario() -> None:
        task = asyncio.ensure_future(aio.run(argv, timeout=120))
        pids = await appears(argv)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # CancelledError is raised only once the sandbox is gone: no polling needed.
        assert [p for p in pids if processes_with_argv(argv)] == []

    asyncio.run(scenario())


def test_cancelling_session_calls_kills_their_processes() -> None:
    """A command call and a warm Python call (whose code started a child) are cancelled:
    every process they started is gone, and the session keeps serving."""
    cmd, child = unique_sleep(), unique_sleep()
    code = (f"import subprocess, time\nsubprocess.Popen({child!r})\ntime.sleep(600)\n")

    async def scenario() -> None:
        async with aio.Sandbox(memory="256M") as sb:
            for call, argv in ((sb.run(cmd, timeout=120), cmd),
                               (sb.run_python(code, timeout=120), child)):
                task = asyncio.ensure_future(call)
                await appears(argv)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                wait_for(lambda argv=argv: not processes_with_argv(argv), f"{argv} to end", 10)
            assert (await sb.run_python("print('still here')")).stdout == "still here\n"
            assert (await sb.run(["echo", "ok"])).stdout == "ok\n"

    asyncio.run(scenario())


def test_live_output_arrives_before_the_end() -> None:
    async def scenario() -> None:
        async with aio.Sandbox() as sb:
            live = sb.stream(["sh", "-c", "echo first; sleep 1; echo second >&2"])
            async with live:
                chunks = live.__aiter__()
                first = await chunks.__anext__()
                result_task = asyncio.ensure_future(live.result())
                await asyncio.sleep(0.1)
                assert not result_task.done(), "the first chunk came only at the end"
                rest = [c async for c in chunks]
            assert (first.stream, first.data) == (1, b"first\n")
            assert [(c.stream, c.data) for c in rest] == [(2, b"second\n")]
            r = await result_task
            assert (r.exit_code, r.stdout, r.stderr) == (0, "first\n", "second\n")

    asyncio.run(scenario())


def test_leaving_a_stream_early_kills_the_run() -> None:
    argv = unique_sleep()
    script = f"echo started; exec {' '.join(argv)}"

    async def scenario() -> None:
        async with aio.stream(["sh", "-c", script], timeout=120) as live:
            async for chunk in live:
                assert chunk.data == b"started\n"
                await appears(argv)
                break
        assert processes_with_argv(argv) == []

    asyncio.run(scenario())


def test_session_methods_are_awaitable() -> None:
    async def scenario() -> None:
        sb = await aio.Sandbox(memory="256M").open()
        try:
            await sb.write_file("data/x.txt", "hello")
            assert await sb.read_file("data/x.txt") == b"hello"
            assert [e.name for e in await sb.list_dir("data")] == ["x.txt"]
            await sb.make_dirs("a/b")
            await sb.remove("a", recursive=True)
            assert sorted(e.name for e in await sb.list_dir()) == ["data"]
            assert (await sb.run_python("x = 20", stateful=True)).ok
            assert (await sb.run_python("x + 1", stateful=True)).value == "21"
            assert (await sb.run_node("1 + 2")).value == "3"
            assert (await sb.run_shell("cat data/x.txt")).stdout == "hello"
            assert "memory" in await sb.enforcement()
            with pytest.raises(cellblock.PathEscape):
                await sb.read_file("../../etc/shadow")
        finally:
            await sb.close()
        assert not sb.is_open
        with pytest.raises(cellblock.SessionClosed):
            await sb.run(["true"])

    asyncio.run(scenario())


def test_run_many_in_order_and_cancellable() -> None:
    jobs = [cellblock.Job(code=f"print({i})") for i in range(4)]
    jobs.append(cellblock.Job(argv=["/nonexistent/x"]))
    outcomes = asyncio.run(aio.run_many(jobs, concurrency=2))
    assert [o.stdout for o in outcomes[:4]] == [f"{i}\n" for i in range(4)]  # type: ignore[union-attr]
    assert isinstance(outcomes[4], cellblock.JobError)
    assert outcomes[4].kind == "CommandNotFound"

    argvs = [unique_sleep() for _ in range(2)]

    async def cancelled() -> None:
        task = asyncio.ensure_future(
            aio.run_many([cellblock.Job(argv=a, limits={"timeout": 120}) for a in argvs],
                         concurrency=2))
        for argv in argvs:
            await appears(argv)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [a for a in argvs if processes_with_argv(a)] == []

    asyncio.run(cancelled())


def test_session_parity_arguments_and_streamed_files() -> None:
    """The arguments aio.Sandbox shares with Sandbox reach it (binary stdin, per-call
    secrets, idle deadline), and files stream both ways: an async iterable is written as it
    is produced, and `iter_file` yields asynchronously."""
    async def scenario() -> None:
        async with aio.Sandbox(idle_timeout=300, disk="64M") as sb:
            r = await sb.run(["python3", "-c", "import sys; print(sys.stdin.buffer.read()[::-1])"],
                             stdin=b"\x00\x01\xff")
            assert r.stdout == "b'\\xff\\x01\\x00'\n"
            r = await sb.run_python("import os; print(os.environ['TOKEN'])",
                                    secrets={"TOKEN": "aio-secret-5e4d"})
            assert r.stdout.strip() and "aio-secret-5e4d" not in r.stdout
            due = sb.idle_deadline()
            assert due is not None and 250 < due - time.monotonic() <= 300
            assert sb.pause_deadline() is None and sb.paused_seconds == 0.0

            written_midway: list[int] = []

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(40):
                    if i == 20:  # 5 MiB produced: most of it is in the sandbox already
                        sizes = {e.name: e.size for e in await sb.list_dir()}
                        written_midway.append(sizes.get("big.bin", 0))
                    yield bytes([i]) * (256 << 10)  # 10 MiB in all

            await sb.write_file("big.bin", chunks())
            assert written_midway and written_midway[0] >= 4 << 20, written_midway
            with pytest.raises(cellblock.FileTooLarge):
                await sb.read_file("big.bin", max_size="1M")
            with pytest.raises(cellblock.FileTooLarge):
                await sb.iter_file("big.bin", max_size="1M")  # refused when opened
            total, first = 0, None
            async for chunk in await sb.iter_file("big.bin", chunk_size=1 << 20):
                first = chunk[:1] if first is None else first
                total += len(chunk)
                assert len(chunk) <= 1 << 20
            assert (total, first) == (10 << 20, b"\x00")

    asyncio.run(scenario())


class SlowChunks:
    """A blocking iterator whose second step waits for `release`; notes a close that runs
    while a step is running (what crashed the service when the iterator was a generator)."""

    def __init__(self) -> None:
        self.steps = 0
        self.running = False
        self.overlapped = False
        self.second_step = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def __iter__(self) -> SlowChunks:
        return self

    def __next__(self) -> bytes:
        self.running = True
        try:
            self.steps += 1
            if self.steps == 2:
                self.second_step.set()
                self.release.wait(30)
            return b"chunk"
        finally:
            self.running = False

    def close(self) -> None:
        self.overlapped = self.running
        self.closed.set()


def test_an_abandoned_stream_is_closed_only_after_its_step_in_flight() -> None:
    """The service streams a download from an anyio task; when the client goes away its scope
    is cancelled and anyio cancels every later await of the task too, so the stream cannot
    await the step in flight before closing. The close must still wait for that step:
    `generator.close()` beside a running `next()` on another thread made CPython 3.11 read
    the running frame's stale stack (the service died by SIGSEGV in 1 of 3 runs)."""
    chunks = SlowChunks()

    async def abandon() -> None:
        async def consume() -> None:
            async for _ in aio._push(chunks):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.to_thread.run_sync(chunks.second_step.wait, 30)
            tg.cancel_scope.cancel()  # as Starlette does on a disconnect

    anyio.run(abandon)
    assert chunks.second_step.is_set()
    # The close was submitted when the task was cancelled; it must not run during the step.
    assert not chunks.closed.wait(1), "closed while a step was still running"
    chunks.release.set()
    assert chunks.closed.wait(30), "an abandoned stream was never closed"
    assert not chunks.overlapped and chunks.steps == 2
