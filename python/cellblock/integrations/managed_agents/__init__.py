"""Claude Managed Agents self-hosted worker backed by cellblock sessions.

The anthropic SDK's own `EnvironmentWorker` polls, acks, heartbeats and stops work items and
runs the session's tool calls; the `agent_toolset_20260401` tools it runs are the ones of
`cellblock_toolset`: each work item gets one `cellblock.Sandbox`, bash runs in it (stateful)
and the file tools are confined to its workspace.
"""

from cellblock.integrations.managed_agents.bash import SandboxBash
from cellblock.integrations.managed_agents.tools import cellblock_toolset
from cellblock.integrations.managed_agents.worker import make_worker, run_worker
from cellblock.integrations.managed_agents.workspace import WORKSPACE, SandboxWorkspace

__all__ = [
    "WORKSPACE",
    "SandboxBash",
    "SandboxWorkspace",
    "cellblock_toolset",
    "make_worker",
    "run_worker",
]
