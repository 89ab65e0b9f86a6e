"""`cellblock.aio.Process`: a background process of an `aio.Sandbox` (see `Sandbox.start`),
with awaitable methods and async iteration of its output.

No worker thread is held for the life of a process: waiting polls from the event loop, and
reading output blocks a worker only for short slices, so thousands of processes (and the HTTP
service's streams of them) do not exhaust the shared pool, and cancelling the awaiting task
returns within a slice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from cellblock.process import OutputChunk, Stream
from cellblock.process import Process as SyncProcess
from cellblock.result import RunResult

__all__ = ["Process"]

#: Longest a worker thread blocks for one process at a time, seconds.
SLICE_S = 0.25
#: Longest pause between two looks at whether a waited-for process ended, seconds.
POLL_S = 0.1


async def _blocking(fn: Any, *args: Any) -> Any:
    from cellblock.aio import call  # aio imports this module

    return await call(lambda _cancel: fn(*args))


class Process:
    """An async view of a `cellblock.Process` (same members; the blocking ones awaited)."""

    def __init__(self, sync: SyncProcess) -> None:
        self.sync = sync

    @property
    def argv(self) -> list[str]:
        """The command."""
        return self.sync.argv

    @property
    def tty(self) -> bool:
        """Whether the process runs on a terminal."""
        return self.sync.tty

    @property
    def pid(self) -> int:
        """Host pid of the process's init."""
        return self.sync.pid

    @property
    def running(self) -> bool:
        """Whether the process has not ended yet."""
        return self.sync.running

    @property
    def result(self) -> RunResult | None:
        """The supervisor's report once the process ended, else None."""
        return self.sync.result

    @property
    def returncode(self) -> int | None:
        """The exit status, or minus the signal that ended it; None while it runs."""
        return self.sync.returncode

    async def write_stdin(self, data: bytes | str) -> None:
        """`Process.write_stdin` (on a worker thread while the pipe is full)."""
        await _blocking(self.sync.write_stdin, data)

    async def close_stdin(self) -> None:
        """`Process.close_stdin`."""
        self.sync.close_stdin()

    async def resize(self, rows: int, cols: int) -> None:
        """`Process.resize` (on a worker thread: a starting process's terminal is waited
        for)."""
        await _blocking(self.sync.resize, rows, cols)

    def signal(self, sig: int) -> bool:
        """`Process.signal` (does not block)."""
        return self.sync.signal(sig)

    def terminate(self) -> bool:
        """`Process.terminate`."""
        return self.sync.terminate()

    def kill(self) -> bool:
        """`Process.kill`."""
        return self.sync.kill()

    async def wait(self, timeout: float | None = None) -> RunResult:
        """`Process.wait`: the supervisor's report; TimeoutError after `timeout` seconds (the
        process keeps running). Cancelling the task stops the waiting, not the process.
        Polls from the event loop (no thread is held while a process runs for long)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.005
        while self.sync.running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"process {self.argv!r} still running after {timeout} s")
            await asyncio.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, POLL_S)
        return self.sync.wait()

    async def read_output(self, start: int = 0, timeout: float = SLICE_S) -> list[OutputChunk]:
        """`Process.read_output`, waiting at most `timeout` (capped at a slice)."""
        chunks: list[OutputChunk] = await _blocking(self.sync.read_output, start,
                                                    min(timeout, SLICE_S))
        return chunks

    async def iter_output(self, start: int = 0) -> AsyncIterator[OutputChunk]:
        """The output chunks from index `start` on, live, until the process ends."""
        i = start
        while True:
            chunks = await self.read_output(i)
            if chunks:
                for chunk in chunks:
                    yield chunk
                i += len(chunks)
            elif not self.sync.running:
                # The last chunks are in before the end is marked: one more read settles it.
                rest = self.sync.read_output(i, 0)
                for chunk in rest:
                    yield chunk
                return

    async def iter_lines(self, stream: Stream = "stdout") -> AsyncIterator[bytes]:
        """Complete lines of one stream as they come (see `Process.iter_lines`)."""
        pending = b""
        async for chunk in self.iter_output():
            if chunk.stream != stream:
                continue
            pending += chunk.data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"
        if pending:
            yield pending

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self.iter_output()

    def __repr__(self) -> str:
        return f"<cellblock.aio.Process {self.sync!r}>"

