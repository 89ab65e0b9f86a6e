"""`--secret NAME` / `--secret NAME=@FILE`: secrets taken from cellblock's own environment."""

from __future__ import annotations

import os
from pathlib import Path

from cellblock.errors import SecretError


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
