"""What an agent run produces: its result, the results of its sub-agents, and the events it
yields on the way (`Agent.stream`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from cellblock.agent.pricing import Usage
from cellblock.agent.routing import RoutingDecision
from cellblock.agent.tools import ToolReason

StopReason = Literal["end_turn", "max_turns", "budget", "error", "cancelled"]


class ToolCall(BaseModel):
    """One tool call the model made and how it ended."""

    model_config = ConfigDict(frozen=True)

    turn: int
    id: str
    name: str
    input: Any
    duration_s: float
    reason: ToolReason
    exit_code: int | None
    is_error: bool
    #: What the supervisor refused during the call, by kind (seccomp, dns, network).
    violations: dict[str, int] = {}


class AgentResult(BaseModel):
    """The outcome of `Agent.run`: the answer, why the loop stopped, and what it cost."""

    model_config = ConfigDict(frozen=True)

    final_text: str
    stop_reason: StopReason
    #: The model's own stop reason on its last response (end_turn, tool_use, max_tokens, ...).
    model_stop_reason: str | None
    turns: int
    tool_calls: list[ToolCall]
    #: The model that answered last (the fallback model after a switch).
    model: str
    usage: Usage
    cost_usd: float
    #: True when a model missing from the price table was priced at the highest known rates.
    cost_is_estimate: bool
    #: Seconds spent inside tool calls (sandbox runs and file transfers).
    sandbox_seconds: float
    #: Seconds the run's sandbox spent frozen by auto-pause while the model was thinking.
    paused_seconds: float = 0.0
    #: What that frozen time would have cost, billed at the agent's `rate_per_hour`.
    idle_saving_usd: float = 0.0
    wall_time_s: float
    #: Redactions made in tool results and in the final text, per secret name.
    redactions: dict[str, int]
    #: What went wrong when stop_reason is "error".
    error: str | None = None
    #: The checkpointed session (when the agent has a memory store): resume it with this id.
    session_id: str | None = None
    #: Each turn's routing decision and cost (with a router).
    routing: list[RoutingDecision] = []
    #: What the same tokens would have cost on the main model (with a router), and the saving.
    main_model_cost_usd: float | None = None
    routing_saving_usd: float = 0.0
    #: Results of the sub-agents this agent delegated to (an orchestrator).
    sub_agent_results: list[SubAgentResult] = []
    #: This agent's cost plus its sub-agents' (theirs included), when it delegated;
    #: `cost_usd` is this agent's own turns only.
    tree_cost_usd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what `cellblock agent --json` prints)."""
        return self.model_dump(mode="json")


SubAgentStatus = Literal["ok", "failed", "timeout", "cancelled", "refused"]


class SubAgentResult(BaseModel):
    """One delegation of an orchestrator: which agent, the task, and how it ended. A failure
    is reported here (status and error), never raised in the parent."""

    model_config = ConfigDict(frozen=True)

    id: str
    agent: str
    task: str
    status: SubAgentStatus
    #: The sub-agent's own result (None when it never started).
    result: AgentResult | None = None
    error: str | None = None
    #: Seconds since the epoch: when it started running (after waiting for a slot) and ended.
    started_at: float | None = None
    ended_at: float | None = None
    #: The budget slice it was given (None: unlimited).
    budget_usd: float | None = None
    budget_tokens: int | None = None


AgentResult.model_rebuild()


class _Event(BaseModel):
    model_config = ConfigDict(frozen=True)


class ModelRequest(_Event):
    """A request to the model is about to be sent."""

    kind: Literal["model_request"] = "model_request"
    turn: int
    model: str
    messages: int
    context_chars: int


class ModelRetry(_Event):
    """A request failed with a retryable error; the loop waits `delay_s` and tries again."""

    kind: Literal["model_retry"] = "model_retry"
    turn: int
    model: str
    attempt: int
    error: str
    delay_s: float


class ModelFallback(_Event):
    """The primary model kept failing; the loop switches to the fallback model."""

    kind: Literal["model_fallback"] = "model_fallback"
    turn: int
    from_model: str
    to_model: str
    error: str


class ModelResponse(_Event):
    """The model answered (text is redacted)."""

    kind: Literal["model_response"] = "model_response"
    turn: int
    model: str
    stop_reason: str | None
    text: str
    tool_uses: int
    usage: Usage
    duration_s: float
    cost_usd: float


class ToolStarted(_Event):
    """A tool call is about to run."""

    kind: Literal["tool_started"] = "tool_started"
    turn: int
    id: str
    name: str
    input: Any


class ToolFinished(_Event):
    """A tool call ended; `content` is exactly what is sent back to the model."""

    kind: Literal["tool_finished"] = "tool_finished"
    call: ToolCall
    content: str


class Finished(_Event):
    """The loop ended; always the last event."""

    kind: Literal["finished"] = "finished"
    result: AgentResult


AgentEvent = (
    ModelRequest | ModelRetry | ModelFallback | ModelResponse
    | ToolStarted | ToolFinished | Finished
)
