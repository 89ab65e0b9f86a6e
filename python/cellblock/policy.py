"""Policy: the limits and rules of a run, as a pydantic model (also loadable from TOML)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from cellblock.credentials import Credential, OnPlaceholderLeak
from cellblock.errors import InvalidSpec
from cellblock.seccomp import SeccompPolicy
from cellblock.sizes import parse_count, parse_seconds, parse_size

#: Limits every run gets unless the policy or the call says otherwise.
DEFAULT_LIMITS: dict[str, Any] = {
    "memory": 512 << 20,
    "pids": 256,
    "cpus": None,
    "timeout": 60.0,
    "cpu_time": None,
    "max_output": 16 << 20,
    "disk": 64 << 20,
}

LIMIT_NAMES = tuple(DEFAULT_LIMITS)


class Policy(BaseModel):
    """Limits, environment, seccomp, network and secrets of a run or a session.

    `environment` names a built environment (`cellblock env build`) whose packages the run
    sees, read-only.

    Sizes accept ints (bytes) or strings like "64M"; `None` keeps the default. Explicit keyword
    arguments of `cellblock.run` override the policy's fields.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None
    timeout: float | None = None
    cpu_time: float | None = None
    max_output: int | None = None
    disk: int | None = None
    env: dict[str, str] = {}
    cwd: str | None = None
    profile: str | None = None
    seccomp: SeccompPolicy | None = None
    allow_net: list[str] = []
    secrets: dict[str, str] = {}
    #: A root filesystem (host directory, e.g. made by `cellblock.environments.rootfs.unpack`)
    #: mounted read-only as the sandbox's root instead of the host's /usr, /etc, runtimes.
    rootfs: str | None = None

    @field_validator("rootfs", mode="before")
    @classmethod
    def _rootfs(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, (str, os.PathLike)):
            raise InvalidSpec(f"rootfs: expected a directory path, got {v!r}")
        path = os.path.abspath(os.fspath(v))
        if not os.path.isdir(path):
            raise InvalidSpec(f"rootfs: {path} is not a directory")
        return path
    environment: str | None = None
    #: Credentials the egress proxy substitutes (see cellblock.credentials); their hosts are
    #: allowed egress.
    credentials: list[Credential] = []
    #: What a placeholder sent to a host it is not bound to does (never forwarded).
    on_credential_leak: OnPlaceholderLeak = "block"
    #: PEM file of the CAs upstream TLS servers are verified against when credentials are
    #: substituted (default: the host's trust store).
    tls_ca_bundle: str | None = None

    @field_validator("memory", "max_output", "disk", mode="before")
    @classmethod
    def _size(cls, v: Any, info: Any) -> int | None:
        return None if v is None else parse_size(v, info.field_name)

    @field_validator("pids", mode="before")
    @classmethod
    def _count(cls, v: Any, info: Any) -> int | None:
        return None if v is None else parse_count(v, info.field_name)

    @field_validator("timeout", "cpu_time", mode="before")
    @classmethod
    def _seconds(cls, v: Any, info: Any) -> float | None:
        return None if v is None else parse_seconds(v, info.field_name)

    @field_validator("allow_net", mode="before")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        # A string is iterable: list("localhost") would be nine one-letter hosts.
        if isinstance(v, (str, bytes)):
            raise InvalidSpec(
                f"allow_net: expected a list of host patterns, got the string {v!r} "
                f"(write [{v!r}])"
            )
        return v

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, v: Any) -> float | None:
        return None if v is None else parse_seconds(v, "cpus", unit="CPUs")

    def __repr_args__(self) -> Any:
        # Secret values never appear in reprs.
        for k, v in super().__repr_args__():
            yield k, ({n: "<hidden>" for n in v} if k == "secrets" else v)

    @classmethod
    def build(cls, **fields: Any) -> Policy:
        """Validate fields, turning pydantic's errors into `InvalidSpec`."""
        try:
            return cls(**fields)
        except ValidationError as e:
            raise InvalidSpec(_first_error(e)) from None

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        """Load a policy from a TOML file (top-level keys are Policy's fields)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise InvalidSpec(f"cannot read policy {path}: {e}") from None
        return cls.build(**data)

    def merged(self, **overrides: Any) -> Policy:
        """A copy with the non-None overrides applied (validated); the policy itself when there
        are none (it is frozen and was validated when built), unless it has a rootfs, whose
        directory is checked again."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given and self.rootfs is None:
            # Re-validating an unchanged policy cost ~50 us on every run.
            return self
        data = self.model_dump(exclude_unset=True)
        data.update(given)
        return Policy.build(**data)

    def limits(self) -> dict[str, Any]:
        """Effective limits: the policy's values over DEFAULT_LIMITS."""
        return {k: (getattr(self, k) if getattr(self, k) is not None else d)
                for k, d in DEFAULT_LIMITS.items()}


def as_pattern_list(patterns: Any) -> Any:
    """`allow_net` as a list for merging; a string is passed through for Policy to refuse."""
    if patterns is None or isinstance(patterns, (str, bytes)):
        return patterns
    return list(patterns)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg
