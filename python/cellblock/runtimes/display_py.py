"""Rich outputs of warm Python calls: IPython's display protocol, minimal and without IPython.
Runs INSIDE the sandbox: its source is put in front of zygote_py.py's (see `zygote_source`);
the host never imports it, and validates everything it sends (runtimes/outputs.py).

A call's outputs, in order: each `display(obj)`, then the value of the last expression, then
the matplotlib figures still open (rendered to PNG with the Agg backend, then closed, as
Jupyter's inline backend does). An object's forms come from `_repr_mimebundle_` and the
`_repr_*_` methods; `text/plain` is always its repr. A method that raises is skipped (the
repr stays). matplotlib is never imported here: only when the user's code did.

Sizes are capped here so that the result frame stays under the host's frame limit: each form
at the call's max_output, all outputs together at OUTPUTS_BUDGET (counted as JSON-encoded).
"""

import base64
import io
import json
import sys
from typing import Any

#: MIME type -> the method of the protocol that renders an object in it.
REPR_METHODS = (
    ("text/html", "_repr_html_"), ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"), ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"), ("image/jpeg", "_repr_jpeg_"),
    ("application/json", "_repr_json_"),
)
BINARY_MIMES = ("image/png", "image/jpeg")
KNOWN_MIMES = ("text/plain", *(m for m, _ in REPR_METHODS))
#: JSON-encoded size of all the outputs of one call (the host takes frames up to 4 MiB).
OUTPUTS_BUDGET = 2 << 20
#: Outputs kept per call (past it, the last one kept is marked truncated).
MAX_DISPLAYS = 100


def _method(obj: Any, name: str) -> Any:
    """obj's bound protocol method, or None (classes are rendered by their repr, as IPython
    does: their `_repr_html_` is unbound)."""
    if isinstance(obj, type):
        return None
    try:
        method = getattr(obj, name, None)
    except Exception:
        return None
    return method if callable(method) else None


def _forms(obj: Any) -> dict[str, Any]:
    """What obj's protocol methods give, by MIME type (a method that raises gives nothing)."""
    data: dict[str, Any] = {}
    bundle = _method(obj, "_repr_mimebundle_")
    if bundle is not None:
        try:
            got = bundle(include=None, exclude=None)
        except Exception:
            got = None
        if isinstance(got, tuple) and got:
            got = got[0]  # (data, metadata)
        if isinstance(got, dict):
            data.update((k, v) for k, v in got.items() if k in KNOWN_MIMES)
    for mime, name in REPR_METHODS:
        method = None if mime in data else _method(obj, name)
        if method is None:
            continue
        try:
            got = method()
        except Exception:
            continue
        if isinstance(got, tuple) and got:
            got = got[0]
        if got is not None:
            data[mime] = got
    figure = sys.modules.get("matplotlib.figure")
    if figure is not None and isinstance(obj, figure.Figure):
        png = _figure_png(obj)
        if png is not None:
            data["image/png"] = png
    return data


def _figure_png(fig: Any) -> bytes | None:
    """The figure rendered to PNG, and closed (it is shown once)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", bbox_inches="tight")
    except Exception as e:
        sys.stderr.write(f"cellblock: a matplotlib figure could not be rendered: {e!r}\n")
        return None
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is not None:
            try:
                pyplot.close(fig)
            except Exception:
                pass
    return buf.getvalue()


def _as_text(mime: str, value: Any) -> str | None:
    """A form as the text sent: binary forms base64, JSON as JSON text; None if malformed."""
    if mime in BINARY_MIMES:
        if isinstance(value, (bytes, bytearray)):
            return base64.b64encode(value).decode()
        return value if isinstance(value, str) else None
    if mime == "application/json":
        if isinstance(value, str):
            try:
                json.loads(value)
            except ValueError:
                return None
            return value
        try:
            return json.dumps(value, ensure_ascii=False, default=repr)
        except (ValueError, TypeError, RecursionError):
            return None
    return value if isinstance(value, str) else None


class Outputs:
    """The outputs of one call, capped as they are added."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, cap: int | None) -> None:
        """A new call: no outputs yet, each form capped at `cap` characters."""
        self.items: list[dict[str, Any]] = []
        self.cap = cap
        self.left = OUTPUTS_BUDGET

    def add(self, obj: Any, plain: str | None = None) -> None:
        """Adds obj's forms; `plain`: its repr when already made."""
        if len(self.items) >= MAX_DISPLAYS:
            self.items[-1]["truncated"] = True
            return
        data = _forms(obj)
        if plain is None:
            try:
                plain = repr(obj)
            except Exception as e:
                plain = f"<{type(obj).__name__} object: repr raised {type(e).__name__}>"
        data["text/plain"] = plain
        self.add_data(data)

    def add_data(self, data: dict[str, Any]) -> None:
        out: dict[str, str] = {}
        truncated = False
        for mime, value in data.items():
            text = _as_text(mime, value)
            if text is None:
                continue
            whole = mime in BINARY_MIMES or mime == "application/json"
            limit = self.left if self.cap is None else min(self.cap, self.left)
            if len(text) > limit:
                truncated = True
                if whole:
                    continue  # half an image or of a JSON document is not one
                text = text[:limit]
            size = len(json.dumps(text))  # as it travels (non-ASCII escaped)
            while size > self.left and text and not whole:
                text, truncated = text[: len(text) // 2], True
                size = len(json.dumps(text))
            if size > self.left:
                truncated = True
                continue
            self.left -= size
            out[mime] = text
        if out:
            self.items.append({"data": out, "truncated": truncated})

    def figures(self) -> None:
        """The matplotlib figures still open: rendered and closed (only if the code imported
        pyplot)."""
        pyplot = sys.modules.get("matplotlib.pyplot")
        if pyplot is None:
            return
        try:
            numbers = list(pyplot.get_fignums())
        except Exception:
            return
        for n in numbers:
            try:
                fig = pyplot.figure(n)
            except Exception:
                continue
            self.add(fig)

    def result(self) -> list[dict[str, Any]]:
        return self.items


#: The outputs of the running call (display() adds to them).
CURRENT = Outputs()


def display(*objs: Any) -> None:
    """Shows each object as a rich output of the call, in order (as IPython's display)."""
    for obj in objs:
        CURRENT.add(obj)
