"""The offline demo model: a deterministic planner for a few built-in tasks, for use without an
API key (`--model offline`).

It is not a language model and does not pretend to be one: it recognises a handful of demo
tasks by keywords and drives the real tools through the real agent loop, in the real sandbox,
with a fixed plan; its final answer quotes what the tools actually returned. Any other task
gets an answer saying what the offline model can do.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

#: The model name that selects this planner.
OFFLINE_MODEL = "offline"

#: How the offline model is described to users.
OFFLINE_NOTICE = (
    "offline demo model: a deterministic planner for the built-in demo tasks, not an LLM; "
    "the tools really run in the sandbox (set ANTHROPIC_API_KEY to use a real model)"
)


class Step(BaseModel):
    """One tool call of a plan, with the sentence the model says before it."""

    model_config = ConfigDict(frozen=True)

    say: str
    tool: str
    input: dict[str, str]


class DemoTask(BaseModel):
    """A built-in task: recognised when all of `keywords` occur in the task text."""

    model_config = ConfigDict(frozen=True)

    name: str
    task: str
    keywords: tuple[str, ...]
    steps: tuple[Step, ...]
    #: Builds the final answer from the tool results' texts, in step order.
    finish: Callable[[Sequence[str]], str]
    #: All steps are asked for in one turn (they run concurrently when the tools allow).
    batch: bool = False


def stdout_of(tool_text: str) -> str:
    """The stdout section of a run tool's result text (see tools.format_run)."""
    _, _, rest = tool_text.partition("[stdout]\n")
    if not rest:
        _, _, rest = tool_text.partition("]\n")  # "[stdout (capped by the sandbox)]"
    return rest.split("\n[stderr", 1)[0].strip()


_PRIMES_CODE = """\
n = 100
sieve = [True] * n
sieve[0] = sieve[1] = False
for i in range(2, int(n ** 0.5) + 1):
    if sieve[i]:
        sieve[i * i::i] = [False] * len(sieve[i * i::i])
primes = [i for i, is_prime in enumerate(sieve) if is_prime]
with open("/workspace/primes.txt", "w") as f:
    f.write(" ".join(map(str, primes)) + "\\n")
print(f"{len(primes)} primes below {n} written to /workspace/primes.txt")
"""

_INSPECT_SHELL = """\
echo "user: $(id)"
echo "kernel: $(uname -srm)"
echo "root dir: $(ls / | tr '\\n' ' ')"
echo "workspace: $(pwd)"
grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
echo "processes visible: $(ls /proc | grep -c '^[0-9]')"
"""

_NETWORK_CODE = """\
import socket
try:
    socket.create_connection(("1.1.1.1", 443), timeout=3).close()
    print("network: 1.1.1.1:443 is reachable")
except OSError as e:
    print(f"network: 1.1.1.1:443 is not reachable ({e.strerror or e})")
"""

_FIB_NODE = """\
const fs = require("fs");
const fib = [0, 1];
while (fib.length < 20) fib.push(fib[fib.length - 1] + fib[fib.length - 2]);
fs.writeFileSync("/workspace/fib.json", JSON.stringify(fib));
console.log(`wrote ${fib.length} Fibonacci numbers to /workspace/fib.json`);
"""

_FIB_CHECK = """\
import json
fib = json.load(open("/workspace/fib.json"))
ok = len(fib) == 20 and fib[:2] == [0, 1] and all(
    fib[i] == fib[i - 1] + fib[i - 2] for i in range(2, len(fib)))
print(f"checked {len(fib)} numbers: {'all correct' if ok else 'WRONG'}; last = {fib[-1]}")
"""

_SECRET_SHELL = """\
echo "DEMO_TOKEN is: ${DEMO_TOKEN:-<not set: pass --secret DEMO_TOKEN>}"
printf %s "$DEMO_TOKEN" | base64
"""

DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask(
        name="primes",
        task="Compute the primes below 100 with Python, save them to a file, then read it back.",
        keywords=("prime",),
        steps=(
            Step(say="I'll compute the primes below 100 with a sieve in Python and save them "
                     "to /workspace/primes.txt.",
                 tool="run_python", input={"code": _PRIMES_CODE}),
            Step(say="Now I'll read the file back to check what was saved.",
                 tool="read_file", input={"path": "/workspace/primes.txt"}),
        ),
        finish=lambda r: (
            f"The sandbox reported: {stdout_of(r[0])}.\n"
            f"Read back from /workspace/primes.txt: {r[1].strip()}"
        ),
    ),
    DemoTask(
        name="inspect",
        task="Inspect the sandbox: who am I, what can I see, and can I reach the network?",
        keywords=("inspect",),
        steps=(
            Step(say="I'll look at the identity, filesystem and privileges from inside.",
                 tool="run_shell", input={"command": _INSPECT_SHELL}),
            Step(say="Now I'll try to open a connection to the internet.",
                 tool="run_python", input={"code": _NETWORK_CODE}),
        ),
        finish=lambda r: f"Inside the sandbox:\n{stdout_of(r[0])}\n{stdout_of(r[1])}",
    ),
    DemoTask(
        name="fibonacci",
        task="Use Node.js to write the first 20 Fibonacci numbers to a JSON file, "
             "then check the file with Python.",
        keywords=("fibonacci",),
        steps=(
            Step(say="I'll generate the numbers with Node.js and write /workspace/fib.json.",
                 tool="run_node", input={"code": _FIB_NODE}),
            Step(say="Now I'll check the file independently with Python.",
                 tool="run_python", input={"code": _FIB_CHECK}),
        ),
        finish=lambda r: f"Node.js: {stdout_of(r[0])}\nPython: {stdout_of(r[1])}",
    ),
    DemoTask(
        name="secret",
        task="Print the secret DEMO_TOKEN from inside the sandbox (it must come back redacted).",
        keywords=("demo_token",),
        steps=(
            Step(say="I'll print the secret, raw and base64-encoded.",
                 tool="run_shell", input={"command": _SECRET_SHELL}),
        ),
        finish=lambda r: f"The sandbox printed:\n{stdout_of(r[0])}",
    ),
)


def _integrate(results: Sequence[str]) -> str:
    """The orchestrator's report: one line per sub-agent, from its `delegate` result."""
    lines = ["Reports of the sub-agents, each from a sandbox of its own:"]
    for raw in results:
        r = json.loads(raw)
        answer = (r.get("answer") or r.get("error") or "").strip().replace("\n", " / ")
        lines.append(f"- {r['agent']} ({r['status']}, {r['turns']} turns): {answer}")
    return "\n".join(lines)


#: Agents of the orchestration demo (`cellblock agent --orchestrate`) and their demo tasks.
ORCHESTRATION_AGENTS: dict[str, DemoTask] = {
    "primes": DEMO_TASKS[0], "inspector": DEMO_TASKS[1], "fibonacci": DEMO_TASKS[2],
}

#: The orchestrator's demo: three delegations in one turn (run concurrently), then a report.
ORCHESTRATION_DEMO = DemoTask(
    name="orchestrate",
    task="Orchestrate: have the sub-agents compute primes, write Fibonacci numbers and inspect "
         "their sandboxes in parallel, then integrate their reports.",
    keywords=("orchestrate",),
    steps=tuple(
        Step(say=f"I'll delegate to the {name} agent.", tool="delegate",
             input={"agent": name, "task": demo.task})
        for name, demo in ORCHESTRATION_AGENTS.items()
    ),
    finish=_integrate,
    batch=True,
)


def find_demo(task: str) -> DemoTask | None:
    """The built-in demo task that `task` asks for, if any."""
    text = task.lower()
    demos = (ORCHESTRATION_DEMO, *DEMO_TASKS)
    return next((d for d in demos if all(k in text for k in d.keywords)), None)


def _unknown_task_answer() -> str:
    tasks = "\n".join(f"  - {d.task}" for d in DEMO_TASKS)
    return (
        f"I am the {OFFLINE_NOTICE}. I only know these demo tasks:\n{tasks}\n"
        "For any other task, use a real model."
    )


def _task_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if isinstance(b, dict))


def _reply(content: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
    return {
        "model": OFFLINE_MODEL,
        "role": "assistant",
        "content": content,
        "stop_reason": stop_reason,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def respond(messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The offline model's next message (Messages API shape) for this conversation."""
    demo = find_demo(_task_text(messages[0]["content"]))
    if demo is None:
        return _reply([_text(_unknown_task_answer())], "end_turn")
    results: list[str] = []
    for message in messages[1:]:
        if message["role"] != "user" or not isinstance(message["content"], list):
            continue
        for block in message["content"]:
            if block.get("type") != "tool_result":
                continue
            content = _task_text(block.get("content", ""))
            if block.get("is_error") and not demo.batch:
                failed = f"The step failed, so I stop here. The tool said:\n{content}"
                return _reply([_text(failed)], "end_turn")
            results.append(content)
    if demo.batch and not results:
        calls = [{"type": "tool_use", "id": f"toolu_offline_{i}", "name": step.tool,
                  "input": dict(step.input)} for i, step in enumerate(demo.steps, 1)]
        return _reply([_text(" ".join(step.say for step in demo.steps)), *calls], "tool_use")
    if len(results) < len(demo.steps):
        step = demo.steps[len(results)]
        call = {"type": "tool_use", "id": f"toolu_offline_{len(results) + 1}",
                "name": step.tool, "input": dict(step.input)}
        return _reply([_text(step.say), call], "tool_use")
    return _reply([_text(demo.finish(results))], "end_turn")
