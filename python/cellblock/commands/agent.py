"""`cellblock agent [options] "TASK"`: a model completes TASK with tools bound to one sandbox."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, TextIO

from cellblock.agent import DEMO_TASKS, OFFLINE_MODEL, Agent
from cellblock.agent.loop import (
    DEFAULT_MODEL,
    AgentEvent,
    AgentResult,
    Finished,
    ModelFallback,
    ModelResponse,
    ModelRetry,
    ToolFinished,
    ToolStarted,
    has_api_key,
)
from cellblock.agent.offline import OFFLINE_NOTICE
from cellblock.commands.run import add_limit_options, policy_from_args

if TYPE_CHECKING:
    from cellblock.memory import MemoryStore

#: Exit status when the loop stopped on max_turns or budget (the answer may be partial).
EXIT_LIMIT = 3
#: Exit status when the loop stopped on an error (model API or sandbox).
EXIT_ERROR = 1


def _short(text: str, width: int) -> str:
    """The first non-empty line of `text`, cut to `width`, noting how much more there is."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "(empty)"
    first = lines[0].strip()
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    if len(first) + len(more) > width:
        first = first[: max(10, width - len(more) - 3)] + "..."
    return first + more


def _outcome_line(event: ToolFinished) -> str:
    """What a tool call produced, in a few words: status, time, first line of output."""
    call = event.call
    body = [ln for ln in event.content.splitlines()[1:] if not ln.startswith("[std")]
    if call.reason == "invalid_input" or call.reason == "error":
        return f"{call.reason}: {_short(event.content, 200)}"
    if call.reason == "ok":
        return _short(event.content, 200)
    status = f"exit {call.exit_code}" if call.reason == "exited" else call.reason
    return f"{status}: {_short(chr(10).join(body), 200)}"


class Progress:
    """Prints events as short readable lines (model turns, tool calls and their outcomes)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.width = max(40, shutil.get_terminal_size((100, 20)).columns - 8)

    def __call__(self, event: AgentEvent) -> None:
        for line in self._lines(event):
            print(line, file=self.out)
        self.out.flush()

    def _lines(self, e: AgentEvent) -> list[str]:
        w = self.width
        if isinstance(e, ModelResponse):
            u = e.usage
            head = (f"[turn {e.turn}] {e.model}: {e.stop_reason} ({e.duration_s:.1f}s, "
                    f"{u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens}"
                    f" in / {u.output_tokens} out tokens)")
            return [head] + [f"  {_short(e.text, w)}"] * bool(e.text.strip())
        if isinstance(e, ModelRetry):
            return [f"  ! {e.error}; retry {e.attempt} in {e.delay_s:.1f}s"]
        if isinstance(e, ModelFallback):
            return [f"  ! {e.error}; switching to fallback model {e.to_model}"]
        if isinstance(e, ToolStarted):
            arg = e.input if not isinstance(e.input, dict) else next(iter(e.input.values()), "")
            return [f"  > {e.name}: {_short(str(arg), w - len(e.name))}"]
        if isinstance(e, ToolFinished):
            return [f"  < {e.call.name} {e.call.duration_s:.2f}s {_outcome_line(e)}"[: w + 8]]
        if isinstance(e, Finished):
            return [summary(e.result)]
        return []


def summary(r: AgentResult) -> str:
    """The one-line end-of-run report."""
    u = r.usage
    cost = f"${r.cost_usd:.4f}" + (" (estimated: model not in the price table)"
                                   if r.cost_is_estimate else "")
    line = (f"done: {r.stop_reason} after {r.turns} turns, {len(r.tool_calls)} tool calls; "
            f"tokens {u.input_tokens} in, {u.output_tokens} out, cache {u.cache_read_input_tokens}"
            f" read / {u.cache_creation_input_tokens} written; {cost}; "
            f"sandbox {r.sandbox_seconds:.2f}s of {r.wall_time_s:.2f}s")
    if r.paused_seconds:
        line += f"; auto-paused {r.paused_seconds:.2f}s (saved ${r.idle_saving_usd:.6f})"
    if r.main_model_cost_usd is not None:
        routed = sum(1 for d in r.routing if d.reason != "main")
        line += (f"; routing: {routed} of {len(r.routing)} turns routed, saved "
                 f"${r.routing_saving_usd:.4f} of ${r.main_model_cost_usd:.4f}")
    line += f"; session {r.session_id}" if r.session_id else ""
    return line + (f"\nerror: {r.error}" if r.error else "")


def exit_status(result: AgentResult) -> int:
    if result.stop_reason == "end_turn":
        return 0
    return EXIT_ERROR if result.stop_reason == "error" else EXIT_LIMIT


def choose_model(requested: str | None, err: TextIO) -> str:
    """The model to use: the one asked for, else a real one when a key is set, else offline."""
    if requested is None and not has_api_key():
        print(f"cellblock agent: ANTHROPIC_API_KEY is not set: using the {OFFLINE_NOTICE}.",
              file=err)
        return OFFLINE_MODEL
    model = requested or DEFAULT_MODEL
    if model == OFFLINE_MODEL:
        print(f"cellblock agent: using the {OFFLINE_NOTICE}.", file=err)
    return model


def cmd_team(args: argparse.Namespace) -> int:
    """`--orchestrate` (the demo team) or `--agents FILE`: run a team's orchestrator."""
    from cellblock.agent.offline import ORCHESTRATION_DEMO
    from cellblock.agent.orchestrate import demo_team
    from cellblock.agent.spec import Team
    from cellblock.cli import fail

    policy = policy_from_args(args)
    if args.agents:
        team = Team.from_toml(args.agents, secrets=dict(policy.secrets))
        name = args.agent or next(
            (n for n, a in team.agents.items() if a.sub_agents is not None), None)
        if name is None:
            fail(f"{args.agents}: no agent has sub_agents; name one with --agent")
        task = (args.task or "").strip()
        if not task:
            fail('no task given (usage: cellblock agent --agents FILE [--agent NAME] "TASK")')
    else:
        from cellblock.agent.control import Budget

        budget = Budget(usd=args.budget_usd, turns=args.max_turns)
        team = demo_team(choose_model(args.model, sys.stderr), budget, policy)
        name, task = "lead", (args.task or ORCHESTRATION_DEMO.task)
    show = not args.json or sys.stderr.isatty()
    result = team.build(str(name)).run(task, on_event=Progress(sys.stderr) if show else None)
    if args.json:
        print(json.dumps(result.to_dict()))
        return exit_status(result)
    if show:
        for s in result.sub_agent_results:
            r = s.result
            cost = f"${r.cost_usd:.4f}, {r.turns} turns" if r is not None else "not run"
            print(f"  sub-agent {s.agent} [{s.id}]: {s.status} ({cost})"
                  + (f": {s.error}" if s.error else ""), file=sys.stderr)
        if result.tree_cost_usd is not None:
            print(f"  tree cost: ${result.tree_cost_usd:.4f}", file=sys.stderr)
    if result.final_text:
        print(result.final_text)
    return exit_status(result)


def cmd_agent(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    if args.orchestrate or args.agents:
        if args.resume is not None:
            fail("--resume does not apply to --orchestrate / --agents")
        return cmd_team(args)
    if args.resume is None and not (args.task or "").strip():
        fail('no task given (usage: cellblock agent [options] "TASK")')
    if args.resume is not None and args.task:
        fail("--resume continues a checkpointed task: give no TASK with it")
    policy = policy_from_args(args)
    model = choose_model(args.model, sys.stderr)
    store = open_store(args)
    telemetry = None
    if args.trace or args.otel != "none":
        from cellblock import Redactor
        from cellblock.telemetry import configure

        redact = Redactor(dict(policy.secrets)).redact if policy.secrets else None
        telemetry = configure(args.otel, trace_file=args.trace, redact=redact)
    agent = Agent(
        model=model, fallback_model=args.fallback_model, max_turns=args.max_turns,
        budget_usd=args.budget_usd, max_retries=args.max_retries, policy=policy,
        memory=store, user_id=args.user, telemetry=telemetry, auto_pause=args.auto_pause,
    )
    show = not args.json or sys.stderr.isatty()
    on_event = Progress(sys.stderr) if show else None
    try:
        if args.resume is not None:
            result = agent.resume(args.resume, on_event=on_event)
        else:
            result = agent.run(args.task, on_event=on_event)
    finally:
        if telemetry is not None:
            telemetry.shutdown()
        if store is not None:
            store.close()
    if args.json:
        print(json.dumps(result.to_dict()))
    elif result.final_text:
        print(result.final_text)
    return exit_status(result)


def open_store(args: argparse.Namespace) -> MemoryStore | None:
    """The memory store when --memory-db, --resume or $CELLBLOCK_MEMORY_URL asks for one."""
    if args.memory_db is None and args.resume is None and not os.environ.get(
            "CELLBLOCK_MEMORY_URL"):
        return None
    from cellblock.memory import MemoryStore

    store = MemoryStore(None if args.memory_db in (None, "default") else args.memory_db)
    print(f"cellblock agent: memory and checkpoints in {store.url}", file=sys.stderr)
    return store


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demos = "\n".join(f"  {d.task}" for d in DEMO_TASKS)
    p = sub.add_parser(
        "agent", help="let a model complete a task with tools in a sandbox",
        usage='cellblock agent [options] "TASK"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A model completes TASK by calling tools (run_python, run_shell, run_node, "
                    "read_file, write_file) bound to one sandbox session. The endpoint comes "
                    "from ANTHROPIC_API_KEY / ANTHROPIC_BASE_URL. Progress goes to stderr, the "
                    "answer to stdout.",
        epilog=f"Without ANTHROPIC_API_KEY (or with --model {OFFLINE_MODEL}) the offline demo "
               f"model runs; it is a deterministic planner that knows these tasks:\n{demos}\n\n"
               f"Exit status: 0 answered, {EXIT_LIMIT} stopped by --max-turns or "
               f"--budget-usd, {EXIT_ERROR} error.",
    )
    p.add_argument("--json", action="store_true", help="print the AgentResult as one JSON object")
    p.add_argument("--model", metavar="M",
                   help=f"model id (default {DEFAULT_MODEL}; '{OFFLINE_MODEL}' without a key)")
    p.add_argument("--fallback-model", metavar="M",
                   help="model used after the primary keeps failing")
    p.add_argument("--max-turns", metavar="N", type=int, default=50,
                   help="model requests at most (default 50)")
    p.add_argument("--budget-usd", metavar="X", type=float, help="stop once the cost reaches X")
    p.add_argument("--max-retries", metavar="N", type=int, default=3,
                   help="retries per model on 429/5xx/overloaded (default 3)")
    p.add_argument("--trace", metavar="FILE",
                   help="append the run's OpenTelemetry spans to FILE as JSON lines")
    p.add_argument("--otel", choices=("none", "console", "otlp"), default="none",
                   help="also export spans and metrics (otlp: OTEL_EXPORTER_OTLP_* variables)")
    p.add_argument("--memory-db", metavar="URL",
                   help="memory and checkpoints in this store ('default': "
                        "$XDG_DATA_HOME/cellblock/memory.db; also $CELLBLOCK_MEMORY_URL)")
    p.add_argument("--resume", metavar="latest|ID",
                   help="continue a checkpointed run (latest, a session or checkpoint id)")
    p.add_argument("--user", metavar="NAME", help="whose memory (default: the login name)")
    p.add_argument("--auto-pause", metavar="S", type=float,
                   help="freeze the sandbox after S seconds without a tool call (root: the "
                        "freezer cgroup); the time frozen is reported as idle saving")
    p.add_argument("--orchestrate", action="store_true",
                   help="run the orchestration demo: a lead agent delegates to three "
                        "sub-agents, each in a sandbox of its own, and integrates their reports")
    p.add_argument("--agents", metavar="FILE",
                   help="a team of agents declared in TOML: run its orchestrator (see --agent)")
    p.add_argument("--agent", metavar="NAME",
                   help="with --agents: the agent to run (default: the first with sub_agents)")
    add_limit_options(p)
    p.add_argument("task", metavar="TASK", nargs="?", help="what to do")
    p.set_defaults(func=cmd_agent)
