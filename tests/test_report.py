"""`cellblock report`: text and HTML summaries of batch results, eval results, agent runs and
traces; the HTML page is rendered by a real headless Chromium and looked at."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

import cellblock
from cellblock.errors import InvalidSpec
from cellblock.report import summarize, to_html, to_text
from cellblock.report.render import PALETTE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
XSS = "<script>alert(1)</script>"


def batch_file(tmp_path: Path) -> Path:
    jobs = [cellblock.Job(id="ok", argv=["true"]), cellblock.Job(id="bad", argv=["false"]),
            cellblock.Job(id=XSS, argv=["sleep", "5"], limits={"timeout": 0.3}),
            cellblock.Job(id="refused", argv=["unshare", "-U", "true"])]
    results = cellblock.run_many(jobs, concurrency=2, progress=False)
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps({"id": j.id, **r.to_dict()}) + "\n"
                            for j, r in zip(jobs, results, strict=True)))
    return path


def test_batch_report_text_counts_what_happened(tmp_path: Path) -> None:
    s = summarize(batch_file(tmp_path))
    stats = dict(s.stats)
    assert stats["jobs"] == "4" and stats["passed (exit 0)"] == "1 (25.0 %)"
    assert stats["violations"] == "1"
    outcomes = {b.label: b.value for b in s.charts[0].bars}
    assert outcomes == {"exit 0": 1.0, "exit 1": 2.0, "timeout": 1.0}
    text = to_text(s)
    assert text.startswith("Batch results.jsonl\n") and "Violations by kind" in text


def test_eval_agent_and_trace_files_are_recognised(tmp_path: Path) -> None:
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"task_id": f"T/{i % 2}", "passed": i % 3 == 0,
                                      "result": "passed" if i % 3 == 0 else "failed: x"}) + "\n"
                          for i in range(6)))
    s = summarize(ev)
    assert s.kind == "eval" and dict(s.stats)["passed"] == "2 (33.3 %)"
    agent = tmp_path / "agent.json"
    agent.write_text(json.dumps({
        "final_text": "x", "stop_reason": "end_turn", "model": "m", "turns": 2,
        "tool_calls": [{"turn": 1, "name": "run_shell", "duration_s": 0.5, "reason": "exited",
                        "is_error": False}],
        "usage": {"input_tokens": 10, "output_tokens": 3}, "cost_usd": 0.25,
        "sandbox_seconds": 3600.0, "wall_time_s": 4000.0}))
    s = summarize(agent, rate_per_hour=0.08)
    assert s.kind == "agent"
    assert dict(s.stats)["cost"] == "$0.330000 (tokens $0.250000, sandbox $0.080000)"
    trace = tmp_path / "trace.jsonl"
    trace.write_text(json.dumps({
        "name": "sandbox run", "context": {"trace_id": "0x1", "span_id": "0x2"},
        "start_time": "2026-01-01T00:00:00.000000Z", "end_time": "2026-01-01T00:00:01.500000Z",
        "status": {"status_code": "ERROR"}, "attributes": {},
        "events": [{"name": "cellblock.security.seccomp", "attributes": {}}]}) + "\n")
    s = summarize(trace)
    assert s.kind == "trace" and dict(s.stats)["security events"] == "1"
    assert s.charts[1].bars[0].value == pytest.approx(1.5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"x\": 1}\nnot json\n")
    with pytest.raises(InvalidSpec, match=r"bad\.jsonl:2: not JSON"):
        summarize(bad)


def test_cli_report_writes_text_and_html(tmp_path: Path) -> None:
    results = batch_file(tmp_path)
    out = tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "cellblock.cli", "report", str(results),
                          "--html", str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Batch results.jsonl")
    page = out.read_text()
    assert XSS not in page and "&lt;script&gt;" in page  # labels are escaped
    # Self-contained: no script, nothing fetched (the only URL is the SVG namespace).
    assert "<script" not in page and "src=" not in page and "href" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    res = subprocess.run([sys.executable, "-m", "cellblock.cli", "report",
                          str(tmp_path / "missing.jsonl")], capture_output=True, text=True,
                         check=False)
    assert res.returncode == 2 and res.stderr.startswith("cellblock: error: InvalidSpec: ")


def screenshot(page: Path, shot: Path, height: int) -> list[tuple[int, tuple[int, int, int]]]:
    """Renders `page` in headless Chromium (installed by `make deps`: its absence fails the
    test, never skips it); the screenshot's (count, colour) pairs."""
    assert CHROMIUM is not None, "chromium is missing: `make deps` installs it"
    profile = tempfile.mkdtemp(prefix="cellblock-chromium-")
    try:
        res = subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
             "--no-first-run", f"--user-data-dir={profile}", f"--window-size=1000,{height}",
             f"--screenshot={shot}", page.as_uri()],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "HOME": profile})
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, height)
    return img.getcolors(maxcolors=1 << 20) or []


def pixels(colors: list[tuple[int, tuple[int, int, int]]], hex_color: str) -> int:
    rgb = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return sum(n for n, c in colors if c == rgb)


def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(to_html(summarize(batch_file(tmp_path))))
    colors = screenshot(page, tmp_path / "shot.png", 900)
    # The first chart's bars are drawn in its colour, text in dark grey, on white.
    assert pixels(colors, PALETTE[0]) > 2000, "no bars rendered"
    assert sum(n for n, c in colors if max(c) < 90) > 500, "no text rendered"


def test_agent_report_renders_its_cost_and_violations_charts_in_chromium(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real agent run (a refused syscall among its tool calls), its JSON summarised and the
    page rendered: the cost chart and the violations chart are drawn."""
    from fake_anthropic import FakeAnthropic, message, text, tool_use

    from cellblock.agent import Agent

    script = [message(tool_use("run_shell", {"command": "unshare -U true; echo tried"}),
                      usage={"input_tokens": 100_000, "output_tokens": 10}),
              message(text("done"))]
    with FakeAnthropic(script) as server:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        result = Agent(model="claude-sonnet-4-6").run("go")
    assert result.tool_calls[0].violations == {"seccomp": 1}
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(result.to_dict()))
    summary = summarize(path)
    charts = {c.title: c for c in summary.charts}
    assert [(b.label, b.value) for b in charts["Violations by kind"].bars] == [("seccomp", 1.0)]
    assert charts["Cost"].bars[0].value == pytest.approx(result.cost_usd)
    assert dict(summary.stats)["violations"] == "1"
    page = tmp_path / "agent.html"
    page.write_text(to_html(summary))
    colors = screenshot(page, tmp_path / "agent.png", 1400)
    order = [c.title for c in summary.charts]
    cost_color = PALETTE[order.index("Cost") % len(PALETTE)]
    violations_color = PALETTE[order.index("Violations by kind") % len(PALETTE)]
    assert len({cost_color, violations_color}) == 2
    # Each chart's largest bar is BAR_WIDTH wide: most of it must be on screen.
    assert pixels(colors, cost_color) > 2000, "cost chart not rendered"
    assert pixels(colors, violations_color) > 2000, "violations chart not rendered"
