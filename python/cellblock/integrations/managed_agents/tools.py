"""The `agent_toolset_20260401` tools (bash, read, write, edit, glob, grep) over one cellblock
session, with the SDK's input schemas, tool decorator, errors and limits.

The SDK's reference tools work on host paths and a host bash and take no pluggable backend,
so each is implemented here over the session: bash by `SandboxBash`, read/write/edit by the
session's files API, glob/grep by one Python run inside the sandbox (so a model-written regex
or pattern costs the sandbox's time, not the worker's).
"""

from __future__ import annotations

import base64
import json
import posixpath
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from anthropic.lib.tools import BetaAsyncFunctionTool, ToolError, beta_async_tool
from anthropic.lib.tools.agent_toolset import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_IMAGE_BASE64_BYTES,
    DEFAULT_MAX_PDF_BYTES,
    GLOB_RESULT_LIMIT,
    GREP_MAX_LINE_LENGTH,
    GREP_OUTPUT_LIMIT,
    WALK_MAX_ENTRIES,
    AgentToolContext,
)
from anthropic.types.beta import (
    BetaManagedAgentsAgentToolset20260401BashInput,
    BetaManagedAgentsAgentToolset20260401EditInput,
    BetaManagedAgentsAgentToolset20260401GlobInput,
    BetaManagedAgentsAgentToolset20260401GrepInput,
    BetaManagedAgentsAgentToolset20260401ReadInput,
    BetaManagedAgentsAgentToolset20260401WriteInput,
)
from anyio import from_thread
from anyio.to_thread import run_sync

from cellblock.errors import CellblockError
from cellblock.integrations.managed_agents._sdk import (
    BASH_DEFAULT_TIMEOUT,
    BINARY_MEDIA_TYPES,
    DEFAULT_MAX_READ_BYTES,
    GREP_CPU_SECONDS,
    LineRangeCollector,
    MemoryWriteError,
    current_session_thread,
    resolve_max_bytes,
)
from cellblock.integrations.managed_agents.bash import (
    STATE_DIR,
    BashError,
    SandboxBash,
    thread_key,
)
from cellblock.integrations.managed_agents.workspace import WORKSPACE, SandboxWorkspace
from cellblock.policy import Policy

T = TypeVar("T")

#: CPU budget of one glob or grep inside the sandbox (the reference's grep deadline).
SEARCH_SECONDS = float(GREP_CPU_SECONDS)

# Runs inside the sandbox: argv = op, root, pattern. Same walk rules as the reference tools.
_SEARCH = """
import json, os, re, sys
from pathlib import Path
op, root, pattern = sys.argv[1:4]
limits = json.loads(sys.argv[4])
base = Path(root)
def within(p):
    try:
        real = os.path.realpath(p, strict=True)
    except OSError:
        return False
    return real == root or real.startswith(root.rstrip("/") + "/")
if op == "glob":
    out = []
    for i, m in enumerate(base.glob(pattern)):
        if i >= limits["walk"]:
            break
        if within(m):
            out.append(m)
    def mtime(p):
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0
    out.sort(key=mtime, reverse=True)
    print("\\n".join(str(m) for m in out[:limits["glob"]]) if out else "no matches")
    sys.exit(0)
rx = re.compile(pattern)
hits, budget = [], limits["out"]
def scan(full):
    global budget
    try:
        with open(full, "rb") as f:
            if b"\\0" in f.read(512):
                return True
            f.seek(0)
            for i, raw in enumerate(f, 1):
                if len(raw) > limits["line"]:
                    continue
                line = raw.decode(errors="replace").rstrip("\\r\\n")
                if rx.search(line):
                    budget -= len(line) + len(str(full)) + 12
                    if budget < 0:
                        hits.append("[output truncated at %d bytes]" % limits["out"])
                        return False
                    hits.append("%s:%d:%s" % (full, i, line))
    except OSError:
        pass
    return True
if base.is_file():
    scan(base)
else:
    seen = 0
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in (".git", "node_modules")
                       and not os.path.islink(os.path.join(dirpath, d))]
        stop = False
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            seen += 1
            if seen > limits["walk"] or not scan(full):
                stop = True
                break
        if stop:
            break
print("\\n".join(hits) if hits else "no matches")
"""


def bash_timeout(timeout_ms: int | None, policy: Policy) -> float:
    """A bash call's timeout: the model's `timeout_ms` capped at the SDK's default, as the
    reference bash does, and at the operator's per-call limit."""
    timeout = BASH_DEFAULT_TIMEOUT
    if timeout_ms is not None and timeout_ms > 0:
        timeout = min(timeout_ms / 1000.0, timeout)
    if policy.timeout is not None:
        timeout = min(timeout, policy.timeout)
    return timeout


class _Tools:
    """The six tools' bodies (blocking; run in a worker thread)."""

    def __init__(self, ctx: AgentToolContext, workspace: SandboxWorkspace) -> None:
        self.ctx = ctx
        self.ws = workspace
        self._shells: dict[str, SandboxBash] = {}
        self._shells_lock = threading.Lock()

    def _path(self, op: str, file_path: str) -> str:
        try:
            return self.ws.resolve(file_path)
        except ValueError as e:
            raise ToolError(f"{op}: {e}") from e

    def _size(self, op: str, file_path: str, path: str) -> int:
        parent, name = posixpath.split(path)
        try:
            entries = {e.name: e for e in self.ws.sandbox().list_dir(parent)}
        except CellblockError:
            entries = {}
        entry = entries.get(name)
        if entry is None:
            raise ToolError(f"{op}: {file_path}: no such file or directory")
        if entry.kind != "file":
            raise ToolError(f"{op}: {file_path}: not a regular file")
        return entry.size

    def shell(self, key: str) -> SandboxBash:
        """The shell of a session thread (its state folder named by `key`)."""
        with self._shells_lock:
            shell = self._shells.get(key)
            if shell is None:
                shell = self._shells[key] = SandboxBash(self.ws.sandbox(), key)
            return shell

    def end_thread(self, key: str) -> None:
        """Forgets the shell of a session thread that ended (its state folder goes)."""
        with self._shells_lock:
            shell = self._shells.pop(key, None)
        sandbox = self.ws.opened
        if shell is not None and sandbox is not None and sandbox.is_open:
            shell.restart()

    def bash(self, key: str, command: str | None, restart: bool | None,
             timeout_ms: int | None, cancel: threading.Event) -> str:
        shell = self.shell(key)
        if restart:
            shell.restart()
            if not command:
                return "bash session restarted"
        if not command:
            raise ToolError("bash: command is required")
        try:
            out, code = shell.exec(command, timeout=bash_timeout(timeout_ms, self.ws.policy),
                                   cancel=cancel)
        except BashError as e:
            raise ToolError(str(e)) from e
        finally:
            self.ws.sync_memory()
        if code != 0:
            raise ToolError(out or "(no output)")  # the API refuses an empty error result
        return out

    def _readable(self, op: str, file_path: str) -> str:
        """`_path`, and also the file where a shell saved a long output (as the SDK's read
        and grep may open it: the bash output names it)."""
        full = posixpath.normpath(file_path)
        if posixpath.isabs(full):
            with self._shells_lock:
                saved = {s.saved_output for s in self._shells.values()}
            if full in saved:
                try:
                    self.ws.refuse_symlinks(file_path, posixpath.dirname(STATE_DIR), full)
                except ValueError as e:
                    raise ToolError(f"{op}: {e}") from e
                return full
        return self._path(op, file_path)

    def read(self, file_path: str, view_range: list[int] | None) -> Any:
        path = self._readable("read", file_path)
        if view_range and len(view_range) != 2:
            raise ToolError("read: view_range must be [start_line, end_line]")
        size = self._size("read", file_path, path)
        media_type = BINARY_MEDIA_TYPES.get(posixpath.splitext(path)[1].lower())
        if media_type is not None:
            if view_range:
                raise ToolError("read: view_range is not supported for image/PDF files")
            return [self._binary(file_path, path, size, media_type)]
        limit = resolve_max_bytes(self.ctx.max_file_bytes, DEFAULT_MAX_READ_BYTES)
        if limit is not None and size > limit:
            if not view_range:
                raise ToolError(
                    f"read: {file_path} is {size} bytes, exceeds {limit}-byte limit. "
                    "Use the view_range parameter to read specific line ranges, "
                    "e.g. view_range: [1, 500]."
                )
            # The SDK's line collector over the streamed file: the cap binds the lines
            # selected, never the whole file.
            lines = LineRangeCollector(file_path=file_path, start_line=view_range[0],
                                       end_line=view_range[1], limit=limit)
            if lines.range_is_empty():
                return ""
            try:
                for chunk in self.ws.sandbox().iter_file(path):
                    lines.collect_from(chunk)
                    if lines.range_is_collected():
                        break
            except CellblockError as e:
                raise ToolError(f"read: {file_path}: {e}") from e
            return lines.text()
        text = self._text("read", file_path, path)
        if not view_range:
            return text
        start_line, end_line = view_range
        lines_of = text.split("\n")
        start = max(0, start_line - 1)
        end = end_line if end_line > 0 else len(lines_of)
        return "\n".join(lines_of[start:end])

    def _text(self, op: str, file_path: str, path: str) -> str:
        try:
            return self.ws.sandbox().read_file(path).decode("utf-8")
        except UnicodeDecodeError as e:
            what = "binary files are only supported for image/PDF extensions"
            if op == "edit":
                what = "cannot edit binary files"
            raise ToolError(f"{op}: {file_path}: not valid UTF-8 text ({what})") from e
        except CellblockError as e:
            raise ToolError(f"{op}: {file_path}: {e}") from e

    def _binary(self, file_path: str, path: str, size: int, media_type: str) -> dict[str, Any]:
        if media_type == "application/pdf":
            limit = resolve_max_bytes(self.ctx.max_pdf_bytes, DEFAULT_MAX_PDF_BYTES)
        else:
            b64 = resolve_max_bytes(self.ctx.max_image_base64_bytes,
                                    DEFAULT_MAX_IMAGE_BASE64_BYTES)
            limit = (b64 // 4) * 3 if b64 is not None else None
        explicit = self.ctx.max_file_bytes
        if isinstance(explicit, int):
            limit = explicit if limit is None else min(limit, explicit)
        if limit is not None and size > limit:
            raise ToolError(
                f"read: {file_path} is {size} bytes, exceeds {limit}-byte limit "
                "for image/PDF files."
            )
        data = base64.standard_b64encode(self.ws.sandbox().read_file(path)).decode("ascii")
        kind = "document" if media_type == "application/pdf" else "image"
        return {"type": kind, "source": {"type": "base64", "media_type": media_type, "data": data}}

    def _writable(self, op: str, file_path: str, path: str) -> None:
        if self.ws.read_only(path):
            raise ToolError(f"{op}: {file_path} is inside a read-only directory")

    def _save_memory(self, op: str, file_path: str, path: str, text: str,
                     replacing: str | None) -> None:
        """A memory file goes through the SDK's own memory write first (saved to its store,
        then to the host folder; a refusal is the agent's error and changes nothing), as the
        reference tools do; the sandbox copy is written after it."""
        host = self.ws.host_memory_path(path)
        save = self.ctx._write_memory_file
        if host is None or save is None:
            return

        async def saved() -> bool:
            return await save(host, text, replacing)

        try:
            from_thread.run(saved)
        except MemoryWriteError as e:
            raise ToolError(f"{op}: {file_path}: {e}") from e
        except OSError as e:
            raise ToolError(f"{op}: {file_path}: {e.strerror or e}") from e

    def write(self, file_path: str, content: str) -> str:
        path = self._path("write", file_path)
        self._writable("write", file_path, path)
        self._save_memory("write", file_path, path, content, None)
        try:
            self.ws.sandbox().write_file(path, content)
        except CellblockError as e:
            raise ToolError(f"write: {file_path}: {e}") from e
        self.ws.sync_memory()
        return f"wrote {len(content)} bytes to {file_path}"

    def edit(self, file_path: str, old: str, new: str, replace_all: bool | None) -> str:
        path = self._path("edit", file_path)
        self._writable("edit", file_path, path)
        size = self._size("edit", file_path, path)
        limit = resolve_max_bytes(self.ctx.max_file_bytes, DEFAULT_MAX_FILE_BYTES)
        if limit is not None and size > limit:
            raise ToolError(
                f"edit: {file_path} is {size} bytes, exceeds {limit}-byte limit. "
                "The edit tool loads the whole file and cannot modify a file this large."
            )
        text = self._text("edit", file_path, path)
        count = text.count(old)
        if count == 0:
            raise ToolError(f"edit: old_string not found in {file_path}")
        if not replace_all and count > 1:
            raise ToolError(
                f"edit: old_string appears {count} times in {file_path} (must be unique)"
            )
        if count > 1 and limit is not None:  # the SDK's cap on what replace_all makes
            grown = size + count * (len(new.encode()) - len(old.encode()))
            if grown > limit:
                raise ToolError(
                    f"edit: {count} replacements would make {file_path} {grown} bytes, "
                    f"exceeds {limit}-byte limit."
                )
        updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
        self._save_memory("edit", file_path, path, updated, text)
        try:
            self.ws.sandbox().write_file(path, updated)
        except CellblockError as e:
            raise ToolError(f"edit: {file_path}: {e}") from e
        self.ws.sync_memory()
        return f"edited {file_path} ({count if replace_all else 1} replacement(s))"

    def search(self, op: str, pattern: str, path: str | None, cancel: threading.Event) -> str:
        if op == "glob":
            if posixpath.isabs(pattern):
                raise ToolError(
                    "glob: absolute pattern not permitted; "
                    "pass a relative pattern (and optionally path)"
                )
            if ".." in pattern.split("/"):
                raise ToolError("glob: '..' is not permitted in the pattern")
        root = (self._readable(op, path) if op == "grep" else self._path(op, path)) \
            if path else WORKSPACE
        limits = {"walk": WALK_MAX_ENTRIES, "glob": GLOB_RESULT_LIMIT,
                  "out": GREP_OUTPUT_LIMIT, "line": GREP_MAX_LINE_LENGTH}
        result = self.ws.sandbox().run(
            ["python3", "-I", "-c", _SEARCH, op, root, pattern, json.dumps(limits)],
            timeout=SEARCH_SECONDS * 2, cpu_time=SEARCH_SECONDS, cancel=cancel,
        )
        if result.reason in ("timeout", "cpu_time"):
            raise ToolError(f"{op}: timed out after {SEARCH_SECONDS:g}s")
        if result.exit_code != 0:
            last = (result.stderr.strip().splitlines() or [result.reason])[-1]
            if op == "grep" and last.startswith(("re.error:", "re.PatternError:")):
                raise ToolError(f"grep: invalid regex: {last.split(':', 1)[1].strip()}")
            raise ToolError(f"{op}: {last}")
        return result.stdout.rstrip("\n")


def cellblock_toolset(
    ctx: AgentToolContext, policy: Policy | None = None
) -> list[BetaAsyncFunctionTool[Any]]:
    """The `agent_toolset_20260401` tools bound to a new cellblock sandbox for `ctx`'s session.

    Use it as the `tools` factory of the SDK's `EnvironmentWorker` (``tools=partial(
    cellblock_toolset, policy=policy)``). The sandbox opens at the first tool call with
    `policy` and is closed by each tool's `close` hook, which the SDK's session runner calls
    when the session run ends.
    """
    workspace = SandboxWorkspace(ctx, policy or Policy())
    body = _Tools(ctx, workspace)

    async def call(fn: Callable[..., T], *args: Any) -> T:
        return await run_sync(partial(fn, *args))

    async def interruptible(fn: Callable[..., T], *args: Any) -> T:
        # The SDK interrupts a call (session interrupt, tool timeout, run end) by cancelling
        # its task: the worker thread is abandoned at once and the event kills the sandboxed
        # processes, so nothing of the call keeps running.
        cancel = threading.Event()
        try:
            return await run_sync(partial(fn, *args, cancel), abandon_on_cancel=True)
        finally:
            cancel.set()

    registered: set[str] = set()

    @beta_async_tool(name="bash", input_schema=BetaManagedAgentsAgentToolset20260401BashInput)
    async def bash(command: str | None = None, restart: bool | None = None,
                   timeout_ms: int | None = None) -> str:
        """Run a command in a persistent bash shell."""
        # One shell per session thread, as the SDK's reference bash keeps; the thread's exit
        # stack (closed when the thread terminates) forgets its shell's state.
        thread = current_session_thread.get()
        key = thread_key(thread.id if thread is not None else None)
        if thread is not None and key not in registered:
            registered.add(key)

            async def forget() -> None:
                await run_sync(body.end_thread, key)

            thread.exit_stack.push_async_callback(forget)
        return await interruptible(body.bash, key, command, restart, timeout_ms)

    @beta_async_tool(name="read", input_schema=BetaManagedAgentsAgentToolset20260401ReadInput)
    async def read(file_path: str, view_range: list[int] | None = None) -> Any:
        """Read a file rooted at the working directory."""
        return await call(body.read, file_path, view_range)

    @beta_async_tool(name="write", input_schema=BetaManagedAgentsAgentToolset20260401WriteInput)
    async def write(file_path: str, content: str) -> str:
        """Write a file, creating parent directories as needed."""
        return await call(body.write, file_path, content)

    @beta_async_tool(name="edit", input_schema=BetaManagedAgentsAgentToolset20260401EditInput)
    async def edit(file_path: str, old_string: str, new_string: str,
                   replace_all: bool | None = None) -> str:
        """Replace text in a file by exact string match."""
        return await call(body.edit, file_path, old_string, new_string, replace_all)

    @beta_async_tool(name="glob", input_schema=BetaManagedAgentsAgentToolset20260401GlobInput)
    async def glob(pattern: str, path: str | None = None) -> str:
        """List files matching a glob pattern, newest first."""
        return await interruptible(body.search, "glob", pattern, path)

    @beta_async_tool(name="grep", input_schema=BetaManagedAgentsAgentToolset20260401GrepInput)
    async def grep(pattern: str, path: str | None = None) -> str:
        """Search file contents for a regular expression."""
        return await interruptible(body.search, "grep", pattern, path)

    tools: list[BetaAsyncFunctionTool[Any]] = [bash, read, write, edit, glob, grep]

    async def close() -> None:
        await run_sync(workspace.close)

    for tool in tools:
        tool.close = close  # the session runner calls every tool's close hook at its end
    return tools
