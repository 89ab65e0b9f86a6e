"""Sub-agents: an orchestrator delegates tasks through its `delegate` tool.

Each delegation runs the named agent of the team in a thread of its own, with its own sandbox
session and a budget slice carved from the orchestrator's (see `control.Ledger`). At most
`max_concurrent` run at once (a semaphore; the calls of one turn start together). A sub-agent
is given `timeout_seconds` from when it starts running: then its cancel scope fires, which
closes its sandbox session (killing every process in it) and stops its loop. Cancelling the
orchestrator cancels every child the same way. Whatever happens to a child comes back to the
orchestrator's model as a tool result and in `AgentResult.sub_agent_results`; it never
raises in the parent.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from cellblock.agent.bindings import outcome
from cellblock.agent.control import Budget, CancelScope, Ledger
from cellblock.agent.offline import OFFLINE_MODEL
from cellblock.agent.results import SubAgentResult, SubAgentStatus
from cellblock.agent.tools import ToolOutcome
from cellblock.policy import Policy

if TYPE_CHECKING:
    import anthropic

    from cellblock import Sandbox
    from cellblock.agent.spec import SubAgents, Team

#: The orchestrator's tool.
DELEGATE = "delegate"

#: Seconds a child gets, past its timeout, to notice it was stopped before it is reported.
GRACE_S = 10.0

_ids = itertools.count(1)


class DelegateInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    agent: str
    task: str


class Delegation:
    """The `delegate` tool source of an orchestrator."""

    def __init__(self, team: Team, config: SubAgents, ledger: Ledger, cancel: CancelScope) -> None:
        self.team = team
        self.config = config
        self.ledger = ledger
        self.cancel = cancel

    def open(self) -> OpenDelegation:
        return OpenDelegation(self)


class _Child:
    """One delegation in flight."""

    def __init__(self, owner: OpenDelegation, agent: str, task: str) -> None:
        self.id = f"sub_{next(_ids)}"
        self.agent = agent
        self.task = task
        self.owner = owner
        self.scope = CancelScope(owner.source.cancel)
        self.done = threading.Event()
        self.result: SubAgentResult | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"cellblock-{self.id}")

    def _finish(self, status: SubAgentStatus, **fields: Any) -> None:
        self.result = SubAgentResult(id=self.id, agent=self.agent, task=self.task,
                                     status=status, **fields)

    def _run(self) -> None:
        sem = self.owner.semaphore
        try:
            while not sem.acquire(timeout=0.05):
                if self.scope.cancelled:
                    self._finish("cancelled", error="cancelled before it started")
                    return
            try:
                self._run_agent()
            finally:
                sem.release()
        except Exception as e:  # a child's failure is a result, never a crash of the parent
            self._finish("failed", error=f"{type(e).__name__}: {e}")
        finally:
            self.done.set()

    def _run_agent(self) -> None:
        from cellblock import Sandbox

        src = self.owner.source
        if self.scope.cancelled:
            self._finish("cancelled", error="cancelled before it started")
            return
        spec = src.team[self.agent]
        started = time.time()
        ledger = src.ledger.child(spec.budget.usd, spec.budget.tokens)
        slice_fields: dict[str, Any] = {"budget_usd": ledger.usd_limit,
                                        "budget_tokens": ledger.tokens_limit}
        sandbox: Sandbox | None = None
        timer = threading.Timer(src.config.timeout_seconds, self.scope.cancel, ("timeout",))
        try:
            if not ledger.allows():
                self._finish("refused", error="the orchestrator's budget is spent",
                             started_at=started, ended_at=time.time(), **slice_fields)
                return
            sandbox = Sandbox(policy=src.team.policy_of(spec))
            self.scope.on_cancel(sandbox.close)  # kills whatever runs in it, at once
            if src.team.on_session is not None:
                src.team.on_session(sandbox)
            timer.start()
            agent = src.team.build(self.agent, sandbox=sandbox, ledger=ledger, cancel=self.scope,
                                   client=self.owner.client(spec.model))
            result = agent.run(self.task)
            status: SubAgentStatus
            error: str | None
            if result.stop_reason == "end_turn":  # finished, even if a cancel came after
                status, error = "ok", None
            elif self.scope.reason == "timeout":
                status, error = "timeout", f"timed out after {src.config.timeout_seconds}s"
            elif self.scope.cancelled:
                status, error = "cancelled", f"cancelled: {self.scope.reason}"
            else:
                status = "failed"
                error = result.error or f"stopped: {result.stop_reason}"
            self._finish(status, result=result, error=error, started_at=started,
                         ended_at=time.time(), **slice_fields)
        finally:
            timer.cancel()
            if sandbox is not None:
                sandbox.close()
            ledger.release()
            self.scope.detach()

    def wait(self) -> SubAgentResult:
        """The child's result. Its own timer enforces its timeout; once it is cancelled it has
        GRACE_S to stop (it may be inside a model request), else it is reported as it is."""
        deadline: float | None = None
        while not self.done.wait(0.05):
            if self.scope.cancelled:
                deadline = deadline or time.monotonic() + GRACE_S
                if time.monotonic() > deadline:
                    break
        if self.result is None:
            status: SubAgentStatus = "timeout" if self.scope.reason == "timeout" else "cancelled"
            return SubAgentResult(id=self.id, agent=self.agent, task=self.task, status=status,
                                  error=f"{status}: the sub-agent did not stop in time")
        return self.result

    def start(self) -> None:
        self.thread.start()


class OpenDelegation:
    """The `delegate` tool for one run of the orchestrator."""

    def __init__(self, source: Delegation) -> None:
        self.source = source
        self.semaphore = threading.BoundedSemaphore(source.config.max_concurrent)
        allowed = source.config.allowed_agents
        described = "; ".join(
            f"{n}: {(source.team[n].instructions or 'no description').splitlines()[0]}"
            for n in allowed)
        self.schemas: list[dict[str, Any]] = [{
            "name": DELEGATE,
            "description": (
                "Delegate a task to a specialised sub-agent, which works in a sandbox of its "
                f"own and returns its answer. Calls made in the same turn run in parallel (at "
                f"most {source.config.max_concurrent} at once). Agents: {described}"),
            "input_schema": {
                "type": "object",
                "properties": {
                    "agent": {"type": "string", "enum": list(allowed)},
                    "task": {"type": "string", "description": "what the sub-agent must do"},
                },
                "required": ["agent", "task"],
                "additionalProperties": False,
            },
        }]
        self.sub_agent_results: list[SubAgentResult] = []
        self._prefetched: dict[str, deque[_Child]] = {}
        self._children: list[_Child] = []
        self._client: anthropic.Anthropic | None = None
        self._client_lock = threading.Lock()

    def client(self, model: str) -> anthropic.Anthropic | None:
        """One SDK client shared by this run's children (it is thread-safe): making one costs
        ~0.1 s, mostly its TLS context. None for the offline model or when the team has one."""
        if model == OFFLINE_MODEL or self.source.team.client is not None:
            return None
        with self._client_lock:
            if self._client is None:
                import anthropic

                self._client = anthropic.Anthropic(max_retries=0)
            return self._client

    def _start(self, agent: str, task: str) -> _Child:
        child = _Child(self, agent, task)
        self._children.append(child)
        child.start()
        return child

    def prefetch(self, calls: Sequence[dict[str, Any]]) -> None:
        """Starts every valid delegation of the turn now; `call` then waits for each."""
        for c in calls:
            args = self._parse(c.get("input"))
            if isinstance(args, DelegateInput):
                self._prefetched.setdefault(_key(c.get("input")), deque()).append(
                    self._start(args.agent, args.task))

    def _parse(self, raw: object) -> DelegateInput | str:
        try:
            args = DelegateInput.model_validate(raw)
        except ValidationError as e:
            return f"invalid input for {DELEGATE}: {e.errors()[0].get('msg')}"
        if args.agent not in self.source.config.allowed_agents:
            return (f"agent {args.agent!r} is not allowed; allowed agents: "
                    f"{self.source.config.allowed_agents}")
        return args

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        started = time.monotonic()
        queue = self._prefetched.get(_key(raw_input))
        if queue:
            child = queue.popleft()
        else:
            args = self._parse(raw_input)
            if isinstance(args, str):
                return outcome(args, is_error=True, started=started, reason="invalid_input")
            if self.source.cancel.cancelled:
                return outcome("cancelled", is_error=True, started=started)
            child = self._start(args.agent, args.task)
        result = child.wait()
        self.sub_agent_results.append(result)
        r = result.result
        report = {
            "id": result.id, "agent": result.agent, "status": result.status,
            "answer": r.final_text if r is not None else None, "error": result.error,
            "cost_usd": round(r.cost_usd, 6) if r is not None else 0.0,
            "turns": r.turns if r is not None else 0,
        }
        return outcome(json.dumps(report, indent=1), is_error=result.status != "ok",
                       started=started)

    def close(self) -> None:
        """The orchestrator's run is over: children still running are cancelled and joined."""
        for child in self._children:
            if not child.done.is_set():
                child.scope.cancel("the orchestrator's run ended")
        for child in self._children:
            child.thread.join(GRACE_S)
            if child.result is not None and child.result not in self.sub_agent_results:
                self.sub_agent_results.append(child.result)
        if self._client is not None and not any(c.thread.is_alive() for c in self._children):
            self._client.close()  # else a stuck child still holds it: left to the collector


def _key(raw: object) -> str:
    return json.dumps(raw, sort_keys=True, default=str)


def demo_team(model: str, budget: Budget | None = None, policy: Policy | None = None) -> Team:
    """The orchestration demo's team (`cellblock agent --orchestrate`): a lead that delegates
    to three workers at once. With the offline model every agent follows its demo plan.
    `budget` is the lead's (the tree's); the workers' sandboxes get `policy`."""
    from cellblock.agent.offline import ORCHESTRATION_AGENTS
    from cellblock.agent.spec import AgentSpec, SubAgents, Team

    workers = [
        AgentSpec(name=name, model=model, instructions=f"You are the {name} agent: {demo.task}",
                  environment="demo")
        for name, demo in ORCHESTRATION_AGENTS.items()
    ]
    lead = AgentSpec(
        name="lead", model=model, tools=[], budget=budget or Budget(),
        instructions="You are an orchestrator. Delegate the parts of the task to your "
                     "sub-agents, in parallel where you can, then integrate their reports.",
        sub_agents=SubAgents(allowed_agents=[w.name for w in workers], max_concurrent=3,
                             timeout_seconds=600),
    )
    return Team([lead, *workers], environments={"demo": policy or Policy()})
