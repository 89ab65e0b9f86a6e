"""Orchestration: what delegating costs, what running sub-agents concurrently saves, and what
routing saves, on the offline demo model and the scripted server of tests/fake_anthropic.py.

1. The three demo tasks (primes, inspect, fibonacci) as three plain agents one after another,
   against the same three as sub-agents of the demo orchestrator (max_concurrent 3).
2. Delegation overhead: a sub-agent that answers at once (one model request to the local
   server, no tool call), delegated N times in a row (max_concurrent 1); the delegate tool's
   time minus the child's own run is the overhead (its thread, sandbox session, budget slice).
3. Routing: a 12-turn scripted run (read_file, run_shell alternating) on Sonnet, against the
   same with `after_tools=["read_file"]` sending the turns after a read to Haiku.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _env import print_environment_table
from fake_anthropic import FakeAnthropic, Reply, message, text, tool_use

from cellblock.agent import Agent, AgentSpec, Route, Router, SubAgents, Team
from cellblock.agent.offline import ORCHESTRATION_AGENTS, ORCHESTRATION_DEMO
from cellblock.agent.orchestrate import demo_team

RUNS = 3
DELEGATIONS = 10


def sequential_vs_orchestrated() -> tuple[float, float]:
    seq, orch = [], []
    for _ in range(RUNS):
        started = time.monotonic()
        for demo in ORCHESTRATION_AGENTS.values():
            assert Agent(model="offline").run(demo.task).stop_reason == "end_turn"
        seq.append(time.monotonic() - started)
        started = time.monotonic()
        result = demo_team("offline").build("lead").run(ORCHESTRATION_DEMO.task)
        orch.append(time.monotonic() - started)
        assert [s.status for s in result.sub_agent_results] == ["ok"] * 3
    return statistics.median(seq), statistics.median(orch)


def delegation_overhead() -> tuple[float, float]:
    def script(body: dict[str, Any]) -> Reply:
        if "[lead]" in body["system"]:
            turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
            if turn < DELEGATIONS:
                return message(tool_use("delegate", {"agent": "echo", "task": f"t{turn}"}))
            return message(text("done"))
        return message(text("ok"))

    team = Team([
        AgentSpec(name="lead", instructions="[lead]", tools=[],
                  sub_agents=SubAgents(allowed_agents=["echo"], max_concurrent=1)),
        AgentSpec(name="echo", instructions="[echo]", tools=["run_shell"]),
    ])
    with FakeAnthropic(script) as server:
        os.environ.update(ANTHROPIC_API_KEY="bench", ANTHROPIC_BASE_URL=server.url)
        team.build("lead").run("warm the SDK up")  # imports, first client
        result = team.build("lead").run("delegate")
    overhead = [c.duration_s - s.result.wall_time_s
                for c, s in zip(result.tool_calls, result.sub_agent_results, strict=True)
                if s.result is not None]
    total = [c.duration_s for c in result.tool_calls]
    return statistics.median(total) * 1000, statistics.median(overhead) * 1000


def routing_saving() -> tuple[float, float]:
    usage = {"input_tokens": 3000, "output_tokens": 300}
    turns = [message(tool_use("read_file", {"path": "/etc/hostname"}), usage=usage)
             if i % 2 == 0 else
             message(tool_use("run_shell", {"command": "true"}), usage=usage)
             for i in range(11)] + [message(text("done"), usage=usage)]
    with FakeAnthropic(list(turns)) as server:
        os.environ["ANTHROPIC_BASE_URL"] = server.url
        plain = Agent(model="claude-sonnet-4-6").run("work")
    with FakeAnthropic(list(turns)) as server:
        os.environ["ANTHROPIC_BASE_URL"] = server.url
        routed = Agent(model="claude-sonnet-4-6", router=Router(
            [Route(model="claude-haiku-4-5", after_tools=["read_file"])])).run("work")
    assert routed.main_model_cost_usd is not None
    assert abs(routed.main_model_cost_usd - plain.cost_usd) < 1e-9
    return plain.cost_usd, routed.cost_usd


def main() -> None:
    seq, orch = sequential_vs_orchestrated()
    total_ms, overhead_ms = delegation_overhead()
    plain, routed = routing_saving()
    print(f"## Orchestration (median of {RUNS} runs; delegation: median of {DELEGATIONS})\n")
    print("| measure | value |")
    print("| --- | ---: |")
    print(f"| 3 demo tasks, plain agents one after another | {seq:.2f} s |")
    print(f"| the same 3 as sub-agents of the demo orchestrator | {orch:.2f} s "
          f"({seq / orch:.2f}x) |")
    print(f"| delegate call, sub-agent answering at once | {total_ms:.1f} ms |")
    print(f"| of which outside the sub-agent's run (thread, session, slice) | "
          f"{overhead_ms:.1f} ms |")
    print(f"| 12 turns on Sonnet 4.6 | ${plain:.4f} |")
    print(f"| the same, turns after read_file on Haiku 4.5 | ${routed:.4f} "
          f"(-{100 * (1 - routed / plain):.0f}%) |")
    print()
    print_environment_table()


if __name__ == "__main__":
    main()
