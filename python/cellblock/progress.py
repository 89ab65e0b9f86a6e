"""Progress and summary of a batch: done/total, rate, ETA, failures, count by reason.

On a terminal the bar is one line on stderr rewritten in place; otherwise a plain line is
printed every `interval` seconds, so logs of piped runs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TextIO

from pydantic import BaseModel, ConfigDict

#: Seconds between redraws of the terminal bar (redrawing on every job costs more than jobs do).
TTY_REFRESH_S = 0.1
#: Seconds between plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL_S = 10.0


class Summary(BaseModel):
    """Statistics of a finished (or interrupted) batch."""

    model_config = ConfigDict(frozen=True)

    total: int
    failures: int
    #: Jobs the infrastructure could not run (not counted in `failures`).
    infrastructure: int = 0
    by_reason: dict[str, int]
    wall_time_s: float

    @property
    def jobs_per_s(self) -> float:
        return self.total / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def format(self) -> str:
        """One line: `164 jobs in 12.3s (13.3 jobs/s), 2 failed; exited 163, timeout 1`."""
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.by_reason.items(), key=_by_count))
        return (
            f"{self.total} jobs in {self.wall_time_s:.1f}s ({self.jobs_per_s:.1f} jobs/s), "
            f"{self.failures} failed"
            + (f", {self.infrastructure} not run (infrastructure errors)"
               if self.infrastructure else "")
            + (f"; {reasons}" if reasons else "")
        )


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Counts finished jobs and shows how far a batch is. Call `add` from one thread only."""

    def __init__(
        self,
        total: int | None,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        tty: bool | None = None,
        live: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`quiet` prints nothing; `live=False` prints only the summary at the end."""
        self.total = total
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.live = live
        self.clock = clock
        self.start = clock()
        self.done = 0
        self.failures = 0
        self.infrastructure = 0
        self.by_reason: Counter[str] = Counter()
        self._last_draw = self.start
        self._drawn = False

    def add(self, reason: str, failed: bool, infrastructure: bool = False) -> None:
        """Record one finished job (`reason` is RunResult.reason, or "error").
        `infrastructure`: the job could not be run at all; counted apart from failures."""
        self.done += 1
        self.infrastructure += infrastructure
        self.failures += failed and not infrastructure
        self.by_reason[reason] += 1
        now = self.clock()
        interval = TTY_REFRESH_S if self.tty else PLAIN_INTERVAL_S
        due = now - self._last_draw >= interval or self.done == self.total
        if not self.quiet and self.live and due:
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        """The progress text: `37/164 12.5 jobs/s ETA 0:10 failures 2`."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text += f" {rate:.1f} jobs/s"
        if self.total is not None and rate > 0:
            text += f" ETA {_duration((self.total - self.done) / rate)}"
        text += f" failures {self.failures}"
        return text + (f" infra {self.infrastructure}" if self.infrastructure else "")

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line(now))
            self._drawn = True
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def summary(self) -> Summary:
        return Summary(
            total=self.done,
            failures=self.failures,
            infrastructure=self.infrastructure,
            by_reason=dict(self.by_reason),
            wall_time_s=self.clock() - self.start,
        )

    def close(self) -> Summary:
        """End the bar's line and print the summary (unless quiet); returns the summary."""
        summary = self.summary()
        if not self.quiet:
            if self._drawn:
                self.stream.write("\n")
            self.stream.write(summary.format() + "\n")
            self.stream.flush()
        return summary
