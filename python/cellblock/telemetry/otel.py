"""OpenTelemetry spans, security events and metrics of sandbox runs.

`Telemetry(...).attach()` turns every finished run (one-shot, session call, warm call) into a
`sandbox {kind}` span, a child of whatever span is current (an agent's `execute_tool` span when
the agent loop ran it), carrying the supervisor's report as attributes and each security
finding as a span event: `cellblock.security.seccomp` (a refused syscall), `.network` (a
refused connection), `.dns` (a refused name lookup), `.limit` (a limit kill or truncation) and
`.egress` (the egress the run was allowed). Refusals of credential placeholders come with
credential injection, which cellblock does not have yet. Strings are redacted before they are set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Self

from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from cellblock.observe import RunRecord, add_run_observer, remove_run_observer
from cellblock.result import RunResult, violation_kind

#: Reasons that mean a limit ended the run (the limit's name is the reason).
LIMIT_REASONS = frozenset({"timeout", "memory", "cpu_time", "output_limit", "seccomp"})

#: Prefix of every security event's name: `cellblock.security.<kind>`.
SECURITY_EVENT = "cellblock.security"

Redact = Callable[[str], str]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cellblock")
    except PackageNotFoundError:
        return "0"


def _scalar(value: Any, redact: Redact) -> Any:
    """An attribute value OpenTelemetry accepts; strings redacted, other types as text."""
    if isinstance(value, bool | int | float):
        return value
    return redact(value if isinstance(value, str) else str(value))


def epoch_ns(monotonic: float) -> int:
    """The wall-clock time in ns of a `time.monotonic()` reading."""
    return time.time_ns() - int((time.monotonic() - monotonic) * 1e9)


def limits_hit(result: RunResult) -> list[str]:
    """The limits a run reached: its reason when a limit ended it, and output truncation."""
    hit: list[str] = [result.reason] if result.reason in LIMIT_REASONS else []
    if (result.stdout_truncated or result.stderr_truncated) and "output_limit" not in hit:
        hit.append("output_limit")
    return hit


def security_events(result: RunResult) -> list[tuple[str, dict[str, Any]]]:
    """(name, attributes) of each security finding in a report, in report order."""
    events: list[tuple[str, dict[str, Any]]] = []
    for v in result.violations:
        kind = str(v.get("kind", "unknown"))
        attrs = {f"cellblock.violation.{k}": val for k, val in v.items() if k != "kind"}
        # A refused DNS answer is its own event (`.dns`), apart from refused connections.
        events.append((f"{SECURITY_EVENT}.{violation_kind(v)}", {
            "cellblock.violation.kind": kind, "cellblock.decision": "deny", **attrs}))
    for limit in limits_hit(result):
        if limit != "seccomp":  # a seccomp kill is already one of the violations
            events.append((f"{SECURITY_EVENT}.limit", {"cellblock.limit": limit,
                                                       "cellblock.decision": "kill"
                                                       if limit == result.reason else "truncate"}))
    net = result.network or {}
    if net.get("connections"):
        events.append((f"{SECURITY_EVENT}.egress", {
            "cellblock.decision": "allow",
            "cellblock.network.connections": net["connections"],
            "cellblock.network.bytes_out": net.get("bytes_out", 0),
            "cellblock.network.bytes_in": net.get("bytes_in", 0),
        }))
    return events


def run_attributes(record: RunRecord) -> dict[str, Any]:
    """The span attributes of one run's report."""
    r = record.result
    attrs: dict[str, Any] = {
        "cellblock.run.kind": record.kind,
        "cellblock.run.reason": r.reason,
        "cellblock.run.wall_time_s": r.wall_time_s,
        "cellblock.run.cpu_time_s": r.cpu_time_s,
        "cellblock.run.peak_memory_bytes": r.peak_memory_bytes,
        "cellblock.run.stdout_bytes": len(r.stdout_bytes),
        "cellblock.run.stderr_bytes": len(r.stderr_bytes),
        "cellblock.run.limits_hit": limits_hit(r),
        "cellblock.run.violations": len(r.violations),
    }
    if r.exit_code is not None:
        attrs["process.exit.code"] = r.exit_code
    if r.signal is not None:
        attrs["cellblock.run.signal"] = r.signal
    if r.seccomp_profile is not None:
        attrs["cellblock.seccomp.profile"] = r.seccomp_profile
    for limit, enforcer in r.enforcement.items():
        attrs[f"cellblock.enforcement.{limit}"] = enforcer or "none"
    for name, count in r.redactions.items():
        attrs[f"cellblock.redactions.{name}"] = count
    if r.network is not None:
        for k, v in r.network.items():
            attrs[f"cellblock.network.{k}"] = v
    return attrs


class Telemetry:
    """Spans and metrics of cellblock runs, on the given (or the global) OTel providers.

    `record_content` opts in to code and output on spans (always redacted with `redact`, which
    should be a `cellblock.Redactor(...).redact` of the secrets in play; identity by default).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        record_content: bool = False,
        redact: Redact | None = None,
    ) -> None:
        tp = tracer_provider or trace.get_tracer_provider()
        mp = meter_provider or metrics.get_meter_provider()
        self.tracer = tp.get_tracer("cellblock", _version())
        meter = mp.get_meter("cellblock", _version())
        self.record_content = record_content
        self.redact: Redact = redact or (lambda s: s)
        self.run_duration = meter.create_histogram(
            "cellblock.run.duration", unit="s", description="Wall time of sandbox runs")
        self.violations = meter.create_counter(
            "cellblock.violations", unit="{violation}", description="Security findings of runs")
        self.active_time = meter.create_counter(
            "cellblock.sandbox.active_time", unit="s",
            description="Seconds during which sandboxed code ran")
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Tokens used per model request")
        self.operation_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="Duration of model requests")
        self._owned: list[Any] = []

    def owns(self, *providers: Any) -> None:
        """Providers that `shutdown()` closes (those made for this Telemetry)."""
        self._owned.extend(providers)

    def shutdown(self) -> None:
        """Detaches, then flushes and closes the providers this Telemetry owns."""
        self.detach()
        for provider in self._owned:
            provider.shutdown()
        self._owned.clear()

    def attach(self) -> Self:
        """Records every run of this process from now on."""
        add_run_observer(self.on_run)
        return self

    def detach(self) -> None:
        """Stops recording runs."""
        remove_run_observer(self.on_run)

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def on_run(self, record: RunRecord) -> None:
        """Records one finished run: a span (child of the current span), events, metrics."""
        r = record.result
        span = self.tracer.start_span(
            f"sandbox {record.kind}", kind=SpanKind.INTERNAL,
            start_time=epoch_ns(record.started),
            attributes=self._clean(run_attributes(record)),
        )
        for name, attrs in security_events(r):
            span.add_event(name, self._clean(attrs), timestamp=epoch_ns(record.ended))
            if name != f"{SECURITY_EVENT}.egress":
                self.violations.add(1, {"cellblock.event": name,
                                        "cellblock.run.kind": record.kind})
        if self.record_content:
            span.set_attribute("cellblock.run.stdout", self.redact(r.stdout))
            span.set_attribute("cellblock.run.stderr", self.redact(r.stderr))
        if r.reason != "exited":
            span.set_attribute("error.type", r.reason)
            span.set_status(Status(StatusCode.ERROR, r.reason))
        span.end(end_time=epoch_ns(record.ended))
        labels = {"cellblock.run.kind": record.kind, "cellblock.run.reason": r.reason}
        self.run_duration.record(r.wall_time_s, labels)
        self.active_time.add(r.wall_time_s, {"cellblock.run.kind": record.kind})

    def _clean(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in attrs.items():
            if isinstance(v, list | tuple):
                out[k] = [_scalar(x, self.redact) for x in v]
            else:
                out[k] = _scalar(v, self.redact)
        return out
