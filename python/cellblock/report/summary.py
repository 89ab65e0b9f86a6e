"""What `cellblock report` shows: a summary of batch results, eval results, an agent run or a
trace, computed from the files cellblock writes (`batch --out`, `eval --out`, `agent --json`,
`agent --trace`)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cellblock.errors import InvalidSpec
from cellblock.telemetry.cost import DEFAULT_RATE_PER_HOUR


class Bar(BaseModel):
    """One bar of a chart."""

    model_config = ConfigDict(frozen=True)

    label: str
    value: float


class Chart(BaseModel):
    """A bar chart: a title, the unit of its values, its bars in order."""

    model_config = ConfigDict(frozen=True)

    title: str
    unit: str
    bars: list[Bar]


class Summary(BaseModel):
    """A report: headline figures and charts."""

    model_config = ConfigDict(frozen=True)

    title: str
    kind: str
    stats: list[tuple[str, str]]
    charts: list[Chart]


#: Bars kept in a chart of items (the slowest first).
MAX_BARS = 20


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"cannot read {path}: {e}") from None
    try:
        doc = json.loads(text)
        records = doc if isinstance(doc, list) else [doc]
    except ValueError:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise InvalidSpec(f"{path}:{n}: not JSON") from None
    if not records or not all(isinstance(r, dict) for r in records):
        raise InvalidSpec(f"{path}: no JSON objects to report on")
    return records


def summarize(path: str | Path, rate_per_hour: float = DEFAULT_RATE_PER_HOUR) -> Summary:
    """Reads a results, agent or trace file and summarizes it (the kind is detected)."""
    p = Path(path)
    records = _load(p)
    first = records[0]
    if "context" in first and "name" in first:
        return _trace(p.name, records)
    if "stop_reason" in first and "tool_calls" in first:
        return _agent(p.name, first, rate_per_hour)
    if "task_id" in first and "passed" in first:
        return _eval(p.name, records)
    if "id" in first:
        return _runs(p.name, records, rate_per_hour)
    raise InvalidSpec(f"{p}: not a cellblock results, agent or trace file")


def _time_chart(title: str, items: list[tuple[str, float]]) -> Chart:
    top = sorted(items, key=lambda x: -x[1])[:MAX_BARS]
    return Chart(title=title, unit="s", bars=[Bar(label=k, value=v) for k, v in top])


def _count_chart(title: str, counts: Counter[str], unit: str = "") -> Chart:
    return Chart(title=title, unit=unit,
                 bars=[Bar(label=k, value=float(v)) for k, v in counts.most_common()])


def _runs(name: str, records: list[dict[str, Any]], rate: float) -> Summary:
    runs = [r for r in records if "reason" in r]
    errors = [r for r in records if "error" in r]
    reasons: Counter[str] = Counter(
        f"exit {r.get('exit_code')}" if r["reason"] == "exited" else str(r["reason"])
        for r in runs)
    reasons.update(f"error: {r['error'].get('kind', '?')}" for r in errors)
    ok = sum(1 for r in runs if r["reason"] == "exited" and r.get("exit_code") == 0)
    times = [float(r.get("wall_time_s", 0.0)) for r in runs]
    violations: Counter[str] = Counter(
        str(v.get("kind", "?")) for r in runs for v in r.get("violations", []))
    active = sum(times)
    peak = max((int(r.get("peak_memory_bytes", 0)) for r in runs), default=0)
    stats = [
        ("jobs", str(len(records))), ("passed (exit 0)", f"{ok} ({_pct(ok, len(records))})"),
        ("failed to start", str(len(errors))),
        ("sandbox seconds", f"{active:.2f}"),
        ("median / max time", f"{statistics.median(times):.3f} s / {max(times):.3f} s"
         if times else "-"),
        ("peak memory (max)", f"{peak / 2**20:.1f} MiB"),
        ("violations", str(sum(violations.values()))),
        ("cost", f"${active * rate / 3600:.6f} at ${rate}/h"),
    ]
    charts = [
        _count_chart("Outcomes", reasons, "jobs"),
        _time_chart("Slowest jobs", [(str(r["id"]), float(r.get("wall_time_s", 0.0)))
                                     for r in runs]),
    ]
    if violations:
        charts.append(_count_chart("Violations by kind", violations))
    return Summary(title=f"Batch {name}", kind="batch", stats=stats, charts=charts)


def _eval(name: str, records: list[dict[str, Any]]) -> Summary:
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(str(r["task_id"]), []).append(bool(r["passed"]))
    passed = sum(1 for r in records if r["passed"])
    outcomes: Counter[str] = Counter(str(r.get("result", "passed" if r["passed"] else "failed"))
                                     .split(":")[0] for r in records)
    rates = [(t, 100 * sum(v) / len(v)) for t, v in by_task.items()]
    stats = [("samples", str(len(records))), ("tasks", str(len(by_task))),
             ("passed", f"{passed} ({_pct(passed, len(records))})"),
             ("tasks with a passing sample", str(sum(1 for v in by_task.values() if any(v))))]
    charts = [_count_chart("Outcomes", outcomes, "samples"),
              Chart(title="Pass rate of the hardest tasks", unit="%",
                    bars=[Bar(label=t, value=v) for t, v in sorted(rates, key=lambda x: x[1])
                          [:MAX_BARS]])]
    return Summary(title=f"Evaluation {name}", kind="eval", stats=stats, charts=charts)


def _agent(name: str, r: dict[str, Any], rate: float) -> Summary:
    calls = r.get("tool_calls", [])
    usage = r.get("usage", {})
    sandbox_s = float(r.get("sandbox_seconds", 0.0))
    sandbox_usd = sandbox_s * rate / 3600
    tokens_usd = float(r.get("cost_usd", 0.0))
    paused_s = float(r.get("paused_seconds", 0.0))
    violations: Counter[str] = Counter()
    for c in calls:
        violations.update({str(k): int(v) for k, v in (c.get("violations") or {}).items()})
    stats = [
        ("stop reason", str(r.get("stop_reason"))), ("model", str(r.get("model"))),
        ("turns", str(r.get("turns"))), ("tool calls", str(len(calls))),
        ("failed tool calls", str(sum(1 for c in calls if c.get("is_error")))),
        ("tokens in / out", f"{usage.get('input_tokens', 0)} / {usage.get('output_tokens', 0)}"),
        ("cache read / write", f"{usage.get('cache_read_input_tokens', 0)} / "
                               f"{usage.get('cache_creation_input_tokens', 0)}"),
        ("wall time", f"{float(r.get('wall_time_s', 0.0)):.2f} s"),
        ("violations", str(sum(violations.values()))),
        ("cost", f"${tokens_usd + sandbox_usd:.6f} (tokens ${tokens_usd:.6f}, "
                 f"sandbox ${sandbox_usd:.6f})"),
        ("auto-paused", f"{paused_s:.2f} s (idle saving ${paused_s * rate / 3600:.6f})"),
    ]
    charts = [
        _time_chart("Tool calls", [(f"{c.get('turn')}. {c.get('name')}",
                                    float(c.get("duration_s", 0.0))) for c in calls]),
        _count_chart("Tool outcomes", Counter(str(c.get("reason")) for c in calls), "calls"),
        Chart(title="Cost", unit="USD", bars=[Bar(label="tokens", value=tokens_usd),
                                              Bar(label="sandbox", value=sandbox_usd),
                                              Bar(label="idle saving (auto-pause)",
                                                  value=paused_s * rate / 3600)]),
        _count_chart("Violations by kind", violations),
    ]
    return Summary(title=f"Agent run {name}", kind="agent", stats=stats, charts=charts)


def _duration(span: dict[str, Any]) -> float:
    from datetime import datetime

    try:
        start = datetime.fromisoformat(str(span["start_time"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(span["end_time"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return 0.0
    return (end - start).total_seconds()


def _trace(name: str, spans: list[dict[str, Any]]) -> Summary:
    events: Counter[str] = Counter(
        str(e.get("name", "?")).removeprefix("cellblock.security.")
        for s in spans for e in s.get("events", [])
        if str(e.get("name", "")).startswith("cellblock.security."))
    kinds: Counter[str] = Counter(str(s["name"]).split(" ")[0] for s in spans)
    attrs = [s.get("attributes", {}) for s in spans]
    tokens_in = sum(int(a.get("gen_ai.usage.input_tokens", 0)) for a in attrs
                    if a.get("gen_ai.operation.name") == "chat")
    tokens_out = sum(int(a.get("gen_ai.usage.output_tokens", 0)) for a in attrs
                     if a.get("gen_ai.operation.name") == "chat")
    agents = [a for a in attrs if a.get("gen_ai.operation.name") == "invoke_agent"]
    cost = sum(float(a.get("cellblock.cost.usd", 0.0)) for a in agents)
    paused = sum(float(a.get("cellblock.agent.paused_seconds", 0.0)) for a in agents)
    saving = sum(float(a.get("cellblock.cost.idle_saving_usd", 0.0)) for a in agents)
    errors = sum(1 for s in spans if s.get("status", {}).get("status_code") == "ERROR")
    stats = [("spans", str(len(spans))), ("traces", str(len({s["context"]["trace_id"]
                                                               for s in spans}))),
             ("agent runs", str(len(agents))), ("tokens in / out", f"{tokens_in} / {tokens_out}"),
             ("model cost", f"${cost:.6f}"),
             ("auto-paused", f"{paused:.2f} s (idle saving ${saving:.6f})"),
             ("spans with errors", str(errors)),
             ("security events", str(sum(events.values())))]
    charts = [
        _count_chart("Spans by operation", kinds, "spans"),
        _time_chart("Slowest spans", [(str(s["name"]), _duration(s)) for s in spans]),
    ]
    if events:
        charts.append(_count_chart("Security events", events, "events"))
    return Summary(title=f"Trace {name}", kind="trace", stats=stats, charts=charts)
