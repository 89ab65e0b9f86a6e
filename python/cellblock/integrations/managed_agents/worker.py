"""The SDK's `EnvironmentWorker` with `cellblock_toolset` as its tools."""

from __future__ import annotations

import os
import tempfile
from functools import partial
from typing import Any

from anthropic import AsyncAnthropic
from anthropic.lib.environments import EnvironmentWorker

from cellblock.errors import InvalidSpec
from cellblock.integrations.managed_agents.tools import cellblock_toolset
from cellblock.policy import Policy


def make_worker(
    client: AsyncAnthropic,
    *,
    environment_id: str,
    environment_key: str | None = None,
    policy: Policy | None = None,
    workdir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> EnvironmentWorker:
    """The SDK's environment worker whose sessions' tools run in cellblock sandboxes.

    Polling, acks, lease heartbeats, stop, skills download and memory-store sync are the
    SDK's own; each session work item gets one sandbox opened with `policy`. `workdir` is the
    host folder where the SDK stages skills and memory before they are copied into the
    sandbox (keep it private to this worker). Other `options` go to `EnvironmentWorker`.
    """
    return EnvironmentWorker(
        client,
        environment_id=environment_id,
        environment_key=environment_key,
        tools=partial(cellblock_toolset, policy=policy or Policy()),
        workdir=workdir,
        **options,
    )


async def run_worker(
    environment_id: str,
    *,
    policy: Policy | None = None,
    environment_key: str | None = None,
    base_url: str | None = None,
    **options: Any,
) -> None:
    """Serves the environment until cancelled. The key defaults to
    `ANTHROPIC_ENVIRONMENT_KEY`, the API address to the SDK's (`ANTHROPIC_BASE_URL`)."""
    key = environment_key or os.environ.get("ANTHROPIC_ENVIRONMENT_KEY")
    if not key:
        raise InvalidSpec("worker: no environment key (set ANTHROPIC_ENVIRONMENT_KEY)")
    with tempfile.TemporaryDirectory(prefix="cellblock-worker-") as workdir:
        async with AsyncAnthropic(auth_token=key, base_url=base_url) as client:
            worker = make_worker(
                client, environment_id=environment_id, environment_key=key, policy=policy,
                workdir=workdir, **options,
            )
            await worker.run()
