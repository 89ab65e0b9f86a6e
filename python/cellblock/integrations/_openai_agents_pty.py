"""The OpenAI Agents SDK's PTY calls (`exec_command` / `write_stdin` tools) on cellblock
background processes (`Sandbox.start`).

Each SDK "PTY session" is one `cellblock.Process` in the session's sandbox. Its live output is
pumped by a thread of ours into the queue the SDK's own `collect_pty_output` drains (yield
time, token truncation and UTF-8 carry are the SDK's); ids, yield-time clamps and pruning are
the SDK's helpers too. `tty=False` runs with stdin closed, as the SDK's local backend (plain
pipes, `write_stdin` refused with the SDK's own message). `tty=True` streams stdin through a
pipe: interactive programs that read stdin (`cat`, `python3 -i`, `sh -i`) work, but there is
no terminal device (`isatty()` is False, no echo, no line editing, no job control).
`Sandbox.run(..., tty=True)` (a real terminal inside the sandbox, branch pty) will replace the
pipe here.
"""

from __future__ import annotations

import abc
import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cellblock.integrations._pins import SUPPORTED_OPENAI_AGENTS, unsupported

try:
    from agents.sandbox.session.base_sandbox_session import BaseSandboxSession
    from agents.sandbox.session.pty_output import collect_pty_output
    from agents.sandbox.session.pty_types import (
        PTY_PROCESSES_MAX,
        PtyExecUpdate,
        allocate_pty_process_id,
        clamp_pty_yield_time_ms,
        process_id_to_prune_from_meta,
        resolve_pty_write_yield_time_ms,
    )
    from agents.sandbox.types import User
except ImportError as e:  # a moved name: say which versions work, not just what broke
    raise unsupported("cellblock.integrations.openai_agents", "openai-agents",
                      SUPPORTED_OPENAI_AGENTS, "openai-agents", e) from e
from anyio.to_thread import run_sync

from cellblock.errors import SandboxIOError
from cellblock.process import Process
from cellblock.result import RunResult
from cellblock.session import Sandbox

#: The workspace of every cellblock session (and the SDK's default manifest root).
WORKSPACE = "/workspace"
#: The SDK's `WriteStdinTool` turns exactly this message into advice to use `tty=true`.
_NO_STDIN = "stdin is not available for this process"
#: The SDK's defaults when a call gives no yield time (its local backend's).
_START_YIELD_MS = 10_000
_WRITE_YIELD_MS = 250


def shell_exit_code(result: RunResult) -> int:
    """The shell's view of a supervisor report: the exit status, 128+signal, 124 on timeout."""
    if result.reason == "timeout":
        return 124
    return result.exit_code if result.exit_code is not None else 128 + (result.signal or 9)


@dataclass(eq=False)
class _PtyEntry:
    """One SDK PTY session: the process and the output queue the SDK's collector drains."""

    process: Process
    tty: bool
    output_chunks: deque[bytes] = field(default_factory=deque)
    output_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    output_notify: asyncio.Event = field(default_factory=asyncio.Event)
    output_closed: asyncio.Event = field(default_factory=asyncio.Event)
    last_used: float = field(default_factory=time.monotonic)


def _pump(entry: _PtyEntry, loop: asyncio.AbstractEventLoop) -> None:
    """Moves the process's live output (stdout and stderr, in the order the supervisor read
    them, as a terminal would show them) onto the event loop; marks the end after the last
    chunk (the loop runs callbacks in order)."""

    def push(data: bytes) -> None:
        entry.output_chunks.append(data)
        entry.output_notify.set()

    def done() -> None:
        entry.output_closed.set()
        entry.output_notify.set()

    try:
        for chunk in entry.process.iter_output():
            loop.call_soon_threadsafe(push, chunk.data)
        loop.call_soon_threadsafe(done)
    except RuntimeError:  # the loop is closed: nobody is left to read
        pass


class PtySessions(BaseSandboxSession, abc.ABC):
    """`supports_pty`, `pty_exec_start`, `pty_write_stdin`, `pty_terminate_all` for a
    session whose `sandbox` is a cellblock `Sandbox`."""

    def __init__(self) -> None:
        self._pty_processes: dict[int, _PtyEntry] = {}
        self._pty_lock = asyncio.Lock()

    @property
    @abc.abstractmethod
    def sandbox(self) -> Sandbox:
        """The session's cellblock sandbox (opened on first use)."""

    def supports_pty(self) -> bool:
        return True

    async def pty_exec_start(
        self,
        *command: str | Path,
        timeout: float | None = None,
        shell: bool | list[str] = True,
        user: str | User | None = None,
        tty: bool = False,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        argv = self._prepare_exec_command(*command, shell=shell, user=user)

        def start() -> Process:
            # No stdin given to start() keeps it open for write_stdin (tty); b"" closes it.
            return self.sandbox.start(argv, timeout=timeout, cwd=WORKSPACE,
                                      stdin=None if tty else b"")

        entry = _PtyEntry(process=await run_sync(start), tty=tty)
        threading.Thread(target=_pump, args=(entry, asyncio.get_running_loop()),
                         name=f"cellblock-pty-{entry.process.pid}", daemon=True).start()
        async with self._pty_lock:
            process_id = allocate_pty_process_id(set(self._pty_processes))
            pruned = self._prune_pty_process()
            self._pty_processes[process_id] = entry
        if pruned is not None:
            await run_sync(pruned.process.kill)
        yield_ms = _START_YIELD_MS if yield_time_s is None else int(yield_time_s * 1000)
        return await self._pty_update(process_id, entry, clamp_pty_yield_time_ms(yield_ms),
                                      max_output_tokens)

    async def pty_write_stdin(
        self,
        *,
        session_id: int,
        chars: str,
        yield_time_s: float | None = None,
        max_output_tokens: int | None = None,
    ) -> PtyExecUpdate:
        async with self._pty_lock:
            entry = self._resolve_pty_session_entry(pty_processes=self._pty_processes,
                                                    session_id=session_id)
        if chars:
            if not entry.tty:
                raise RuntimeError(_NO_STDIN)
            try:
                await run_sync(entry.process.write_stdin, chars.encode())
            except SandboxIOError:
                pass  # it no longer reads: its last output and exit code follow
        yield_ms = _WRITE_YIELD_MS if yield_time_s is None else int(yield_time_s * 1000)
        update = await self._pty_update(
            session_id, entry,
            resolve_pty_write_yield_time_ms(yield_time_ms=yield_ms, input_empty=chars == ""),
            max_output_tokens,
        )
        entry.last_used = time.monotonic()
        return update

    async def pty_terminate_all(self) -> None:
        async with self._pty_lock:
            entries = list(self._pty_processes.values())
            self._pty_processes.clear()
        for entry in entries:
            await run_sync(entry.process.kill)

    async def _pty_update(self, process_id: int, entry: _PtyEntry, yield_ms: int,
                          max_output_tokens: int | None) -> PtyExecUpdate:
        output, tokens, closed = await collect_pty_output(
            output_chunks=entry.output_chunks, output_lock=entry.output_lock,
            output_notify=entry.output_notify, is_done=entry.output_closed.is_set,
            yield_time_ms=yield_ms, max_output_tokens=max_output_tokens,
        )
        if not closed:
            return PtyExecUpdate(process_id=process_id, output=output, exit_code=None,
                                 original_token_count=tokens)
        result = await run_sync(entry.process.wait)
        async with self._pty_lock:
            self._pty_processes.pop(process_id, None)
        return PtyExecUpdate(process_id=None, output=output, exit_code=shell_exit_code(result),
                             original_token_count=tokens)

    def _prune_pty_process(self) -> _PtyEntry | None:
        """At the SDK's limit, the entry the SDK's policy picks (exited first, least recently
        used, never the most recent few), removed from the table."""
        if len(self._pty_processes) < PTY_PROCESSES_MAX:
            return None
        meta = [(pid, e.last_used, e.output_closed.is_set())
                for pid, e in self._pty_processes.items()]
        victim = process_id_to_prune_from_meta(meta)
        return None if victim is None else self._pty_processes.pop(victim, None)
