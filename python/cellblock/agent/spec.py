"""Agents declared as data: a `Team` of `AgentSpec`s, from Python or a TOML file.

    [environments.py]               # named base policies (cellblock.Policy fields)
    memory = "512M"

    [agents.coder]
    model = "claude-sonnet-4-6"
    instructions = "You write and test Python code."
    tools = ["run_python", "read_file", "write_file"]
    environment = "py"              # the environment's policy, under the agent's own `policy`
    credentials = ["GITHUB_TOKEN"]  # names: values come from the team's secrets
    budget = { usd = 0.50, tokens = 200000, turns = 30 }
    memory = { turns = 20 }
    policy = { timeout = 30 }
    routing = [{ model = "claude-haiku-4-5", after_tools = ["read_file"] }]
    mcp_servers = [{ name = "docs", command = ["python3", "docs_server.py"] }]

    [agents.lead]
    instructions = "You split work between your sub-agents and integrate their results."
    tools = []
    sub_agents = { allowed_agents = ["coder"], max_concurrent = 3, timeout_seconds = 600 }

Credentials are given to the sandbox as secrets (environment variables, redacted from all
output), which is what the sandbox policy supports today.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cellblock.agent.bindings import FunctionTool, FunctionTools, ToolSource
from cellblock.agent.control import Budget, CancelScope, Ledger
from cellblock.agent.loop import DEFAULT_MODEL, Agent
from cellblock.agent.mcp_tools import McpServer
from cellblock.agent.routing import Classifier, Route, Router
from cellblock.agent.tools import DEFAULT_TOOLS, SandboxLike, check_tool_names
from cellblock.errors import CredentialError, InvalidSpec
from cellblock.policy import Policy

if TYPE_CHECKING:
    import anthropic

    from cellblock.memory import MemoryStore


class SubAgents(BaseModel):
    """An orchestrator's sub-agents: who it may delegate to, how many at once, for how long."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    allowed_agents: list[str] = Field(min_length=1)
    max_concurrent: int = Field(default=3, ge=1)
    timeout_seconds: float = Field(default=600.0, gt=0)


class MemorySpec(BaseModel):
    """Short-term memory: turns and characters kept in context; `store` uses the team's
    MemoryStore (archived turns, memory tools, checkpoints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    turns: int | None = Field(default=None, ge=1)
    context_chars: int | None = Field(default=None, ge=1000)
    store: bool = False


class AgentSpec(BaseModel):
    """One agent, as data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    model: str = DEFAULT_MODEL
    fallback_model: str | None = None
    instructions: str | None = None
    #: Built-in sandbox tools and names of `@tool` functions given to the team.
    tools: list[str] = list(DEFAULT_TOOLS)
    mcp_servers: list[McpServer] = []
    environment: str | None = None
    policy: Policy = Policy()
    credentials: list[str] = []
    memory: MemorySpec = MemorySpec()
    budget: Budget = Budget()
    sub_agents: SubAgents | None = None
    routing: list[Route] = []
    max_tokens: int = Field(default=8192, ge=1)
    tool_timeout: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AgentSpec:
        builtin = [t for t in self.tools if t in DEFAULT_TOOLS]
        if builtin:
            check_tool_names(builtin)
        if not self.tools and not self.mcp_servers and self.sub_agents is None:
            raise InvalidSpec(f"agent {self.name!r} has no tools")
        return self


class Team:
    """Agent specs by name, with what they are built from: named environments (base
    policies), secrets for credentials, `@tool` functions, a memory store, a client."""

    def __init__(
        self,
        agents: Sequence[AgentSpec],
        *,
        environments: Mapping[str, Policy] | None = None,
        secrets: Mapping[str, str] | None = None,
        functions: Sequence[FunctionTool] = (),
        classifier: Classifier | None = None,
        memory_store: MemoryStore | None = None,
        client: anthropic.Anthropic | None = None,
        on_session: Callable[[SandboxLike], object] | None = None,
    ) -> None:
        self.agents = {a.name: a for a in agents}
        if len(self.agents) != len(agents):
            raise InvalidSpec("two agents have the same name")
        self.environments = dict(environments or {})
        self.secrets = dict(secrets or {})
        self.functions = {f.name: f for f in functions}
        self.classifier = classifier
        self.memory_store = memory_store
        self.client = client
        #: Called with each sandbox session opened for a sub-agent (tests, monitoring).
        self.on_session = on_session
        for a in agents:
            self._check(a)

    def _check(self, a: AgentSpec) -> None:
        if a.environment is not None and a.environment not in self.environments:
            raise InvalidSpec(f"agent {a.name!r}: unknown environment {a.environment!r} "
                              f"(defined: {sorted(self.environments)})")
        unknown = [t for t in a.tools if t not in DEFAULT_TOOLS and t not in self.functions]
        if unknown:
            raise InvalidSpec(f"agent {a.name!r}: unknown tools {unknown} (built-in: "
                              f"{list(DEFAULT_TOOLS)}, functions: {sorted(self.functions)})")
        if a.sub_agents is not None:
            missing = [n for n in a.sub_agents.allowed_agents if n not in self.agents]
            if missing:
                raise InvalidSpec(f"agent {a.name!r}: allowed_agents {missing} are not defined")

    @classmethod
    def from_toml(cls, path: str | Path, **kwargs: Any) -> Team:
        """A team from a TOML file (`[agents.NAME]` tables, `[environments.NAME]` policies)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidSpec(f"cannot read agents file {path}: {e}") from None
        return cls.from_dict(data, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **kwargs: Any) -> Team:
        unknown = set(data) - {"agents", "environments"}
        if unknown:
            raise InvalidSpec(f"agents file: unknown sections {sorted(unknown)}")
        try:
            envs = {n: Policy.build(**p) for n, p in data.get("environments", {}).items()}
            agents = [AgentSpec(name=n, **a) for n, a in data.get("agents", {}).items()]
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidSpec(f"agents file: {loc}: {err.get('msg')}") from None
        return cls(agents, environments={**envs, **kwargs.pop("environments", {})}, **kwargs)

    def __getitem__(self, name: str) -> AgentSpec:
        try:
            return self.agents[name]
        except KeyError:
            raise InvalidSpec(f"no agent named {name!r} (defined: {sorted(self.agents)})") \
                from None

    def policy_of(self, spec: AgentSpec) -> Policy:
        """The environment's policy with the agent's own fields over it, and its credentials
        as secrets."""
        base = self.environments[spec.environment] if spec.environment else Policy()
        own = spec.policy.model_dump(exclude_unset=True)
        policy = base.merged(**own)
        missing = [c for c in spec.credentials if c not in self.secrets]
        if missing:
            raise CredentialError(f"agent {spec.name!r}: credentials {missing} were not given")
        if spec.credentials:
            policy = policy.merged(secrets={**policy.secrets,
                                            **{c: self.secrets[c] for c in spec.credentials}})
        return policy

    def build(
        self,
        name: str,
        *,
        sandbox: SandboxLike | None = None,
        ledger: Ledger | None = None,
        cancel: CancelScope | None = None,
        client: anthropic.Anthropic | None = None,
    ) -> Agent:
        """The agent `name`, ready to run. Without a ledger, its own budget starts a tree.
        `client` (else the team's, else one per run) is the SDK client it talks through."""
        spec = self[name]
        sources: list[ToolSource] = list(spec.mcp_servers)
        functions = [self.functions[t] for t in spec.tools if t in self.functions]
        if functions:
            sources.append(FunctionTools(functions))
        cancel = cancel or CancelScope()
        if spec.sub_agents is not None and spec.sub_agents.enabled:
            from cellblock.agent.orchestrate import Delegation

            if ledger is None:
                ledger = Ledger(spec.budget.usd, spec.budget.tokens)
            sources.append(Delegation(self, spec.sub_agents, ledger, cancel))
        elif ledger is None and (spec.budget.usd is not None or spec.budget.tokens is not None):
            ledger = Ledger(spec.budget.usd, spec.budget.tokens)
        router = None
        if spec.routing or self.classifier is not None:
            router = Router(spec.routing, self.classifier)
        extra: dict[str, Any] = {}
        if spec.memory.turns is not None:
            extra["memory_turns"] = spec.memory.turns
        if spec.memory.context_chars is not None:
            extra["context_chars"] = spec.memory.context_chars
        if spec.memory.store:
            if self.memory_store is None:
                raise InvalidSpec(f"agent {name!r} uses a memory store; the team has none")
            extra["memory"] = self.memory_store
        agent = Agent(
            model=spec.model, fallback_model=spec.fallback_model,
            tools=[t for t in spec.tools if t in DEFAULT_TOOLS], sandbox=sandbox,
            max_turns=spec.budget.turns or 50, max_tokens=spec.max_tokens,
            policy=self.policy_of(spec), client=client or self.client,
            tool_timeout=spec.tool_timeout, name=spec.name, tool_sources=sources,
            router=router, ledger=ledger, cancel=cancel,
            **extra,
        )
        if spec.instructions:
            agent.system = f"{spec.instructions}\n\n{agent.system}"
        return agent
