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
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from cellblock import sandbox as _sandbox
from cellblock.aio_process import Process as Process  # re-exported: aio.Process
from cellblock.batch import Job, JobError, Outcome, job_policy, run_cold
from cellblock.credentials import CredentialsArg
from cellblock.errors import InvalidSpec, SessionClosed
from cellblock.files import CHUNK_SIZE, DEFAULT_MAX_READ, DirEntry, FileData
from cellblock.fork import DEFAULT_FORK_TIMEOUT, ForkReport
from cellblock.policy import Policy
from cellblock.process import ExposedPort
from cellblock.result import RunResult
from cellblock.runtimes.warm import CodeResult
from cellblock.sandbox import OutputCallback
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import SecretsArg
from cellblock.session import Sandbox as SyncSandbox
from cellblock.terminal import SizeArg

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


async def call(fn: Callable[[threading.Event], T], cancel: threading.Event | None = None) -> T:
    """Runs `fn(cancel)` on a worker thread. When the awaiting task is cancelled, `cancel` is
    set and the task waits for `fn` to return (the run to be killed) before re-raising. The
    caller may pass its own `cancel` event (setting it from anywhere kills the run too)."""
    cancel = cancel if cancel is not None else threading.Event()
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


def _given(**kwargs: Any) -> dict[str, Any]:
    """The keyword arguments actually given (None: the callee's default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _pull(chunks: AsyncIterable[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """A blocking iterator (for a worker thread) over async `chunks` produced on `loop`,
    regrouped into chunks of about CHUNK_SIZE: one chunk is in memory at a time."""
    source = aiter(chunks)

    async def next_chunk() -> bytes | None:
        try:
            return await anext(source)
        except StopAsyncIteration:
            return None

    buffer = bytearray()
    while (chunk := asyncio.run_coroutine_threadsafe(next_chunk(), loop).result()) is not None:
        buffer += chunk
        if len(buffer) >= CHUNK_SIZE:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


async def _push(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """An async iterator over a blocking one, each step on a worker thread.

    Steps and the final close are serialized by a lock, not by the awaits: a task in a
    cancelled anyio scope (Starlette's streaming response when the client goes away) has
    every await cancelled, so the close is submitted while a step may still run on another
    worker, and closing a generator that another thread is running crashes CPython 3.11
    (`gen.close()` peeks at the running frame's stale stack: SIGSEGV)."""
    one_at_a_time = threading.Lock()

    def step() -> bytes | None:
        with one_at_a_time:
            return next(chunks, None)

    def close() -> None:
        with one_at_a_time:
            closer = getattr(chunks, "close", None)
            if closer is not None:
                closer()

    try:
        while (chunk := await _blocking(step)) is not None:
            yield chunk
    finally:
        # Submitted at once even if this await is cancelled; runs after any step in flight.
        await _blocking(close)


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
    or ``sb = await aio.Sandbox(**kwargs).open()``; the arguments are `cellblock.Sandbox`'s.

    Differences from `cellblock.Sandbox`: `enforcement` is a coroutine (not a property);
    `iter_file` is awaited (it opens the file) and yields asynchronously; `write_file` also
    takes an async iterable; a call's `cancel` may be a `threading.Event` or, more simply,
    the awaiting task is cancelled; `on_output` is called on a worker thread (use `stream`
    for output in the event loop)."""

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        memory: int | str | None = None,
        pids: int | None = None,
        cpus: float | None = None,
        disk: int | str | None = None,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        seccomp: SeccompPolicy | None = None,
        allow_net: Sequence[str] | None = None,
        secrets: SecretsArg = None,
        environment: str | None = None,
        credentials: CredentialsArg = None,
        idle_timeout: float | None = None,
        auto_pause: float | None = None,
        warm: Sequence[str] = (),
        rootfs: str | os.PathLike[str] | None = None,
    ) -> None:
        self._args = (policy, _given(
            memory=memory, pids=pids, cpus=cpus, disk=disk, timeout=timeout,
            cpu_time=cpu_time, max_output=max_output, env=env, cwd=cwd, profile=profile,
            seccomp=seccomp, allow_net=allow_net, secrets=secrets, environment=environment,
            credentials=credentials, idle_timeout=idle_timeout,
            auto_pause=auto_pause, warm=warm or None, rootfs=rootfs,
        ))
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

    async def set_network(self, allow: Sequence[str]) -> list[dict[str, Any]]:
        """Replaces the session's egress allowlist (see `Sandbox.set_network`)."""
        return await _blocking(lambda: self.sync.set_network(allow))

    async def fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> Sandbox:
        """A new session with a copy of this one's workspace and kernel state (see
        `Sandbox.fork`), open."""
        return Sandbox.wrap(await _blocking(lambda: self.sync.fork(timeout=timeout)))

    async def prepare_fork(self, *, timeout: float = DEFAULT_FORK_TIMEOUT) -> None:
        """Opens the next fork's session ahead (see `Sandbox.prepare_fork`)."""
        await _blocking(lambda: self.sync.prepare_fork(timeout=timeout))

    @property
    def fork_report(self) -> ForkReport | None:
        """What `fork()` carried into this session, when it is a fork."""
        return self.sync.fork_report

    async def pause(self) -> None:
        """Freezes every process of the session."""
        await _blocking(self.sync.pause)

    async def resume(self) -> None:
        """Thaws a paused session."""
        await _blocking(self.sync.resume)

    @property
    def paused_seconds(self) -> float:
        """Seconds this session spent frozen by `auto_pause`, the current pause included."""
        return self.sync.paused_seconds

    def idle_deadline(self) -> float | None:
        """When the idle timeout closes this session (monotonic clock), if it will."""
        return self.sync.idle_deadline()

    def pause_deadline(self) -> float | None:
        """When `auto_pause` freezes this idle session (monotonic clock), if it will."""
        return self.sync.pause_deadline()

    async def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        seccomp: SeccompPolicy | None = None,
        secrets: SecretsArg = None,
        on_output: OutputCallback | None = None,
        cancel: threading.Event | None = None,
        tty: bool = False,
        tty_size: SizeArg = None,
        tty_input: int | None = None,
    ) -> RunResult:
        """`Sandbox.run`; cancelling the task (or setting `cancel`) kills the call."""
        sync = self.sync
        kwargs = _given(timeout=timeout, cpu_time=cpu_time, max_output=max_output, stdin=stdin,
                        env=env, cwd=cwd, profile=profile, seccomp=seccomp, secrets=secrets,
                        on_output=on_output, tty_size=tty_size, tty_input=tty_input)
        return await call(lambda c: sync.run(argv, cancel=c, tty=tty, **kwargs), cancel)

    async def run_shell(self, script: str, **kwargs: Any) -> RunResult:
        """`Sandbox.run_shell`; keyword arguments and cancelling as for `run`."""
        return await self.run(["/bin/sh", "-c", script], **kwargs)

    def stream(self, argv: Sequence[str], **kwargs: Any) -> LiveRun:
        """Runs a command in the session with live output (see `LiveRun`)."""
        sync = self.sync
        return LiveRun(
            lambda on_output, cancel: sync.run(argv, on_output=on_output, cancel=cancel, **kwargs)
        )

    async def run_python(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_python` (same keyword arguments); cancelling the task (or setting
        `cancel`) kills the code's processes."""
        sync = self.sync
        cancel = kwargs.pop("cancel", None)
        return await call(
            lambda c: sync.run_python(code, stateful=stateful, cancel=c, **kwargs), cancel
        )

    async def run_node(self, code: str, *, stateful: bool = False, **kwargs: Any) -> CodeResult:
        """`Sandbox.run_node`; cancelling as for `run_python`."""
        sync = self.sync
        cancel = kwargs.pop("cancel", None)
        return await call(
            lambda c: sync.run_node(code, stateful=stateful, cancel=c, **kwargs), cancel
        )

    async def write_file(self, path: str, data: FileData | AsyncIterable[bytes]) -> None:
        """`Sandbox.write_file`; `data` may also be an async iterable of chunks (an HTTP
        body, say), written as the chunks arrive: the whole file is never held in memory."""
        if isinstance(data, AsyncIterable):
            data = _pull(data, asyncio.get_running_loop())
        await _blocking(self.sync.write_file, path, data)

    async def read_file(self, path: str, *, max_size: int | str = DEFAULT_MAX_READ) -> bytes:
        """`Sandbox.read_file` (FileTooLarge past `max_size`, default 64 MiB)."""
        return await _blocking(self.sync.read_file, path, max_size=max_size)

    async def iter_file(
        self, path: str, *, chunk_size: int = CHUNK_SIZE, max_size: int | str | None = None
    ) -> AsyncIterator[bytes]:
        """`Sandbox.iter_file`: awaiting it opens the file (errors are raised here, before any
        byte moves); the result yields the chunks as they are read.

            async for chunk in await sb.iter_file("big.bin"): ...
        """
        chunks = await _blocking(self.sync.iter_file, path, chunk_size=chunk_size,
                                 max_size=max_size)
        return _push(chunks)

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

    async def start(
        self,
        argv: Sequence[str] | str,
        *,
        timeout: float | None = None,
        cpu_time: float | None = None,
        max_output: int | str | None = None,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        profile: str | None = None,
        seccomp: SeccompPolicy | None = None,
        secrets: SecretsArg = None,
        on_output: OutputCallback | None = None,
        tty: bool = False,
        tty_size: SizeArg = None,
    ) -> Process:
        """`Sandbox.start`: the process as an `aio.Process` (awaitable `wait`/`write_stdin`,
        ``async for chunk in proc``). `on_output` is called on the supervisor's thread."""
        sync = self.sync
        kwargs = _given(timeout=timeout, cpu_time=cpu_time, max_output=max_output, stdin=stdin,
                        env=env, cwd=cwd, profile=profile, seccomp=seccomp, secrets=secrets,
                        on_output=on_output, tty_size=tty_size)
        return Process(await _blocking(sync.start, argv, tty=tty, **kwargs))

    def processes(self) -> list[Process]:
        """The session's background processes still running."""
        return [Process(p) for p in self.sync.processes()]

    async def expose(self, port: int, host: str = "127.0.0.1", host_port: int = 0
                     ) -> ExposedPort:
        """`Sandbox.expose`."""
        return await _blocking(self.sync.expose, port, host, host_port)

    def exposed_ports(self) -> list[ExposedPort]:
        """`Sandbox.exposed_ports`."""
        return self.sync.exposed_ports()

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

