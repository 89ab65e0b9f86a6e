"""`--secret NAME` / `--secret NAME=@FILE`: secrets taken from cellblock's own environment;
`--credential NAME@HOSTS[=@FILE]`: credentials the same way."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import SecretStr

from cellblock.credentials import Credential
from cellblock.errors import CredentialError, SecretError


def _value(option: str, name: str, sep: str, source: str,
           error: type[SecretError | CredentialError]) -> str:
    """The value of `--OPTION NAME[=@FILE]`: from the file, or from cellblock's environment."""
    if sep:
        if not source.startswith("@"):
            raise error(
                f"--{option} {name}: give the value through the environment or as =@FILE, "
                "never on the command line"
            )
        try:
            return Path(source[1:]).read_text().rstrip("\n")
        except OSError as e:
            raise error(f"--{option} {name}: cannot read {source[1:]}: {e.strerror}") from None
    if name not in os.environ:
        raise error(f"--{option} {name}: not set in cellblock's environment")
    return os.environ[name]


def secrets_from_args(items: list[str]) -> dict[str, str]:
    """Resolve `--secret` options into {name: value}; values are never printed."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        out[name] = _value("secret", name, sep, source, SecretError)
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
        value = _value("credential", name, sep, source, CredentialError)
        out.append(Credential(name=name, value=SecretStr(value), hosts=hosts.split(",")))
    return out
