"""RunResult: what happened in one run, as reported by the native core."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from cellblock import _native

#: Why a run ended: the core's one definition (`Reason` in rust/core/src/report.rs).
REASONS: tuple[str, ...] = _native.REASONS
#: What can enforce a limit: the core's one definition (`Enforcer`).
ENFORCERS: tuple[str, ...] = _native.ENFORCERS


def one_of(names: tuple[str, ...], what: str) -> AfterValidator:
    """A pydantic validator accepting only `names` (`what` names the field in errors)."""

    def check(value: str) -> str:
        if value not in names:
            raise ValueError(f"unknown {what} {value!r} (one of {', '.join(names)})")
        return value

    return AfterValidator(check)


Reason = Annotated[str, one_of(REASONS, "reason")]
Enforcer = Annotated[str, one_of(ENFORCERS, "enforcer")]

#: Fields printed by `cellblock run --json`, in order: exactly RunResult's fields.
FIELDS = (
    "exit_code", "signal", "reason", "stdout", "stderr", "stdout_truncated",
    "stderr_truncated", "wall_time_s", "cpu_time_s", "peak_memory_bytes", "violations",
    "enforcement", "redactions", "seccomp_profile", "network", "cleanup_errors",
    "limits_hit", "limits_unverified", "time_namespace",
)


class RunResult(BaseModel):
    """The report of one sandboxed run (immutable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    exit_code: int | None
    signal: int | None
    reason: Reason
    stdout_bytes: bytes
    stderr_bytes: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    wall_time_s: float
    cpu_time_s: float
    peak_memory_bytes: int
    violations: list[dict[str, Any]]
    enforcement: dict[str, Enforcer | None]
    redactions: dict[str, int] = {}
    seccomp_profile: str | None = None
    network: dict[str, int] | None = None
    #: What could not be cleaned up after the run (a cgroup left behind...), with why.
    cleanup_errors: list[str] = []
    #: Limits the supervisor saw reached (kernel counters of the run's cgroup, its own timers
    #: and caps, its count of the sandbox's processes).
    limits_hit: list[str] = []
    #: Enforced limits whose reaching cannot be observed (e.g. memory under an rlimit): not
    #: being in `limits_hit` says nothing about them.
    limits_unverified: list[str] = []
    #: Whether the command ran in a time namespace of its own: its monotonic and boot-time
    #: clocks (/proc/uptime, /proc/stat btime) start when the sandbox was built. False on a
    #: kernel without time namespaces (the command saw the host's uptime), or when nothing ran.
    time_namespace: bool = False

    @property
    def stdout(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.reason == "exited" and self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the text fields (stdout/stderr as str)."""
        return {name: getattr(self, name) for name in FIELDS}


def violation_kind(violation: Mapping[str, Any]) -> str:
    """The kind of a reported violation as security events and reports name it: `seccomp`,
    `dns` (a name lookup refused: a network violation on port 0), `network` (a connection
    refused) or `credential` (a credential placeholder refused toward a host it is not bound
    to)."""
    kind = str(violation.get("kind", "unknown"))
    if kind == "network" and violation.get("port") == 0:
        return "dns"
    return kind
