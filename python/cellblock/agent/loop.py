"""The agent loop: a model drives one sandbox session through tool use, within turn and cost
budgets, with retries, a fallback model, redaction of everything that leaves the sandbox, and
a bounded context window.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from cellblock import Redactor, Sandbox
from cellblock.agent import offline
from cellblock.agent.bindings import Prefetching, ToolSet, ToolSource
from cellblock.agent.control import CancelScope, Ledger
from cellblock.agent.credentials import AgentCredentials
from cellblock.agent.memory import ShortTermMemory
from cellblock.agent.pricing import (
    DEFAULT_RATE_PER_HOUR,
    PRICES,
    UNKNOWN_PRICE,
    Price,
    Usage,
    price_for,
)
from cellblock.agent.results import (
    AgentEvent,
    AgentResult,
    Finished,
    ModelFallback,
    ModelRequest,
    ModelResponse,
    ModelRetry,
    StopReason,
    SubAgentResult,
    ToolCall,
    ToolFinished,
    ToolStarted,
)
from cellblock.agent.routing import RouteContext, Router, RoutingDecision
from cellblock.agent.tools import (
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TOOLS,
    SandboxLike,
    Toolbox,
    ToolRunner,
    check_tool_names,
)
from cellblock.errors import InvalidSpec
from cellblock.policy import Policy
from cellblock.redaction import redact_fields
from cellblock.secrets import normalize_secrets

if TYPE_CHECKING:
    import anthropic

    from cellblock.credentials import Credential
    from cellblock.memory import Checkpoint, CheckpointConfig, MemoryStore
    from cellblock.memory.agent import Persistence
    from cellblock.telemetry.otel import Telemetry
    from cellblock.vault import Vault

__all__ = [  # the result and event models are defined in cellblock.agent.results
    "DEFAULT_MODEL",
    "Agent",
    "AgentEvent",
    "AgentResult",
    "Finished",
    "ModelFallback",
    "ModelRequest",
    "ModelResponse",
    "ModelRetry",
    "StopReason",
    "SubAgentResult",
    "ToolCall",
    "ToolFinished",
    "ToolStarted",
    "describe_error",
    "has_api_key",
    "is_retryable",
    "require_sdk",
    "retry_delay",
]

#: Model used when none is given.
DEFAULT_MODEL = "claude-sonnet-4-6"

#: Context kept for the model, in characters of JSON (about 4 per token: ~100k tokens).
DEFAULT_CONTEXT_CHARS = 400_000

#: Longest wait between two attempts of a model request, in seconds.
MAX_RETRY_DELAY_S = 30.0

DEFAULT_SYSTEM = (
    "You complete tasks by running code in an isolated Linux sandbox through the tools you "
    "are given. Files under /workspace persist between tool calls of this task; each run "
    "starts a fresh process. The sandbox has no network access unless it was explicitly "
    "allowed. Check tool output before relying on it. When the task is done, reply with the "
    "answer and no tool call."
)

def require_sdk() -> Any:
    """The anthropic SDK, an optional extra needed only by the agent with a real model."""
    try:
        import anthropic
    except ImportError as e:
        raise ImportError(
            "the agent needs the anthropic SDK: pip install 'cellblock[agent]'"
        ) from e
    return anthropic


def is_retryable(error: Exception) -> bool:
    """429, 408, 409, 5xx (529 overloaded included) and connection failures are retried."""
    import anthropic

    if isinstance(error, anthropic.APIConnectionError):
        return True
    if isinstance(error, anthropic.APIStatusError):
        return (error.status_code in (408, 409, 429) or error.status_code >= 500
                or error.type in ("overloaded_error", "rate_limit_error"))
    return False


def retry_delay(error: Exception, attempt: int, base: float) -> float:
    """The server's retry-after if it gave one, else exponential backoff with jitter."""
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return min(max(float(headers[name]) * scale, 0.0), MAX_RETRY_DELAY_S)
        except (KeyError, ValueError):
            continue
    delay: float = min(base * 2 ** (attempt - 1), MAX_RETRY_DELAY_S)
    return delay * random.uniform(0.5, 1.0)


def describe_error(error: Exception) -> str:
    """A one-line description of a model API error."""
    status = getattr(error, "status_code", None)
    message = getattr(error, "api_message", None) or str(error)
    return f"{type(error).__name__}" + (f" {status}" if status else "") + f": {message}"


def has_api_key() -> bool:
    """True when the SDK's environment provides a credential."""
    return bool(os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("ANTHROPIC_AUTH_TOKEN"))


class Agent:
    """A model that completes a task by calling tools bound to one sandbox session.

    `model="offline"` selects the offline demo planner (no API key needed). Otherwise requests
    go through the official `anthropic` client, configured from its usual environment
    (ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL) unless `client` is given; the SDK's own retries are
    disabled so the loop controls them: each request is tried once plus `max_retries` times on
    a retryable error (429, 5xx, 529 overloaded, connection failure), then the loop switches to
    `fallback_model` for the rest of the run.

    With `sandbox=None` each run opens its own `cellblock.Sandbox(policy)`, with `secrets`
    injected as environment variables, and closes it at the end; a given sandbox is used as is
    and left open. Every tool result, event text and the final answer pass through a Redactor
    of the secrets (the agent's and the policy's).

    `agent_name` names the agent in the credential vault: each run's sandbox gets every
    credential stored for it (`cellblock vault add NAME --agent AGENT`), plus `credentials`
    (`Credential` objects, or names of the vault's session credentials), as placeholders that
    the egress proxy replaces with the real values for the credentials' hosts only.

    With `telemetry` (a `cellblock.telemetry.Telemetry`) each run is recorded as OpenTelemetry
    spans following the GenAI conventions; `name` is the agent's name there.

    `tool_sources` add tools from elsewhere (MCP servers, `@tool` functions, sub-agents; then
    `tools` may be empty, and no sandbox is opened for a run without built-in tools);
    `router` picks each turn's model; `ledger` is a budget shared with an agent tree and
    `budget_tokens` a token limit of this agent; cancelling `cancel` stops the run. Agents
    declared as data (`cellblock.agent.spec.Team`) are built with these.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        system: str | None = None,
        tools: Sequence[str] = DEFAULT_TOOLS,
        sandbox: SandboxLike | None = None,
        max_turns: int = 50,
        max_tokens: int = 8192,
        fallback_model: str | None = None,
        max_retries: int = 3,
        budget_usd: float | None = None,
        secrets: Mapping[str, str] | None = None,
        *,
        policy: Policy | None = None,
        client: anthropic.Anthropic | None = None,
        tool_timeout: float | None = None,
        max_tool_output: int = DEFAULT_MAX_OUTPUT_CHARS,
        memory_turns: int | None = None,
        context_chars: int = DEFAULT_CONTEXT_CHARS,
        retry_base_delay: float = 0.5,
        prompt_cache: bool = True,
        prices: Mapping[str, Price] = PRICES,
        telemetry: Telemetry | None = None,
        name: str = "cellblock",
        memory: MemoryStore | None = None,
        user_id: str | None = None,
        checkpoints: CheckpointConfig | None = None,
        auto_pause: float | None = None,
        rate_per_hour: float = DEFAULT_RATE_PER_HOUR,
        agent_name: str | None = None,
        credentials: Sequence[Credential | str] | None = None,
        vault: Vault | None = None,
        tool_sources: Sequence[ToolSource] = (),
        router: Router | None = None,
        ledger: Ledger | None = None,
        budget_tokens: int | None = None,
        cancel: CancelScope | None = None,
    ) -> None:
        if max_turns < 1 or max_tokens < 1 or max_retries < 0:
            raise InvalidSpec("max_turns and max_tokens must be >= 1, max_retries >= 0")
        if budget_usd is not None and budget_usd < 0:
            raise InvalidSpec("budget_usd must be >= 0")
        if rate_per_hour < 0:
            raise InvalidSpec("rate_per_hour must be >= 0")
        if budget_tokens is not None and budget_tokens < 0:
            raise InvalidSpec("budget_tokens must be >= 0")
        if tools or not tool_sources:
            check_tool_names(tools)
        #: The vault's credentials of `agent_name` (scope "agent") and `credentials` (Credential
        #: objects, or names of the vault's session credentials): every run's sandbox gets them.
        self.credentials = AgentCredentials(agent_name, credentials or (), vault)
        if self.credentials and sandbox is not None:
            raise InvalidSpec("agent_name= and credentials= go to the sandbox each run opens; a "
                              "sandbox given to the agent keeps its own")
        self.model = model
        self.fallback_model = fallback_model
        self.tools = tuple(tools)
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.max_retries = max_retries
        self.budget_usd = budget_usd
        self.policy = policy or Policy()
        self.secrets = {
            s.name: s.value.get_secret_value()
            for s in normalize_secrets(self.policy.secrets) + normalize_secrets(secrets)
        }
        self.system = system if system is not None else _system_prompt(
            self.secrets, self.credentials.known_names() if self.credentials else [])
        self.sandbox = sandbox
        self.tool_timeout = tool_timeout
        self.max_tool_output = max_tool_output
        self.memory_turns = memory_turns or max_turns
        self.context_chars = context_chars
        self.retry_base_delay = retry_base_delay
        self.prompt_cache = prompt_cache
        self.prices = prices
        self.client = client
        self.telemetry = telemetry
        self.name = name
        #: With a store: memory tools for the model, archived turns, checkpoints and resume.
        self.memory = memory
        self.user_id = user_id
        self.checkpoints = checkpoints
        #: The run's own sandbox freezes after this many seconds without a call (the time
        #: the model thinks), so it is not billed; see `AgentResult.paused_seconds`.
        self.auto_pause = auto_pause
        self.rate_per_hour = rate_per_hour
        if memory is not None and memory_turns is None:
            self.memory_turns = memory.config.max_turns
        #: Tools from other sources (MCP servers, `@tool` functions, sub-agents).
        self.tool_sources = tuple(tool_sources)
        #: Sends some turns to a cheaper model (see cellblock.agent.routing).
        self.router = router
        #: The budget shared with an agent tree (see cellblock.agent.control).
        self.ledger = ledger
        self.budget_tokens = budget_tokens
        #: Cancelling this scope stops the run (and closes its own sandbox at once).
        self.cancel = cancel

    def run(self, task: str, on_event: Callable[[AgentEvent], None] | None = None) -> AgentResult:
        """Run the loop to its end; `on_event` sees every event as it happens."""
        event = None
        for event in self.stream(task):
            if on_event is not None:
                on_event(event)
        return cast(Finished, event).result

    def stream(self, task: str) -> Iterator[AgentEvent]:
        """Run the loop, yielding an event for each model request, tool call and tool result;
        the last event is `Finished` with the AgentResult. With `telemetry`, the run is
        recorded as GenAI spans (`invoke_agent`, `chat`, `execute_tool`, sandbox runs)."""
        yield from self._observed(_Run(self, task).events())

    def resume(
        self, checkpoint: str = "latest", on_event: Callable[[AgentEvent], None] | None = None
    ) -> AgentResult:
        """Continues a checkpointed run (`latest`, a session id or a checkpoint id) to its end:
        its workspace and state are restored, completed tool calls are not run again."""
        event = None
        for event in self.resume_stream(checkpoint):
            if on_event is not None:
                on_event(event)
        return cast(Finished, event).result

    def resume_stream(self, checkpoint: str = "latest") -> Iterator[AgentEvent]:
        """`resume`, yielding events as `stream` does."""
        from cellblock.memory.agent import find_checkpoint

        found = find_checkpoint(self, checkpoint)
        yield from self._observed(_Run(self, str(found.state["task"]), resume=found).events())

    def _observed(self, events: Iterator[AgentEvent]) -> Iterator[AgentEvent]:
        """The run's events, recorded as spans on the way when the agent has telemetry."""
        if self.telemetry is None:
            return events
        from cellblock.telemetry.agent import traced

        return traced(events, self.telemetry, self.name, self.model)


class _Run:
    """The state of one `Agent.stream` call."""

    def __init__(self, agent: Agent, task: str, resume: Checkpoint | None = None) -> None:
        self.agent = agent
        self.task = task
        self.started = time.monotonic()
        self.redactor = Redactor(agent.secrets) if agent.secrets else None
        # The longest form a secret can be printed in: JSON \u escapes take 6 chars a byte.
        self.redact_margin = 6 * max((len(v.encode()) for v in agent.secrets.values()), default=0)
        self.hooks: Persistence | None = None
        if agent.memory is not None:
            from cellblock.memory.agent import Persistence

            self.hooks = Persistence(self, resume)
        self.memory = ShortTermMemory(
            task, keep_turns=agent.memory_turns, max_chars=agent.context_chars,
            on_drop=self.hooks.archive if self.hooks is not None else None,
        )
        self.model = agent.model
        self.turns = 0
        self.usage = Usage()
        self.cost = 0.0
        self.cost_is_estimate = False
        self.best_text = ""
        self.model_stop_reason: str | None = None
        self.tool_calls: list[ToolCall] = []
        self.sandbox_seconds = 0.0
        self.error: str | None = None
        self.client: anthropic.Anthropic | None = None
        #: Tool results of the current turn so far (set when resuming in the middle of one).
        self.pending: list[dict[str, Any]] | None = None
        self.prior_redactions: dict[str, int] = {}
        self.prior_wall_time = 0.0
        self.prior_paused = 0.0
        self.sandbox: SandboxLike | None = None
        self.paused_at_start = 0.0
        #: The model asked this turn (the router's choice, or the main model).
        self.turn_model = agent.model
        self.turn_reason = "main"
        self.routing: list[RoutingDecision] = []
        self.last_tools: tuple[str, ...] = ()
        #: The dearest turn so far: the estimate of the next one for the shared budget.
        self.dearest = (0.0, 0)
        self.tools: ToolSet | None = None

    def redact(self, text: str) -> str:
        return self.redactor.redact(text) if self.redactor is not None else text

    def events(self) -> Iterator[AgentEvent]:
        sandbox: SandboxLike | None
        owned: Sandbox | None = None
        forget: Callable[[], None] | None = None
        if self.agent.sandbox is not None:
            sandbox = self.agent.sandbox
        elif not self.agent.tools and self.hooks is None:
            sandbox = None  # no sandbox tools (e.g. an orchestrator): no session to hold
        else:
            sandbox = owned = Sandbox(
                policy=self.agent.policy.merged(secrets=self.agent.secrets or None),
                auto_pause=self.agent.auto_pause,
                credentials=self.agent.credentials.resolve() or None,
            )
        self.sandbox = sandbox
        if owned is not None and self.agent.cancel is not None:
            forget = self.agent.cancel.on_cancel(owned.close)  # kills a tool call in progress
        self.paused_at_start = _paused(sandbox)
        # Every field of every event (tool inputs, errors, results) is redacted, not only the
        # texts the loop builds; with a redactor of its own, so that `redactions` keeps
        # counting what was found in tool results and answers.
        fields = Redactor(self.agent.secrets) if self.agent.secrets else None
        opened: list[Any] = []
        try:
            toolbox: ToolRunner = Toolbox(
                cast(SandboxLike, sandbox), self.agent.tools, redact=self.redact,
                redact_margin=self.redact_margin, timeout=self.agent.tool_timeout,
                max_output_chars=self.agent.max_tool_output,
            ) if self.agent.tools else cast(ToolRunner, None)
            if self.agent.tool_sources:
                for source in self.agent.tool_sources:
                    opened.append(source.open())
                toolbox = self.tools = ToolSet(
                    toolbox, opened, redact=self.redact, redact_margin=self.redact_margin,
                    max_output_chars=self.agent.max_tool_output)
            if self.hooks is not None:
                toolbox = self.hooks.start(cast(SandboxLike, sandbox), toolbox)
            if self.hooks is not None and self.hooks.finished is not None:
                result = self.hooks.finished
            else:
                loop = self._loop(toolbox)
                while True:
                    try:
                        event = next(loop)
                    except StopIteration as done:
                        stop = done.value
                        break
                    yield redact_fields(event, fields)
                _close_all(opened)  # first: children still running report in the result
                result = self._result(stop)
                if self.hooks is not None:
                    self.hooks.finish(result)
        finally:
            _close_all(opened)
            if forget is not None:
                forget()
            if owned is not None:
                owned.close()
            if self.client is not None and self.agent.client is None:
                self.client.close()
        yield redact_fields(Finished(result=result), fields)

    def _loop(self, toolbox: ToolRunner) -> Generator[AgentEvent, None, StopReason]:
        """Yields events; returns the stop reason."""
        agent = self.agent
        if self.pending is not None:
            # Resumed in the middle of a turn: run the tool calls not completed yet.
            last = self.memory.messages[-1]["content"]
            stop = yield from self._run_tools(
                toolbox, [b for b in last if b.get("type") == "tool_use"], self.pending)
            if stop is not None:
                return stop
        while True:
            if self._cancelled():
                return "cancelled"
            if self._over_budget():
                return "budget"
            if self.hooks is not None:
                self.hooks.tick()
            self.memory.compact()
            self._route()
            yield ModelRequest(
                turn=self.turns + 1, model=self.turn_model, messages=len(self.memory.messages),
                context_chars=self.memory.size,
            )
            started = time.monotonic()
            reply = yield from self._request(toolbox.schemas)
            duration = time.monotonic() - started
            if reply is None:
                return "error"
            self.turns += 1
            self._account(reply)
            content: list[dict[str, Any]] = reply["content"]
            self.memory.append({"role": "assistant", "content": content})
            self.model_stop_reason = reply.get("stop_reason")
            text = self.redact("\n".join(b["text"] for b in content if b.get("type") == "text"))
            if text.strip():
                self.best_text = text
            tool_uses = [b for b in content if b.get("type") == "tool_use"]
            yield ModelResponse(
                turn=self.turns, model=self.turn_model, stop_reason=self.model_stop_reason,
                text=text, tool_uses=len(tool_uses), usage=_usage(reply), cost_usd=self.cost,
                duration_s=duration,
            )
            if not tool_uses:
                return "end_turn"
            if self._over_budget():
                return "budget"
            if self.turns >= agent.max_turns:
                return "max_turns"
            self.pending = []
            if self.hooks is not None:
                self.hooks.replied()
            stop = yield from self._run_tools(toolbox, tool_uses, self.pending)
            if stop is not None:
                return stop

    def _run_tools(
        self, toolbox: ToolRunner, tool_uses: list[dict[str, Any]],
        results: list[dict[str, Any]],
    ) -> Generator[AgentEvent, None, StopReason | None]:
        """Runs the turn's tool calls that have no result in `results` yet, then appends the
        results message; returns a stop reason if the loop must end."""
        done = {r["tool_use_id"] for r in results}
        self.pending = results
        self.last_tools = tuple(b["name"] for b in tool_uses)
        if isinstance(toolbox, Prefetching):
            toolbox.prefetch([b for b in tool_uses if b["id"] not in done])
        for block in tool_uses:
            if block["id"] in done:
                continue
            yield ToolStarted(turn=self.turns, id=block["id"], name=block["name"],
                              input=block.get("input"))
            outcome = (toolbox.call(block["name"], block.get("input")) if self.hooks is None
                       else self.hooks.run_tool(toolbox, block["id"], block["name"],
                                                block.get("input")))
            call = ToolCall(
                turn=self.turns, id=block["id"], name=block["name"], input=block.get("input"),
                duration_s=outcome.duration_s, reason=outcome.reason,
                exit_code=outcome.exit_code, is_error=outcome.is_error,
                violations=outcome.violations,
            )
            self.tool_calls.append(call)
            self.sandbox_seconds += outcome.duration_s
            results.append({"type": "tool_result", "tool_use_id": block["id"],
                            "content": outcome.content, "is_error": outcome.is_error})
            if self.hooks is not None:
                self.hooks.tool_done(block["name"])  # before the event: never lost
            yield ToolFinished(call=call, content=outcome.content)
            if self._cancelled():
                return "cancelled"
            if outcome.fatal:
                self.error = outcome.content
                return "error"
        self.pending = None
        self.memory.append({"role": "user", "content": results})
        return None

    def _cancelled(self) -> bool:
        scope = self.agent.cancel
        if scope is not None and scope.cancelled:
            self.error = self.error or f"cancelled: {scope.reason}"
            return True
        return False

    def _over_budget(self) -> bool:
        agent = self.agent
        if agent.budget_usd is not None and self.cost >= agent.budget_usd:
            return True
        if agent.budget_tokens is not None and _tokens(self.usage) >= agent.budget_tokens:
            return True
        return agent.ledger is not None and not agent.ledger.allows(*self.dearest)

    def _route(self) -> None:
        """Picks this turn's model (after a fallback switch, the fallback model)."""
        agent = self.agent
        self.turn_model, self.turn_reason = self.model, "main"
        if agent.router is None or self.model != agent.model:
            return
        ctx = RouteContext(
            turn=self.turns + 1, task_chars=len(self.task), context_chars=self.memory.size,
            last_tools=self.last_tools, main_model=self.model,
        )
        self.turn_model, self.turn_reason = agent.router.decide(ctx)

    def _price(self, model: str) -> Price:
        price = price_for(model, self.agent.prices)
        if price is None:
            price, self.cost_is_estimate = UNKNOWN_PRICE, True
        return price

    def _account(self, reply: dict[str, Any]) -> None:
        usage = _usage(reply)
        cost = self._price(self.turn_model).cost(usage)
        self.usage += usage
        self.cost += cost
        tokens = _tokens(usage)
        self.dearest = (max(self.dearest[0], cost), max(self.dearest[1], tokens))
        if self.agent.ledger is not None:
            self.agent.ledger.charge(cost, tokens)
        if self.agent.router is not None:
            self.routing.append(RoutingDecision(
                turn=self.turns, model=self.turn_model, reason=self.turn_reason, usage=usage,
                cost_usd=cost, main_model_cost_usd=self._price(self.agent.model).cost(usage),
            ))

    def _request(
        self, tools: list[dict[str, Any]]
    ) -> Generator[AgentEvent, None, dict[str, Any] | None]:
        """One model request with retries and fallback. Yields retry/fallback events; returns
        the reply (a Messages API message as a dict) or None after recording the error."""
        agent = self.agent
        while True:
            last: Exception
            for attempt in range(1, agent.max_retries + 2):
                try:
                    return self._create(tools)
                except _ModelError as e:
                    if not is_retryable(e.error):
                        self.error = f"{self.turn_model}: {describe_error(e.error)}"
                        return None
                    last = e.error
                if attempt <= agent.max_retries:
                    delay = retry_delay(last, attempt, agent.retry_base_delay)
                    yield ModelRetry(turn=self.turns + 1, model=self.turn_model, attempt=attempt,
                                     error=describe_error(last), delay_s=delay)
                    time.sleep(delay)
            failure = (f"{self.turn_model}: {describe_error(last)} "
                       f"({agent.max_retries + 1} attempts)")
            if agent.fallback_model is None or self.turn_model == agent.fallback_model:
                self.error = failure
                return None
            yield ModelFallback(turn=self.turns + 1, from_model=self.turn_model,
                                to_model=agent.fallback_model, error=failure)
            self.model = self.turn_model = agent.fallback_model
            self.turn_reason = "fallback"

    def _create(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """The model's reply as a dict; raises _ModelError for the SDK's errors."""
        agent = self.agent
        if self.turn_model == offline.OFFLINE_MODEL:
            return offline.respond(self.memory.messages)
        # Imported here: the SDK takes seconds to import and the offline model needs none of it.
        anthropic = require_sdk()

        params: dict[str, Any] = {
            "model": self.turn_model, "max_tokens": agent.max_tokens, "system": agent.system,
            "messages": self.memory.messages, "tools": tools,
        }
        if agent.prompt_cache:
            params["cache_control"] = {"type": "ephemeral"}
        if self.hooks is not None:
            params.update(self.hooks.request_options())
        try:
            message = self._api().messages.create(**params)
        except anthropic.AnthropicError as e:
            raise _ModelError(e) from e
        data: dict[str, Any] = message.to_dict(mode="json", warnings=False)
        return data

    def _api(self) -> anthropic.Anthropic:
        """The SDK client with its own retries off: the caller's, or one made for this run."""
        import anthropic

        if self.client is None:
            given = self.agent.client
            if given is None:
                self.client = anthropic.Anthropic(max_retries=0)
            else:
                self.client = given if given.max_retries == 0 else given.with_options(max_retries=0)
        return self.client

    def _result(self, stop: StopReason) -> AgentResult:
        paused = self._paused_seconds()  # one reading: the sandbox may still be frozen
        return AgentResult(
            final_text=self.best_text,
            stop_reason=stop,
            model_stop_reason=self.model_stop_reason,
            turns=self.turns,
            tool_calls=self.tool_calls,
            model=self.model,
            usage=self.usage,
            cost_usd=self.cost,
            cost_is_estimate=self.cost_is_estimate,
            sandbox_seconds=self.sandbox_seconds,
            paused_seconds=paused,
            idle_saving_usd=paused * self.agent.rate_per_hour / 3600,
            wall_time_s=self.prior_wall_time + time.monotonic() - self.started,
            redactions=self._redactions(),
            error=self.error,
            session_id=self.hooks.session_id if self.hooks is not None else None,
            **self._tree_fields(),
        )

    def _tree_fields(self) -> dict[str, Any]:
        """Routing and sub-agent fields of the result."""
        fields: dict[str, Any] = {}
        if self.agent.router is not None:
            main = sum(d.main_model_cost_usd for d in self.routing)
            fields.update(routing=self.routing, main_model_cost_usd=main,
                          routing_saving_usd=main - self.cost)
        subs: list[SubAgentResult] = []
        for source in self.tools.sources if self.tools is not None else ():
            subs.extend(getattr(source, "sub_agent_results", ()))
        if subs:
            fields.update(sub_agent_results=subs, tree_cost_usd=self.cost + sum(
                _tree_cost(s.result) for s in subs if s.result is not None))
        return fields

    def _paused_seconds(self) -> float:
        """Frozen time of this run's sandbox (since the run took it), earlier processes'
        included."""
        if self.sandbox is None:
            return self.prior_paused
        return self.prior_paused + _paused(self.sandbox) - self.paused_at_start

    def _redactions(self) -> dict[str, int]:
        counts = dict(self.prior_redactions)
        for name, n in (self.redactor.counts if self.redactor is not None else {}).items():
            counts[name] = counts.get(name, 0) + n
        return counts

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run elsewhere, as JSON-ready data."""
        return {
            "task": self.task, "messages": self.memory.messages,
            "dropped_turns": self.memory.dropped_turns, "model": self.model,
            "turns": self.turns, "usage": self.usage.model_dump(), "cost_usd": self.cost,
            "cost_is_estimate": self.cost_is_estimate, "best_text": self.best_text,
            "model_stop_reason": self.model_stop_reason,
            "tool_calls": [c.model_dump(mode="json") for c in self.tool_calls],
            "sandbox_seconds": self.sandbox_seconds, "pending": self.pending,
            "redactions": self._redactions(), "paused_seconds": self._paused_seconds(),
            "wall_time_s": self.prior_wall_time + time.monotonic() - self.started,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `state()` of an earlier process."""
        self.memory.restore(state["messages"], state["dropped_turns"])
        self.model = state["model"]
        self.turns = state["turns"]
        self.usage = Usage(**state["usage"])
        self.cost = state["cost_usd"]
        self.cost_is_estimate = state["cost_is_estimate"]
        self.best_text = state["best_text"]
        self.model_stop_reason = state["model_stop_reason"]
        self.tool_calls = [ToolCall(**c) for c in state["tool_calls"]]
        self.sandbox_seconds = state["sandbox_seconds"]
        self.pending = state["pending"]
        self.prior_redactions = dict(state["redactions"])
        self.prior_wall_time = state["wall_time_s"]
        self.prior_paused = float(state.get("paused_seconds", 0.0))


class _ModelError(Exception):
    """An error of the model API (the SDK's exception in `error`)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _paused(sandbox: object) -> float:
    """Seconds a sandbox spent frozen by auto-pause (0 for one that cannot pause)."""
    return float(getattr(sandbox, "paused_seconds", 0.0))


def _close_all(opened: list[Any]) -> None:
    """Closes the open tool sources, last opened first (each once)."""
    while opened:
        opened.pop().close()


def _tokens(usage: Usage) -> int:
    return (usage.input_tokens + usage.output_tokens + usage.cache_read_input_tokens
            + usage.cache_creation_input_tokens)


def _tree_cost(result: AgentResult) -> float:
    return result.tree_cost_usd if result.tree_cost_usd is not None else result.cost_usd


def _usage(reply: dict[str, Any]) -> Usage:
    raw = reply.get("usage") or {}
    return Usage(**{k: raw.get(k) or 0 for k in Usage.model_fields})


def _system_prompt(secrets: Mapping[str, str], credentials: Sequence[str] = ()) -> str:
    prompt = DEFAULT_SYSTEM
    if secrets:
        names = ", ".join(sorted(secrets))
        prompt += (f"\n\nThese environment variables hold credentials you may use in "
                   f"code: {names}. Their values are secret and are redacted from all output.")
    if credentials:
        prompt += ("\n\nThese environment variables hold placeholders of credentials: "
                   f"{', '.join(credentials)}. Use them as if they were the real values in "
                   "requests to the services they belong to; the network proxy puts the real "
                   "value in, for those services only.")
    return prompt

