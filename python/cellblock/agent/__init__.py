"""The agent loop: a model completes a task by calling tools bound to one sandbox session."""

from cellblock.agent.loop import (
    DEFAULT_MODEL,
    Agent,
    AgentEvent,
    AgentResult,
    Finished,
    ModelFallback,
    ModelRequest,
    ModelResponse,
    ModelRetry,
    ToolCall,
    ToolFinished,
    ToolStarted,
)
from cellblock.agent.offline import DEMO_TASKS, OFFLINE_MODEL
from cellblock.agent.pricing import PRICES, Price, Usage
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
    "Finished",
    "ModelFallback",
    "ModelRequest",
    "ModelResponse",
    "ModelRetry",
    "Price",
    "SandboxLike",
    "ToolCall",
    "ToolFinished",
    "ToolStarted",
    "Usage",
    "tool_schemas",
]
