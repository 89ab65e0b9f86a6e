"""Secrets: values injected as environment variables of a run and redacted from its output."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

from cellblock.errors import SecretError

#: Secrets shorter than this cannot be redacted without mangling ordinary output.
MIN_SECRET_LEN = 8

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Secret(BaseModel):
    """A named secret. The value never appears in reprs, logs or error messages."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    value: SecretStr
    scope: Literal["session", "run"] = "run"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise SecretError(f"secret name {v!r} is not a valid environment variable name")
        return v

    @field_validator("value")
    @classmethod
    def _value(cls, v: SecretStr, info: object) -> SecretStr:
        if len(v.get_secret_value().encode()) < MIN_SECRET_LEN:
            raise SecretError(
                f"secret is shorter than {MIN_SECRET_LEN} bytes: too short to redact safely"
            )
        return v


SecretsArg = Mapping[str, str] | Iterable[Secret] | None


def normalize_secrets(secrets: SecretsArg) -> list[Secret]:
    """Secrets from a {name: value} mapping or a list of Secret (validated)."""
    if secrets is None:
        return []
    if isinstance(secrets, Mapping):
        return [Secret(name=k, value=SecretStr(v)) for k, v in secrets.items()]
    out = []
    for s in secrets:
        if not isinstance(s, Secret):
            raise SecretError(f"expected Secret objects, got {type(s).__name__}")
        out.append(s)
    return out


def secrets_for_spec(secrets: Iterable[Secret]) -> list[dict[str, str]]:
    """The spec's form of the secrets (values in memory only)."""
    return [{"name": s.name, "value": s.value.get_secret_value()} for s in secrets]
