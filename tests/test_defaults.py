"""The documented defaults (issue 19's memory tiers and checkpoints, issue 21's rate), each
asserted where it is defined and, where it is cheap, by the behaviour it sets: 50 turns,
entries kept 90 days, at most 1000 per user, knowledge refreshed every 24 h, a checkpoint
every 300 s keeping 10, sandbox time at $0.08 an hour."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_anthropic import FakeAnthropic, Reply, message, tool_use

import cellblock
from cellblock.agent import Agent
from cellblock.cli import make_parser
from cellblock.memory import CheckpointConfig, KnowledgeSource, MemoryConfig, MemoryStore
from cellblock.observe import RunRecord
from cellblock.telemetry import CostMeter
from cellblock.telemetry.cost import DEFAULT_RATE_PER_HOUR

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MemoryStore]:
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.md").write_text("a")
    config = MemoryConfig(sources=(KnowledgeSource(namespace="kb", directory=tmp_path / "kb"),))
    with MemoryStore(f"sqlite://{tmp_path / 'm.db'}", config=config, clock=Clock()) as s:
        yield s


def test_the_documented_values() -> None:
    memory, checkpoints = MemoryConfig(), CheckpointConfig()
    assert (memory.max_turns, memory.ttl_days, memory.max_entries,
            memory.refresh_interval_hours) == (50, 90, 1000, 24)
    assert (checkpoints.interval_seconds, checkpoints.max_checkpoints) == (300, 10)
    assert DEFAULT_RATE_PER_HOUR == 0.08 and CostMeter().rate_per_hour == 0.08
    assert Agent(model="offline").max_turns == 50
    args = make_parser("agent").parse_args(["agent", "task"])
    assert args.max_turns == 50
    assert make_parser("report").parse_args(["report", "x.json"]).rate == 0.08


def test_an_entry_lives_90_days(store: MemoryStore) -> None:
    assert isinstance(store.clock, Clock)
    store.write("alice", "/memories/a.md", "x")
    store.clock.now += 90 * DAY - 1
    assert store.read("alice", "/memories/a.md").content == "x"  # a read does not extend it
    store.clock.now += 1
    assert store.entries("alice") == []


def test_at_most_1000_entries_per_user(store: MemoryStore) -> None:
    assert isinstance(store.clock, Clock)
    for i in range(1001):
        store.clock.now += 1
        store.write("alice", f"/memories/{i:04d}.md", "x")
    paths = [e.path for e in store.entries("alice")]
    assert len(paths) == 1000 and "/memories/0000.md" not in paths  # the LRU one went


def test_knowledge_is_refreshed_every_24_hours(store: MemoryStore) -> None:
    assert isinstance(store.clock, Clock)
    assert store.refresh_due() == ["kb"]
    store.clock.now += 24 * 3600 - 1
    assert store.refresh_due() == []
    store.clock.now += 1
    assert store.refresh_due() == ["kb"] and store.knowledge_version("kb") == 2


def test_10_checkpoints_are_kept(store: MemoryStore) -> None:
    lease = store.checkpoints.start("alice", "t")
    for i in range(11):
        store.checkpoints.save(lease, {"i": i}, {})
    kept = store.checkpoints.kept("alice", lease.session_id)
    assert [c.state["i"] for c in kept] == list(range(1, 11))


def test_a_checkpoint_every_300_seconds(store: MemoryStore,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Persistence.tick saves once 300 s of its clock have passed since the last save."""
    from cellblock.memory import agent as memory_agent

    now = [1000.0]
    monkeypatch.setattr(memory_agent.time, "monotonic", lambda: now[0])
    saves: list[str] = []
    hooks = memory_agent.Persistence.__new__(memory_agent.Persistence)
    hooks.config = CheckpointConfig()
    hooks.store = store
    hooks.last_save = hooks.last_refresh_check = now[0]
    monkeypatch.setattr(hooks, "_save", lambda reason, **_: saves.append(reason), raising=False)
    now[0] += 299.9
    hooks.tick()
    assert saves == []
    now[0] += 0.1
    hooks.tick()
    assert saves == ["interval"]


def test_sandbox_time_costs_8_cents_an_hour() -> None:
    meter = CostMeter()
    hour = cellblock.RunResult(
        exit_code=0, signal=None, reason="exited", stdout_bytes=b"", stderr_bytes=b"",
        stdout_truncated=False, stderr_truncated=False, wall_time_s=3600.0, cpu_time_s=0.0,
        peak_memory_bytes=0, violations=[], enforcement={})
    meter.observe_run(RunRecord("run", hour, None, 5000.0))
    assert meter.report().sandbox_usd == pytest.approx(0.08)


class _Sandbox:
    """Answers every shell call at once (the loop's turn limit is what is tested)."""

    def run_shell(self, script: str, *, timeout: float | None = None) -> cellblock.RunResult:
        return cellblock.RunResult(
            exit_code=0, signal=None, reason="exited", stdout_bytes=b"ok", stderr_bytes=b"",
            stdout_truncated=False, stderr_truncated=False, wall_time_s=0.0, cpu_time_s=0.0,
            peak_memory_bytes=0, violations=[], enforcement={})


def test_an_agent_stops_after_50_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    def forever(body: dict[str, Any]) -> Reply:
        return message(tool_use("run_shell", {"command": "true"}))

    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    with FakeAnthropic(forever) as server:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
        result = Agent(model="claude-sonnet-4-6", tools=["run_shell"],
                       sandbox=_Sandbox()).run("loop")  # type: ignore[arg-type]
    assert result.stop_reason == "max_turns" and result.turns == 50
    assert len(server.requests) == 50
