"""`cellblock mcp [--transport stdio|streamable-http] [--host H] [--port N] [--tokens FILE]`:
an MCP server whose tools run code in sandboxes.

Over streamable-http every request needs a bearer token of the tokens file `cellblock serve`
uses (`--tokens`); `--no-auth` is accepted only on a loopback address."""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

LOOPBACK = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (only there may the server run without tokens)."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BearerAuth:
    """ASGI middleware: 401 problem+json unless the request carries a known bearer token."""

    def __init__(self, app: Any, tokens: Any) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from cellblock.mcp.server import TOKEN_STATE
        from cellblock.service.app import _bearer_token, problem
        from cellblock.service.problems import Unauthorized

        if scope["type"] == "http":
            token = _bearer_token(scope)
            record = self.tokens.lookup(token) if token is not None else None
            if record is None:
                await problem(Unauthorized("a valid bearer token is required"))(
                    scope, receive, send)
                return
            scope.setdefault("state", {})[TOKEN_STATE] = record.name
        await self.app(scope, receive, send)


def cmd_mcp(args: argparse.Namespace) -> int:
    from cellblock.errors import InvalidSpec
    from cellblock.mcp.server import Sessions, build_server
    from cellblock.service.server import reclaim_stale

    if args.transport == "streamable-http":
        if args.no_auth and not is_loopback(args.host):
            raise InvalidSpec(f"--no-auth is refused on {args.host}: only on a loopback "
                              "address (127.0.0.1, ::1)")
        if not args.no_auth and not args.tokens:
            raise InvalidSpec("streamable-http needs --tokens FILE (made with `cellblock serve "
                              "--tokens FILE --add-token NAME`), or --no-auth on loopback")
    reclaim_stale("cellblock mcp")
    if args.transport == "stdio":
        build_server(idle_timeout=args.idle_timeout, log_level="WARNING").run(transport="stdio")
        return 0
    import asyncio

    import uvicorn

    from cellblock.service.auth import TokenStore

    # One store for every client's MCP session; closed when the server exits.
    sessions = Sessions(args.idle_timeout)
    server = build_server(sessions=sessions, host=args.host, port=args.port,
                          log_level="WARNING")
    app: Any = server.streamable_http_app()
    if not args.no_auth:
        app = BearerAuth(app, TokenStore.load(args.tokens))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        asyncio.run(sessions.close_all())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("mcp", help="serve sandbox tools over the Model Context Protocol")
    p.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio",
                   help="stdio (default) or streamable-http")
    p.add_argument("--host", default="127.0.0.1", help="streamable-http: address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8766, help="streamable-http: port (8766)")
    p.add_argument("--tokens", metavar="FILE",
                   help="streamable-http: the bearer tokens accepted (cellblock serve's file)")
    p.add_argument("--no-auth", action="store_true",
                   help="streamable-http on a loopback address: accept requests without token")
    p.add_argument("--idle-timeout", type=float, default=900.0, metavar="S",
                   help="close a session unused for S seconds (900)")
    p.set_defaults(func=cmd_mcp)
