"""The tools a model gets: JSON schemas, input validation, and dispatch to one sandbox session.

Every text a tool returns is redacted and trimmed to a size a model can use. Trimming first
could cut a secret in two and let a piece of it through, so only the two kept ends are
redacted, each with a margin longer than any encoded secret that is dropped afterwards: the
cost stays proportional to what is kept, not to what the program printed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Protocol, cast

from pydantic import BaseModel, ConfigDict, ValidationError

from cellblock.errors import CellblockError, InvalidSpec, SessionClosed
from cellblock.result import REASONS, RunResult, one_of, violation_kind

#: Tools offered to the model unless the caller narrows the list.
DEFAULT_TOOLS: tuple[str, ...] = ("run_python", "run_shell", "run_node", "read_file", "write_file")

#: Characters of one tool result sent to the model (stdout and stderr share it).
DEFAULT_MAX_OUTPUT_CHARS = 10_000

#: Why a tool call ended: a run's RunResult.reason, "ok" for file tools, "error" when the
#: sandbox refused (bad path, I/O error), "invalid_input" when the model's input was malformed,
#: "interrupted" when a resumed run found the call started but its result never recorded.
TOOL_REASONS: tuple[str, ...] = (*REASONS, "ok", "error", "invalid_input", "interrupted")
ToolReason = Annotated[str, one_of(TOOL_REASONS, "tool reason")]


class SandboxLike(Protocol):
    """What the tools need from a sandbox session (`cellblock.Sandbox` provides it)."""

    def run_shell(self, script: str, *, timeout: float | None = None) -> RunResult: ...

    def run_python(
        self, code: str, *, stateful: bool = False, timeout: float | None = None
    ) -> RunResult: ...

    def run_node(
        self, code: str, *, stateful: bool = False, timeout: float | None = None
    ) -> RunResult: ...

    def write_file(self, path: str, data: bytes | str) -> None: ...

    def read_file(self, path: str) -> bytes: ...


class _Input(BaseModel):
    # strict: a number where code belongs is the model's mistake, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True)


class CodeInput(_Input):
    code: str


class CommandInput(_Input):
    command: str


class PathInput(_Input):
    path: str


class WriteInput(_Input):
    path: str
    content: str


_WORKSPACE_NOTE = (
    "Runs in an isolated Linux sandbox; files under /workspace persist between tool calls of "
    "this task, processes do not. Returns exit status, stdout and stderr (long output is "
    "trimmed in the middle)."
)

#: Tool name -> (input model, description, JSON schema of the input).
_TOOLS: dict[str, tuple[type[_Input], str, dict[str, Any]]] = {
    "run_python": (
        CodeInput,
        "Run a Python 3 program (a fresh interpreter each call; print what you need). "
        + _WORKSPACE_NOTE,
        {"code": {"type": "string", "description": "Python source to run"}},
    ),
    "run_shell": (
        CommandInput,
        "Run a POSIX shell script with sh (coreutils available). " + _WORKSPACE_NOTE,
        {"command": {"type": "string", "description": "shell script to run"}},
    ),
    "run_node": (
        CodeInput,
        "Run a JavaScript program with Node.js (a fresh process each call). " + _WORKSPACE_NOTE,
        {"code": {"type": "string", "description": "JavaScript source to run"}},
    ),
    "read_file": (
        PathInput,
        "Read a text file from the sandbox (e.g. /workspace/out.txt). Long files are trimmed.",
        {"path": {"type": "string", "description": "file path inside the sandbox"}},
    ),
    "write_file": (
        WriteInput,
        "Write a text file in the sandbox, replacing it if it exists.",
        {
            "path": {"type": "string", "description": "file path inside the sandbox"},
            "content": {"type": "string", "description": "the whole new content"},
        },
    ),
}


def tool_schemas(names: Sequence[str] = DEFAULT_TOOLS) -> list[dict[str, Any]]:
    """The Messages API `tools` parameter for these tool names."""
    check_tool_names(names)
    return [
        {
            "name": name,
            "description": _TOOLS[name][1],
            "input_schema": {
                "type": "object",
                "properties": _TOOLS[name][2],
                "required": list(_TOOLS[name][2]),
                "additionalProperties": False,
            },
        }
        for name in names
    ]


def check_tool_names(names: Sequence[str]) -> None:
    """Raise InvalidSpec for a name that is not one of the built-in tools."""
    unknown = [n for n in names if n not in _TOOLS]
    if unknown or not names:
        raise InvalidSpec(
            f"unknown tools {unknown}; choose from {list(_TOOLS)}" if unknown else "no tools given"
        )


class ToolOutcome(BaseModel):
    """One tool call's result: `content` is what the model sees (redacted, trimmed)."""

    model_config = ConfigDict(frozen=True)

    content: str
    is_error: bool
    reason: ToolReason
    exit_code: int | None = None
    duration_s: float
    #: The session is gone: the loop cannot continue.
    fatal: bool = False
    #: What the supervisor refused during the call, by kind (seccomp, dns, network).
    violations: dict[str, int] = {}


def trim_text(text: str, limit: int) -> str:
    """`text` cut in the middle to at most about `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters trimmed ...]\n{text[len(text) - tail:]}"


_STOPPED = {
    "timeout": "stopped: the run hit its time limit and was killed",
    "memory": "stopped: the run hit its memory limit and was killed",
    "cpu_time": "stopped: the run used up its CPU-time budget and was killed",
    "output_limit": "stopped: the run exceeded the output size cap and was killed",
    "seccomp": "stopped: the run made a forbidden system call and was killed",
    "session_closed": "stopped: the sandbox session was closed and the run killed",
    "credential": "stopped: the run sent a credential placeholder to a host it is not bound "
                  "to and was killed",
}


Redact = Callable[[str], str]


def no_redaction(text: str) -> str:
    return text


def redact_and_trim(text: str, limit: int, redact: Redact = no_redaction, margin: int = 0) -> str:
    """`text` redacted and cut in the middle to about `limit` characters.

    `margin` must be at least the longest encoded secret: a secret crossing the end of a kept
    piece is then left unredacted only within the margin, which is dropped.
    """
    if len(text) <= limit + 2 * margin:
        return trim_text(redact(text), limit)
    head_n = limit * 2 // 3
    tail_n = limit - head_n
    head = redact(text[: head_n + margin])
    head = head[: max(0, len(head) - margin)][:head_n]
    tail = redact(text[len(text) - tail_n - margin :])[margin:]
    tail = tail[max(0, len(tail) - tail_n) :]
    cut = len(text) - head_n - tail_n
    return f"{head}\n[... {cut} characters trimmed ...]\n{tail}"


def format_run(
    result: RunResult, limit: int, redact: Redact = no_redaction, margin: int = 0
) -> str:
    """A RunResult as the text of a tool result: status line, stdout, stderr."""
    if result.reason == "exited":
        status = f"exit code {result.exit_code}"
    elif result.reason == "signaled":
        status = f"killed by signal {result.signal}"
    else:
        status = _STOPPED.get(result.reason, f"stopped ({result.reason})")
    lines = [f"{status} (reason: {result.reason}, {result.wall_time_s:.2f}s)"]
    for v in result.violations:
        detail = ", ".join(f"{k}={v[k]}" for k in sorted(v) if k != "kind")
        # A refused host name can carry a secret (exfiltration through DNS): redacted too.
        lines.append(redact(f"blocked by the sandbox: {v.get('kind', 'violation')} {detail}"))
    out, err = result.stdout, result.stderr
    err_limit = min(len(err), limit // 3 if out else limit)
    for name, text, cap, truncated in (
        ("stdout", out, limit - err_limit, result.stdout_truncated),
        ("stderr", err, err_limit, result.stderr_truncated),
    ):
        if text or name == "stdout":
            note = " (capped by the sandbox)" if truncated else ""
            body = redact_and_trim(text, cap, redact, margin) if text else "(empty)"
            lines.append(f"[{name}{note}]\n{body}")
    return "\n".join(lines)


class ToolRunner(Protocol):
    """What the loop calls tools through: `Toolbox`, or a wrapper adding tools to it."""

    schemas: list[dict[str, Any]]

    def call(self, name: str, raw_input: object) -> ToolOutcome: ...


class Toolbox:
    """The built-in tools bound to one sandbox session."""

    def __init__(
        self,
        sandbox: SandboxLike,
        names: Sequence[str] = DEFAULT_TOOLS,
        *,
        redact: Redact = no_redaction,
        redact_margin: int = 0,
        timeout: float | None = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    ) -> None:
        check_tool_names(names)
        self.names = tuple(names)
        self.schemas = tool_schemas(self.names)
        self._sandbox = sandbox
        self._redact = redact
        self._margin = redact_margin
        self._timeout = timeout
        self._limit = max_output_chars

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        """Run tool `name` with the model's input; never raises for the model's mistakes."""
        started = time.monotonic()
        if name not in self.names:
            return self._invalid(started, f"unknown tool {name!r}; available: {list(self.names)}")
        model = _TOOLS[name][0]
        try:
            args = model.model_validate(raw_input)
        except ValidationError as e:
            return self._invalid(started, f"invalid input for {name}: {_describe(e, model)}")
        try:
            return self._dispatch(name, args, started)
        except SessionClosed as e:
            return self._error(started, f"{type(e).__name__}: {e}", fatal=True)
        except CellblockError as e:
            return self._error(started, f"{type(e).__name__}: {e}")

    def _dispatch(self, name: str, args: _Input, started: float) -> ToolOutcome:
        sb, t = self._sandbox, self._timeout
        if isinstance(args, WriteInput):
            sb.write_file(args.path, args.content)
            size = len(args.content.encode())
            return self._ok(started, f"wrote {size} bytes to {args.path}")
        if isinstance(args, PathInput):
            data = sb.read_file(args.path)
            text = data.decode("utf-8", "replace")
            body = redact_and_trim(text, self._limit, self._redact, self._margin)
            return self._ok(started, body or "(empty file)")
        if isinstance(args, CommandInput):
            result = sb.run_shell(args.command, timeout=t)
        else:
            run_code = sb.run_python if name == "run_python" else sb.run_node
            result = run_code(cast(CodeInput, args).code, timeout=t)
        return ToolOutcome(
            content=format_run(result, self._limit, self._redact, self._margin),
            is_error=not result.ok,
            reason=result.reason,
            exit_code=result.exit_code,
            duration_s=time.monotonic() - started,
            violations=dict(Counter(violation_kind(v) for v in result.violations)),
            # The session is gone (closed by a timeout, a cancel, the idle timer): no more calls.
            fatal=result.reason == "session_closed",
        )

    def _ok(self, started: float, content: str) -> ToolOutcome:
        return ToolOutcome(
            content=content, is_error=False, reason="ok", duration_s=time.monotonic() - started
        )

    def _error(self, started: float, message: str, fatal: bool = False) -> ToolOutcome:
        return ToolOutcome(
            content=self._redact(message), is_error=True, reason="error", fatal=fatal,
            duration_s=time.monotonic() - started,
        )

    def _invalid(self, started: float, message: str) -> ToolOutcome:
        return ToolOutcome(
            content=message, is_error=True, reason="invalid_input",
            duration_s=time.monotonic() - started,
        )


def _describe(e: ValidationError, model: type[_Input]) -> str:
    """Pydantic's errors as one line, plus the expected shape."""
    problems = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "input"
        problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    expected = ", ".join(f'"{f}": string' for f in model.model_fields)
    return "; ".join(problems) + f". Expected an object {{{expected}}}."
