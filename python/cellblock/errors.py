"""Exception classes of cellblock.

They are created by the native extension from the Rust error enum (one class per variant, same
names as the CLI prints) and re-exported here so pure-Python code can raise them too.
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

__all__ = [
    "CellblockError",
    "CommandNotFound",
    "CredentialError",
    "FileTooLarge",
    "ForkError",
    "InvalidSpec",
    "NamespaceUnavailable",
    "NetworkPolicyError",
    "PathEscape",
    "SandboxIOError",
    "SeccompError",
    "SecretError",
    "SessionClosed",
    "SetupError",
    "SetupTimeout",
    "UnsafeLayer",
    "VaultError",
]
