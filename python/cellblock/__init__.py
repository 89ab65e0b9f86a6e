"""cellblock: run untrusted code in fresh Linux namespaces, with limits, seccomp, an egress
allowlist and secret redaction, and get a report of exactly what happened."""

from cellblock._native import Redactor, __version__
from cellblock.batch import Job, JobError, iter_many, run_many
from cellblock.client import Client, RemoteSandbox
from cellblock.errors import (
    CellblockError,
    CommandNotFound,
    CredentialError,
    FileTooLarge,
    InvalidSpec,
    NamespaceUnavailable,
    NetworkPolicyError,
    PathEscape,
    SandboxIOError,
    SeccompError,
    SecretError,
    SessionClosed,
    SetupError,
    SetupTimeout,
    VaultError,
)
from cellblock.files import DirEntry
from cellblock.policy import Policy
from cellblock.pool import run_node, run_python
from cellblock.process import ExposedPort, OutputChunk, Process
from cellblock.remote_process import RemoteProcess
from cellblock.result import RunResult
from cellblock.runtimes.warm import CodeResult
from cellblock.sandbox import run
from cellblock.seccomp import SeccompPolicy
from cellblock.secrets import Secret
from cellblock.session import Sandbox

__all__ = [
    "CellblockError",
    "Client",
    "CodeResult",
    "CommandNotFound",
    "CredentialError",
    "DirEntry",
    "ExposedPort",
    "FileTooLarge",
    "InvalidSpec",
    "Job",
    "JobError",
    "NamespaceUnavailable",
    "NetworkPolicyError",
    "OutputChunk",
    "PathEscape",
    "Policy",
    "Process",
    "Redactor",
    "RemoteProcess",
    "RemoteSandbox",
    "RunResult",
    "Sandbox",
    "SandboxIOError",
    "SeccompError",
    "SeccompPolicy",
    "Secret",
    "SecretError",
    "SessionClosed",
    "SetupError",
    "SetupTimeout",
    "VaultError",
    "__version__",
    "iter_many",
    "run",
    "run_many",
    "run_node",
    "run_python",
]
