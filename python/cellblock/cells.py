"""Pre-created cells for one-shot runs: `cellblock.run` takes a ready sandbox when one of its
shape (memory, pids, cpus, cpu-time budget, disk, extra binds; no egress allowlist) is waiting,
so the run only sends its command and waits for its report.

Cells are built ahead by a background thread in the native core, sized from observed demand
and bounded (`max_cells` in all, `per_shape` per shape); each serves one run and is torn down
after its report is returned. A run with no ready cell builds its sandbox at once (the cold
path): same isolation, same report. The cold path takes parts made ahead by the same kind
of background thread when it can: a network namespace (as root) and cgroup directories, each
used once, and the fork server that clones PID 1 (see `cellblock.forkserver`; cells are cloned by it
too). Turn cells (and parts) off with `configure(False)`,
`CELLBLOCK_CELLS=0`, or per run with `cellblock.run(..., cells=False)`. `CELLBLOCK_CELLS=wait`
makes runs wait (up to 30 s) for a cell of their shape instead of taking the cold path; a run
that still finds none (or cannot use the cell it got) takes the cold path, counted in
`stats().misses` and logged as a warning (logger `cellblock.cells`).

A shape's first run only records demand; `prepare` makes cells of a run's shape ready ahead
(and says which runs cells never serve). The test suite's `--cells=pooled` prepares a cell
before every run and fails a run the cold path served (`stats().hits` did not grow).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from cellblock import _native
from cellblock.errors import InvalidSpec


class CellStats(BaseModel):
    """Counters of the cell pool."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Whether runs use cells unless they say otherwise.
    enabled: bool
    #: Runs served by a ready cell.
    hits: int
    #: Runs that found none and built their sandbox (cold path). With
    #: `CELLBLOCK_CELLS=wait`, each waited up to 30 s first (and is logged as a warning).
    misses: int
    #: Cells built so far.
    built: int
    #: Builds that failed (the shape then waits before the next attempt).
    failed: int
    #: Cells ready now.
    ready: int
    #: Used or dropped sandboxes whose teardown is not finished.
    pending_teardown: int
    #: Teardowns that could not remove their cgroup (after the run's report was returned).
    teardown_failures: int
    #: The most recent of those failures and of the stale-cgroup sweep's (at most 32), each
    #: naming the path and the errno.
    teardown_errors: list[str] = []
    #: Most cells kept ready at once.
    max_cells: int
    #: Cold runs that joined a network namespace made ahead (root only; not with an egress
    #: allowlist) instead of creating one.
    cold_netns_ahead: int = 0
    #: Cold runs that took cgroup directories made ahead (their limits written at the run).
    cold_cgroups_ahead: int = 0
    #: Network namespaces and cgroups made ahead and not used yet.
    parts_ready: int = 0
    #: Runs that took a cell but could not use it (request larger than the cell's buffer, or
    #: the cell died): they took the cold path and count as misses, not hits.
    fallbacks: int = 0
    #: Processes the fork server (see `cellblock.forkserver`) cloned rather than the calling
    #: process: cold runs' and cells' PID 1s, session calls' joiners.
    forkserver_clones: int = 0
    #: Host pid of the running forkserver, if one runs.
    forkserver_pid: int | None = None
    #: Why the most recent failed build failed.
    last_build_error: str | None = None


class Preparation(BaseModel):
    """What `prepare` achieved."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: "ready": a cell waits for each run whose shape cells serve; "disabled": cells are off;
    #: "over_bound": more cells than the pool's bounds were asked for; "timed_out": not all
    #: were ready in time (`detail` names the last build error).
    status: Literal["ready", "disabled", "over_bound", "timed_out"]
    #: Per run: whether cells serve its shape at all. False for an egress allowlist
    #: (`allow_net`, credentials) or a terminal (`tty`): such a run builds a sandbox made for
    #: it, always.
    served: list[bool]
    detail: str | None = None


#: `cellblock.run` arguments that do not shape the sandbox (ignored by `prepare`).
_PER_CALL = frozenset({"stdin", "on_output", "cancel", "cells", "tty_input"})


def prepare_many(runs: Sequence[tuple[Sequence[str], Mapping[str, Any]]],
                 within: float = 30.0) -> Preparation:
    """Makes a ready cell wait, within `within` seconds, for each of these runs (argv and
    `cellblock.run` keyword arguments): runs of the same shape get as many cells as there are
    of them. Cells of other shapes are dropped when the pool has no room. The runs, made
    afterwards, are then served by those cells (unless they pass `cells=False`). Arguments a
    run would refuse raise the run's error (`InvalidSpec`, ...)."""
    from cellblock.sandbox import plan_run

    if within < 0:
        raise InvalidSpec(f"within must be >= 0, got {within}")
    specs = [plan_run(argv, **{k: v for k, v in options.items() if k not in _PER_CALL}).encoded()
             for argv, options in runs]
    return Preparation(**_native.cells_prepare(specs, within))


def prepare(argv: Sequence[str] = ("true",), *, count: int = 1, within: float = 30.0,
            **options: Any) -> Preparation:
    """Makes `count` cells of the shape `cellblock.run(argv, **options)` would use ready
    (see `prepare_many`): e.g. before a burst of runs, so that none pays for a sandbox."""
    if count < 1:
        raise InvalidSpec(f"count must be >= 1, got {count}")
    return prepare_many([(argv, options)] * count, within)


def configure(enabled: bool = True, *, max_cells: int | None = None,
              per_shape: int | None = None) -> None:
    """Turn cells on or off (off drops the ready ones) and optionally bound the pool."""
    for name, value in (("max_cells", max_cells), ("per_shape", per_shape)):
        if value is not None and value < 0:
            raise InvalidSpec(f"{name} must be >= 0, got {value}")
    _native.cells_configure(enabled, max_cells, per_shape)


def drain(timeout: float = 10.0) -> bool:
    """Drop every ready cell and wait until all builds and teardowns are finished: afterwards
    no process, mount or cgroup of a cell or a finished run remains. False on timeout."""
    return _native.cells_drain(timeout)


def stats() -> CellStats:
    """The pool's counters."""
    return CellStats(**_native.cells_stats())


_log = logging.getLogger("cellblock.cells")


class _WaitWatch:
    """`CELLBLOCK_CELLS=wait` is meant to serve every run through a cell; the native core
    sends a run that found none within 30 s down the cold path without a word. This warns
    about each such run (the misses counted since the last check), naming the last build
    error, which is usually why no cell became ready."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wait: bool | None = None
        self._seen = 0

    def check(self) -> None:
        """Called after each one-shot run; costs nothing unless in wait mode."""
        if self._wait is None:
            # Read once, as the pool reads it when it starts (the first run).
            self._wait = os.environ.get("CELLBLOCK_CELLS") == "wait"
        if not self._wait:
            return
        now = CellStats(**_native.cells_stats())
        with self._lock:
            new, self._seen = now.misses - self._seen, max(self._seen, now.misses)
        if new > 0:
            _log.warning(
                "CELLBLOCK_CELLS=wait: %d run(s) found no ready cell of their shape within "
                "30 s (or could not use the cell they got) and took the cold path (%d so far, "
                "cellblock.cells.stats().misses); last cell build error: %s",
                new, now.misses, now.last_build_error or "none")


#: Checked by `cellblock.run` after each run.
wait_watch = _WaitWatch()
