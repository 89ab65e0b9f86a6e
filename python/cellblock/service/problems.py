"""Errors of the service as RFC 9457 problem+json, named like the Python exceptions.

The `title` of a problem is the exception's class name (`InvalidSpec`, `SessionClosed`,
`PathEscape`, ...) and its `type` is `urn:cellblock:error:<name>`, so a client raises the same
class the in-process API would. Errors that only the service has are defined here.
"""

from __future__ import annotations

from typing import Any

from cellblock import errors
from cellblock.errors import CellblockError

#: Media type of every error response.
PROBLEM_JSON = "application/problem+json"


class ServiceError(CellblockError):
    """An error only the HTTP service reports (not the sandbox)."""


class Unauthorized(ServiceError):
    """No bearer token, or one the service does not know."""


class LimitExceeded(ServiceError):
    """A per-token limit (open sessions, concurrent runs) would be exceeded."""


class RequestTooLarge(ServiceError):
    """The request body is larger than the token's limit."""


class NotFound(ServiceError):
    """No such route or resource (other tokens' resources are not found either)."""


class Cancelled(ServiceError):
    """A client's call was cancelled by its caller: the request was closed, and the service
    killed the run (raised by the client; a killed run's report cannot come back)."""


class WaitTimeout(ServiceError, TimeoutError):
    """Waiting for a background process took longer than asked (the process keeps running);
    also a `TimeoutError`, as `Process.wait` raises in-process."""


class InternalError(ServiceError):
    """A bug in the service; the message says what failed."""


#: HTTP status of each error class (subclasses inherit their nearest listed base's).
STATUS: dict[type[CellblockError], int] = {
    errors.CellblockError: 500,
    errors.InvalidSpec: 422,
    errors.CommandNotFound: 422,
    errors.SecretError: 422,
    errors.CredentialError: 422,
    errors.VaultError: 422,
    errors.UnsafeLayer: 422,
    errors.EnvironmentNotFound: 404,
    errors.EnvironmentBuildError: 422,
    errors.CorruptEnvironment: 409,
    errors.NetworkPolicyError: 422,
    errors.SeccompError: 422,
    errors.PathEscape: 403,
    errors.SandboxIOError: 404,
    errors.FileTooLarge: 413,
    errors.ForkError: 422,
    errors.SessionClosed: 404,
    errors.NamespaceUnavailable: 503,
    errors.SetupError: 503,
    errors.SetupTimeout: 504,
    Unauthorized: 401,
    LimitExceeded: 429,
    RequestTooLarge: 413,
    NotFound: 404,
    WaitTimeout: 408,
    InternalError: 500,
}


def _error_classes() -> list[type[CellblockError]]:
    """Every exception class of `cellblock.errors`, plus the service's own."""
    found: list[type[CellblockError]] = [ServiceError]
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, CellblockError):
            found.append(cls)
    found.extend(c for c in [*STATUS, *ServiceError.__subclasses__()] if c not in found)
    return found


#: Every class a problem's title may name, by name (the client raises the class named).
CLASSES: dict[str, type[CellblockError]] = {cls.__name__: cls for cls in _error_classes()}

TYPE_PREFIX = "urn:cellblock:error:"


def status_of(error: CellblockError) -> int:
    """The HTTP status for an error (its nearest listed base class decides)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem_body(error: CellblockError, status: int | None = None) -> dict[str, Any]:
    """The problem+json object of an error."""
    code = status if status is not None else status_of(error)
    name = type(error).__name__
    return {"type": TYPE_PREFIX + name, "title": name, "status": code, "detail": str(error)}


def error_from_problem(body: Any, status: int) -> CellblockError:
    """The exception a client raises for a problem+json body (the class its title names)."""
    title = body.get("title") if isinstance(body, dict) else None
    detail = body.get("detail") if isinstance(body, dict) else None
    cls = CLASSES.get(title, ServiceError) if isinstance(title, str) else ServiceError
    return cls(str(detail) if detail is not None else f"HTTP {status}")
