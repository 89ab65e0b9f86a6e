"""Model routing (cellblock.agent.routing) against the scripted Anthropic server: rules on task
size and tool use and a classifier hook send turns to a cheaper model; each turn records its
decision and cost, and the run shows the saving against always using the main model."""

from __future__ import annotations

import pytest
from fake_anthropic import error, message, text, tool_use
from test_orchestration import api, serve  # noqa: F401 (api: fixture)

from cellblock.agent import Agent
from cellblock.agent.pricing import price_for
from cellblock.agent.routing import Route, RouteContext, Router
from cellblock.commands.agent import summary

pytestmark = pytest.mark.usefixtures("api")

MAIN, CHEAP, FALLBACK = "claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6"
USAGE = {"input_tokens": 2000, "output_tokens": 400}
LONG_TASK = "read the file the previous step wrote and report what it says, then check it"


def cost(model: str) -> float:
    return (2000 * price_for(model).input + 400 * price_for(model).output) / 1e6


def test_tool_use_rule_routes_the_turn_after_a_read_to_the_cheap_model(monkeypatch):
    script = [
        message(tool_use("write_file", {"path": "/workspace/a.txt", "content": "hello"}),
                usage=USAGE),
        message(tool_use("read_file", {"path": "/workspace/a.txt"}), usage=USAGE),
        message(tool_use("run_shell", {"command": "wc -c < /workspace/a.txt"}), usage=USAGE),
        message(text("it says hello"), usage=USAGE),
    ]
    router = Router([Route(model=CHEAP, after_tools=["read_file", "write_file"]),
                     Route(model=CHEAP, max_task_chars=20)])
    events = []
    with serve(script, monkeypatch) as server:
        result = Agent(model=MAIN, router=router).run(LONG_TASK, on_event=events.append)
    # Turn 1: nothing ran yet (main). 2 and 3 follow write_file / read_file (cheap). 4 follows
    # run_shell (main). The long task never matches the task-size rule.
    assert server.models() == [MAIN, CHEAP, CHEAP, MAIN]
    assert [(d.turn, d.model, d.reason) for d in result.routing] == [
        (1, MAIN, "main"), (2, CHEAP, "rule 0"), (3, CHEAP, "rule 0"), (4, MAIN, "main")]
    assert [e.model for e in events if e.kind == "model_request"] == server.models()
    # Each decision carries its cost, and what the main model would have charged.
    for d in result.routing:
        assert d.cost_usd == pytest.approx(cost(d.model))
        assert d.main_model_cost_usd == pytest.approx(cost(MAIN))
    assert result.cost_usd == pytest.approx(2 * cost(MAIN) + 2 * cost(CHEAP))
    assert result.main_model_cost_usd == pytest.approx(4 * cost(MAIN))
    assert result.routing_saving_usd == pytest.approx(2 * (cost(MAIN) - cost(CHEAP)))
    assert result.routing_saving_usd > 0
    assert result.to_dict()["routing"][1]["reason"] == "rule 0"
    line = summary(result)
    assert (f"routing: 2 of 4 turns routed, saved ${result.routing_saving_usd:.4f} of "
            f"${result.main_model_cost_usd:.4f}") in line


def test_task_size_rule_and_classifier_hook(monkeypatch):
    seen: list[RouteContext] = []

    def classify(ctx: RouteContext) -> str | None:
        seen.append(ctx)
        return None  # no opinion: the rules decide

    router = Router([Route(model=CHEAP, max_task_chars=20)], classifier=classify)
    script = [message(tool_use("run_shell", {"command": "echo hi"}), usage=USAGE),
              message(tool_use("run_shell", {"command": "echo again"}), usage=USAGE),
              message(text("hi"), usage=USAGE)]
    with serve(script, monkeypatch) as server:
        result = Agent(model=MAIN, router=router).run("say hi")  # 6 characters: small
    # The classifier is asked first, every turn; with no opinion from it, the rules decide.
    assert server.models() == [CHEAP, CHEAP, CHEAP]
    assert [d.reason for d in result.routing] == ["rule 0"] * 3
    assert [c.turn for c in seen] == [1, 2, 3] and seen[0].task_chars == 6
    assert seen[1].last_tools == ("run_shell",) and seen[1].context_chars > seen[0].context_chars

    router = Router(classifier=lambda ctx: CHEAP if ctx.turn > 1 else None)
    script = [message(tool_use("run_shell", {"command": "echo hi"}), usage=USAGE),
              message(text("hi"), usage=USAGE)]
    with serve(script, monkeypatch) as server:
        result = Agent(model=MAIN, router=router).run(LONG_TASK)
    assert server.models() == [MAIN, CHEAP]
    assert [d.reason for d in result.routing] == ["main", "classifier"]


def test_retries_and_fallback_work_as_before_with_routing(monkeypatch):
    script = [error(529, "overloaded_error"), error(529, "overloaded_error"),
              message(tool_use("run_shell", {"command": "echo 1"}), usage=USAGE),
              message(text("done"), usage=USAGE)]
    router = Router([Route(model=CHEAP, max_task_chars=100)])
    with serve(script, monkeypatch) as server:
        result = Agent(model=MAIN, router=router, fallback_model=FALLBACK, max_retries=1,
                       retry_base_delay=0.01).run("short")
    # The cheap model was tried twice (once plus one retry), then the fallback took over for
    # the rest of the run, as without routing.
    assert server.models() == [CHEAP, CHEAP, FALLBACK, FALLBACK]
    assert [(d.model, d.reason) for d in result.routing] == [
        (FALLBACK, "fallback"), (FALLBACK, "main")]
    assert result.model == FALLBACK and result.stop_reason == "end_turn"
    # The fallback is dearer than the main model here: the "saving" is negative, and shown.
    assert result.routing_saving_usd == pytest.approx(2 * (cost(MAIN) - cost(FALLBACK)))


def test_route_rule_conditions():
    ctx = RouteContext(turn=2, task_chars=50, context_chars=900, last_tools=("read_file",),
                       main_model=MAIN)
    assert Route(model=CHEAP, max_task_chars=50, max_context_chars=900).matches(ctx)
    assert not Route(model=CHEAP, max_task_chars=49).matches(ctx)
    assert not Route(model=CHEAP, max_context_chars=899).matches(ctx)
    assert not Route(model=CHEAP, after_tools=["run_shell"]).matches(ctx)
    first = ctx.model_copy(update={"last_tools": ()})
    assert not Route(model=CHEAP, after_tools=["read_file"]).matches(first)
    assert Router([], None).decide(ctx) == (MAIN, "main")
