"""The agent loop's side of memory: memory tools for the model, archiving of turns that leave
the context window, checkpoints and resume (hooks called by `cellblock.agent.loop`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from anthropic.lib.tools import ToolError

from cellblock.agent.tools import ToolOutcome, ToolRunner
from cellblock.errors import InvalidSpec
from cellblock.memory.checkpoint import (
    Checkpoint,
    Lease,
    WorkspaceLike,
    restore_workspace,
    snapshot_workspace,
)
from cellblock.memory.config import CheckpointConfig
from cellblock.memory.store import default_user
from cellblock.memory.tool import (
    MEMORY_BETA,
    MEMORY_TOOL,
    SEARCH_SCHEMA,
    SEARCH_TOOL,
    StoreMemoryTool,
    search,
)

#: Tools that never change the workspace: no need to read it again after them.
READ_ONLY_TOOLS = frozenset({"read_file", MEMORY_TOOL, SEARCH_TOOL})

#: Tools run in the store's database: each call commits with its journal row.
MEMORY_TOOLS = frozenset({MEMORY_TOOL, SEARCH_TOOL})

#: What the model is told, on resume, about a sandbox tool call that had started when the
#: agent process stopped and whose result was never recorded: it is not run again.
INTERRUPTED = (
    "interrupted: this tool call had started when the agent process stopped, and its result "
    "was never recorded. It is not run again automatically. Files under /workspace are as they "
    "were before the call (restored from the checkpoint); effects outside the sandbox (network "
    "requests) may or may not have happened. Check before repeating it.")

#: Seconds between two checks of whether a knowledge source is due for a refresh.
REFRESH_CHECK_S = 60.0

if TYPE_CHECKING:
    from cellblock.agent.loop import Agent, AgentResult, _Run
    from cellblock.agent.tools import SandboxLike
    from cellblock.memory.store import MemoryStore


def find_checkpoint(agent: Agent, ref: str) -> Checkpoint:
    """The checkpoint `ref` names (`latest`: the user's newest), for `Agent.resume`."""
    if agent.memory is None:
        raise InvalidSpec("resume needs an Agent with a memory store (memory=MemoryStore(...))")
    return agent.memory.checkpoints.resolve(agent.user_id or default_user(), ref)


class ToolboxWithMemory:
    """The run's tools plus the memory tool and the memory search tool."""

    def __init__(self, inner: ToolRunner, store: MemoryStore, user_id: str, redact: Any) -> None:
        self.inner = inner
        self.store = store
        self.user_id = user_id
        self.memory_tool = StoreMemoryTool(store, user_id)
        self.redact = redact
        self.schemas = [*inner.schemas, dict(self.memory_tool.to_dict()), SEARCH_SCHEMA]

    def call(self, name: str, raw_input: object) -> ToolOutcome:
        """Runs a memory tool here, any other tool in the inner toolbox."""
        if name not in (MEMORY_TOOL, SEARCH_TOOL):
            return self.inner.call(name, raw_input)
        started = time.monotonic()
        try:
            if name == MEMORY_TOOL:
                content, error = self.memory_tool.call(raw_input), False
            else:
                content, error = search(self.store, self.user_id, raw_input), False
        except ToolError as e:
            content, error = str(e.content), True
        return ToolOutcome(content=self.redact(content), is_error=error,
                           reason="error" if error else "ok",
                           duration_s=time.monotonic() - started)


class Persistence:
    """Checkpoints and memory of one agent run (`_Run.hooks`)."""

    def __init__(self, run: _Run, resume: Checkpoint | None) -> None:
        agent = run.agent
        assert agent.memory is not None
        self.run = run
        self.store: MemoryStore = agent.memory
        self.user_id = agent.user_id or default_user()
        self.config = agent.checkpoints or CheckpointConfig()
        self.resume_from = resume
        self.lease: Lease | None = None
        self.sandbox: WorkspaceLike | None = None
        self.last_save = self.last_refresh_check = time.monotonic()
        #: The workspace as last read (reused after tools that only read).
        self.files: dict[str, bytes | None] | None = None
        #: The stored result when the resumed session had already finished.
        self.finished: AgentResult | None = None

    @property
    def session_id(self) -> str | None:
        return self.lease.session_id if self.lease is not None else None

    def start(self, sandbox: SandboxLike, toolbox: ToolRunner) -> ToolRunner:
        """Takes the session (new, or over from a checkpoint), restores its workspace and
        state, refreshes due knowledge sources; returns the toolbox with memory tools."""
        from cellblock.agent.loop import AgentResult

        self.sandbox = sandbox  # type: ignore[assignment]
        self.store.refresh_due()
        self.store.sweep()
        checkpoints = self.store.checkpoints
        found = self.resume_from
        if found is None:
            self.lease = checkpoints.start(self.user_id, self.run.task)
            self._save("start")
        else:
            self.lease = checkpoints.take_over(self.user_id, found.session_id)
            if found.state.get("result") is not None:
                self.finished = AgentResult(**found.state["result"])
            else:
                restore_workspace(self.workspace, found, checkpoints, self.user_id)
                self.run.load_state(found.state)
                self._save("resume")
        return ToolboxWithMemory(toolbox, self.store, self.user_id, self.run.redact)

    @property
    def workspace(self) -> WorkspaceLike:
        assert self.sandbox is not None
        return self.sandbox

    def tick(self) -> None:
        """Before a model request: a checkpoint if `interval_seconds` passed since the last;
        knowledge sources refreshed when due (checked at most once a minute)."""
        now = time.monotonic()
        if now - self.last_refresh_check >= REFRESH_CHECK_S:
            self.last_refresh_check = now
            self.store.refresh_due()
        if now - self.last_save >= self.config.interval_seconds:
            self._save("interval")

    def run_tool(self, toolbox: ToolRunner, tool_use_id: str, name: str,
                 raw_input: object) -> ToolOutcome:
        """Runs a tool call at most once per session, across kills and resumes.

        A memory-tool call and its journal row commit in one transaction (the tool's own
        statements are a savepoint of it): after a kill it either took effect and its
        recorded outcome is replayed, or it did not and runs now. A sandbox tool call is
        journaled as started before it runs; found started on resume, it is not run again
        but reported to the model as interrupted (`INTERRUPTED`)."""
        assert self.lease is not None
        checkpoints = self.store.checkpoints
        if name in MEMORY_TOOLS:
            with self.store.db.transaction():
                entry = checkpoints.journal_entry(self.lease, tool_use_id)
                if entry is None:
                    outcome = toolbox.call(name, raw_input)
                    checkpoints.journal(self.lease, tool_use_id, "done",
                                        outcome.model_dump_json())
                    return outcome
        else:
            entry = checkpoints.journal_entry(self.lease, tool_use_id)
            if entry is None:
                checkpoints.journal(self.lease, tool_use_id, "started")
                return toolbox.call(name, raw_input)
        if entry.state == "done" and entry.outcome is not None:
            return ToolOutcome.model_validate_json(entry.outcome)
        return ToolOutcome(content=INTERRUPTED, is_error=True, reason="interrupted",
                           duration_s=0.0)

    def replied(self) -> None:
        """The model asked for tool calls: their ids are checkpointed before any runs (the
        workspace is unchanged since the last snapshot), so a resumed run finds the journal
        entries of the very calls it has to continue."""
        self._save("model_reply", rescan=False)

    def tool_done(self, name: str) -> None:
        """After each completed tool call (a tool that cannot change the workspace reuses the
        last snapshot of it instead of reading it again)."""
        self._save("tool_call", rescan=name not in READ_ONLY_TOOLS)

    def finish(self, result: AgentResult) -> None:
        """The last checkpoint. Resuming a finished session returns its result; a run that
        ended on an error (model API, lost sandbox) is resumed from where it stopped."""
        if result.stop_reason == "error":
            self._save("failed", status="failed")
            return
        state = self.run.state()
        state["result"] = result.to_dict()
        self._save("finished", state=state, status="finished")

    def archive(self, turn: int, messages: list[dict[str, Any]]) -> None:
        """A turn left the model's context: keep it, searchable."""
        self.store.archive_turn(self.user_id, self.session_id or "", turn, messages)

    def request_options(self) -> dict[str, Any]:
        """Extra Messages API parameters: the memory tool's beta."""
        return {"extra_headers": {"anthropic-beta": MEMORY_BETA}}

    def _save(self, reason: str, state: dict[str, Any] | None = None,
              status: str = "running", rescan: bool = True) -> None:
        assert self.lease is not None
        if rescan or self.files is None:
            self.files = snapshot_workspace(self.workspace, self.config.max_file_bytes)
        self.store.checkpoints.save(self.lease, state or self.run.state(), self.files,
                                    reason=reason, config=self.config, status=status,
                                    completed={c.id for c in self.run.tool_calls})
        self.last_save = time.monotonic()
