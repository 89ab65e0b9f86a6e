"""What the service holds: sessions and batches by id, each owned by the token that made it,
and per-token counters that enforce the token's limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from cellblock import aio
from cellblock.batch import Job, JobError, Outcome
from cellblock.errors import SessionClosed
from cellblock.service.auth import TokenRecord
from cellblock.service.models import BatchStatus, JobOutcome, RunReport, SessionInfo
from cellblock.service.problems import LimitExceeded, NotFound

#: How often expired sessions are looked for, seconds.
REAP_INTERVAL_S = 0.5
#: Sessions one service holds at once, all tokens together (each costs a few descriptors and
#: processes; see the README's bench).
DEFAULT_MAX_SESSIONS = 1000
#: How long a finished batch's results are kept for its owner to fetch, seconds.
BATCH_RETENTION_S = 3600.0

_log = logging.getLogger("cellblock.service")


def new_id(prefix: str) -> str:
    """An unguessable id (ids are not secrets, but guessing one must not be a way in)."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class Session:
    """An open session of one token."""

    id: str
    owner: str
    sandbox: aio.Sandbox
    labels: dict[str, str]
    created_at: float
    expires_at: float
    paused: bool = False

    def info(self) -> SessionInfo:
        """The session's public description."""
        state: Literal["open", "paused", "closed"] = (
            "paused" if self.paused else "open" if self.sandbox.is_open else "closed"
        )
        now = time.monotonic()
        idle = self.sandbox.idle_deadline() if self.sandbox.is_open else None
        pause = self.sandbox.pause_deadline() if self.sandbox.is_open else None
        return SessionInfo(
            id=self.id, labels=self.labels, state=state,
            created_at=self.created_at, expires_at=self.expires_at,
            paused_seconds=self.sandbox.paused_seconds,
            idle_close_in=None if idle is None else max(0.0, idle - now),
            auto_pause_in=None if pause is None else max(0.0, pause - now),
        )


@dataclass
class Batch:
    """A submitted batch: its task and the outcomes so far."""

    id: str
    owner: str
    jobs: list[Job]
    outcomes: list[tuple[Job, Outcome]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    cancelled: bool = False
    #: Monotonic time the batch ended (it is forgotten BATCH_RETENTION_S later).
    finished_at: float | None = None

    def status(self, with_results: bool) -> BatchStatus:
        """Progress, and the finished jobs' outcomes if asked for."""
        done = self.task is not None and self.task.done()
        state: Literal["running", "done", "cancelled"] = (
            "cancelled" if self.cancelled else "done" if done else "running"
        )
        results = None
        if with_results:
            results = [
                JobOutcome(job_id=job.id, error={"kind": o.kind, "message": o.message})
                if isinstance(o, JobError)
                else JobOutcome(job_id=job.id, result=RunReport.of(o))
                for job, o in self.outcomes
            ]
        return BatchStatus(
            id=self.id, state=state, total=len(self.jobs), finished=len(self.outcomes),
            failed=sum(1 for _, o in self.outcomes if not o.ok), results=results,
        )


class Usage:
    """One token's counters: open sessions and runs in progress."""

    def __init__(self) -> None:
        self.sessions = 0
        self.runs = 0
        self.changed = asyncio.Condition()


class Registry:
    """Sessions and batches by id; `get_*` never reveals another token's objects."""

    def __init__(self, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 batch_retention_s: float = BATCH_RETENTION_S) -> None:
        self.max_sessions = max_sessions
        self.batch_retention_s = batch_retention_s
        #: Sessions open or being opened, all tokens together.
        self._opening = 0
        self.sessions: dict[str, Session] = {}
        self.batches: dict[str, Batch] = {}
        self._usage: dict[str, Usage] = {}
        self._reaper: asyncio.Task[None] | None = None

    def usage(self, token: TokenRecord) -> Usage:
        """The counters of a token."""
        return self._usage.setdefault(token.name, Usage())

    # ---- sessions ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session_slot(self, token: TokenRecord) -> AsyncIterator[None]:
        """Reserves one of the token's sessions while it is being opened (kept on success)."""
        usage = self.usage(token)
        if usage.sessions >= token.max_sessions:
            raise LimitExceeded(f"token {token.name!r} has {usage.sessions} open sessions "
                                f"(limit {token.max_sessions})")
        if self._opening >= self.max_sessions:
            raise LimitExceeded(f"the service holds {self._opening} sessions "
                                f"(limit {self.max_sessions})")
        usage.sessions += 1
        self._opening += 1
        try:
            yield
        except BaseException:
            usage.sessions -= 1
            self._opening -= 1
            raise

    def add_session(self, session: Session) -> None:
        """Registers an opened session."""
        self.sessions[session.id] = session

    def get_session(self, token: TokenRecord, session_id: str) -> Session:
        """The token's open session with that id (SessionClosed otherwise, also for sessions
        of other tokens: their existence is not revealed)."""
        s = self.sessions.get(session_id)
        if s is None or s.owner != token.name:
            raise SessionClosed(f"no open session {session_id!r}")
        return s

    def list_sessions(self, token: TokenRecord, labels: dict[str, str]) -> list[Session]:
        """The token's sessions whose labels include all of `labels`."""
        return [
            s for s in self.sessions.values()
            if s.owner == token.name and labels.items() <= s.labels.items()
        ]

    async def close_session(self, session: Session) -> None:
        """Closes a session and frees its slot (idempotent)."""
        if self.sessions.pop(session.id, None) is None:
            return
        self._usage[session.owner].sessions -= 1
        self._opening -= 1
        await session.sandbox.close()

    async def close_all(self) -> None:
        """Closes every session and cancels every batch (graceful shutdown). One failing
        close does not stop the others: failures are logged."""
        if self._reaper is not None:
            self._reaper.cancel()
        for batch in self.batches.values():
            if batch.task is not None:
                batch.task.cancel()
        tasks = [b.task for b in self.batches.values() if b.task is not None]
        if tasks:
            await asyncio.wait(tasks)
        sessions = list(self.sessions.values())
        outcomes = await asyncio.gather(*(self.close_session(s) for s in sessions),
                                        return_exceptions=True)
        for session, outcome in zip(sessions, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                _log.error("closing session %s failed: %r", session.id, outcome)

    def start_reaper(self) -> None:
        """Starts closing sessions past their lifetime, or closed from the inside."""
        self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.time()
            gone = [
                s for s in self.sessions.values()
                if s.expires_at <= now or not s.sandbox.is_open
            ]
            for s in gone:
                await self.close_session(s)
            self.forget_finished_batches()

    def forget_finished_batches(self) -> None:
        """Drops the batches that ended more than the retention time ago."""
        cutoff = time.monotonic() - self.batch_retention_s
        for batch_id in [b.id for b in self.batches.values()
                         if b.finished_at is not None and b.finished_at <= cutoff]:
            del self.batches[batch_id]

    # ---- runs --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def run_slot(self, token: TokenRecord, wait: bool = False) -> AsyncIterator[None]:
        """Holds one of the token's concurrent runs; without `wait`, LimitExceeded when all
        are in use (a batch job waits instead)."""
        usage = self.usage(token)
        async with usage.changed:
            if not wait and usage.runs >= token.max_concurrent_runs:
                raise LimitExceeded(f"token {token.name!r} has {usage.runs} runs in progress "
                                    f"(limit {token.max_concurrent_runs})")
            await usage.changed.wait_for(lambda: usage.runs < token.max_concurrent_runs)
            usage.runs += 1
        try:
            yield
        finally:
            async with usage.changed:
                usage.runs -= 1
                usage.changed.notify_all()

    # ---- batches -----------------------------------------------------------------------------

    def check_batch_room(self, token: TokenRecord) -> None:
        """LimitExceeded if the token holds `max_batches` batches (running, or finished and
        not yet forgotten)."""
        held = sum(1 for b in self.batches.values() if b.owner == token.name)
        if held >= token.max_batches:
            raise LimitExceeded(f"token {token.name!r} holds {held} batches (limit "
                                f"{token.max_batches}; finished ones are kept "
                                f"{self.batch_retention_s:g} s or until deleted)")

    def add_batch(self, batch: Batch) -> None:
        """Registers a submitted batch."""
        self.batches[batch.id] = batch

    def get_batch(self, token: TokenRecord, batch_id: str) -> Batch:
        """The token's batch with that id (NotFound otherwise, also for other tokens')."""
        b = self.batches.get(batch_id)
        if b is None or b.owner != token.name:
            raise NotFound(f"no batch {batch_id!r}")
        return b
