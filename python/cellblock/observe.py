"""Observers of what the supervisor reported: every finished run and every session change.

Telemetry is a side channel: the places that already know (one-shot runs, session calls, warm
calls, session life) announce it here, and exporters and meters subscribe. Observers run on the
caller's thread; the error of an observer that raises is logged, and the run's result is
returned as usual.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from cellblock.result import RunResult

_log = logging.getLogger("cellblock.telemetry")

#: Which API produced a run: `cellblock.run`, `Sandbox.run`, or a warm `run_python`/`run_node`.
RunKind = Literal["run", "session.run", "session.start", "session.python", "session.node"]

#: What happened to a session.
SessionChange = Literal["open", "close", "pause", "resume", "auto_pause"]


@dataclass(frozen=True)
class RunRecord:
    """One finished run: what the supervisor reported, where and when it ran."""

    kind: RunKind
    result: RunResult
    #: `id()` of the Sandbox for session calls, None for one-shot runs.
    session: int | None
    #: Monotonic clock at the end of the run; it started `result.wall_time_s` earlier.
    ended: float

    @property
    def started(self) -> float:
        """Monotonic clock at the start of the run."""
        return self.ended - self.result.wall_time_s


@dataclass(frozen=True)
class SessionRecord:
    """A change of a session's state, at a monotonic time."""

    change: SessionChange
    session: int
    at: float


RunObserver = Callable[[RunRecord], None]
SessionObserver = Callable[[SessionRecord], None]

_lock = threading.Lock()
_run_observers: list[RunObserver] = []
_session_observers: list[SessionObserver] = []


def add_run_observer(fn: RunObserver) -> None:
    """Calls `fn` with a RunRecord after every run, session call and warm call."""
    with _lock:
        _run_observers.append(fn)


def remove_run_observer(fn: RunObserver) -> None:
    """Stops calling `fn` (no error if it was not registered)."""
    with _lock:
        if fn in _run_observers:
            _run_observers.remove(fn)


def add_session_observer(fn: SessionObserver) -> None:
    """Calls `fn` with a SessionRecord on every session open, close, pause and resume."""
    with _lock:
        _session_observers.append(fn)


def remove_session_observer(fn: SessionObserver) -> None:
    """Stops calling `fn` (no error if it was not registered)."""
    with _lock:
        if fn in _session_observers:
            _session_observers.remove(fn)


def notify_run(kind: RunKind, result: RunResult, session: object | None = None) -> None:
    """Announces a finished run to every run observer."""
    if not _run_observers:
        return
    record = RunRecord(kind, result, id(session) if session is not None else None,
                       time.monotonic())
    with _lock:
        observers = list(_run_observers)
    for fn in observers:
        try:
            fn(record)
        except Exception:  # an exporter's failure must not fail the user's run
            _log.exception("run observer %r failed", fn)


def notify_session(change: SessionChange, session: object) -> None:
    """Announces a session change to every session observer."""
    if not _session_observers:
        return
    record = SessionRecord(change, id(session), time.monotonic())
    with _lock:
        observers = list(_session_observers)
    for fn in observers:
        try:
            fn(record)
        except Exception:  # as above
            _log.exception("session observer %r failed", fn)
