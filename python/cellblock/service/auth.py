"""Bearer tokens of the service: stored as SHA-256 hashes, each with its own limits.

Tokens are 256-bit random strings (`secrets.token_urlsafe(32)`), so a plain SHA-256 is enough
to store them (there is nothing to brute-force, unlike a password); the file holds only
hashes, and a token is looked up by the hash of what the client sent. Each token sees only
the sessions and batches it created.

Tokens file (JSON): ``{"tokens": [{"name": "alice", "sha256": "...", "max_sessions": 100,
"max_concurrent_runs": 16, "max_request_bytes": 67108864}]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellblock.errors import InvalidSpec


class TokenLimits(BaseModel):
    """What one token may hold at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_sessions: int = Field(default=1000, ge=0, description="Open sessions at once.")
    max_concurrent_runs: int = Field(default=64, ge=1, description="Runs (batch jobs) at once.")
    max_request_bytes: int = Field(default=64 << 20, ge=1024, description="Largest body.")
    max_batch_jobs: int = Field(default=10_000, ge=1, description="Jobs in one batch.")
    max_batches: int = Field(default=100, ge=1,
                             description="Batches held (running or finished, not forgotten).")


class TokenRecord(TokenLimits):
    """A stored token: its name, the hash of its value, and its limits."""

    name: str = Field(min_length=1, max_length=200)
    sha256: str = Field(pattern="^[0-9a-f]{64}$")


def token_hash(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits), prefixed so it is recognizable in logs and leaks."""
    return "cbk_" + secrets.token_urlsafe(32)


class TokenStore:
    """The tokens the service accepts, by hash."""

    def __init__(self, records: list[TokenRecord]) -> None:
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise InvalidSpec("token names must be unique")
        self._by_hash = {r.sha256: r for r in records}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Reads a tokens file (InvalidSpec if malformed)."""
        try:
            data = json.loads(Path(path).read_text())
            return cls([TokenRecord.model_validate(r) for r in data.get("tokens", [])])
        except (OSError, ValueError, ValidationError, AttributeError) as e:
            raise InvalidSpec(f"tokens file {path}: {e}") from None

    def lookup(self, token: str) -> TokenRecord | None:
        """The record of a presented token, or None."""
        return self._by_hash.get(token_hash(token))

    def records(self) -> list[TokenRecord]:
        """Every stored token record."""
        return list(self._by_hash.values())


def add_token(path: str | os.PathLike[str], name: str, limits: TokenLimits) -> str:
    """Creates a token, appends its hash to the tokens file (created 0600 if missing) and
    returns the token itself: the only time it is ever shown."""
    file = Path(path)
    records = TokenStore.load(file).records() if file.exists() else []
    if any(r.name == name for r in records):
        raise InvalidSpec(f"a token named {name!r} exists already")
    token = new_token()
    records.append(TokenRecord(name=name, sha256=token_hash(token), **limits.model_dump()))
    text = json.dumps({"tokens": [r.model_dump() for r in records]}, indent=2) + "\n"
    tmp = file.with_name(file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, file)
    return token
