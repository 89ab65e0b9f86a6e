"""Exception classes of cellblock.

They are created by the native extension from the Rust error enum (one class per variant, same
names as the CLI prints) and re-exported here so pure-Python code can raise them too. The
environment errors at the end are only ever raised by Python code (cellblock.environments),
so they are defined here rather than in the core.
"""

from cellblock._native import (
    CellblockError,
    CommandNotFound,
    CredentialError,
    FileTooLarge,
    ForkError,
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
    UnsafeLayer,
    VaultError,
)


class EnvironmentNotFound(CellblockError):
    """No environment of that name has been built (see `cellblock env ls`)."""


class EnvironmentBuildError(CellblockError):
    """Building an environment failed (the message says which step and why); nothing of the
    failed step is kept in the store."""


class PackageNotFound(EnvironmentBuildError):
    """A declared package does not exist in the configured package sources."""


class SourceUnreachable(EnvironmentBuildError):
    """A package source (index, repository, registry) could not be reached from the build."""


class CorruptEnvironment(CellblockError):
    """A cached environment or layer does not match its manifest (it is never used)."""


__all__ = [
    "CellblockError",
    "CommandNotFound",
    "CorruptEnvironment",
    "CredentialError",
    "EnvironmentBuildError",
    "EnvironmentNotFound",
    "FileTooLarge",
    "ForkError",
    "InvalidSpec",
    "NamespaceUnavailable",
    "NetworkPolicyError",
    "PackageNotFound",
    "PathEscape",
    "SandboxIOError",
    "SeccompError",
    "SecretError",
    "SessionClosed",
    "SetupError",
    "SetupTimeout",
    "SourceUnreachable",
    "UnsafeLayer",
    "VaultError",
]
