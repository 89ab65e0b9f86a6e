"""Debian bases (`debian:SUITE`) built with mmdebstrap, then unpacked like any tarball.

mmdebstrap writes a tarball (so it needs no root: `--mode=auto` picks unshare for a plain
user); `rootfs.unpack` then applies the same rules as to any untrusted layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cellblock.environments.rootfs import unpack
from cellblock.errors import InvalidSpec, SetupError

#: Prefix of a base built from the Debian archive: `debian:bookworm`.
PREFIX = "debian:"
#: How long one mmdebstrap run may take.
TIMEOUT = 1800.0


def mmdebstrap_argv(
    suite: str,
    output: Path,
    *,
    mirrors: Sequence[str] = (),
    variant: str = "minbase",
    packages: Sequence[str] = (),
) -> list[str]:
    """The mmdebstrap command that writes `suite`'s base to the tarball `output`. A mirror is a
    URL or a full sources.list line; none = mmdebstrap's default (the machine's apt sources)."""
    if not suite or not all(c.isalnum() or c in "-._" for c in suite):
        raise InvalidSpec(f"debian: bad suite name {suite!r}")
    argv = ["mmdebstrap", f"--variant={variant}", "--mode=auto", "--format=tar"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    return [*argv, suite, str(output), *mirrors]


def build(
    spec: str,
    dest: Path,
    *,
    mirrors: Sequence[str] = (),
    variant: str = "minbase",
    packages: Sequence[str] = (),
) -> None:
    """Build `dest` from a base spec: `debian:SUITE`, or a path `rootfs.unpack` takes."""
    if not spec.startswith(PREFIX):
        unpack(Path(spec), dest)
        return
    if shutil.which("mmdebstrap") is None:
        raise SetupError("debian bases need mmdebstrap (apt-get install mmdebstrap)")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".debian-", dir=dest.parent) as tmp:
        tarball = Path(tmp) / "base.tar"
        argv = mmdebstrap_argv(spec[len(PREFIX):], tarball, mirrors=mirrors, variant=variant,
                               packages=packages)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=False,
                                  env={**os.environ, "LC_ALL": "C.UTF-8"})
        except subprocess.TimeoutExpired:
            raise SetupError(f"mmdebstrap did not finish within {TIMEOUT:.0f} s") from None
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise SetupError(f"mmdebstrap failed ({done.returncode}): " + " | ".join(tail))
        unpack(tarball, dest)
