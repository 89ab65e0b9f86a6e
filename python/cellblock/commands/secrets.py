"""`--secret NAME` / `--secret NAME=@FILE`: secrets taken from cellblock's own environment;
`--credential NAME@HOSTS[=@FILE]`: credentials the same way."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from cellblock.credentials import Credential
from cellblock.errors import CredentialError, SecretError


def secrets_from_args(items: list[str]) -> dict[str, str]:
    """Resolve `--secret` options into {name: value}; values are never printed."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if sep:
            if not source.startswith("@"):
                raise SecretError(
                    f"--secret {name}: give the value through the environment or as =@FILE, "
                    "never on the command line"
                )
            try:
                value = Path(source[1:]).read_text().rstrip("\n")
            except OSError as e:
                raise SecretError(
                    f"--secret {name}: cannot read {source[1:]}: {e.strerror}"
                ) from None
        else:
            if name not in os.environ:
                raise SecretError(f"--secret {name}: not set in cellblock's environment")
            value = os.environ[name]
        out[name] = value
    return out


def credentials_from_args(items: list[str]) -> list[Credential]:
    """Resolve `--credential NAME@HOST[,HOST...]` (value from cellblock's environment variable
    NAME), `NAME@HOSTS=@FILE`, or a bare `NAME` (the vault's credential of that name, with its
    hosts) into credentials; values are never printed."""
    out: list[Credential] = []
    stored = [item for item in items if "@" not in item and "=" not in item]
    if stored:
        from cellblock.vault import Vault  # only when asked: it imports cryptography

        out += Vault().resolve(stored)
    for item in items:
        if item in stored:
            continue
        spec, sep, source = item.partition("=")
        name, at, hosts = spec.partition("@")
        if not at or not name or not hosts:
            raise CredentialError(f"--credential expects NAME@HOST[,HOST...], got {spec!r}")
        if sep:
            if not source.startswith("@"):
                raise CredentialError(
                    f"--credential {name}: give the value through the environment or as =@FILE, "
                    "never on the command line"
                )
            try:
                value = Path(source[1:]).read_text().rstrip("\n")
            except OSError as e:
                raise CredentialError(
                    f"--credential {name}: cannot read {source[1:]}: {e.strerror}"
                ) from None
        else:
            if name not in os.environ:
                raise CredentialError(f"--credential {name}: not set in cellblock's environment")
            value = os.environ[name]
        out.append(Credential(name=name, value=SecretStr(value), hosts=hosts.split(",")))
    return out
