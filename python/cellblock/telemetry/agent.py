"""Spans of the agent loop, following the OpenTelemetry GenAI semantic conventions.

One `invoke_agent {name}` span per run; under it a `chat {model}` span per model request and an
`execute_tool {tool}` span per tool call, which is the current span while the tool runs, so the
sandbox run it makes (see `otel.Telemetry.on_run`) becomes its child. Built from the loop's own
events: nothing is re-parsed from output.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from opentelemetry import context, trace
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from cellblock.agent.loop import (
    AgentEvent,
    Finished,
    ModelFallback,
    ModelRequest,
    ModelResponse,
    ModelRetry,
    ToolFinished,
    ToolStarted,
)
from cellblock.agent.pricing import Usage
from cellblock.telemetry.otel import Telemetry

#: The provider name of the Anthropic API in the conventions.
PROVIDER = "anthropic"


def usage_attributes(usage: Usage) -> dict[str, int]:
    """The GenAI usage attributes of a response (or of a run's total)."""
    return {
        gen_ai.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
        gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
        gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: usage.cache_read_input_tokens,
        gen_ai.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS: usage.cache_creation_input_tokens,
    }


class AgentTracer:
    """Turns one agent run's events into spans; `observe` each event in order, `close` last.

    `close()` ends whatever is still open (a run abandoned midway, or an exception), so that
    no span is left unfinished.
    """

    def __init__(self, telemetry: Telemetry, agent_name: str, model: str) -> None:
        self._t = telemetry
        self._agent = telemetry.tracer.start_span(
            f"invoke_agent {agent_name}", kind=SpanKind.INTERNAL,
            attributes={
                gen_ai.GEN_AI_OPERATION_NAME: "invoke_agent",
                gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
                gen_ai.GEN_AI_AGENT_NAME: agent_name,
                gen_ai.GEN_AI_REQUEST_MODEL: model,
            },
        )
        self._tokens = [context.attach(trace.set_span_in_context(self._agent))]
        self._chat: Span | None = None
        self._tool: Span | None = None

    def observe(self, event: object) -> None:
        """Records one event of the loop (call before the loop goes on)."""
        if isinstance(event, ModelRequest):
            self._end_chat(error="interrupted")
            self._chat = self._t.tracer.start_span(
                f"chat {event.model}", kind=SpanKind.CLIENT,
                attributes={
                    gen_ai.GEN_AI_OPERATION_NAME: "chat",
                    gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
                    gen_ai.GEN_AI_REQUEST_MODEL: event.model,
                    "cellblock.agent.turn": event.turn,
                    "cellblock.agent.context_chars": event.context_chars,
                },
            )
        elif isinstance(event, ModelRetry) and self._chat is not None:
            self._chat.add_event("cellblock.model.retry", {
                "cellblock.attempt": event.attempt, "error.type": self._t.redact(event.error),
                "cellblock.delay_s": event.delay_s})
        elif isinstance(event, ModelFallback) and self._chat is not None:
            self._chat.add_event("cellblock.model.fallback", {
                "cellblock.from_model": event.from_model, "cellblock.to_model": event.to_model})
            self._chat.set_attribute(gen_ai.GEN_AI_REQUEST_MODEL, event.to_model)
        elif isinstance(event, ModelResponse):
            self._response(event)
        elif isinstance(event, ToolStarted):
            self._tool_started(event)
        elif isinstance(event, ToolFinished):
            self._tool_finished(event)
        elif isinstance(event, Finished):
            self._finished(event)

    def _response(self, event: ModelResponse) -> None:
        if self._chat is None:
            return
        span, self._chat = self._chat, None
        span.set_attributes({
            gen_ai.GEN_AI_RESPONSE_MODEL: event.model,
            gen_ai.GEN_AI_RESPONSE_FINISH_REASONS: [event.stop_reason or "unknown"],
            **usage_attributes(event.usage),
            "cellblock.agent.tool_uses": event.tool_uses,
            "cellblock.cost.usd": event.cost_usd,
        })
        if self._t.record_content:
            span.set_attribute("gen_ai.output.messages", self._t.redact(event.text))
        span.end()
        labels = {gen_ai.GEN_AI_OPERATION_NAME: "chat", gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
                  gen_ai.GEN_AI_REQUEST_MODEL: event.model}
        self._t.token_usage.record(event.usage.input_tokens,
                                   {**labels, "gen_ai.token.type": "input"})
        self._t.token_usage.record(event.usage.output_tokens,
                                   {**labels, "gen_ai.token.type": "output"})
        self._t.operation_duration.record(event.duration_s, labels)

    def _tool_started(self, event: ToolStarted) -> None:
        self._end_tool(error="interrupted")
        span = self._t.tracer.start_span(
            f"execute_tool {event.name}", kind=SpanKind.INTERNAL,
            attributes={
                gen_ai.GEN_AI_OPERATION_NAME: "execute_tool",
                gen_ai.GEN_AI_TOOL_NAME: event.name,
                gen_ai.GEN_AI_TOOL_CALL_ID: event.id,
                gen_ai.GEN_AI_TOOL_TYPE: "function",
                "cellblock.agent.turn": event.turn,
            },
        )
        if self._t.record_content:
            span.set_attribute(gen_ai.GEN_AI_TOOL_CALL_ARGUMENTS,
                               self._t.redact(json.dumps(event.input, default=str)))
        self._tool = span
        self._tokens.append(context.attach(trace.set_span_in_context(span)))

    def _tool_finished(self, event: ToolFinished) -> None:
        span = self._tool
        if span is None:
            return
        call = event.call
        span.set_attribute("cellblock.tool.reason", call.reason)
        span.set_attribute("cellblock.tool.duration_s", call.duration_s)
        if call.exit_code is not None:
            span.set_attribute("process.exit.code", call.exit_code)
        if self._t.record_content:
            span.set_attribute(gen_ai.GEN_AI_TOOL_CALL_RESULT, self._t.redact(event.content))
        if call.is_error:
            span.set_attribute("error.type", call.reason)
            span.set_status(Status(StatusCode.ERROR, call.reason))
        self._end_tool()

    def _finished(self, event: Finished) -> None:
        r = event.result
        self._end_chat(error="no response")
        self._end_tool(error="interrupted")
        attrs: dict[str, Any] = {
            "cellblock.agent.stop_reason": r.stop_reason,
            "cellblock.agent.turns": r.turns,
            "cellblock.agent.tool_calls": len(r.tool_calls),
            "cellblock.cost.usd": r.cost_usd,
            "cellblock.agent.paused_seconds": r.paused_seconds,
            "cellblock.cost.idle_saving_usd": r.idle_saving_usd,
            **usage_attributes(r.usage),
        }
        self._agent.set_attributes(attrs)
        if r.stop_reason == "error":
            self._agent.set_attribute("error.type", "agent_error")
            self._agent.set_status(Status(StatusCode.ERROR, self._t.redact(r.error or "")))

    def _end_chat(self, error: str | None = None) -> None:
        if self._chat is not None:
            if error is not None:
                self._chat.set_attribute("error.type", error)
                self._chat.set_status(Status(StatusCode.ERROR, error))
            self._chat.end()
            self._chat = None

    def _end_tool(self, error: str | None = None) -> None:
        if self._tool is not None:
            if error is not None:
                self._tool.set_attribute("error.type", error)
                self._tool.set_status(Status(StatusCode.ERROR, error))
            self._tool.end()
            self._tool = None
            context.detach(self._tokens.pop())

    def close(self) -> None:
        """Ends every span still open, the agent's last."""
        self._end_chat(error="interrupted")
        self._end_tool(error="interrupted")
        while self._tokens:
            context.detach(self._tokens.pop())
        self._agent.end()


def traced(
    events: Iterator[AgentEvent], telemetry: Telemetry, agent_name: str, model: str
) -> Iterator[AgentEvent]:
    """Passes an agent run's events through, recording them as spans on the way."""
    tracer = AgentTracer(telemetry, agent_name, model)
    try:
        for event in events:
            tracer.observe(event)
            yield event
    finally:
        tracer.close()
