"""The cost meter: active sandbox seconds at a rate, plus model tokens by model, with alerts.

Sandbox time is billed only while something runs in a session (the union of its calls'
intervals, so concurrent calls of one session count once) and for the whole of a one-shot run.
Idle time of an open session is not billed; the time it spent frozen by auto-pause is reported
as the idle saving (`idle_saving_usd`), priced at the same rate.

Budget alerts: a callable runs on the thread whose observation crossed the threshold; "log"
logs a warning; a webhook is POSTed from the meter's one alert thread (a 5 s timeout each, at
most `MAX_PENDING_WEBHOOKS` waiting, more are logged and dropped), never on the run's thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Self

from pydantic import BaseModel, ConfigDict

from cellblock.agent.pricing import (
    DEFAULT_RATE_PER_HOUR,
    PRICES,
    UNKNOWN_PRICE,
    Price,
    Usage,
    price_for,
)
from cellblock.errors import InvalidSpec
from cellblock.observe import (
    RunRecord,
    SessionRecord,
    add_run_observer,
    add_session_observer,
    remove_run_observer,
    remove_session_observer,
)

__all__ = ["DEFAULT_RATE_PER_HOUR", "AlertAction", "CostMeter", "CostReport", "ModelCost"]

#: Seconds a budget webhook may take.
WEBHOOK_TIMEOUT_S = 5.0

#: Webhooks queued at most per meter (each alert fires once, so only many alerts reach it).
MAX_PENDING_WEBHOOKS = 16

_log = logging.getLogger("cellblock.cost")


class ModelCost(BaseModel):
    """Tokens and USD of one model."""

    model_config = ConfigDict(frozen=True)

    usage: Usage
    usd: float
    #: The model has no known price: `usd` uses the conservative fallback price.
    estimated: bool = False


class CostReport(BaseModel):
    """What the meter counted so far."""

    model_config = ConfigDict(frozen=True)

    rate_per_hour: float
    #: Seconds during which something ran (billed).
    active_seconds: float
    #: Seconds sessions were open (active or not), one-shot runs included.
    open_seconds: float
    #: Seconds sessions spent frozen by auto-pause.
    paused_seconds: float
    sandbox_usd: float
    models: dict[str, ModelCost]
    tokens_usd: float
    total_usd: float
    #: What the time sessions spent frozen by auto-pause would have cost if billed.
    idle_saving_usd: float


#: What an alert does: a callable (given the report), "log", or an http(s) URL to POST to.
AlertAction = Callable[[CostReport], None] | str


@dataclass
class _Alert:
    threshold_usd: float
    action: AlertAction
    fired: bool = False


@dataclass
class _Session:
    opened: float
    closed: float | None = None
    paused_at: float | None = None
    paused: float = 0.0
    #: Merged, sorted [start, end] intervals of its calls.
    busy: list[list[float]] = field(default_factory=list)


def _merge(intervals: list[list[float]], start: float, end: float) -> None:
    """Adds [start, end] to sorted disjoint intervals, merging overlaps."""
    intervals.append([start, end])
    intervals.sort()
    merged: list[list[float]] = []
    for s, e in intervals:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    intervals[:] = merged


class CostMeter:
    """Counts sandbox seconds and tokens into USD, and fires budget alerts.

    `attach()` subscribes it to every run and session of this process (also as a context
    manager); `add_tokens(model, usage)` counts a model response (the agent loop's events do
    it through `observe_agent_event`). `clock` is the monotonic clock (tests pass their own).
    """

    def __init__(
        self,
        rate_per_hour: float = DEFAULT_RATE_PER_HOUR,
        *,
        prices: Mapping[str, Price] = PRICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_hour < 0:
            raise InvalidSpec(f"rate_per_hour must be >= 0, got {rate_per_hour}")
        self.rate_per_hour = rate_per_hour
        self._prices = prices
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[int, _Session] = {}
        self._oneshot_seconds = 0.0
        self._usage: dict[str, Usage] = {}
        self._alerts: list[_Alert] = []
        self._webhook_pool: ThreadPoolExecutor | None = None
        self._webhook_futures: list[Future[None]] = []

    # ---- subscription ----------------------------------------------------------------------

    def attach(self) -> Self:
        """Starts counting every run and session of this process."""
        add_run_observer(self.observe_run)
        add_session_observer(self.observe_session)
        return self

    def detach(self) -> None:
        """Stops counting (what was counted stays)."""
        remove_run_observer(self.observe_run)
        remove_session_observer(self.observe_session)

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # ---- observations ----------------------------------------------------------------------

    def observe_run(self, record: RunRecord) -> None:
        """Counts a finished run (a RunRecord from the hooks)."""
        with self._lock:
            if record.session is None:
                self._oneshot_seconds += record.result.wall_time_s
            else:
                s = self._sessions.setdefault(record.session, _Session(opened=record.started))
                _merge(s.busy, record.started, record.ended)
        self._check_alerts()

    def observe_session(self, record: SessionRecord) -> None:
        """Follows a session's life (open, close, auto-pause, resume)."""
        with self._lock:
            s = self._sessions.setdefault(record.session, _Session(opened=record.at))
            if record.change == "close":
                self._end_pause(s, record.at)
                s.closed = record.at
            elif record.change == "auto_pause":
                s.paused_at = record.at
            elif record.change == "resume":
                self._end_pause(s, record.at)

    @staticmethod
    def _end_pause(s: _Session, at: float) -> None:
        if s.paused_at is not None:
            s.paused += at - s.paused_at
            s.paused_at = None

    def add_tokens(self, model: str, usage: Usage) -> None:
        """Counts the tokens of one model response."""
        with self._lock:
            self._usage[model] = self._usage.get(model, Usage()) + usage
        self._check_alerts()

    def observe_agent_event(self, event: object) -> None:
        """An agent `on_event` consumer: counts each model response's tokens."""
        from cellblock.agent.loop import ModelResponse

        if isinstance(event, ModelResponse):
            self.add_tokens(event.model, event.usage)

    # ---- alerts ----------------------------------------------------------------------------

    def alert_at(self, threshold_usd: float, action: AlertAction = "log") -> None:
        """Fires `action` once when the total cost first reaches `threshold_usd`."""
        if threshold_usd < 0:
            raise InvalidSpec(f"alert threshold must be >= 0, got {threshold_usd}")
        if isinstance(action, str) and action != "log" and not action.startswith(
            ("http://", "https://")
        ):
            raise InvalidSpec(f"alert action must be a callable, 'log' or a URL, got {action!r}")
        with self._lock:
            self._alerts.append(_Alert(threshold_usd, action))
        self._check_alerts()

    def _check_alerts(self) -> None:
        if not self._alerts:
            return
        report = self.report()
        with self._lock:
            due = [a for a in self._alerts if not a.fired and report.total_usd >= a.threshold_usd]
            for a in due:
                a.fired = True
        for a in due:
            self._fire(a, report)

    def _fire(self, alert: _Alert, report: CostReport) -> None:
        action = alert.action
        if isinstance(action, str) and action != "log":
            self._post_later(action, alert, report)
            return
        try:
            if callable(action):
                action(report)
            else:
                _log.warning("cost %.4f USD reached the alert threshold %.4f USD",
                             report.total_usd, alert.threshold_usd)
        except Exception:  # an alert that fails must not fail the run that crossed it
            _log.exception("cost alert at %.4f USD failed", alert.threshold_usd)

    def _post_later(self, url: str, alert: _Alert, report: CostReport) -> None:
        """Queues the webhook on the alert thread: a slow or dead endpoint never holds up the
        run whose observation crossed the threshold."""
        with self._lock:
            self._webhook_futures = [f for f in self._webhook_futures if not f.done()]
            if len(self._webhook_futures) >= MAX_PENDING_WEBHOOKS:
                _log.error("cost alert webhook at %.4f USD dropped: %d already waiting",
                           alert.threshold_usd, MAX_PENDING_WEBHOOKS)
                return
            if self._webhook_pool is None:
                self._webhook_pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="cellblock-alert")
            self._webhook_futures.append(self._webhook_pool.submit(_post, url, alert, report))

    def flush_alerts(self, timeout: float | None = None) -> bool:
        """Waits for the queued webhooks; True when none is left waiting."""
        with self._lock:
            futures = list(self._webhook_futures)
        _, pending = wait(futures, timeout=timeout)
        return not pending

    # ---- totals ----------------------------------------------------------------------------

    def report(self) -> CostReport:
        """The totals so far (open sessions counted up to now)."""
        now = self._clock()
        with self._lock:
            active = self._oneshot_seconds
            open_s = self._oneshot_seconds
            paused = 0.0
            for s in self._sessions.values():
                end = s.closed if s.closed is not None else now
                active += sum(e - b for b, e in s.busy)
                open_s += max(end - s.opened, 0.0)
                paused += s.paused + (end - s.paused_at if s.paused_at is not None else 0.0)
            models = {}
            for model, usage in self._usage.items():
                price = price_for(model, self._prices)
                models[model] = ModelCost(
                    usage=usage, usd=(price or UNKNOWN_PRICE).cost(usage), estimated=price is None
                )
        rate = self.rate_per_hour / 3600
        sandbox_usd = active * rate
        tokens_usd = sum(m.usd for m in models.values())
        return CostReport(
            rate_per_hour=self.rate_per_hour, active_seconds=active, open_seconds=open_s,
            paused_seconds=paused, sandbox_usd=sandbox_usd, models=models,
            tokens_usd=tokens_usd, total_usd=sandbox_usd + tokens_usd,
            idle_saving_usd=paused * rate,
        )


def _post(url: str, alert: _Alert, report: CostReport) -> None:
    """POSTs an alert to its webhook (on the alert thread)."""
    body = json.dumps({"threshold_usd": alert.threshold_usd,
                       "report": report.model_dump(mode="json")}).encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=WEBHOOK_TIMEOUT_S):
            pass
    except Exception:  # an alert that fails must not fail anything else
        _log.exception("cost alert webhook at %.4f USD failed", alert.threshold_usd)
