"""The agent loop: a model completes a task by calling tools bound to one sandbox session."""

from cellblock.agent.bindings import FunctionTool, FunctionTools, ToolSource, tool
from cellblock.agent.control import Budget, CancelScope, Ledger
from cellblock.agent.loop import DEFAULT_MODEL, Agent
from cellblock.agent.mcp_tools import McpServer
from cellblock.agent.offline import DEMO_TASKS, OFFLINE_MODEL
from cellblock.agent.pipeline import Pipeline, PipelineResult, Stage, StageResult
from cellblock.agent.pricing import PRICES, Price, Usage
from cellblock.agent.results import (
    AgentEvent,
    AgentResult,
    Finished,
    ModelFallback,
    ModelRequest,
    ModelResponse,
    ModelRetry,
    SubAgentResult,
    ToolCall,
    ToolFinished,
    ToolStarted,
)
from cellblock.agent.routing import Route, RouteContext, Router, RoutingDecision
from cellblock.agent.spec import AgentSpec, MemorySpec, SubAgents, Team
from cellblock.agent.tools import DEFAULT_TOOLS, SandboxLike, tool_schemas

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_TOOLS",
    "DEMO_TASKS",
    "OFFLINE_MODEL",
    "PRICES",
    "Agent",
    "AgentEvent",
    "AgentResult",
    "AgentSpec",
    "Budget",
    "CancelScope",
    "Finished",
    "FunctionTool",
    "FunctionTools",
    "Ledger",
    "McpServer",
    "MemorySpec",
    "ModelFallback",
    "ModelRequest",
    "ModelResponse",
    "ModelRetry",
    "Pipeline",
    "PipelineResult",
    "Price",
    "Route",
    "RouteContext",
    "Router",
    "RoutingDecision",
    "SandboxLike",
    "Stage",
    "StageResult",
    "SubAgentResult",
    "SubAgents",
    "Team",
    "ToolCall",
    "ToolFinished",
    "ToolSource",
    "ToolStarted",
    "Usage",
    "tool",
    "tool_schemas",
]
