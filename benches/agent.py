"""Agent loop overhead per tool call, beyond the model and the sandbox (issue 8: < 5 ms).

The model is the scripted server of tests/fake_anthropic.py on 127.0.0.1 (real `anthropic`
client, real HTTP); every turn asks for one tool call, then a final answer ends the run. Time is
split three ways: inside `client.messages.create` (SDK + loopback server), inside the sandbox
session's own methods (a timing wrapper around the real `cellblock.Sandbox`), and the rest: the
loop's overhead (input validation, redaction, trimming, formatting, memory window, events,
accounting), which is what the target is about.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import anthropic
from _env import environment
from fake_anthropic import FakeAnthropic, message, text, tool_use

import cellblock
from cellblock.agent import Agent

TARGET_MS = 5.0
RUNS = 3
SECRETS = {"API_TOKEN": "sk-bench-0123456789abcdef", "DB_PASSWORD": "hunter2-hunter2-hunter2"}


class Timed:
    """Forwards method calls to `inner` and adds up the time spent inside them."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def scenario(turns: int, call: dict[str, Any], secrets: dict[str, str] | None) -> dict[str, float]:
    """One agent run of `turns` tool calls; milliseconds per tool call of each share."""
    script = [message(text(f"step {i}"), tool_use(call["name"], call["input"]))
              for i in range(turns)]
    script.append(message(text("done")))
    with FakeAnthropic(script) as server:
        client = anthropic.Anthropic(base_url=server.url, api_key="bench", max_retries=0)
        model = Timed(client.messages)
        client.messages.create = model.create  # type: ignore[method-assign]
        policy = cellblock.Policy(secrets=secrets or {})
        with cellblock.Sandbox(policy=policy) as session:
            session.write_file("notes.txt", "a short file the read_file scenario reads\n")
            box = Timed(session)
            agent = Agent(model="claude-sonnet-4-6", sandbox=box, client=client,
                          secrets=secrets, max_turns=turns + 1)
            started = time.perf_counter()
            result = agent.run("bench")
            wall = time.perf_counter() - started
    assert result.stop_reason == "end_turn" and len(result.tool_calls) == turns, result
    per = 1000 / turns
    return {
        "sandbox": box.seconds * per,
        "model": model.seconds * 1000 / (turns + 1),
        "overhead": (wall - model.seconds - box.seconds) * per,
    }


def median_of(runs: int, *args: Any) -> dict[str, float]:
    samples = [scenario(*args) for _ in range(runs)]
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def main() -> None:
    shell_true = {"name": "run_shell", "input": {"command": "true"}}
    big_output = {"name": "run_python", "input": {"code": "print('x' * 1_000_000)"}}
    read = {"name": "read_file", "input": {"path": "notes.txt"}}
    rows = [
        ("run_shell `true`, 20 turns", median_of(RUNS, 20, shell_true, None)),
        ("run_shell `true`, 20 turns, 2 secrets", median_of(RUNS, 20, shell_true, SECRETS)),
        ("run_python 1 MB stdout, 10 turns, 2 secrets", median_of(RUNS, 10, big_output, SECRETS)),
        ("read_file, 49 turns (long history)", median_of(RUNS, 49, read, SECRETS)),
    ]
    print(f"## Agent loop overhead per tool call "
          f"(median of {RUNS} runs; target < {TARGET_MS:g} ms)")
    print("| scenario | sandbox ms/call | model request ms/turn (local server) "
          "| **loop overhead ms/call** |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows:
        ok = "" if r["overhead"] < TARGET_MS else " (over target)"
        print(f"| {name} | {r['sandbox']:.2f} | {r['model']:.2f} | **{r['overhead']:.2f}**{ok} |")
    print()
    print("| environment | |")
    print("| --- | --- |")
    for key, value in {**environment(), "anthropic SDK": anthropic.__version__}.items():
        print(f"| {key} | {value} |")


if __name__ == "__main__":
    main()
