"""Rich outputs of warm Python calls, host side: what the worker sent (display_py.py) checked
as untrusted data, capped and redacted.

Every text form (text/plain, text/html, text/markdown, text/latex, image/svg+xml,
application/json) goes through the session's redactor, HTML also against the HTML-escaped
forms of the secrets (pandas escapes `&<>"'` in cells). Images (image/png, image/jpeg) are
checked to be base64 of a PNG/JPEG and capped, but NOT scanned for secrets: a secret drawn
into a picture comes back.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from cellblock import _native

#: Forms kept as text (redacted, cut at max_output).
TEXT_MIMES = frozenset({
    "text/plain", "text/html", "text/markdown", "text/latex", "image/svg+xml",
})
#: JSON text: redacted, and dropped rather than cut (half a document is not one).
JSON_MIMES = frozenset({"application/json"})
#: Images and the bytes they start with.
IMAGE_SIGNATURES: Mapping[str, bytes] = {
    "image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff",
}
#: Outputs taken from one call (the worker keeps at most as many).
MAX_OUTPUTS = 100
#: Length of the outputs_error text.
MAX_ERROR = 2000


class Output(BaseModel):
    """One rich output of a call: the same object in several forms, by MIME type.

    Text forms are `str` (application/json is JSON text); images are the decoded `bytes`.
    `truncated`: a form was cut at max_output, or dropped because it did not fit.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_bytes="base64")

    data: dict[str, str | bytes]
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The text/plain form (the object's repr)."""
        form = self.data.get("text/plain")
        return form if isinstance(form, str) else None

    def json_value(self) -> Any:
        """The application/json form, parsed (None when there is none)."""
        form = self.data.get("application/json")
        return json.loads(form) if isinstance(form, str) else None


class OutputRedactor:
    """Redacts the text forms; counts what it redacted by secret name."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._plain = _native.Redactor(secrets) if secrets else None
        escaped = {k: html.escape(v) for k, v in secrets.items() if html.escape(v) != v}
        self._html = _native.Redactor(escaped) if escaped else None

    def redact(self, mime: str, text: str) -> str:
        if self._plain is not None:
            text = self._plain.redact(text)
        if mime in ("text/html", "image/svg+xml") and self._html is not None:
            text = self._html.redact(text)
        return text

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in (self._plain, self._html):
            for name, n in (r.counts.items() if r is not None else ()):
                counts[name] = counts.get(name, 0) + int(n)
        return counts


def parse_outputs(
    raw: Any, redactor: OutputRedactor, cap: int | None
) -> tuple[list[Output], str | None]:
    """The worker's `outputs` as Output models, and what was wrong with them (None: nothing).
    Malformed entries and forms are dropped, never raised."""
    if raw is None:
        return [], None
    if not isinstance(raw, list):
        return [], f"outputs is a {type(raw).__name__}, not a list"
    problems: list[str] = []
    if len(raw) > MAX_OUTPUTS:
        problems.append(f"{len(raw)} outputs sent, the first {MAX_OUTPUTS} kept")
    outputs: list[Output] = []
    for i, item in enumerate(raw[:MAX_OUTPUTS]):
        data = item.get("data") if isinstance(item, dict) else None
        if not isinstance(data, dict):
            problems.append(f"output {i}: not an object with a data map")
            continue
        truncated = isinstance(item, dict) and item.get("truncated") is True
        forms: dict[str, str | bytes] = {}
        for mime, value in data.items():
            got = _form(mime, value, redactor, cap)
            if isinstance(got, _Problem):
                problems.append(f"output {i}: {redactor.redact('text/plain', got.why)}")
            elif got is None:
                truncated = True
            else:
                forms[mime] = got
                if cap is not None and isinstance(value, str) and len(value) > cap:
                    truncated = True
        if forms:
            outputs.append(Output(data=forms, truncated=truncated))
    error = "; ".join(problems)[:MAX_ERROR] if problems else None
    return outputs, error


class _Problem:
    def __init__(self, why: str) -> None:
        self.why = why


def _form(
    mime: Any, value: Any, redactor: OutputRedactor, cap: int | None
) -> str | bytes | _Problem | None:
    """One checked form; None: dropped for its size."""
    if not isinstance(mime, str) or not isinstance(value, str):
        return _Problem(f"form {str(mime)[:64]!r} is not text")
    if mime in TEXT_MIMES:
        text = value if cap is None else value[:cap]
        return redactor.redact(mime, text)
    if mime in JSON_MIMES:
        if cap is not None and len(value) > cap:
            return None
        text = redactor.redact(mime, value)
        try:
            json.loads(text)
        except ValueError:
            return _Problem(f"{mime} is not JSON")
        return text
    signature = IMAGE_SIGNATURES.get(mime)
    if signature is None:
        return _Problem(f"unknown MIME type {mime[:64]!r}")
    if cap is not None and len(value) > (cap + 2) // 3 * 4:
        return None
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return _Problem(f"{mime} is not base64")
    if not data.startswith(signature):
        return _Problem(f"{mime} does not start with its signature")
    return data
