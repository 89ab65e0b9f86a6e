"""Orchestration (cellblock.agent.orchestrate, spec, control) against the scripted Anthropic
server: sub-agents in sandboxes of their own, the concurrency cap, timeouts and cancellation
reaching every child's sandbox (no process left), budgets across the tree, failures as
results.

Every agent's instructions start with "[agent:NAME]", so the server's script knows which agent
a request comes from and which turn it is (assistant messages so far).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_anthropic import FakeAnthropic, Reply, error, message, text, tool_use

import cellblock
from cellblock.agent.control import Budget, CancelScope, Ledger
from cellblock.agent.spec import AgentSpec, SubAgents, Team
from cellblock.errors import CredentialError, InvalidSpec
from conftest import IS_ROOT, run_json_script

MODEL = "claude-sonnet-4-6"
SCRIPT = (Path(__file__).parent / "orchestration_script.py").read_text()


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    yield


def who(body: dict[str, Any]) -> str:
    m = re.search(r"\[agent:([\w-]+)\]", body.get("system", ""))
    assert m, body.get("system")
    return m.group(1)


def turn_of(body: dict[str, Any]) -> int:
    return sum(1 for m in body["messages"] if m["role"] == "assistant")


def task_of(body: dict[str, Any]) -> str:
    first = body["messages"][0]["content"]
    return first if isinstance(first, str) else first[0]["text"]


def by_agent(replies: dict[str, Callable[[int, dict[str, Any]], Reply]]) -> Callable[..., Reply]:
    return lambda body: replies[who(body)](turn_of(body), body)


def serve(script: Any, monkeypatch: pytest.MonkeyPatch) -> FakeAnthropic:
    server = FakeAnthropic(script)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    return server


def delegations(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [tool_use("delegate", {"agent": a, "task": t}) for a, t in pairs]


def tool_results(server: FakeAnthropic, agent: str) -> list[dict[str, Any]]:
    """The tool results one agent's model was sent (its last request carries them all)."""
    out: list[dict[str, Any]] = []
    for req in server.requests:
        if who(req) == agent:
            for msg in req["messages"]:
                if msg["role"] == "user" and isinstance(msg["content"], list):
                    out += [b for b in msg["content"] if b.get("type") == "tool_result"]
    return list({b["tool_use_id"]: b for b in out}.values())


def most_in_flight(spans: list[tuple[float, float, dict[str, Any]]]) -> int:
    """The most requests the server was answering at one moment."""
    edges = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    now = best = 0
    for _, d in edges:
        now += d
        best = max(best, now)
    return best


def test_concurrency_is_capped_at_max_concurrent_and_each_child_has_its_own_sandbox(
        api, monkeypatch):
    jobs = [f"job{i}" for i in range(6)]

    def lead(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(*[("worker", j) for j in jobs]))
        return message(text("all six jobs done"))

    def worker(turn: int, body: dict[str, Any]) -> Reply:
        job = task_of(body)
        if turn == 0:  # each writes its own file, then lists the workspace
            return message(tool_use("run_shell", {
                "command": f"echo {job} > /workspace/{job}.txt; ls /workspace"}), delay_s=1.0)
        return message(text(f"{job} finished"), delay_s=1.0)

    sessions: list[Any] = []
    team = Team([
        AgentSpec(name="lead", instructions="[agent:lead] Split the work.", tools=[],
                  sub_agents=SubAgents(allowed_agents=["worker"], max_concurrent=3)),
        AgentSpec(name="worker", instructions="[agent:worker] Do one job.",
                  tools=["run_shell"]),
    ], on_session=sessions.append)
    with serve(by_agent({"lead": lead, "worker": worker}), monkeypatch) as server:
        result = team.build("lead").run("do six jobs")

    assert result.stop_reason == "end_turn" and result.final_text == "all six jobs done"
    subs = result.sub_agent_results
    assert [s.task for s in subs] == jobs and all(s.status == "ok" for s in subs)
    assert [s.result.final_text for s in subs] == [f"{j} finished" for j in jobs]
    # Server-side timestamps: the workers' requests overlapped, never more than 3 at once.
    worker_spans = [s for s in server.spans if who(s[2]) == "worker"]
    assert len(worker_spans) == 12
    assert most_in_flight(worker_spans) == 3
    # Children's own start/end times agree: at no moment were more than 3 running.
    moments = sorted([(s.started_at, 1) for s in subs] + [(s.ended_at, -1) for s in subs])
    running = peak = 0
    for _, d in moments:
        running += d
        peak = max(peak, running)
    assert peak == 3
    # One sandbox session per child, each seeing only its own file, all closed now.
    assert len(sessions) == 6 and len({id(s) for s in sessions}) == 6
    assert not any(s.is_open for s in sessions)
    listings = [r["content"].split("[stdout]\n")[1].split() for r in tool_results(server, "worker")]
    assert sorted(listings) == sorted([[f"{j}.txt"] for j in jobs])
    # The orchestrator's model got each child's answer back as a tool result.
    answers = [r for r in server.requests if who(r) == "lead"][-1]["messages"][-1]["content"]
    assert [json.loads(b["content"])["answer"] for b in answers] == [
        f"{j} finished" for j in jobs]


@pytest.mark.parametrize("identity", ["self", "nobody"],
                         ids=["root" if IS_ROOT else "user", "nobody"])
@pytest.mark.parametrize("mode", ["timeout", "cancel"])
def test_timeouts_and_cancellation_reach_every_child_and_its_sandbox(
        identity, mode, request, monkeypatch):
    """lead -> [sleeper, mid -> [sleeper]]: both sleepers run `sleep N` in their sandboxes;
    a timeout (4s) or cancelling the lead must close all three sessions and kill both sleeps."""
    nobody_dir = request.getfixturevalue("nobody_dir") if identity == "nobody" else None
    needle = f"sleep {random.randint(200, 299)}.{random.randint(100, 999)}"

    def lead(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("sleeper", "sleep here"), ("mid", "ask another")))
        return message(text("integrated what came back"))

    def mid(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("sleeper", "sleep there")))
        return message(text("mid done"))

    def sleeper(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(tool_use("run_shell", {"command": needle}))
        return message(text("slept"))

    spec = {"mode": mode, "timeout": 4.0 if mode == "timeout" else 600.0, "needle": needle,
            "expect": 2}
    with FakeAnthropic(by_agent({"lead": lead, "mid": mid, "sleeper": sleeper})) as server:
        if identity == "self":  # this checkout's package, whatever the venv has installed
            spec["path"] = str(Path(cellblock.__file__).parents[1])
        out = run_json_script(identity, nobody_dir, SCRIPT, {**spec, "url": server.url})

    # Both sleeps really ran in the children's sandboxes (at the same time when cancelled:
    # the cancel waits for that) ...
    assert len(out["seen"]) == 2
    if mode == "cancel":
        assert out["most_at_once"] == 2
    # ... and none is left: not by pid, not by command line; every session is closed.
    assert out["alive"] == [] and out["left"] == []
    assert out["sessions"] == [False, False, False]
    assert out["elapsed"] < 200  # long before the sleeps could have ended by themselves
    result = out["result"]
    subs = {s["agent"]: s for s in result["sub_agent_results"]}
    grandchild = subs["mid"]["result"]["sub_agent_results"][0]
    if mode == "timeout":
        # The lead goes on and integrates: a timed-out child is a result, not a crash.
        assert result["stop_reason"] == "end_turn"
        assert result["final_text"] == "integrated what came back"
        assert subs["sleeper"]["status"] == "timeout" and subs["mid"]["status"] == "timeout"
        assert "timed out after 4.0s" in subs["sleeper"]["error"]
        assert grandchild["status"] == "timeout"  # the mid's timeout reached its child
    else:
        assert result["stop_reason"] == "cancelled"
        assert "the test cancelled the run" in result["error"]
        assert [s["status"] for s in result["sub_agent_results"]] == ["cancelled", "cancelled"]
        assert grandchild["status"] == "cancelled"
        # The lead's model was never asked again after the cancel.
        assert sum(1 for r in server.requests if who(r) == "lead") == 1
    # The sleepers' tool calls ended with the sandbox gone, not with the sleep finishing.
    for s in (subs["sleeper"], grandchild):
        call = s["result"]["tool_calls"][0]
        assert call["name"] == "run_shell" and call["is_error"]


PER_TURN = {"input_tokens": 1000, "output_tokens": 100}  # $0.0045 on Sonnet 4.6


def test_budget_is_enforced_across_the_tree(api, monkeypatch):
    """lead $0.02; three workers of $0.01 each that never stop on their own. The slices carved
    from the lead never add up to more than it has left, and the whole tree stays within it."""
    def lead(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("worker", "a"), ("worker", "b"), ("worker", "c")),
                           usage=PER_TURN)
        return message(text("never reached: the budget is spent"), usage=PER_TURN)

    def worker(turn: int, body: dict[str, Any]) -> Reply:
        return message(tool_use("run_shell", {"command": f"echo {turn}"}), usage=PER_TURN,
                       delay_s=0.2)

    team = Team([
        AgentSpec(name="lead", instructions="[agent:lead]", tools=[], budget=Budget(usd=0.02),
                  sub_agents=SubAgents(allowed_agents=["worker"], max_concurrent=3)),
        AgentSpec(name="worker", instructions="[agent:worker]", tools=["run_shell"],
                  budget=Budget(usd=0.01)),
    ])
    with serve(by_agent({"lead": lead, "worker": worker}), monkeypatch) as server:
        result = team.build("lead").run("spend")

    subs = result.sub_agent_results
    # $0.02 - $0.0045 (the lead's first turn) = $0.0155 to share: 0.01, 0.0055, then nothing.
    assert sorted(s.budget_usd for s in subs) == pytest.approx([0.0, 0.0055, 0.01])
    by_slice = {round(s.budget_usd, 4): s for s in subs}
    assert by_slice[0.0].status == "refused" and by_slice[0.0].result is None
    assert by_slice[0.01].result.turns == 2 and by_slice[0.0055].result.turns == 1
    for s in (by_slice[0.01], by_slice[0.0055]):
        assert s.status == "failed" and s.result.stop_reason == "budget"
        assert s.result.cost_usd <= s.budget_usd
    # The lead stopped too: its next turn would not fit.
    assert result.stop_reason == "budget" and result.turns == 1
    # Every request the server answered is counted, and the tree stayed within $0.02.
    assert len(server.requests) == 4
    assert result.tree_cost_usd == pytest.approx(4 * 0.0045)
    assert result.tree_cost_usd <= 0.02


def test_token_budget_slices_and_charges_up_the_tree():
    root = Ledger(tokens=1000)
    a = root.child(tokens=600)
    b = root.child(tokens=600)
    assert (a.tokens_limit, b.tokens_limit) == (600, 400)
    assert root.child(tokens=1).tokens_limit == 0  # nothing left while a and b run
    a.charge(0.0, 100)
    assert root.spent_tokens == 100 and a.allows(0, 500) and not a.allows(0, 501)
    a.release()  # a's unspent 500 goes back
    assert root.remaining() == (None, 1000 - 100 - 400 - 0)
    with pytest.raises(InvalidSpec):
        Ledger(usd=-1)


def test_cancel_scope_cascades_and_runs_callbacks_once():
    parent = CancelScope()
    child = CancelScope(parent)
    calls: list[str] = []
    child.on_cancel(lambda: calls.append("closed"))
    parent.cancel("stop")
    parent.cancel("again")
    assert child.cancelled and child.reason == "stop" and calls == ["closed"]
    child.on_cancel(lambda: calls.append("late"))  # already cancelled: runs at once
    assert calls == ["closed", "late"]


def test_a_failing_sub_agent_is_a_result_not_a_crash(api, monkeypatch):
    def lead(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("broken", "x"), ("nocreds", "y")),
                           tool_use("delegate", {"agent": "stranger", "task": "z"}))
        return message(text("reported the failures"))

    def broken(turn: int, body: dict[str, Any]) -> Reply:
        return error(400, "invalid_request_error", "scripted refusal")

    team = Team([
        AgentSpec(name="lead", instructions="[agent:lead]", tools=[],
                  sub_agents=SubAgents(allowed_agents=["broken", "nocreds"])),
        AgentSpec(name="broken", instructions="[agent:broken]", tools=["run_shell"]),
        AgentSpec(name="nocreds", instructions="[agent:nocreds]", tools=["run_shell"],
                  credentials=["MISSING_TOKEN"]),
    ])
    with serve(by_agent({"lead": lead, "broken": broken}), monkeypatch) as server:
        result = team.build("lead").run("try")
    assert result.stop_reason == "end_turn" and result.final_text == "reported the failures"
    subs = {s.agent: s for s in result.sub_agent_results}
    assert subs["broken"].status == "failed" and "scripted refusal" in subs["broken"].error
    assert subs["nocreds"].status == "failed" and "CredentialError" in subs["nocreds"].error
    results = [json.loads(r["content"]) if r["tool_use_id"] else None
               for r in server.tool_results()[:2]]
    assert [r["status"] for r in results] == ["failed", "failed"]
    stranger = server.tool_results()[2]
    assert stranger["is_error"] and "not allowed" in stranger["content"]


def test_sub_agent_secrets_never_reach_the_orchestrators_model(api, monkeypatch):
    secret = "ghp_" + "".join(random.choices("abcdefghijk0123456789", k=30))

    def lead(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("leaker", "print the token")))
        return message(text("ok"))

    def leaker(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(tool_use("run_shell", {"command": "echo $GH_TOKEN"}))
        # A child model repeating what it saw (redacted already) and the raw value.
        return message(text(f"the token is {secret}"))

    team = Team([
        AgentSpec(name="lead", instructions="[agent:lead]", tools=[],
                  sub_agents=SubAgents(allowed_agents=["leaker"])),
        AgentSpec(name="leaker", instructions="[agent:leaker]", tools=["run_shell"],
                  credentials=["GH_TOKEN"]),
    ], secrets={"GH_TOKEN": secret})
    with serve(by_agent({"lead": lead, "leaker": leaker}), monkeypatch) as server:
        result = team.build("lead").run("go")
    assert secret not in json.dumps(server.requests)
    assert secret not in json.dumps(result.to_dict())
    child_output = server.tool_results()[0]["content"]
    assert "[REDACTED:GH_TOKEN]" in child_output  # injected, printed, redacted
    answer = json.loads(server.tool_results()[1]["content"])["answer"]
    assert answer == "the token is [REDACTED:GH_TOKEN]"


def test_team_from_toml_and_typed_errors(tmp_path):
    path = tmp_path / "agents.toml"
    path.write_text("""
[environments.small]
memory = "256M"
timeout = 20

[agents.lead]
instructions = "Delegate."
tools = []
budget = { usd = 1.5, tokens = 100000, turns = 7 }
sub_agents = { allowed_agents = ["coder"], max_concurrent = 2, timeout_seconds = 30 }

[agents.coder]
model = "claude-haiku-4-5"
tools = ["run_python"]
environment = "small"
policy = { timeout = 5, allow_net = ["127.0.0.1"] }
credentials = ["TOKEN"]
memory = { turns = 9 }
routing = [{ model = "claude-haiku-4-5", after_tools = ["read_file"] }]
""")
    team = Team.from_toml(path, secrets={"TOKEN": "t0ken-value"})
    lead, coder = team["lead"], team["coder"]
    assert lead.sub_agents.max_concurrent == 2 and lead.budget.turns == 7
    policy = team.policy_of(coder)
    assert policy.memory == 256 * 2**20 and policy.timeout == 5  # the agent's own wins
    assert policy.allow_net == ["127.0.0.1"] and policy.secrets == {"TOKEN": "t0ken-value"}
    agent = team.build("coder")
    assert agent.memory_turns == 9 and agent.router is not None
    assert agent.system.startswith("Delegate.") is False and "TOKEN" in agent.system
    built = team.build("lead")
    assert built.max_turns == 7 and built.ledger.usd_limit == 1.5
    assert built.ledger.tokens_limit == 100000

    bad = [
        ({"agents": {"a": {"tools": ["rm_rf"]}}}, "unknown tools"),
        ({"agents": {"a": {"environment": "nope"}}}, "unknown environment"),
        ({"agents": {"a": {"sub_agents": {"allowed_agents": ["ghost"]}}}}, "not defined"),
        ({"agents": {"a": {"budget": {"usd": -1}}}}, "budget.usd"),
        ({"agents": {"a": {"sub_agents": {"allowed_agents": ["a"], "max_concurrent": 0}}}},
         "max_concurrent"),
        ({"agents": {"a": {"tools": []}}}, "has no tools"),
        ({"teams": {}}, "unknown sections"),
    ]
    for data, message_part in bad:
        with pytest.raises(InvalidSpec, match=message_part):
            Team.from_dict(data)
    with pytest.raises(CredentialError, match="TOKEN"):
        Team.from_toml(path).build("coder")


def test_cli_orchestration_demo_runs_offline_without_a_key():
    from test_agent import base_env, cli

    out = cli("--orchestrate", "--json", env=base_env())
    assert out.returncode == 0, out.stderr
    assert "ANTHROPIC_API_KEY is not set" in out.stderr
    result = json.loads(out.stdout)
    assert result["stop_reason"] == "end_turn" and result["model"] == "offline"
    # One turn delegated to all three at once; each ran its demo's tools in its own sandbox.
    assert [c["name"] for c in result["tool_calls"]] == ["delegate"] * 3
    subs = {s["agent"]: s for s in result["sub_agent_results"]}
    assert set(subs) == {"primes", "inspector", "fibonacci"}
    assert all(s["status"] == "ok" for s in subs.values())
    assert "2 3 5 7 11" in subs["primes"]["result"]["final_text"]
    assert "all correct" in subs["fibonacci"]["result"]["final_text"]
    assert "primes (ok" in result["final_text"] and "fibonacci (ok" in result["final_text"]
    # The runs overlapped: all three had started before the first one ended.
    starts = sorted(s["started_at"] for s in subs.values())
    assert starts[-1] < min(s["ended_at"] for s in subs.values())


def test_cli_runs_a_team_declared_in_toml(tmp_path, monkeypatch):
    from test_agent import base_env, cli

    path = tmp_path / "team.toml"
    path.write_text(f"""
[agents.boss]
model = "{MODEL}"
instructions = "[agent:boss] Delegate."
tools = []
sub_agents = {{ allowed_agents = ["helper"] }}

[agents.helper]
model = "{MODEL}"
instructions = "[agent:helper] Help."
tools = ["run_shell"]
""")

    def boss(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(*delegations(("helper", "count")))
        return message(text("the helper counted to 3"))

    def helper(turn: int, body: dict[str, Any]) -> Reply:
        if turn == 0:
            return message(tool_use("run_shell", {"command": "seq 3"}))
        return message(text("1 2 3"))

    with FakeAnthropic(by_agent({"boss": boss, "helper": helper})) as server:
        env = {**base_env(), "ANTHROPIC_API_KEY": "test-key", "ANTHROPIC_BASE_URL": server.url}
        out = cli("--agents", str(path), "count to three", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "the helper counted to 3"
    assert "sub-agent helper [sub_" in out.stderr and ": ok (" in out.stderr
    assert sorted(who(r) for r in server.requests) == ["boss", "boss", "helper", "helper"]

    bad = tmp_path / "bad.toml"
    bad.write_text('[agents.a]\ntools = ["rm"]\n')
    out = cli("--agents", str(bad), "x", env=base_env())
    assert out.returncode != 0 and "InvalidSpec" in out.stderr and "unknown tools" in out.stderr


def test_memory_spec_uses_the_teams_store(tmp_path):
    from cellblock.memory import MemoryStore

    spec = AgentSpec(name="rememberer", tools=["run_shell"],
                     memory={"store": True, "turns": 5, "context_chars": 50_000})
    with pytest.raises(InvalidSpec, match="uses a memory store; the team has none"):
        Team([spec]).build("rememberer")
    store = MemoryStore(f"sqlite://{tmp_path / 'memory.db'}")
    try:
        agent = Team([spec], memory_store=store).build("rememberer")
        assert agent.memory is store and agent.memory_turns == 5
        assert agent.context_chars == 50_000
    finally:
        store.close()
