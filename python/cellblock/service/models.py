"""Request and response bodies of the HTTP service (validated by pydantic, in the OpenAPI
document). Limits use the names and units of `cellblock.run`'s keyword arguments."""

from __future__ import annotations

import base64
from typing import Any, Literal, Self

from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, field_validator, model_validator

from cellblock.batch import Job, Limits
from cellblock.credentials import Credential, OnPlaceholderLeak
from cellblock.environments.spec import NAME_RE
from cellblock.fork import ForkReport
from cellblock.result import Reason, RunResult
from cellblock.runtimes.outputs import IMAGE_SIGNATURES, Output
from cellblock.runtimes.warm import CodeResult

#: Longest a session may live without being extended (`set_timeout`), seconds.
MAX_LIFETIME_S = 7 * 24 * 3600.0

Env = dict[str, str]

#: Largest CA bundle a request may carry (PEM text; a system bundle is about 200 KiB).
MAX_CA_PEM = 1 << 20


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CallLimits(_Body):
    """Per-call limits (None: the session's or the policy's default)."""

    timeout: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S)
    cpu_time: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S)
    max_output: int | str | None = None


class RemoteIsolation(BaseModel):
    """What a run or a session may take beyond limits: a built environment of the SERVICE's
    store (by name only: a name can never be a path, so `rootfs`, a host directory, is not
    accepted), and credentials the service's egress proxy substitutes. Credential values are
    write-only: no response, error or log line of the service holds them."""

    model_config = ConfigDict(extra="forbid")

    environment: str | None = Field(
        default=None, pattern=NAME_RE.pattern,
        description="A built environment of the service's store, by name (`cellblock env ls` "
        "on the service's machine).")
    credentials: list[Credential] = Field(
        default=[], max_length=256,
        description="Credentials (write-only values): the sandbox sees placeholders, the "
        "service's egress proxy substitutes the values for the credentials' hosts.")
    on_credential_leak: OnPlaceholderLeak | None = Field(
        default=None, description="A placeholder sent to a host it is not bound to: block "
        "(default), kill or log; never forwarded.")
    tls_ca_pem: str | None = Field(
        default=None, min_length=1, max_length=MAX_CA_PEM,
        description="PEM CA certificates upstream TLS servers are verified against when "
        "credentials are substituted (the CONTENT; the client reads its `tls_ca_bundle` "
        "file). Default: the service host's trust store.")

    @field_validator("tls_ca_pem")
    @classmethod
    def _pem(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(v.encode())
        except ValueError:
            raise ValueError("not PEM CA certificates") from None
        return v


class SessionCreate(Limits, RemoteIsolation):
    """A new session: session-wide limits, per-call defaults, labels and lifetime."""

    model_config = ConfigDict(extra="forbid")

    labels: dict[str, str] = Field(default={}, max_length=64, description="Metadata.")
    env: Env = Field(default_factory=dict)
    cwd: str | None = None
    profile: str | None = None
    allow_net: list[str] | None = None
    secrets: dict[str, str] = Field(default={}, description="Env values, redacted.")
    idle_timeout: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S,
                                       description="Close after this many idle seconds.")
    auto_pause: float | None = Field(default=None, gt=0, le=MAX_LIFETIME_S,
                                     description="Freeze after this many idle seconds (root).")
    lifetime_s: float = Field(default=3600.0, gt=0, le=MAX_LIFETIME_S,
                              description="Seconds until the service closes it.")
    warm: list[Literal["python", "node"]] = Field(default=[], max_length=2)


class SetTimeout(_Body):
    """Extends (or shortens) a session's lifetime: it closes `seconds` from now."""

    seconds: float = Field(gt=0, le=MAX_LIFETIME_S)


class NetworkSet(_Body):
    """A running session's new egress allowlist (patterns as for `allow_net`)."""

    allow: list[str] = Field(max_length=4096)


class SessionInfo(BaseModel):
    """A session as the service sees it."""

    id: str
    labels: dict[str, str]
    state: Literal["open", "paused", "closed"]
    created_at: float = Field(description="Unix time.")
    expires_at: float = Field(description="Unix time at which the session is closed.")
    paused_seconds: float = Field(default=0.0, description="Seconds frozen by auto_pause.")
    idle_close_in: float | None = Field(
        default=None, description="Seconds until the idle timeout closes it (none: never).")
    auto_pause_in: float | None = Field(
        default=None, description="Seconds until auto_pause freezes it (none: not pending).")


class ForkRequest(BaseModel):
    """How long a fork's saving and loading of the kernel's state may each take."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(default=60.0, gt=0, le=600)


class SessionForked(SessionInfo):
    """A session made by forking another (`POST /v1/sessions/{id}/fork`)."""

    fork: ForkReport = Field(description="What the fork carried (see `Sandbox.fork`).")


class CallInput(CallLimits):
    """What every call may add: stdin (text, or exact bytes as base64), environment and
    per-call secrets (injected into the environment, redacted from the output)."""

    stdin: str | None = None
    stdin_base64: Base64Bytes | None = Field(default=None, description="Binary stdin.")
    env: Env = {}
    secrets: dict[str, str] = Field(default={}, description="Env values, redacted.")

    @model_validator(mode="after")
    def _one_stdin(self) -> Self:
        if self.stdin is not None and self.stdin_base64 is not None:
            raise ValueError("give stdin or stdin_base64, not both")
        return self


class TerminalArgs(_Body):
    """A terminal for the command (`tty`), of `tty_size` = [rows, cols] (default 24x80):
    its output, stdout and stderr merged, comes as stdout; `stdin` is typed, then
    end-of-file. Checked by the sandbox (InvalidSpec, as in-process)."""

    tty: bool = False
    tty_size: tuple[int, int] | None = None


class CommandRun(CallInput, TerminalArgs):
    """A command in a session."""

    argv: list[str] = Field(min_length=1, max_length=4096)
    cwd: str | None = None
    profile: str | None = None


class TerminalResize(_Body):
    """A terminal's new window (its foreground process group gets SIGWINCH)."""

    rows: int = Field(ge=1, le=0xFFFF)
    cols: int = Field(ge=1, le=0xFFFF)


class TerminalMessage(_Body):
    """A control message of the terminal WebSocket (a text frame; keystrokes are binary)."""

    type: Literal["resize"]
    rows: int = Field(ge=1, le=0xFFFF)
    cols: int = Field(ge=1, le=0xFFFF)


class CodeRun(CallInput):
    """Code in a session's warm runtime (stateless unless `stateful`)."""

    code: str
    stateful: bool = False
    cwd: str | None = None


class ProcessStart(CallInput, TerminalArgs):
    """A background process in a session: `argv`, or `shell` (run by `/bin/sh -c`). Without
    `stdin`/`stdin_base64` its stdin stays open for `POST .../stdin`; no wall-clock timeout
    unless `timeout` is given."""

    argv: list[str] | None = Field(default=None, min_length=1, max_length=4096)
    shell: str | None = Field(default=None, min_length=1)
    cwd: str | None = None
    profile: str | None = None

    @model_validator(mode="after")
    def _one_command(self) -> Self:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give argv or shell (one of them)")
        return self


class ProcessInfo(BaseModel):
    """A background process as the service sees it (`result` once it ended)."""

    id: str
    argv: list[str]
    state: Literal["running", "ended"]
    tty: bool = Field(default=False, description="Runs on a terminal (resizable).")
    returncode: int | None = Field(
        default=None, description="Exit status, or minus the signal that ended it.")
    result: RunReport | None = None


class ProcessSignal(_Body):
    """A signal for a background process (all but KILL are forwarded by its init)."""

    signal: Literal["TERM", "INT", "HUP", "QUIT", "USR1", "USR2", "KILL"]


class PortExpose(_Body):
    """A port inside the sandbox to reach from the service's machine. `host` is an address
    of the SERVICE's machine, and only its loopback is allowed."""

    port: int = Field(ge=1, le=65535)
    host: Literal["127.0.0.1", "::1"] = "127.0.0.1"
    host_port: int = Field(default=0, ge=0, le=65535, description="0: a free port.")


class PortInfo(BaseModel):
    """An exposed port: `host:host_port` on the service's machine reaches `port` inside."""

    port: int
    host: str
    host_port: int


class OneShotRun(CommandRun, RemoteIsolation):
    """A command in a fresh sandbox of its own (destroyed after)."""

    memory: int | str | None = None
    pids: int | None = Field(default=None, ge=1)
    cpus: float | None = Field(default=None, gt=0)
    disk: int | str | None = None
    allow_net: list[str] | None = None


class BatchCreate(_Body):
    """A batch of jobs (`cellblock.Job`) run in fresh sandboxes."""

    jobs: list[Job] = Field(min_length=1)
    concurrency: int | None = Field(default=None, ge=1, le=1024)


class JobOutcome(BaseModel):
    """One finished job of a batch: its report, or the error that kept it from running."""

    job_id: str
    result: RunReport | None = None
    error: dict[str, str] | None = None


class BatchStatus(BaseModel):
    """Progress of a batch; `results` once asked for (finished jobs, completion order)."""

    id: str
    state: Literal["running", "done", "cancelled"]
    total: int
    finished: int
    failed: int
    results: list[JobOutcome] | None = None


class OutputReport(BaseModel):
    """A rich output of warm Python on the wire: images (image/png, image/jpeg) as base64."""

    data: dict[str, str]
    truncated: bool = False

    @classmethod
    def of(cls, o: Output) -> OutputReport:
        data = {
            m: v if isinstance(v, str) else base64.b64encode(v).decode()
            for m, v in o.data.items()
        }
        return cls(data=data, truncated=o.truncated)

    def to_output(self) -> Output:
        data: dict[str, str | bytes] = {
            m: base64.b64decode(v) if m in IMAGE_SIGNATURES else v for m, v in self.data.items()
        }
        return Output(data=data, truncated=self.truncated)


class RunReport(BaseModel):
    """A run's report: `cellblock.RunResult` (plus `value`/`error` of warm code). Output is
    given as text and, exactly, as base64."""

    exit_code: int | None
    signal: int | None
    reason: Reason
    stdout: str
    stderr: str
    stdout_base64: str
    stderr_base64: str
    stdout_truncated: bool
    stderr_truncated: bool
    wall_time_s: float
    cpu_time_s: float
    peak_memory_bytes: int
    violations: list[dict[str, Any]]
    enforcement: dict[str, str | None]
    redactions: dict[str, int] = {}
    seccomp_profile: str | None = None
    network: dict[str, int] | None = None
    cleanup_errors: list[str] = []
    limits_hit: list[str] = []
    limits_unverified: list[str] = []
    time_namespace: bool = False
    value: str | None = None
    error: str | None = None
    outputs: list[OutputReport] = []
    outputs_error: str | None = None
    result_truncated: bool = False

    @classmethod
    def of(cls, r: RunResult) -> RunReport:
        """The wire form of a result."""
        data: dict[str, Any] = {
            **r.to_dict(),
            "stdout_base64": base64.b64encode(r.stdout_bytes).decode(),
            "stderr_base64": base64.b64encode(r.stderr_bytes).decode(),
        }
        if isinstance(r, CodeResult):
            data.update(
                value=r.value, error=r.error, outputs_error=r.outputs_error,
                result_truncated=r.result_truncated,
                outputs=[OutputReport.of(o) for o in r.outputs],
            )
        return cls.model_validate(data)

    def to_result(self) -> CodeResult:
        """Back to a `CodeResult` (a `RunResult` with `value`/`error`), bytes exact."""
        data = self.model_dump(
            exclude={"stdout", "stderr", "stdout_base64", "stderr_base64", "outputs"}
        )
        return CodeResult(
            **data,
            outputs=[o.to_output() for o in self.outputs],
            stdout_bytes=base64.b64decode(self.stdout_base64),
            stderr_bytes=base64.b64decode(self.stderr_base64),
        )


JobOutcome.model_rebuild()
ProcessInfo.model_rebuild()
