"""The agent loop (`cellblock.agent.Agent`) against a scripted Anthropic-compatible server.

The server (tests/fake_anthropic.py) listens on 127.0.0.1 and the real `anthropic` client talks
to it through ANTHROPIC_BASE_URL; tools run in a real sandbox session. Assertions are made on
what the server received (what the model would see) as well as on the AgentResult.
"""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_anthropic import FakeAnthropic, Reply, error, message, text, tool_use

import cellblock
from cellblock.agent import (
    DEMO_TASKS,
    Agent,
    AgentEvent,
    Finished,
    ModelFallback,
    ModelRetry,
    ToolFinished,
    Usage,
)
from cellblock.agent.memory import ShortTermMemory
from cellblock.agent.pricing import PRICES, UNKNOWN_PRICE, price_for
from cellblock.agent.tools import format_run, redact_and_trim, trim_text
from cellblock.errors import InvalidSpec
from cellblock.result import RunResult

MODEL = "claude-sonnet-4-6"
SECRET = "sk-test-9f8e7d6c5b4a39281706"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The SDK's environment, pointed at whatever server the test starts (set per test)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    yield


def serve(script, monkeypatch: pytest.MonkeyPatch) -> FakeAnthropic:
    server = FakeAnthropic(script)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.url)
    return server


def run_agent(agent: Agent, task: str) -> tuple[cellblock.agent.AgentResult, list[AgentEvent]]:
    events: list[AgentEvent] = []
    result = agent.run(task, on_event=events.append)
    return result, events


def test_multi_step_tool_use(api, monkeypatch):
    usage = {"input_tokens": 100, "output_tokens": 50, "cache_read_input_tokens": 1000,
             "cache_creation_input_tokens": 200}
    script = [
        message(text("Computing."), tool_use("run_python", {
            "code": "open('/workspace/n.txt','w').write(str(sum(range(10**6))))"}, "t1"),
            usage=usage),
        message(tool_use("read_file", {"path": "/workspace/n.txt"}, "t2"),
                tool_use("run_shell", {"command": "wc -c < /workspace/n.txt"}, "t3"), usage=usage),
        message(text("The sum is 499999500000."), usage=usage),
    ]
    with serve(script, monkeypatch) as server:
        result, events = run_agent(Agent(model=MODEL), "sum the numbers below a million")

    assert result.stop_reason == "end_turn" and result.final_text == "The sum is 499999500000."
    assert result.turns == 3 and result.model == MODEL
    assert [c.name for c in result.tool_calls] == ["run_python", "read_file", "run_shell"]
    assert [c.reason for c in result.tool_calls] == ["exited", "ok", "exited"]
    # The sandbox really ran the code: the file it wrote is read back, and the session kept it.
    results = {r["tool_use_id"]: r for r in server.tool_results()}
    assert results["t2"]["content"] == "499999500000" and not results["t2"]["is_error"]
    assert "12" in results["t3"]["content"].split("[stdout]")[1]
    # Each request carries the whole conversation, tools and system prompt.
    assert len(server.requests) == 3
    last = server.requests[-1]
    roles = [m["role"] for m in last["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert {t["name"] for t in last["tools"]} == {"run_python", "run_shell", "run_node",
                                                  "read_file", "write_file"}
    assert "sandbox" in last["system"]
    # Usage and cost, cache tokens included.
    assert result.usage == Usage(input_tokens=300, output_tokens=150,
                                 cache_read_input_tokens=3000, cache_creation_input_tokens=600)
    assert result.cost_usd == pytest.approx(price_for(MODEL).cost(result.usage))
    assert result.cost_usd == pytest.approx((300 * 3 + 150 * 15 + 3000 * 0.3 + 600 * 3.75) / 1e6)
    assert result.sandbox_seconds > 0 and not result.cost_is_estimate
    kinds = [e.kind for e in events]
    assert kinds.count("model_request") == 3 and kinds.count("tool_started") == 3
    assert kinds.count("tool_finished") == 3 and kinds[-1] == "finished"


def test_secret_printed_by_a_tool_never_reaches_the_model_or_the_caller(api, monkeypatch):
    b64 = base64.b64encode(SECRET.encode()).decode()
    script = [
        message(tool_use("run_shell", {"command":
            "echo token=$API_TOKEN; printf %s \"$API_TOKEN\" | base64; "
            "printenv API_TOKEN > /workspace/tok.txt"}, "t1")),
        # read_file: the session redacts what it reads (the agent's redactor would too).
        message(tool_use("read_file", {"path": "/workspace/tok.txt"}, "t2")),
        # A model that repeats the secret (e.g. from the task) must not leak it to the caller.
        message(text(f"The token is {SECRET} ({b64})")),
    ]
    with serve(script, monkeypatch) as server:
        result, events = run_agent(Agent(model=MODEL, secrets={"API_TOKEN": SECRET}), "leak it")

    sent = json.dumps(server.requests)
    assert SECRET not in sent and b64 not in sent
    results = {r["tool_use_id"]: r["content"] for r in server.tool_results()}
    # The secret was injected (it was printed) and redacted in every form.
    assert "token=[REDACTED:API_TOKEN]" in results["t1"]
    assert results["t2"].strip() == "[REDACTED:API_TOKEN]"
    assert SECRET not in result.final_text and b64 not in result.final_text
    assert result.final_text.startswith("The token is [REDACTED:API_TOKEN]")
    # Counted by the agent's redactor: t1 and the final text (the session redacted t2).
    assert result.redactions.get("API_TOKEN", 0) >= 2
    everything = json.dumps([e.model_dump(mode="json") for e in events])
    assert SECRET not in everything and b64 not in everything
    # The model is told the variable's name, never its value.
    assert "API_TOKEN" in server.requests[0]["system"]


def test_overloaded_and_rate_limited_then_success(api, monkeypatch):
    script = [error(529, "overloaded_error"), error(429, "rate_limit_error"),
              error(503, "api_error"), message(text("fine"))]
    with serve(script, monkeypatch) as server:
        result, events = run_agent(Agent(model=MODEL, max_retries=3), "hi")
    assert result.stop_reason == "end_turn" and result.final_text == "fine"
    assert result.model == MODEL and len(server.requests) == 4
    retries = [e for e in events if isinstance(e, ModelRetry)]
    assert [r.attempt for r in retries] == [1, 2, 3]
    assert "529" in retries[0].error and "429" in retries[1].error


def test_persistent_failure_switches_to_fallback_model(api, monkeypatch):
    def script(body) -> Reply:
        if body["model"] == MODEL:
            return error(529, "overloaded_error")
        return message(text("answered by the fallback"), model=body["model"])

    with serve(script, monkeypatch) as server:
        result, events = run_agent(
            Agent(model=MODEL, fallback_model="claude-haiku-4-5", max_retries=2), "hi")
    assert server.models() == [MODEL] * 3 + ["claude-haiku-4-5"]
    assert result.stop_reason == "end_turn" and result.model == "claude-haiku-4-5"
    assert result.final_text == "answered by the fallback"
    switch = [e for e in events if isinstance(e, ModelFallback)]
    assert len(switch) == 1 and switch[0].to_model == "claude-haiku-4-5"


def test_persistent_failure_without_fallback_ends_with_error_not_exception(api, monkeypatch):
    with serve(lambda body: error(529, "overloaded_error"), monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL, max_retries=0), "hi")
    # max_retries=0 and the SDK's own retries disabled: exactly one request.
    assert len(server.requests) == 1
    assert result.stop_reason == "error" and "529" in (result.error or "")


def test_backoff_without_retry_after_header_still_retries(api, monkeypatch):
    script = [error(500, "api_error", retry_after=None), message(text("ok"))]
    with serve(script, monkeypatch) as server:
        result, events = run_agent(Agent(model=MODEL, retry_base_delay=0.01), "hi")
    assert result.final_text == "ok" and len(server.requests) == 2
    assert [e.delay_s > 0 for e in events if isinstance(e, ModelRetry)] == [True]


def test_non_retryable_error_stops_at_once(api, monkeypatch):
    script = [error(400, "invalid_request_error", "bad request")]
    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL, fallback_model="claude-haiku-4-5"), "hi")
    assert len(server.requests) == 1
    assert result.stop_reason == "error" and "bad request" in (result.error or "")


def test_max_turns_ends_with_best_answer_so_far(api, monkeypatch):
    counter = iter(range(1, 100))

    def script(body) -> Reply:
        n = next(counter)
        return message(text(f"partial answer {n}"), tool_use("run_shell", {"command": f"echo {n}"}))

    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL, max_turns=3), "never ends")
    assert result.stop_reason == "max_turns" and result.turns == 3
    assert len(server.requests) == 3
    assert result.final_text == "partial answer 3"
    # The last turn's tool call is not run: no model would read its result.
    assert len(result.tool_calls) == 2


def test_malformed_tool_input_is_an_error_result_and_the_loop_continues(api, monkeypatch):
    script = [
        message(tool_use("run_python", {"cod": "print(1)"}, "bad1"),
                tool_use("run_python", {"code": 5}, "bad2"),
                tool_use("launch_missiles", {}, "bad3"),
                tool_use("run_python", "print(1)", "bad4"),
                tool_use("run_python", {"code": "print(2)"}, "good")),
        message(text("recovered")),
    ]
    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL), "try")
    assert result.stop_reason == "end_turn" and result.final_text == "recovered"
    res = {r["tool_use_id"]: r for r in server.tool_results()}
    for bad in ("bad1", "bad2", "bad3", "bad4"):
        assert res[bad]["is_error"] is True
    assert "code" in res["bad1"]["content"] and "required" in res["bad1"]["content"].lower()
    assert "cod" in res["bad1"]["content"]  # the unexpected field is named too
    assert "string" in res["bad2"]["content"]
    assert "unknown tool 'launch_missiles'" in res["bad3"]["content"]
    assert res["good"]["is_error"] is False and "2" in res["good"]["content"]
    reasons = [c.reason for c in result.tool_calls]
    assert reasons == ["invalid_input"] * 4 + ["exited"]


def test_tool_that_times_out(api, monkeypatch):
    script = [message(tool_use("run_python", {"code": "while True: pass"}, "t1")),
              message(text("it timed out"))]
    with serve(script, monkeypatch) as server:
        result, events = run_agent(Agent(model=MODEL, tool_timeout=1.0), "spin")
    res = server.tool_results()[0]
    assert res["is_error"] is True and "time limit" in res["content"]
    assert result.tool_calls[0].reason == "timeout"
    assert result.stop_reason == "end_turn" and result.turns == 2
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert finished[0].content == res["content"]


def test_budget_stop(api, monkeypatch):
    usage = {"input_tokens": 1000, "output_tokens": 1000}  # $0.018 per turn on Sonnet
    script = [message(text("step 1"), tool_use("run_shell", {"command": "echo 1"}), usage=usage),
              message(text("step 2"), tool_use("run_shell", {"command": "echo 2"}), usage=usage),
              message(text("never reached"), usage=usage)]
    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL, budget_usd=0.03), "spend")
    assert result.stop_reason == "budget" and result.turns == 2
    assert len(server.requests) == 2 and len(result.tool_calls) == 1
    assert result.final_text == "step 2"
    assert result.cost_usd == pytest.approx(0.036)


def test_unknown_model_is_priced_conservatively():
    assert price_for("claude-opus-4-5-20251101") == PRICES["claude-opus-4-5"]
    assert price_for("claude-opus-4-20250514") == PRICES["claude-opus-4"]
    assert price_for("some-other-model") is None
    assert all(UNKNOWN_PRICE.output >= p.output for p in PRICES.values())


def test_long_tool_output_is_trimmed_and_old_output_summarised(api, monkeypatch):
    big = "print('x' * 200_000)"
    script = [message(tool_use("run_python", {"code": big})) for _ in range(6)]
    script.append(message(text("done")))
    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL, max_tool_output=2000, context_chars=9000), "big")
    assert result.stop_reason == "end_turn"
    sizes = [len(json.dumps(r["messages"])) for r in server.requests]
    assert max(sizes) <= 9000
    first = server.tool_results()[0]["content"]
    assert "characters trimmed" in first and len(first) < 2300
    last_messages = server.requests[-1]["messages"]
    flat = json.dumps(last_messages)
    assert "older tool output removed" in flat or "earlier turns" in flat


def test_memory_window_keeps_task_and_pairs():
    mem = ShortTermMemory("the task", keep_turns=3, max_chars=10**9)
    for i in range(6):
        mem.append({"role": "assistant", "content": [
            {"type": "tool_use", "id": f"t{i}", "name": "run_shell", "input": {"command": "x"}}]})
        mem.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": "y" * 1000}]})
    mem.compact()
    msgs = mem.messages
    assert msgs[0]["role"] == "user" and msgs[0]["content"].startswith("the task")
    assert "3 earlier turns" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:]] == ["assistant", "user"] * 3
    assert [m["content"][0]["id"] for m in msgs[1::2]] == ["t3", "t4", "t5"]
    assert [m["content"][0]["tool_use_id"] for m in msgs[2::2]] == ["t3", "t4", "t5"]

    small = ShortTermMemory("task", keep_turns=50, max_chars=9000)
    for i in range(6):
        small.append({"role": "assistant", "content": [{"type": "text", "text": "go"}]})
        output = f"line {i}\n" + "z" * 1500
        small.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{i}", "content": output}]})
    assert small.size > 9000
    assert small.compact() and small.size <= 9000
    # Old output is summarised first (oldest first); the two newest results stay intact and
    # no turn had to be dropped.
    contents = [m["content"][0]["content"] for m in small.messages[2::2]]
    assert len(contents) == 6 and small.dropped_turns == 0
    assert contents[-1].endswith("z" * 1500) and contents[-2].endswith("z" * 1500)
    assert "older tool output removed" in contents[0] and "line 0" in contents[0]


def test_trimming_never_lets_a_piece_of_a_secret_through():
    """Only the kept ends of a long output are redacted; a secret cut by the trim must not
    leave a fragment behind (checked against trimming first, which does leak)."""
    forms = [SECRET, base64.b64encode(SECRET.encode()).decode(), SECRET.encode().hex()]
    redactor = cellblock.Redactor({"T": SECRET})
    margin = 6 * len(SECRET)

    def leaks(out: str) -> bool:
        return any(f[k:k + 8] in out for f in forms for k in range(len(f) - 7))

    rng = random.Random(8)
    naive_leaks = 0
    for _ in range(2000):
        t = "".join(rng.choice(forms) if rng.random() < 0.5 else "y" * rng.randint(0, 50)
                    for _ in range(rng.randint(1, 60)))
        limit = rng.randint(3, 400)
        assert not leaks(redact_and_trim(t, limit, redactor.redact, margin)), (t, limit)
        naive_leaks += leaks(redactor.redact(trim_text(t, limit)))
    assert naive_leaks > 100


def test_refused_host_names_are_redacted_too():
    """A program can try to exfiltrate a secret as a host name; the refusal report that goes
    back to the model must not carry it."""
    result = RunResult(
        exit_code=1, signal=None, reason="exited", stdout_bytes=b"", stderr_bytes=b"",
        stdout_truncated=False, stderr_truncated=False, wall_time_s=0.1, cpu_time_s=0.0,
        peak_memory_bytes=0, enforcement={},
        violations=[{"kind": "network", "host": f"{SECRET}.evil.test", "port": 443}],
    )
    redactor = cellblock.Redactor({"T": SECRET})
    out = format_run(result, 1000, redactor.redact, 6 * len(SECRET))
    assert SECRET not in out and "host=[REDACTED:T].evil.test" in out


def test_trim_text_keeps_head_and_tail():
    t = "A" * 5000 + "B" * 5000
    out = trim_text(t, 1000)
    assert out.startswith("A" * 600) and out.endswith("B" * 300) and "trimmed" in out
    assert trim_text("short", 1000) == "short"


def test_invalid_arguments():
    with pytest.raises(InvalidSpec):
        Agent(model=MODEL, tools=["run_python", "rm_rf"])
    with pytest.raises(InvalidSpec):
        Agent(model=MODEL, max_turns=0)
    with pytest.raises(cellblock.SecretError):
        Agent(model=MODEL, secrets={"SHORT": "abc"})


@pytest.mark.parametrize("demo", DEMO_TASKS, ids=[d.name for d in DEMO_TASKS])
def test_offline_demo_tasks_really_run_the_tools(demo):
    secrets = {"DEMO_TOKEN": SECRET} if demo.name == "secret" else None
    result = Agent(model="offline", secrets=secrets).run(demo.task)
    assert result.stop_reason == "end_turn" and result.model == "offline"
    assert len(result.tool_calls) == len(demo.steps)
    assert all(not c.is_error for c in result.tool_calls)
    expected = {
        "primes": "2 3 5 7 11 13 17 19 23 29 31 37 41 43 47 53 59 61 67 71 73 79 83 89 97",
        "inspect": "is not reachable",
        "fibonacci": "checked 20 numbers: all correct; last = 4181",
        "secret": "DEMO_TOKEN is: [REDACTED:DEMO_TOKEN]",
    }[demo.name]
    assert expected in result.final_text
    assert SECRET not in result.final_text and result.cost_usd == 0


def test_offline_model_says_what_it_cannot_do():
    result = Agent(model="offline").run("write a sonnet about the sea")
    assert result.stop_reason == "end_turn" and not result.tool_calls
    assert "offline demo model" in result.final_text and "not an LLM" in result.final_text


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cellblock.cli", "agent", *args],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def base_env() -> dict[str, str]:
    import os

    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "LANG")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_cli_offline_by_default_without_key():
    out = cli(DEMO_TASKS[0].task, env=base_env())
    assert out.returncode == 0, out.stderr
    assert "ANTHROPIC_API_KEY is not set" in out.stderr and "offline demo model" in out.stderr
    assert "> run_python" in out.stderr and "< read_file" in out.stderr
    assert "done: end_turn" in out.stderr
    assert "2 3 5 7 11" in out.stdout


def test_cli_json_against_server(monkeypatch):
    script = [message(tool_use("run_shell", {"command": "echo $API_TOKEN"})),
              message(text("done"))]
    with FakeAnthropic(script) as server:
        env = {**base_env(), "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": server.url,
               "API_TOKEN": SECRET}
        out = cli("--json", "--model", MODEL, "--secret", "API_TOKEN", "--max-turns", "5",
                  "do it", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["stop_reason"] == "end_turn" and data["final_text"] == "done"
    assert data["model"] == MODEL and data["tool_calls"][0]["name"] == "run_shell"
    assert set(data["usage"]) == {"input_tokens", "output_tokens", "cache_read_input_tokens",
                                  "cache_creation_input_tokens"}
    assert "[REDACTED:API_TOKEN]" in server.tool_results()[0]["content"]
    assert SECRET not in json.dumps(server.requests) + out.stdout + out.stderr


def test_cli_exit_status_on_max_turns(monkeypatch):
    with FakeAnthropic(lambda b: message(tool_use("run_shell", {"command": "true"}))) as server:
        env = {**base_env(), "ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": server.url}
        out = cli("--max-turns", "2", "loop", env=env)
    assert out.returncode == 3 and "done: max_turns" in out.stderr


def test_stream_yields_events_in_order_and_finishes(api, monkeypatch):
    script = [message(text("a"), tool_use("run_shell", {"command": "echo hi"})),
              message(text("b"))]
    with serve(script, monkeypatch):
        events = list(Agent(model=MODEL).stream("go"))
    assert [e.kind for e in events] == [
        "model_request", "model_response", "tool_started", "tool_finished",
        "model_request", "model_response", "finished"]
    assert isinstance(events[-1], Finished) and events[-1].result.final_text == "b"


def test_thinking_blocks_are_sent_back_unchanged(api, monkeypatch):
    thinking = {"type": "thinking", "thinking": "let me run it", "signature": "sig-abc"}
    script = [message(thinking, tool_use("run_shell", {"command": "echo 1"}, "t1")),
              message(text("1"))]
    with serve(script, monkeypatch) as server:
        result, _ = run_agent(Agent(model=MODEL), "go")
    assert result.final_text == "1"
    echoed = server.requests[1]["messages"][1]
    assert echoed["role"] == "assistant" and echoed["content"][0] == thinking
    assert echoed["content"][1]["id"] == "t1"
