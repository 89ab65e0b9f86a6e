"""Adapters that make cellblock the sandbox of agent frameworks (optional extras).

- `cellblock.integrations.managed_agents`: the anthropic SDK's self-hosted environment worker
  with the agent toolset running in one cellblock session per work item
  (``pip install 'cellblock[managed-agents]'``).
- `cellblock.integrations.openai_agents`: `CellblockSandboxClient`, a sandbox client of the
  OpenAI Agents SDK (``pip install 'cellblock[openai-agents]'``).
"""
