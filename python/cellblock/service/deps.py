"""FastAPI dependencies shared by the service's routes: the bearer token's record and the
token's own session named in the path."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cellblock.service.auth import TokenRecord, TokenStore
from cellblock.service.problems import Unauthorized
from cellblock.service.registry import Registry, Session

_bearer = HTTPBearer(auto_error=False)


async def _token(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TokenRecord:
    store: TokenStore = request.app.state.tokens
    record = store.lookup(creds.credentials) if creds is not None else None
    if record is None:
        raise Unauthorized("a valid bearer token is required")
    return record


Token = Annotated[TokenRecord, Depends(_token)]


async def _session_of(request: Request, tok: Token, session_id: str) -> Session:
    registry: Registry = request.app.state.registry
    return registry.get_session(tok, session_id)


Sess = Annotated[Session, Depends(_session_of)]
Path = Annotated[str, Query(min_length=1, max_length=4096)]
