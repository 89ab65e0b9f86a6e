"""The anthropic SDK names the integration uses beyond its public API, imported in one place.

The session runner's current thread is module-private in the SDK; it is used rather than
re-derived so the sandboxed bash keeps one shell per thread, like the reference one.
"""

from __future__ import annotations

from anthropic.lib.tools._tool_dispatch import SessionThread, current_session_thread
from anthropic.lib.tools.agent_toolset import BASH_DEFAULT_TIMEOUT

__all__ = ["BASH_DEFAULT_TIMEOUT", "SessionThread", "current_session_thread"]
