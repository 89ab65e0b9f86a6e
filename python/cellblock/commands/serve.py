"""`cellblock serve [--host H] [--port N] [--tokens FILE]`: the HTTP/JSON service, and
`cellblock serve --tokens FILE --add-token NAME`: create a token (printed once)."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> int:
    from cellblock.service.auth import TokenLimits, TokenStore, add_token
    from cellblock.service.server import ephemeral_store, serve

    if args.add_token:
        if not args.tokens:
            from cellblock.errors import InvalidSpec

            raise InvalidSpec("--add-token needs --tokens FILE")
        limits = TokenLimits(
            max_sessions=args.max_sessions, max_concurrent_runs=args.max_concurrent_runs,
            max_request_bytes=args.max_request_bytes,
        )
        print(add_token(args.tokens, args.add_token, limits))
        return 0
    store = TokenStore.load(args.tokens) if args.tokens else ephemeral_store()
    serve(args.host, args.port, store, max_sessions=args.max_total_sessions)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = {"max_sessions": 1000, "max_concurrent_runs": 64, "max_request_bytes": 64 << 20}
    p = sub.add_parser("serve", help="serve sandboxes over HTTP/JSON (bearer tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (8765)")
    p.add_argument("--tokens", metavar="FILE",
                   help="tokens file (hashes and limits); without it one token is made and "
                        "printed for this run")
    p.add_argument("--add-token", metavar="NAME", help="create a token in --tokens, print it")
    p.add_argument("--max-total-sessions", type=int, default=1000, metavar="N",
                   help="sessions the service holds at once, all tokens together (1000)")
    for name, value in defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value,
                       help=f"with --add-token: the token's {name.replace('_', ' ')} ({value})")
    p.set_defaults(func=cmd_serve)
