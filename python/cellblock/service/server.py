"""Running the service: file-descriptor limit, tokens, uvicorn with graceful shutdown."""

from __future__ import annotations

import resource
import sys

from cellblock.service.auth import TokenLimits, TokenRecord, TokenStore, new_token, token_hash


def raise_nofile_limit() -> int:
    """Raises RLIMIT_NOFILE's soft limit to the hard limit (each open session holds a few
    descriptors); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def ephemeral_store() -> TokenStore:
    """One fresh token, printed on stderr, for a service started without a tokens file."""
    token = new_token()
    print(f"cellblock serve: token (this run only): {token}", file=sys.stderr, flush=True)
    return TokenStore([TokenRecord(name="default", sha256=token_hash(token),
                                   **TokenLimits().model_dump())])


def reclaim_stale(program: str) -> int:
    """Reclaims what dead cellblock processes left behind (a predecessor killed with SIGKILL
    whose paused sessions' reapers died too): their cgroups are thawed, their processes killed,
    the cgroups removed. Said on stderr when there was any; returns how many."""
    from cellblock import _native

    found = _native.sweep_stale_cgroups()
    if found:
        print(f"{program}: reclaimed {found} cgroups of dead cellblock processes",
              file=sys.stderr, flush=True)
    return found


def serve(host: str, port: int, tokens: TokenStore, max_sessions: int = 1000) -> None:
    """Serves until SIGINT/SIGTERM; then every session is closed before the process exits."""
    import uvicorn

    from cellblock.service.app import create_app

    raise_nofile_limit()
    reclaim_stale("cellblock serve")
    config = uvicorn.Config(
        create_app(tokens, max_sessions=max_sessions), host=host, port=port, log_level="warning",
        timeout_graceful_shutdown=10, lifespan="on",
        # Clients hold connections across long runs; a short idle limit races their reuse.
        timeout_keep_alive=75,
    )
    uvicorn.Server(config).run()
