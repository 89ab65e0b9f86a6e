"""Tool bindings: tools from sources other than the sandbox (MCP servers, Python functions,
sub-agents), combined with the built-in sandbox tools into what the loop calls.

A `ToolSource` is opened once per run (`open()`), giving `OpenTools`: schemas, `call`, and
`close` at the end of the run. `ToolSet` dispatches each call by name and passes every result
through the run's redactor, whatever source it came from.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from cellblock.agent.tools import (
    DEFAULT_MAX_OUTPUT_CHARS,
    Redact,
    ToolOutcome,
    ToolRunner,
    no_redaction,
    redact_and_trim,
)
from cellblock.errors import InvalidSpec

#: What the Messages API accepts as a tool name.
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_tool_name(name: str) -> str:
    if not name or len(name) > 64 or set(name) - _NAME_CHARS:
        raise InvalidSpec(f"tool name {name!r}: 1-64 characters of letters, digits, _ and -")
    return name


class OpenTools(Protocol):
    """Tools of one source, open for one run."""

    schemas: list[dict[str, Any]]

    def call(self, name: str, raw_input: object) -> ToolOutcome: ...

    def close(self) -> None: ...


@runtime_checkable
class Prefetching(Protocol):
    """Tools that can start all of a turn's calls at once (sub-agents run concurrently)."""

    def prefetch(self, calls: Sequence[dict[str, Any]]) -> None: ...


class ToolSource(Protocol):
    """Something that gives an agent tools for a run (an MCP server, Python functions)."""

    def open(self) -> OpenTools: ...


def outcome(content: str, *, is_error: bool = False, started: float | None = None,
            reason: str | None = None) -> ToolOutcome:
    """A ToolOutcome for a tool that is not a sandbox run."""
    return ToolOutcome(
        content=content, is_error=is_error, reason=reason or ("error" if is_error else "ok"),
        duration_s=time.monotonic() - started if started is not None else 0.0,
    )


class ToolSet:
    """The built-in tools (if any) and the open sources' tools, under unique names."""

    def __init__(
        self,
        builtin: ToolRunner | None,
        sources: Sequence[OpenTools],
        *,
        redact: Redact = no_redaction,
        redact_margin: int = 0,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        self._builtin = builtin
        self.sources = tuple(sources)
        self._owner: dict[str, OpenTools] = {}
        self.schemas: list[dict[str, Any]] = list(builtin.schemas) if builtin else []
        taken = {s["name"] for s in self.schemas}
        for source in sources:
            for schema in source.schemas:
                name = schema["name"]
                if name in taken:
                    raise InvalidSpec(f"two tools are named {name!r}")
                taken.add(name)
                self._owner[name] = source
                self.schemas.append(schema)
        if not self.schemas:
            raise InvalidSpec("the agent has no tools")
        self._redact = redact
        self._margin = redact_margin
        self._limit = max_output_chars

    def prefetch(self, calls: Sequence[dict[str, Any]]) -> None:
        """Lets each source start its share of a turn's calls before they are awaited."""
        by_source: dict[int, list[dict[str, Any]]] = {}
        for c in calls:
            owner = self._owner.get(c["name"])
            if owner is not None and isinstance(owner, Prefetching):
                by_source.setdefault(id(owner), []).append(c)
        for source in {id(s): s for s in self._owner.values()}.values():
            if isinstance(source, Prefetching) and id(source) in by_source:
                source.prefetch(by_source[id(source)])

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        owner = self._owner.get(name)
        if owner is None:
            if self._builtin is None:
                return outcome(f"unknown tool {name!r}; available: "
                               f"{[s['name'] for s in self.schemas]}", is_error=True,
                               reason="invalid_input")
            return self._builtin.call(name, raw_input)  # redacts its own output
        started = time.monotonic()
        try:
            result = owner.call(name, raw_input)
        except Exception as e:  # a tool's failure is the model's information, not a crash
            result = outcome(f"{type(e).__name__}: {e}", is_error=True, started=started)
        return result.model_copy(update={
            "content": redact_and_trim(result.content, self._limit, self._redact, self._margin)})


class FunctionTool(BaseModel):
    """A Python function offered to the model as a tool (made by `@tool`)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    name: str
    description: str
    func: Callable[..., Any]
    input_model: type[BaseModel]

    def schema_for_model(self) -> dict[str, Any]:
        schema = self.input_model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


def tool(
    func: Callable[..., Any] | None = None, *, name: str | None = None,
    description: str | None = None,
) -> Any:
    """Decorator: a Python function as a tool, its input schema typed from its signature and
    its description from its docstring. Use as `@tool` or `@tool(name=..., description=...)`."""

    def make(f: Callable[..., Any]) -> FunctionTool:
        fields: dict[str, Any] = {}
        for p in inspect.signature(f).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise InvalidSpec(f"tool {f.__name__}: *args/**kwargs cannot be typed")
            if p.annotation is inspect.Parameter.empty:
                raise InvalidSpec(f"tool {f.__name__}: parameter {p.name!r} has no type hint")
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (p.annotation, default)
        model = create_model(
            f"{f.__name__}_input", __config__=ConfigDict(extra="forbid"), **fields)
        return FunctionTool(
            name=check_tool_name(name or f.__name__),
            description=description or inspect.getdoc(f) or f.__name__,
            func=f, input_model=model,
        )

    return make(func) if func is not None else make


class FunctionTools:
    """A ToolSource of `@tool` functions; they run in this process, not in the sandbox."""

    def __init__(self, tools: Sequence[FunctionTool]) -> None:
        self.tools = {t.name: t for t in tools}
        self.schemas = [t.schema_for_model() for t in tools]

    def open(self) -> FunctionTools:
        return self

    def close(self) -> None:
        pass

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        started = time.monotonic()
        t = self.tools[name]
        try:
            args = t.input_model.model_validate(raw_input)
        except ValidationError as e:
            return outcome(f"invalid input for {name}: {e.errors()[0].get('msg')}",
                           is_error=True, started=started, reason="invalid_input")
        value = t.func(**{k: getattr(args, k) for k in type(args).model_fields})
        return outcome(value if isinstance(value, str) else _json(value), started=started)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, default=str)
