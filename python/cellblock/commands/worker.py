"""`cellblock worker --environment ID [--config FILE]`: a Claude Managed Agents self-hosted
environment worker whose tools run in cellblock sandboxes (needs `cellblock[managed-agents]`)."""

from __future__ import annotations

import argparse
import asyncio

from cellblock.policy import Policy


def cmd_worker(args: argparse.Namespace) -> int:
    from cellblock.cli import fail

    policy = Policy.from_toml(args.config) if args.config else Policy()
    try:
        from cellblock.integrations.managed_agents import run_worker
    except ImportError as e:
        fail(f"worker needs the anthropic SDK: pip install 'cellblock[managed-agents]' ({e})")
    from anthropic import APIError

    try:
        asyncio.run(run_worker(args.environment, policy=policy, max_idle=args.max_idle))
    except APIError as e:  # e.g. a rejected environment key: the poll fails for good
        fail(f"{type(e).__name__}: {e}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "worker", usage="cellblock worker --environment ID [--config FILE]",
        help="serve a Claude Managed Agents self-hosted environment, tools in sandboxes",
        description="Polls the environment (key: ANTHROPIC_ENVIRONMENT_KEY, API address: "
                    "ANTHROPIC_BASE_URL) and runs each session's agent toolset in its own "
                    "sandbox; the sandbox's policy (limits, allow_net, secrets) is the TOML "
                    "file given with --config.",
    )
    p.add_argument("--environment", required=True, metavar="ID", help="environment id")
    p.add_argument("--config", metavar="FILE", help="policy TOML of each session's sandbox")
    p.add_argument("--max-idle", type=float, default=60.0, metavar="S",
                   help="seconds a session may stay idle before its work item is released")
    p.set_defaults(func=cmd_worker)
