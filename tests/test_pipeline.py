"""Pipelines (cellblock.agent.pipeline) against the scripted Anthropic server: artefacts (files
and structured output) pass from one stage's sandbox to the next, and a rerun after a failure
resumes at the failed stage without re-running the earlier ones.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from fake_anthropic import Reply, error, message, text, tool_use
from test_orchestration import api, by_agent, serve, task_of, who  # noqa: F401 (api: fixture)

from cellblock.agent.pipeline import Pipeline, Stage
from cellblock.agent.spec import AgentSpec, Team
from cellblock.errors import InvalidSpec

pytestmark = pytest.mark.usefixtures("api")


def team(sessions: list[Any] | None = None) -> Team:
    return Team([
        AgentSpec(name=n, instructions=f"[agent:{n}]", tools=["run_shell", "read_file"])
        for n in ("extract", "total", "report")
    ], on_session=sessions.append if sessions is not None else None)


STAGES = [
    Stage(name="extract", agent="extract", task="Extract numbers from: {previous}",
          outputs=["data"], output="json"),
    Stage(name="total", agent="total", task="Add them up; you were told {previous}",
          outputs=["total.txt"]),
    Stage(name="report", agent="report", task="Report on: {previous}"),
]


def test_pipeline_passes_artefacts_and_resumes_at_the_failed_stage(monkeypatch, tmp_path):
    calls: Counter[str] = Counter()
    broken = {"total": True}

    def extract(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(tool_use("run_shell", {
                "command": "mkdir -p data && seq 1 10 > data/numbers.txt && ls /workspace"}))
        return message(text('```json\n{"count": 10, "file": "data/numbers.txt"}\n```'))

    def total(turn: int, body: dict[str, Any]) -> Reply:
        if broken["total"]:
            return error(400, "invalid_request_error", "scripted failure of stage 2")
        if turn == 0:  # stage 1's file is in this stage's own workspace
            return message(tool_use("run_shell", {
                "command": "paste -sd+ data/numbers.txt | bc > total.txt; cat total.txt"}))
        return message(text("the total is in total.txt"))

    def report(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:  # both earlier stages' files are here
            return message(tool_use("run_shell", {
                "command": "echo $(cat total.txt) from $(wc -l < data/numbers.txt) numbers"}))
        return message(text("55 from 10 numbers"))

    replies = {"extract": extract, "total": total, "report": report}

    def script(body: dict[str, Any]) -> Reply:
        calls[who(body)] += 1
        return by_agent(replies)(body)

    journal = tmp_path / "journal"
    sessions: list[Any] = []
    with serve(script, monkeypatch) as server:
        first = Pipeline(team(sessions), STAGES, journal).run("the numbers one to ten")
        assert not first.ok and first.failed_stage == "total"
        assert [s.status for s in first.stages] == ["done", "failed", "not_run"]
        assert "scripted failure of stage 2" in first.stages[1].error
        assert first.stages[0].output == {"count": 10, "file": "data/numbers.txt"}
        assert calls == {"extract": 2, "total": 1}
        assert list(json.loads((journal / "journal.json").read_text())["stages"]) == ["extract"]

        broken["total"] = False
        second = Pipeline(team(sessions), STAGES, journal).run("the numbers one to ten")

    assert second.ok and second.output == "55 from 10 numbers"
    assert [s.status for s in second.stages] == ["resumed", "done", "done"]
    # Stage 1 was not run again: its model was asked twice in all, in the first run.
    assert calls == {"extract": 2, "total": 1 + 2, "report": 2}
    # Structured output went forward: stage 2's task carries stage 1's JSON.
    total_tasks = {task_of(r) for r in server.requests if who(r) == "total"}
    assert total_tasks == {'Add them up; you were told {"count": 10, "file": "data/numbers.txt"}'}
    # Files went forward: stage 3 ran on stage 1's and stage 2's files in its own workspace.
    outputs = [r["content"] for r in server.tool_results()]
    assert any("[stdout]\n55\n" in o or o.endswith("[stdout]\n55") for o in outputs)
    assert any("55 from 10 numbers" in o for o in outputs)
    assert (journal / "total" / "files" / "total.txt").read_text().strip() == "55"
    # Each stage that ran had a session of its own, closed afterwards.
    assert len(sessions) == 2 + 2 and not any(s.is_open for s in sessions)
    assert second.cost_usd > 0 and second.stages[0].cost_usd == first.stages[0].cost_usd

    # A third run has nothing left to do.
    third = Pipeline(team(), STAGES, journal).run("the numbers one to ten")
    assert [s.status for s in third.stages] == ["resumed"] * 3 and third.cost_usd == 0
    # A changed stage runs again, with the stages after it (and the server is gone: it fails).
    changed = [STAGES[0], STAGES[1].model_copy(update={"task": "Sum: {previous}"}), STAGES[2]]
    fourth = Pipeline(team(), changed, journal).run("the numbers one to ten")
    assert [s.status for s in fourth.stages] == ["resumed", "failed", "not_run"]


def test_pipeline_stage_without_its_output_file_fails(monkeypatch, tmp_path):
    script = [message(tool_use("run_shell", {"command": "true"})), message(text("done"))]
    stages = [Stage(name="a", agent="extract", task="x", outputs=["missing.txt"])]
    with serve(script, monkeypatch):
        res = Pipeline(team(), stages, tmp_path).run("t")
    assert not res.ok and res.stages[0].status == "failed"
    assert "missing.txt" in res.stages[0].error
    assert not (tmp_path / "journal.json").exists()


def test_pipeline_bad_definitions():
    with pytest.raises(InvalidSpec, match="relative to /workspace"):
        Stage(name="a", agent="extract", task="x", outputs=["../etc/passwd"])
    with pytest.raises(InvalidSpec, match="relative to /workspace"):
        Stage(name="a", agent="extract", task="x", outputs=["/etc/passwd"])
    with pytest.raises(InvalidSpec, match="unique"):
        Pipeline(team(), [STAGES[0], STAGES[0]], "/nonexistent")
    with pytest.raises(InvalidSpec, match="no agent named"):
        Pipeline(team(), [Stage(name="a", agent="ghost", task="x")], "/nonexistent")
