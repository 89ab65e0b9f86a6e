"""What a remote run or session takes beyond limits, made safe on the service's side: an
environment is resolved in the service's own store (its errors do not show where that is), and
a CA bundle sent as content becomes a private file of the service for the egress proxy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterator

from cellblock.errors import EnvironmentNotFound


@contextlib.contextmanager
def ca_bundle_file(pem: str | None) -> Iterator[str | None]:
    """A CA bundle sent as content, as a file of the service's own (private, removed after):
    the egress proxy reads a path, and a path from a client would name any file here."""
    if pem is None:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="cellblock-ca-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def known_environment(name: str | None) -> None:
    """EnvironmentNotFound before any sandbox is made, naming the environment but not where
    the service keeps its store (a path of the service's machine)."""
    if name is None:
        return
    from cellblock.environments.runtime import resolve

    try:
        await asyncio.to_thread(resolve, name)
    except EnvironmentNotFound:
        raise EnvironmentNotFound(
            f"no environment named {name!r} on the service (see 'cellblock env ls' there)"
        ) from None
