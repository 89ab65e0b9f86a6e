"""`cellblock mcp [--transport stdio|streamable-http] [--host H] [--port N]`: an MCP server
whose tools run code in sandboxes."""

from __future__ import annotations

import argparse


def cmd_mcp(args: argparse.Namespace) -> int:
    from cellblock.mcp.server import build_server
    from cellblock.service.server import reclaim_stale

    reclaim_stale("cellblock mcp")
    server = build_server(host=args.host, port=args.port, log_level="WARNING")
    server.run(transport=args.transport)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mcp", help="serve sandbox tools over the Model Context Protocol")
    p.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio",
                   help="stdio (default) or streamable-http")
    p.add_argument("--host", default="127.0.0.1", help="streamable-http: address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8766, help="streamable-http: port (8766)")
    p.set_defaults(func=cmd_mcp)
