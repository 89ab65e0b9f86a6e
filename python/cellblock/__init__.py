"""cellblock: run untrusted code in fresh Linux namespaces, with limits, seccomp, an egress
allowlist and secret redaction, and get a report of exactly what happened."""

from cellblock._native import Redactor
from cellblock.batch import Job, JobError, iter_many, run_many
from cellblock.errors import (
    CellblockError,
    CommandNotFound,
    InvalidSpec,
    NamespaceUnavailable,
    NetworkPolicyError,
    PathEscape,
    SandboxIOError,
    SeccompError,
    SecretError,
    SessionClosed,
    SetupError,
)
from cellblock.policy import Policy
from cellblock.result import RunResult
from cellblock.sandbox import run
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import Secret

__all__ = [
    "CellblockError",
    "CommandNotFound",
    "InvalidSpec",
    "Job",
    "JobError",
    "NamespaceUnavailable",
    "NetworkPolicyError",
    "PathEscape",
    "Policy",
    "Redactor",
    "RunResult",
    "SandboxIOError",
    "SeccompError",
    "SeccompPolicy",
    "Secret",
    "SecretError",
    "SessionClosed",
    "SetupError",
    "iter_many",
    "run",
    "run_many",
]
