"""Observability: spans (GenAI conventions) with security events, metrics, the cost meter and
idle auto-pause, through the public API, as root and as uid 65534."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from fake_anthropic import FakeAnthropic, message, text, tool_use
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import cellblock
from cellblock.agent import Agent, Usage
from cellblock.errors import InvalidSpec, SetupError
from cellblock.observe import RunRecord, SessionRecord
from cellblock.telemetry import CostMeter, Telemetry
from conftest import IS_ROOT, SETPRIV, WORKER_DEADLINE, own_cellblock_cgroups, share_tree

SECRET = "sk-trace-5b4a39281706fedcba98"
#: A refused syscall (unshare of a user namespace) and a refused DNS name, in one run.
REFUSED = ("import ctypes, socket\n"
           "ctypes.CDLL(None).unshare(0x10000000)\n"
           "try:\n    socket.getaddrinfo('blocked.example.test', 443)\n"
           "except OSError:\n    pass\n")
ALLOW = ["127.0.0.1:9"]


@pytest.fixture
def otel() -> Iterator[tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    tel = Telemetry(tp, mp, redact=cellblock.Redactor({"KEY": SECRET}).redact).attach()
    yield tel, spans, reader
    tel.detach()
    tp.shutdown()
    mp.shutdown()


def tree(spans: tuple[ReadableSpan, ...]) -> list[Any]:
    """[(name, [children...]), ...] of the roots, children in start order."""
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    for s in spans:
        by_parent.setdefault(s.parent.span_id if s.parent else None, []).append(s)

    def build(parent: int | None) -> list[Any]:
        kids = sorted(by_parent.get(parent, []), key=lambda s: s.start_time or 0)
        return [(s.name, build(s.context.span_id)) for s in kids]  # type: ignore[union-attr]

    return build(None)


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


# ---- agent span tree ---------------------------------------------------------------------------

def test_agent_run_is_one_span_tree_with_genai_attributes_and_security_events(
    otel: tuple[Telemetry, InMemorySpanExporter, InMemoryMetricReader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tel, exporter, reader = otel
    script = [
        message(tool_use("run_shell", {"command": f"echo {SECRET}; unshare -U true"}),
                usage={"input_tokens": 100, "output_tokens": 20,
                       "cache_read_input_tokens": 7}),
        message(tool_use("run_python", {"code": "print(6 * 7)"})),
        message(text("done")),
    ]
    with FakeAnthropic(script) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        result = Agent(max_turns=5, telemetry=tel, name="tracer-test",
                       secrets={"KEY": SECRET}).run("go")
    assert result.stop_reason == "end_turn"
    spans = exporter.get_finished_spans()
    assert tree(spans) == [("invoke_agent tracer-test", [
        ("chat claude-sonnet-4-6", []),
        ("execute_tool run_shell", [("sandbox session.run", [])]),
        ("chat claude-sonnet-4-6", []),
        ("execute_tool run_python", [("sandbox session.python", [])]),
        ("chat claude-sonnet-4-6", []),
    ])]
    root = named(spans, "invoke_agent tracer-test")[0]
    assert root.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["gen_ai.agent.name"] == "tracer-test"
    assert root.attributes["gen_ai.provider.name"] == "anthropic"
    assert root.attributes["cellblock.agent.stop_reason"] == "end_turn"
    assert root.attributes["cellblock.agent.tool_calls"] == 2
    assert root.attributes["gen_ai.usage.input_tokens"] == 120
    chat = named(spans, "chat claude-sonnet-4-6")[0]
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.request.model"] == "claude-sonnet-4-6"
    assert chat.attributes["gen_ai.usage.input_tokens"] == 100
    assert chat.attributes["gen_ai.usage.output_tokens"] == 20
    assert chat.attributes["gen_ai.usage.cache_read.input_tokens"] == 7
    assert chat.attributes["gen_ai.response.finish_reasons"] == ("tool_use",)
    tool = named(spans, "execute_tool run_shell")[0]
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.name"] == "run_shell"
    assert tool.attributes["gen_ai.tool.call.id"] == result.tool_calls[0].id
    run = named(spans, "sandbox session.run")[0]
    assert run.attributes is not None
    assert run.attributes["cellblock.run.reason"] == "exited"
    assert run.attributes["cellblock.run.violations"] == 1
    assert run.attributes["cellblock.redactions.KEY"] == 1
    events = [(e.name, dict(e.attributes or {})) for e in run.events]
    assert events == [("cellblock.security.seccomp", {
        "cellblock.violation.kind": "seccomp", "cellblock.decision": "deny",
        "cellblock.violation.syscall": "unshare", "cellblock.violation.count": 1})]
    # Content is opt-in: no code, arguments or output on any span by default.
    content = {"gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.output.messages",
               "cellblock.run.stdout", "cellblock.run.stderr"}
    for s in spans:
        assert not content & set(s.attributes or {}), s.name
    metrics = {m.name: m for rm in reader.get_metrics_data().resource_metrics  # type: ignore[union-attr]
               for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "cellblock.run.duration", "cellblock.violations",
            "cellblock.sandbox.active_time"} <= set(metrics)
    violations = metrics["cellblock.violations"].data.data_points  # type: ignore[union-attr]
    assert sum(p.value for p in violations) == 1  # type: ignore[union-attr]


def test_recorded_content_is_opt_in_and_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    tel = Telemetry(tp, record_content=True,
                    redact=cellblock.Redactor({"KEY": SECRET}).redact).attach()
    try:
        script = [message(tool_use("run_shell", {"command": f"echo {SECRET}"})),
                  message(text("ok"))]
        with FakeAnthropic(script) as server:
            monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
            monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
            Agent(max_turns=3, telemetry=tel, secrets={"KEY": SECRET}).run("go")
    finally:
        tel.detach()
        tp.shutdown()
    dump = json.dumps([dict(s.attributes or {}) for s in exporter.get_finished_spans()])
    assert "gen_ai.tool.call.arguments" in dump and "cellblock.run.stdout" in dump
    assert "[REDACTED:KEY]" in dump
    assert SECRET not in dump


# ---- run spans, as root and as uid 65534 --------------------------------------------------------

#: Runs the refused payload and a memory kill with Telemetry attached; prints the spans.
SPANS_SCRIPT = textwrap.dedent(f"""\
    import json, sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import cellblock
    from cellblock.telemetry import Telemetry
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    Telemetry(tp).attach()
    cellblock.run(["python3", "-c", {REFUSED!r}], allow_net={ALLOW!r}, timeout=30)
    cellblock.run(["python3", "-c", "x = bytearray(256 << 20); x[::4096] = b'1' * len(x[::4096])"],
                  memory="64M", timeout=30)
    with cellblock.Sandbox(timeout=30) as sb:
        sb.run(["sleep", "5"], timeout=0.5)
    print(json.dumps([{{"name": s.name, "attributes": dict(s.attributes),
                        "events": [(e.name, dict(e.attributes)) for e in s.events]}}
                      for s in exporter.get_finished_spans()]))
""")


def _site_closure(modules: list[str]) -> list[Path]:
    """The top-level entries of site-packages that importing `modules` loads."""
    code = ("import json, sys, sysconfig\n" + "".join(f"import {m}\n" for m in modules) +
            "site = sysconfig.get_paths()['purelib']\n"
            "print(json.dumps(sorted({f[len(site) + 1:].split('/')[0] for m in "
            "list(sys.modules.values()) if (f := getattr(m, '__file__', None) or '')"
            ".startswith(site + '/')})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    meta = [p for p in site.glob("opentelemetry*.dist-info")]
    return [site / n for n in json.loads(out.stdout) if n != "cellblock"] + meta


def spans_of_runs(caller: str, nobody_dir: Path | None, script: str = SPANS_SCRIPT,
                  args: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    if caller == "root":
        res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                             text=True, timeout=WORKER_DEADLINE, check=False)
    else:
        assert nobody_dir is not None
        for src in _site_closure(["opentelemetry.sdk.trace",
                                  "opentelemetry.sdk.trace.export.in_memory_span_exporter"]):
            if not (nobody_dir / src.name).exists():
                share_tree(src, nobody_dir / src.name)
        res = subprocess.run(
            [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
             f"TMPDIR={nobody_dir / 'tmp'}", "/usr/bin/python3", "-c", script, *args],
            capture_output=True, text=True, timeout=WORKER_DEADLINE, check=False, cwd="/")
    assert res.returncode == 0, res.stderr[-3000:]
    spans: list[dict[str, Any]] = json.loads(res.stdout)
    return spans


@pytest.mark.parametrize("caller", ["root", "nobody"])
def test_every_run_is_a_span_with_its_security_events(caller: str, request: pytest.FixtureRequest
                                                      ) -> None:
    nobody_dir = request.getfixturevalue("nobody_dir") if caller == "nobody" else None
    refused, oom, timed_out = spans_of_runs(caller, nobody_dir)
    assert refused["name"] == "sandbox run" and timed_out["name"] == "sandbox session.run"
    kinds = [(name, a.get("cellblock.violation.kind"), a.get("cellblock.violation.syscall"),
              a.get("cellblock.violation.host")) for name, a in refused["events"]]
    assert ("cellblock.security.seccomp", "seccomp", "unshare", None) in kinds
    assert ("cellblock.security.dns", "network", None, "blocked.example.test") in kinds
    assert refused["attributes"]["cellblock.run.reason"] == "exited"
    # The memory kill: root has a cgroup (reason memory); uid 65534 has RLIMIT_DATA, under which
    # the allocation fails inside (MemoryError, exit 1) and the report says rlimit enforced it.
    if caller == "root":
        assert oom["attributes"]["cellblock.run.reason"] == "memory"
        assert ("cellblock.security.limit", {"cellblock.limit": "memory",
                                             "cellblock.decision": "kill"}) in [
            (n, a) for n, a in oom["events"]]
    else:
        assert oom["attributes"]["cellblock.enforcement.memory"] == "rlimit"
        assert oom["attributes"]["cellblock.run.reason"] in ("exited", "memory")
    assert timed_out["attributes"]["cellblock.run.reason"] == "timeout"
    assert timed_out["attributes"]["cellblock.run.limits_hit"] == ["timeout"]
    assert [n for n, _ in timed_out["events"]] == ["cellblock.security.limit"]


#: One run per security event kind, against the loopback server on port argv[1] (allowed):
#: egress allowed (a GET the server answers), a refused connection (to port 9, through the
#: egress proxy), a refused DNS
#: answer, a refused syscall; then a limit kill. Prints the spans as JSON.
EVENTS_SCRIPT = textwrap.dedent("""\
    import json, sys
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    import cellblock
    from cellblock.telemetry import Telemetry
    port = int(sys.argv[1])
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    Telemetry(tp).attach()
    code = (
        "import ctypes, socket, urllib.request\\n"
        f"print(urllib.request.urlopen('http://127.0.0.1:{port}/allowed', timeout=20).read())\\n"
        # Through the egress proxy (NO_PROXY lists 127.0.0.1): a connection to port 9.
        "import os\\nos.environ.pop('NO_PROXY', None)\\nos.environ.pop('no_proxy', None)\\n"
        "try:\\n    urllib.request.urlopen('http://127.0.0.1:9/denied', timeout=20)\\n"
        "except OSError as e:\\n    print('refused', e)\\n"
        "try:\\n    socket.getaddrinfo('denied.example.test', 443)\\n"
        "except OSError as e:\\n    print('no answer', e)\\n"
        "ctypes.CDLL(None).unshare(0x10000000)\\n")
    res = cellblock.run(["python3", "-c", code], allow_net=[f"127.0.0.1:{port}"], timeout=60)
    assert res.reason == "exited", (res.reason, res.stderr)
    cellblock.run(["sleep", "5"], timeout=0.5)
    print(json.dumps([{"name": s.name, "attributes": dict(s.attributes),
                       "events": [(e.name, dict(e.attributes)) for e in s.events]}
                      for s in exporter.get_finished_spans()]))
""")


class _Served(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Served.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("caller", ["root", "nobody"])
def test_each_security_event_kind_against_a_loopback_server(
        caller: str, request: pytest.FixtureRequest) -> None:
    """Every kind of security event the supervisor reports, each provoked by an attempt: egress
    allowed (the test's server answers), a connection refused, a DNS answer refused (its own
    event name), a syscall refused, a limit kill."""
    nobody_dir = request.getfixturevalue("nobody_dir") if caller == "nobody" else None
    server = HTTPServer(("127.0.0.1", 0), _Served)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Served.paths.clear()
    try:
        attempts, killed = spans_of_runs(caller, nobody_dir, EVENTS_SCRIPT,
                                         (str(server.server_port),))
    finally:
        server.shutdown()
        server.server_close()
    assert _Served.paths == ["/allowed"]  # the allowed egress really reached the host
    events = {name: a for name, a in attempts["events"]}
    assert set(events) == {"cellblock.security.egress", "cellblock.security.network",
                           "cellblock.security.dns", "cellblock.security.seccomp"}, events
    egress = events["cellblock.security.egress"]
    assert egress["cellblock.decision"] == "allow"
    assert egress["cellblock.network.connections"] >= 1
    assert egress["cellblock.network.bytes_in"] >= len(b"hello")
    connect = events["cellblock.security.network"]
    assert (connect["cellblock.decision"], connect["cellblock.violation.host"],
            connect["cellblock.violation.port"]) == ("deny", "127.0.0.1", 9)
    dns = events["cellblock.security.dns"]
    assert (dns["cellblock.decision"], dns["cellblock.violation.host"],
            dns["cellblock.violation.port"]) == ("deny", "denied.example.test", 0)
    seccomp = events["cellblock.security.seccomp"]
    assert (seccomp["cellblock.decision"], seccomp["cellblock.violation.syscall"]) == (
        "deny", "unshare")
    assert attempts["attributes"]["cellblock.run.violations"] == 3
    assert killed["events"] == [["cellblock.security.limit", {
        "cellblock.limit": "timeout", "cellblock.decision": "kill"}]]


# ---- the cost meter -------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(result: cellblock.RunResult, session: int | None, ended: float) -> RunRecord:
    return RunRecord("session.run" if session else "run", result, session, ended)


def result_of(wall: float) -> cellblock.RunResult:
    return cellblock.RunResult(
        exit_code=0, signal=None, reason="exited", stdout_bytes=b"", stderr_bytes=b"",
        stdout_truncated=False, stderr_truncated=False, wall_time_s=wall, cpu_time_s=0.0,
        peak_memory_bytes=0, violations=[], enforcement={})


def test_meter_bills_only_active_time_of_a_scripted_session_with_idle_gaps() -> None:
    clock = FakeClock()
    meter = CostMeter(rate_per_hour=3.6, clock=clock)  # $0.001 a second: easy numbers
    meter.observe_session(SessionRecord("open", 1, 1000.0))
    meter.observe_run(record(result_of(2.0), 1, 1002.0))      # [1000, 1002]
    meter.observe_run(record(result_of(1.0), 1, 1001.5))      # overlaps: counted once
    meter.observe_session(SessionRecord("auto_pause", 1, 1010.0))
    meter.observe_session(SessionRecord("resume", 1, 1070.0))  # 60 s frozen
    meter.observe_run(record(result_of(3.0), 1, 1073.0))      # [1070, 1073]
    meter.observe_run(record(result_of(0.5), None, 1080.0))   # a one-shot run
    meter.observe_session(SessionRecord("close", 1, 1100.0))
    clock.now = 5000.0  # time after close is not counted
    meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=1_000_000))
    meter.add_tokens("claude-haiku-4-5", Usage(output_tokens=1_000_000,
                                                cache_read_input_tokens=1_000_000))
    r = meter.report()
    assert r.active_seconds == pytest.approx(5.5)
    assert r.open_seconds == pytest.approx(100.5)
    assert r.paused_seconds == pytest.approx(60.0)
    assert r.sandbox_usd == pytest.approx(0.0055)
    # The saving is the time actually frozen (60 s), not all the unbilled idle time.
    assert r.idle_saving_usd == pytest.approx(0.06)
    from cellblock.agent.pricing import price_for

    sonnet, haiku = price_for("claude-sonnet-4-6"), price_for("claude-haiku-4-5")
    assert sonnet is not None and haiku is not None
    assert r.models["claude-sonnet-4-6"].usd == pytest.approx(sonnet.input)
    assert r.models["claude-haiku-4-5"].usd == pytest.approx(haiku.output + haiku.cache_read)
    assert r.total_usd == pytest.approx(0.0055 + sonnet.input + haiku.output + haiku.cache_read)


class _Hook(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        n = int(self.headers["Content-Length"])
        _Hook.bodies.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_budget_alerts_fire_once_by_callback_and_webhook() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen: list[float] = []
        meter = CostMeter(clock=FakeClock())
        meter.alert_at(0.5, lambda rep: seen.append(rep.total_usd))
        meter.alert_at(0.5, f"http://127.0.0.1:{server.server_port}/hook")
        meter.alert_at(100.0, lambda rep: seen.append(-1.0))
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # $0.30: not yet
        assert seen == [] and _Hook.bodies == []
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # $0.60
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # no second alert
        assert seen == [pytest.approx(0.6)]
        assert meter.flush_alerts(timeout=30)
        assert len(_Hook.bodies) == 1 and _Hook.bodies[0]["threshold_usd"] == 0.5
        with pytest.raises(InvalidSpec):
            meter.alert_at(1.0, "mailto:someone")
    finally:
        server.shutdown()
        server.server_close()


class _SlowHook(BaseHTTPRequestHandler):
    """Holds each POST until `release` is set (at most 3 s, less than the webhook's timeout),
    then answers and sets `answered`."""

    received = threading.Event()
    release = threading.Event()
    answered = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        _SlowHook.received.set()
        _SlowHook.release.wait(3)
        self.send_response(204)
        self.end_headers()
        _SlowHook.answered.set()

    def log_message(self, *args: object) -> None:
        pass


def test_budget_webhook_fires_off_the_runs_thread() -> None:
    """The observation that crosses the threshold returns while the webhook is still waiting
    for its answer (on the run's thread it could only return after the answer)."""
    for event in (_SlowHook.received, _SlowHook.release, _SlowHook.answered):
        event.clear()
    server = HTTPServer(("127.0.0.1", 0), _SlowHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        meter = CostMeter(clock=FakeClock())
        meter.alert_at(0.1, f"http://127.0.0.1:{server.server_port}/slow")
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # $0.30
        assert not _SlowHook.answered.is_set()
        assert _SlowHook.received.wait(30)  # it was sent, from the alert thread
        _SlowHook.release.set()
        assert meter.flush_alerts(timeout=30) and _SlowHook.answered.is_set()
    finally:
        _SlowHook.release.set()
        server.shutdown()
        server.server_close()


def test_budget_webhook_queue_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    from cellblock.telemetry.cost import MAX_PENDING_WEBHOOKS

    server = HTTPServer(("127.0.0.1", 0), _SlowHook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SlowHook.release.clear()
    try:
        meter = CostMeter(clock=FakeClock())
        for i in range(MAX_PENDING_WEBHOOKS + 3):
            meter.alert_at(0.01 * i, f"http://127.0.0.1:{server.server_port}/{i}")
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=1_000_000))
        dropped = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert len(dropped) >= 3  # the first blocks the thread; at most 16 wait behind it
        _SlowHook.release.set()
        assert meter.flush_alerts(timeout=120)
    finally:
        _SlowHook.release.set()
        server.shutdown()
        server.server_close()


def test_budget_log_alert(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    meter = CostMeter(clock=FakeClock())
    meter.alert_at(0.5)  # "log" is the default action
    with caplog.at_level(logging.WARNING, logger="cellblock.cost"):
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # $0.30
        assert caplog.records == []
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # $0.60
        meter.add_tokens("claude-sonnet-4-6", Usage(input_tokens=100_000))  # once only
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("cellblock.cost", "WARNING",
         "cost 0.6000 USD reached the alert threshold 0.5000 USD")]


def test_meter_follows_real_runs_and_sessions() -> None:
    with CostMeter() as meter:
        cellblock.run(["true"])
        with cellblock.Sandbox() as sb:
            sb.run_shell("sleep 0.2")
            time.sleep(0.3)
    r = meter.report()
    assert 0.2 <= r.active_seconds < r.open_seconds
    assert r.paused_seconds == 0 and r.idle_saving_usd == 0  # idle, but never frozen


# ---- idle auto-pause ------------------------------------------------------------------------

def freezer_states(cgroups: list[str]) -> list[str]:
    """FROZEN/THAWED of each freezer cgroup among `cgroups` (v1 freezer.state, v2 cgroup.freeze)."""
    states = []
    for path in cgroups:
        v1, v2 = Path(path, "freezer.state"), Path(path, "cgroup.freeze")
        if v1.exists():
            states.append(v1.read_text().strip())
        elif v2.exists():
            states.append("FROZEN" if v2.read_text().strip() == "1" else "THAWED")
    return states


@pytest.mark.skipif(not IS_ROOT, reason="the freezer needs root (covered by the nobody test)")
def test_idle_session_is_frozen_and_thawed_by_the_next_call() -> None:
    before = set(own_cellblock_cgroups())
    with cellblock.Sandbox(auto_pause=0.3) as sb:
        # A warm interpreter keeps a process in the session's cgroup between calls.
        assert sb.run_python("x = 1", stateful=True).reason == "exited"
        mine = sorted(set(own_cellblock_cgroups()) - before)
        assert freezer_states(mine) == ["THAWED"]
        deadline = time.monotonic() + 10
        while freezer_states(mine) != ["FROZEN"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert freezer_states(mine) == ["FROZEN"]
        time.sleep(0.3)
        paused = sb.paused_seconds
        assert paused >= 0.3
        res = sb.run_python("x + 1", stateful=True)  # thawed first; the kernel kept its state
        assert res.reason == "exited" and res.value == "2"
        assert sb.paused_seconds == pytest.approx(paused, abs=0.25)
        assert freezer_states(mine) == ["THAWED"]
    assert set(own_cellblock_cgroups()) == before


def test_auto_pause_needs_a_freezer_and_says_so(request: pytest.FixtureRequest) -> None:
    with pytest.raises(InvalidSpec):
        cellblock.Sandbox(auto_pause=0)
    if IS_ROOT:
        nobody_dir = request.getfixturevalue("nobody_dir")
        code = ("import cellblock\n"
                "try:\n    cellblock.Sandbox(auto_pause=1)\n"
                "except cellblock.SetupError as e:\n    print('SetupError', e)\n")
        res = subprocess.run(
            [*SETPRIV, "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={nobody_dir}",
             "/usr/bin/python3", "-c", code], capture_output=True, text=True, check=False,
            timeout=WORKER_DEADLINE, cwd="/")
        assert res.stdout.startswith("SetupError auto_pause:"), res.stdout + res.stderr
    else:
        with pytest.raises(SetupError):
            cellblock.Sandbox(auto_pause=1)


def test_a_failing_observer_never_fails_the_run(caplog: pytest.LogCaptureFixture) -> None:
    from cellblock.observe import add_run_observer, remove_run_observer

    def broken(record: RunRecord) -> None:
        raise RuntimeError("exporter down")

    add_run_observer(broken)
    try:
        assert cellblock.run(["true"]).ok
    finally:
        remove_run_observer(broken)
    assert "exporter down" in caplog.text


# ---- exporters --------------------------------------------------------------------------------

class _Collector(BaseHTTPRequestHandler):
    """A local stand-in of an OTLP/HTTP collector's endpoints: keeps what it is sent."""

    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        n = int(self.headers["Content-Length"])
        _Collector.received.append((self.path, self.rfile.read(n)))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_exporter_sends_the_spans_to_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from cellblock.telemetry import configure

    server = HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        tel = configure("otlp", service_name="cellblock-test")
        try:
            cellblock.run(["sh", "-c", "exit 3"])
        finally:
            tel.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    traces = [body for path, body in _Collector.received if path == "/v1/traces"]
    assert traces, [p for p, _ in _Collector.received]
    req = ExportTraceServiceRequest.FromString(traces[0])
    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for s in spans] == ["sandbox run"]
    attrs = {a.key: a.value for a in spans[0].attributes}
    assert attrs["process.exit.code"].int_value == 3
    assert any(path == "/v1/metrics" for path, _ in _Collector.received)


def test_cli_agent_trace_file_feeds_the_report(tmp_path: Path) -> None:
    from cellblock.agent import DEMO_TASKS

    trace = tmp_path / "trace.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    res = subprocess.run([sys.executable, "-m", "cellblock.cli", "agent", "--model", "offline",
                          "--json", "--trace", str(trace), DEMO_TASKS[0].task],
                         capture_output=True, text=True, check=False, timeout=WORKER_DEADLINE,
                         env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    spans = [json.loads(line) for line in trace.read_text().splitlines()]
    names = [s["name"] for s in spans]
    assert names[-1] == "invoke_agent cellblock" and "chat offline" in names
    assert any(n.startswith("execute_tool ") for n in names)
    assert any(n.startswith("sandbox ") for n in names)
    rep = subprocess.run([sys.executable, "-m", "cellblock.cli", "report", str(trace)],
                         capture_output=True, text=True, check=False)
    assert rep.returncode == 0 and rep.stdout.startswith("Trace trace.jsonl"), rep.stderr


@pytest.mark.skipif(not IS_ROOT, reason="the freezer needs root (covered by the nobody test)")
def test_agent_auto_pause_saving_in_its_json_and_the_report(tmp_path: Path) -> None:
    """`cellblock agent --auto-pause`: the sandbox freezes while the model thinks; the time
    frozen and its saving are in the agent's JSON and in `cellblock report`."""
    def slow_model(body: dict[str, Any]) -> Any:
        if sum(1 for m in body["messages"] if m["role"] == "assistant") == 0:
            return message(tool_use("run_shell", {"command": "echo hi"}))
        time.sleep(1.5)  # the model thinks; the idle sandbox is frozen meanwhile
        return message(text("done"))

    with FakeAnthropic(slow_model) as server:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")},
               "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": server.url}
        trace = tmp_path / "trace.jsonl"
        res = subprocess.run([sys.executable, "-m", "cellblock.cli", "agent", "--json",
                              "--model", "claude-sonnet-4-6", "--auto-pause", "0.2",
                              "--trace", str(trace), "go"],
                             capture_output=True, text=True, check=False,
                             timeout=WORKER_DEADLINE, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["stop_reason"] == "end_turn"
    paused = result["paused_seconds"]
    assert 0 < paused < result["wall_time_s"]
    assert result["idle_saving_usd"] == pytest.approx(paused * 0.08 / 3600)
    path = tmp_path / "agent.json"
    path.write_text(res.stdout)
    rep = subprocess.run([sys.executable, "-m", "cellblock.cli", "report", str(path)],
                         capture_output=True, text=True, check=False)
    assert rep.returncode == 0, rep.stderr
    line = next(x for x in rep.stdout.splitlines() if x.startswith("auto-paused"))
    assert line.split()[1:] == [f"{paused:.2f}", "s", "(idle", "saving",
                                f"${paused * 0.08 / 3600:.6f})"]
    assert "idle saving (auto-pause)" in rep.stdout
    # And on the invoke_agent span, which the trace report sums.
    agent_span = [json.loads(x) for x in trace.read_text().splitlines()][-1]
    assert agent_span["attributes"]["cellblock.agent.paused_seconds"] == pytest.approx(paused)
    rep = subprocess.run([sys.executable, "-m", "cellblock.cli", "report", str(trace)],
                         capture_output=True, text=True, check=False)
    assert rep.returncode == 0, rep.stderr
    line = next(x for x in rep.stdout.splitlines() if x.startswith("auto-paused"))
    assert line.split()[1:3] == [f"{paused:.2f}", "s"], rep.stdout
