"""Pre-created cells for one-shot runs: `cellblock.run` takes a ready sandbox when one of its
shape (memory, pids, cpus, cpu-time budget, disk, extra binds; no egress allowlist) is waiting,
so the run only sends its command and waits for its report.

Cells are built ahead by a background thread in the native core, sized from observed demand
and bounded (`max_cells` in all, `per_shape` per shape); each serves one run and is torn down
after its report is returned. A run with no ready cell builds its sandbox at once (the cold
path): same isolation, same report. The cold path takes parts made ahead by the same kind
of background thread when it can: a network namespace (as root) and cgroup directories, each
used once. Turn cells (and parts) off with `configure(False)`,
`CELLBLOCK_CELLS=0`, or per run with `cellblock.run(..., cells=False)`. `CELLBLOCK_CELLS=wait`
makes runs wait (up to 30 s) for a cell of their shape instead of taking the cold path: the
test suite run that way proves every isolation claim through cells.
"""

from __future__ import annotations

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
    #: Runs that found none and built their sandbox (cold path).
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
