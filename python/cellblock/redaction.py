"""Redaction of every field of results, errors and events, not only of the output streams.

The core redacts each run report where it is built (output streams, violations and every other
text field). Python code that builds results, errors or events from other data (exception
messages echoing argv, paths or env; batch records; agent events) passes them through
`redact_fields` / `redact_error` with a redactor of the same secrets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from cellblock._native import Redactor
from cellblock.secrets import Secret

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def redactor_for(secrets: Iterable[Secret]) -> Redactor | None:
    """A redactor of `secrets`, or None when there are none (nothing to redact)."""
    pairs = [(s.name, s.value.get_secret_value()) for s in secrets]
    return Redactor(pairs) if pairs else None


def redact_fields(value: T, redactor: Redactor | None) -> T:
    """`value` with every str and bytes inside redacted: through pydantic models (copied, not
    changed), dicts (keys too), lists and tuples; other values are kept as they are."""
    if redactor is None:
        return value
    return cast(T, _redact(value, redactor))


def _redact(value: Any, redactor: Redactor) -> Any:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, bytes):
        return redactor.redact_bytes(value)
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        return value.model_copy(update={k: _redact(getattr(value, k), redactor) for k in fields})
    if isinstance(value, dict):
        return {_redact(k, redactor): _redact(v, redactor) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, redactor) for v in value]
    if isinstance(value, tuple):
        return tuple(_redact(v, redactor) for v in value)
    return value


def redact_error(error: E, redactor: Redactor | None) -> E:
    """`error`, or an exception of the same class whose message is redacted when the message
    shows a secret. Raise the result `from None`: the original stays out of the traceback."""
    if redactor is None:
        return error
    message = str(error)
    clean = redactor.redact(message)
    if clean == message:
        return error
    return type(error)(clean)
