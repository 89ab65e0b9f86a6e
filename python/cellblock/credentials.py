"""Credentials: values that never enter the sandbox.

The sandbox's environment variable holds a placeholder; the egress proxy outside the sandbox
puts the real value into requests bound for the credential's hosts (and, when `methods` is set,
only for those methods). A placeholder sent anywhere else is refused and reported.
"""

from __future__ import annotations

import re
import secrets as _random
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from cellblock.errors import CredentialError

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_METHOD_RE = re.compile(r"^[A-Z]+$")

#: What the proxy does with a request carrying a placeholder toward a host it is not bound to
#: (it is never forwarded): refuse it, kill the sandbox's run, or only log the violation.
OnPlaceholderLeak = Literal["block", "kill", "log"]


class Credential(BaseModel):
    """A named credential bound to the hosts it may be sent to.

    `hosts` are egress allowlist patterns (`api.example.com`, `*.example.com`, with an optional
    `:port`). `methods` (e.g. `["GET", "HEAD"]`) limits substitution to those methods. `header`
    limits substitution to one request header (e.g. `Authorization`); `in_query` and `in_body`
    opt in to substitution in the URL query and the request body. `scope` is `session` (lives
    and dies with one session) or `agent` (every session of that agent gets it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: SecretStr
    hosts: list[str] = Field(min_length=1)
    methods: list[str] | None = None
    header: str | None = None
    in_query: bool = False
    in_body: bool = False
    scope: Literal["session", "agent"] = "session"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise CredentialError(f"credential name {v!r} is not a valid environment variable name")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value():
            raise CredentialError("credential value is empty")
        if any(c in v.get_secret_value() for c in "\r\n\0"):
            # It goes into header lines: a line break would add headers of its own.
            raise CredentialError("credential value holds a line break or NUL")
        return v

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if not h or any(c.isspace() or c in "/@" for c in h):
                raise CredentialError(f"credential host {h!r} is not a host pattern")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [m.upper() for m in v]
        for m in out:
            if not _METHOD_RE.match(m):
                raise CredentialError(f"credential method {m!r} is not an HTTP method")
        return out

    @field_validator("header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not _HEADER_RE.match(v):
            raise CredentialError(f"credential header {v!r} is not a header name")
        return v


def make_placeholder(name: str) -> str:
    """A fresh placeholder for one sandbox: unique, unguessable, and safe in headers, URLs and
    JSON (letters, digits and underscores only)."""
    return f"cellblock_placeholder_{name}_{_random.token_hex(16)}"


CredentialsArg = Iterable[Credential | Mapping[str, Any]] | None


def normalize_credentials(credentials: CredentialsArg) -> list[Credential]:
    """Credentials as a list of `Credential` (mappings, e.g. from JSON, are validated)."""
    if credentials is None:
        return []
    if isinstance(credentials, (str, bytes, Mapping)):
        raise CredentialError("credentials: expected a list of Credential objects")
    out = []
    for c in credentials:
        if isinstance(c, Credential):
            out.append(c)
        elif isinstance(c, Mapping):
            try:
                out.append(Credential(**c))
            except ValidationError as e:
                raise CredentialError(f"credential: {e.errors()[0].get('msg')}") from None
        else:
            raise CredentialError(f"expected Credential objects, got {type(c).__name__}")
    return out


def credentials_for_spec(
    credentials: list[Credential], on_leak: OnPlaceholderLeak, tls_ca_bundle: str | None
) -> dict[str, object] | None:
    """The run spec's `credentials` section, with a fresh placeholder per credential: the
    only place the real values go (the supervisor reads them; the sandbox never does)."""
    if not credentials:
        return None
    credential_names(credentials)
    return {
        "list": [
            {
                "name": c.name,
                "value": c.value.get_secret_value(),
                "placeholder": make_placeholder(c.name),
                "hosts": list(c.hosts),
                "methods": c.methods,
                "header": c.header,
                "in_query": c.in_query,
                "in_body": c.in_body,
            }
            for c in credentials
        ],
        "on_leak": on_leak,
        "tls_ca_bundle": tls_ca_bundle,
    }


def credential_hosts(credentials: Iterable[Credential]) -> list[str]:
    """Every host the credentials are bound to: egress to them is allowed by the credential."""
    out: list[str] = []
    for c in credentials:
        out.extend(h for h in c.hosts if h not in out)
    return out


def credential_names(credentials: Iterable[Credential]) -> list[str]:
    """The names, checked for duplicates (one placeholder per variable)."""
    seen: set[str] = set()
    for c in credentials:
        if c.name in seen:
            raise CredentialError(f"credential {c.name!r} is given twice")
        seen.add(c.name)
    return sorted(seen)
