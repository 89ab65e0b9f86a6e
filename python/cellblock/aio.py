"""`cellblock.aio`: the async API. Same calls as `cellblock.run`, `cellblock.Sandbox` and
`cellblock.run_many`, awaitable from asyncio code (FastAPI, aiohttp, ...).

Every call runs the synchronous API on a worker thread (the native core releases the GIL), so
nothing about policy or supervision is re-implemented here. Cancelling the awaiting task
really stops the run: the call's cancel event is set, the supervisor kills the sandbox's
processes, and `CancelledError` is raised only once they are gone.

    async with cellblock.aio.Sandbox(memory="256M") as sb:
        r = await sb.run_python("print(1)")
        async with sb.stream(["sh", "-c", "echo a; sleep 1; echo b"]) as live:
            async for chunk in live:
                print(chunk.stream, chunk.data)
        print((await live.result()).exit_code)
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from cellblock import sandbox as _sandbox
from cellblock.batch import Job, JobError, Outcome, job_policy, run_cold
from cellblock.errors import InvalidSpec, SessionClosed
from cellblock.files import DirEntry
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.runtimes.warm import CodeResult
from cellblock.session import Sandbox as SyncSandbox

T = TypeVar("T")

#: Worker threads for blocking calls: each running call holds one; idle sessions hold none.
MAX_THREADS = int(os.environ.get("CELLBLOCK_AIO_THREADS", "256"))

_EXECUTOR = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="cellblock-aio")


@dataclass(frozen=True)
class Output:
    """A chunk of live, already redacted output: `stream` is 1 (stdout) or 2 (stderr)."""

    stream: int
    data: bytes


async def _settle(future: asyncio.Future[Any]) -> None:
    """Waits for `future` without cancelling it (asyncio.wait never cancels what it waits on)."""
    await asyncio.wait({future})


async def call(fn: Callable[[threading.Event], T]) -> T:
    """Runs `fn(cancel)` on a worker thread. When the awaiting task is cancelled, `cancel` is
    set and the task waits for `fn` to return (the run to be killed) before re-raising."""
    cancel = threading.Event()
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(_EXECUTOR, fn, cancel)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancel.set()
        await _settle(future)
        raise


async def _blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs a short blocking call (no cancel point) on a worker thread."""
    return await call(lambda _cancel: fn(*args, **kwargs))


class LiveRun:
    """A run whose output is read as it arrives: ``async for chunk in live`` yields `Output`
    chunks until the run ends; `await live.result()` gives its report. Leaving
    ``async with live`` (or `await live.cancel()`) before the end kills the run."""

    def __init__(self, start: Callable[[Callable[[int, bytes], None], threading.Event], RunResult]):
        self._start = start
        self._queue: asyncio.Queue[Output | None] = asyncio.Queue()
        self._task: asyncio.Task[RunResult] | None = None
        self._drained = False

    def _ensure_started(self) -> asyncio.Task[RunResult]:
        if self._task is None:
            loop = asyncio.get_running_loop()

            def on_output(stream: int, data: bytes) -> None:
                loop.call_soon_threadsafe(self._queue.put_nowait, Output(stream, bytes(data)))

            def body(cancel: threading.Event) -> RunResult:
                try:
                    return self._start(on_output, cancel)
                finally:
                    loop.call_soon_threadsafe(self._queue.put_nowait, None)

            self._task = asyncio.ensure_future(call(body))
        return self._task

    async def __aenter__(self) -> Self:
        self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        task = self._ensure_started()
        if self._drained:
            await _settle(task)  # all output was read: the run is ending by itself
        elif not task.done():
            await self.cancel()

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Output]:
        self._ensure_started()
        while (chunk := await self._queue.get()) is not None:
            yield chunk
        self._drained = True

    async def result(self) -> RunResult:
        """The run's report (waits for the end)."""
        return await self._ensure_started()

    async def cancel(self) -> None:
        """Kills the run and waits until its processes are gone."""
        task = self._ensure_started()
        task.cancel()
        await _settle(task)


async def run(argv: Sequence[str], **kwargs: Any) -> RunResult:
    """`cellblock.run` as a coroutine; cancelling the task kills the sandbox."""
    return await call(lambda cancel: _sandbox.run(argv, cancel=cancel, **kwargs))


def stream(argv: Sequence[str], **kwargs: Any) -> LiveRun:
    """A one-shot run with live output (see `LiveRun`); keyword arguments as for `run`."""
    return LiveRun(
        lambda on_output, cancel: _sandbox.run(argv, on_output=on_output, cancel=cancel, **kwargs)
    )


class Sandbox:
    """`cellblock.Sandbox` with awaitable methods. ``async with aio.Sandbox(**kwargs) as sb``
    or ``sb = await aio.Sandbox(**kwargs).open()``; the arguments are `cellblock.Sandbox`'s."""

    def __init__(self, policy: Policy | None = None, **kwargs: Any) -> None:
        self._args = (policy, kwargs)
        self._sync: SyncSandbox | None = None

    @classmethod
    def wrap(cls, sync: SyncSandbox) -> Sandbox:
        """An async view of an open synchronous sandbox."""
        sb = cls()
        sb._sync = sync
        return sb

    @property
    def sync(self) -> SyncSandbox:
        """The underlying synchronous sandbox (SessionClosed before `open()`)."""
        if self._sync is None:
            raise SessionClosed("the sandbox is not open yet: await open() first")
        return self._sync

    async def open(self) -> Self:
        """Opens the sandbox (once) and returns it."""
        if self._sync is None:
            policy, kwargs = self._args
            self._sync = await _blocking(SyncSandbox, policy, **kwargs)
        return self

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sync is not None:
            await self.close()

    async def close(self) -> None:
        """Kills every process of the session and frees it (idempotent)."""
        await _blocking(self.sync.close)

    @property
    def is_open(self) -> bool:
        """Whether the session is open and its sandbox alive."""
        return self._sync is not None and self._sync.is_open

    async def enforcement(self) -> dict[str, str | None]:
        """What enforces each session-wide limit."""
        return await _blocking(lambda: self.sync.enforcement)

    async def pause(self) -> None:
        """Freezes every process of the session."""
        await _blocking(self.sync.pause)

    async def resume(self) -> None:
        """Thaws a paused session."""
        await _blocking(self.sync.resume)

    def idle_deadline(self) -> float | None:
        """When the idle timeout closes this session (monotonic clock), if it will."""
        return self.sync.idle_deadline()

    async def run(self, argv: Sequence[str], **kwargs: Any) -> RunResult:
        """`Sandbox.run`; cancelling the task kills the call's processes."""
        sync = self.sync
        return await call(lambda cancel: sync.run(argv, cancel=cancel, **kwargs))

    async def run_shell(self, script: str, **kwargs: Any) -> RunResult:
        """`Sandbox.run_shell`; cancellable like `run`."""
        return await self.run(["/bin/sh", "-c", script], **kwargs)

    def stream(self, argv: Sequence[str], **kwargs: Any) -> LiveRun:
        """Runs a command in the session with live output (see `LiveRun`)."""
        sync = self.sync
        return LiveRun(
            lambda on_output, cancel: sync.run(argv, on_output=on_output, cancel=cancel, **kwargs)
        )

    async def run_python(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_python`; cancelling the task kills the code's processes."""
        sync = self.sync
        return await call(
            lambda cancel: sync.run_python(code, stateful=stateful, cancel=cancel, **kwargs)
        )

    async def run_node(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_node`; cancelling the task kills the code's processes."""
        sync = self.sync
        return await call(
            lambda cancel: sync.run_node(code, stateful=stateful, cancel=cancel, **kwargs)
        )

    async def write_file(self, path: str, data: bytes | str) -> None:
        """`Sandbox.write_file`."""
        await _blocking(self.sync.write_file, path, data)

    async def read_file(self, path: str) -> bytes:
        """`Sandbox.read_file`."""
        return await _blocking(self.sync.read_file, path)

    async def make_dirs(self, path: str) -> None:
        """`Sandbox.make_dirs`."""
        await _blocking(self.sync.make_dirs, path)

    async def list_dir(self, path: str = "/workspace") -> list[DirEntry]:
        """`Sandbox.list_dir`."""
        return await _blocking(self.sync.list_dir, path)

    async def remove(self, path: str, recursive: bool = False) -> None:
        """`Sandbox.remove`."""
        await _blocking(self.sync.remove, path, recursive)

    async def upload(self, local: str | os.PathLike[str], path: str) -> None:
        """`Sandbox.upload`."""
        await _blocking(self.sync.upload, local, path)

    async def download(self, path: str, local: str | os.PathLike[str]) -> None:
        """`Sandbox.download`."""
        await _blocking(self.sync.download, path, local)

    def __repr__(self) -> str:
        return f"<cellblock.aio.Sandbox {'open' if self.is_open else 'closed'}>"


async def run_job(job: Job, policy: Policy | None = None) -> Outcome:
    """One job as `run_many` runs it (a fresh sandbox): its report, or the `JobError` that
    kept it from running. Cancelling the task kills the job's sandbox."""
    effective = job_policy(job, policy)
    try:
        return await call(lambda cancel: run_cold(job, effective, cancel=cancel))
    except Exception as e:
        return JobError.from_exception(e)


async def _run_job_in(
    job: Job, policy: Policy | None, slots: asyncio.Semaphore
) -> tuple[Job, Outcome]:
    async with slots:
        return job, await run_job(job, policy)


async def iter_many(
    jobs: Iterable[Job], concurrency: int | None = None, policy: Policy | None = None
) -> AsyncIterator[tuple[Job, Outcome]]:
    """Runs jobs concurrently, yielding `(job, outcome)` in completion order. Closing the
    iterator or cancelling the task kills the running jobs and starts no new one."""
    workers = concurrency if concurrency is not None else os.cpu_count() or 1
    if workers < 1:
        raise InvalidSpec(f"concurrency must be at least 1, got {concurrency}")
    slots = asyncio.Semaphore(workers)
    tasks = [asyncio.ensure_future(_run_job_in(job, policy, slots)) for job in jobs]
    try:
        for next_done in asyncio.as_completed(tasks):
            yield await next_done
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


async def run_many(
    jobs: Iterable[Job], concurrency: int | None = None, policy: Policy | None = None
) -> list[Outcome]:
    """`cellblock.run_many` as a coroutine: outcomes in job order (`JobError` for jobs that
    could not run); cancelling the task kills every running job."""
    listed = list(jobs)
    index = {id(job): i for i, job in enumerate(listed)}
    results: list[Outcome | None] = [None] * len(listed)
    async for job, outcome in iter_many(listed, concurrency, policy):
        results[index[id(job)]] = outcome
    return [r for r in results if r is not None]

