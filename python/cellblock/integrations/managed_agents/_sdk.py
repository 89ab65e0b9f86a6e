"""The anthropic SDK names the integration uses beyond its public API, imported in one place.

The reference toolset's limits and output assembly, and the session runner's current thread,
are module-private in the SDK; they are used rather than copied so the sandboxed tools behave
like the reference ones (and follow them when the SDK changes them).
"""

from __future__ import annotations

from cellblock.integrations._pins import SUPPORTED_ANTHROPIC, unsupported

try:
    from anthropic.lib.tools._files import LineRangeCollector
    from anthropic.lib.tools._memories import MemoryWriteError
    from anthropic.lib.tools._tool_dispatch import SessionThread, current_session_thread
    from anthropic.lib.tools.agent_toolset import (
        _BINARY_MEDIA_TYPES,
        _DEFAULT_MAX_READ_BYTES,
        _GREP_CPU_SECONDS,
        BASH_DEFAULT_TIMEOUT,
        BASH_OUTPUT_LIMIT,
        AgentToolContext,
        _BashOutput,
        _resolve_max_bytes,
    )

    # The worker's hook that saves a memory file to its store before writing it.
    if not hasattr(AgentToolContext, "_write_memory_file"):
        raise ImportError("AgentToolContext._write_memory_file is gone")
except ImportError as e:  # a private name moved: say which versions work, not just what broke
    raise unsupported("cellblock.integrations.managed_agents", "anthropic", SUPPORTED_ANTHROPIC,
                      "managed-agents", e) from e

__all__ = [
    "BASH_DEFAULT_TIMEOUT",
    "BASH_OUTPUT_LIMIT",
    "BINARY_MEDIA_TYPES",
    "DEFAULT_MAX_READ_BYTES",
    "GREP_CPU_SECONDS",
    "SUPPORTED_ANTHROPIC",
    "BashOutput",
    "LineRangeCollector",
    "MemoryWriteError",
    "SessionThread",
    "current_session_thread",
    "resolve_max_bytes",
]

#: Extension -> media type of the files `read` returns as base64 blocks.
BINARY_MEDIA_TYPES = _BINARY_MEDIA_TYPES
#: `read`'s default cap (the API cuts a longer result).
DEFAULT_MAX_READ_BYTES = _DEFAULT_MAX_READ_BYTES
#: The grep walk's CPU budget.
GREP_CPU_SECONDS = _GREP_CPU_SECONDS
#: The bash output's assembly: order of the streams, ANSI, limit, saved file.
BashOutput = _BashOutput
#: The `max_*_bytes` rule: not given -> the default, None -> no cap.
resolve_max_bytes = _resolve_max_bytes
