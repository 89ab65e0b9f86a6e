"""Terminals: `run(..., tty=True)` gives the command a pseudo-terminal of the sandbox's own.

The core opens the pty in the sandbox's private devpts instance and makes it the command's
stdin, stdout, stderr and controlling terminal; the supervisor reads its output (stdout and
stderr merged into `stdout`, redacted and capped as usual) and types `stdin` into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellblock.errors import InvalidSpec

#: Window size when none is given: the classic terminal.
DEFAULT_SIZE = (24, 80)

#: End-of-file typed after a tty run's input (Ctrl-D, the terminal's VEOF).
EOF = b"\x04"

#: (rows, cols).
WindowSize = tuple[int, int]
#: A fixed window size, or a function giving the current one (None: unchanged), polled while
#: the run goes on: the terminal follows it and the command gets SIGWINCH on a change.
SizeArg = WindowSize | Callable[[], WindowSize | None] | None


class TtySize(BaseModel):
    """A terminal's window size, as the core's RunSpec `tty` section."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rows: int = Field(ge=1, le=0xFFFF)
    cols: int = Field(ge=1, le=0xFFFF)


def _checked(size: Any) -> dict[str, Any]:
    try:
        rows, cols = size
        return TtySize(rows=rows, cols=cols).model_dump()
    except (TypeError, ValueError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            field = ".".join(str(x) for x in err.get("loc", ()))
            raise InvalidSpec(f"tty_size.{field}: {err.get('msg', 'invalid value')}") from None
        raise InvalidSpec(f"tty_size: expected (rows, cols), got {size!r}") from None


def tty_section(tty: bool, size: SizeArg) -> dict[str, Any] | None:
    """The RunSpec `tty` entry for `tty`/`tty_size` arguments (None: pipes, no terminal)."""
    if not tty:
        if size is not None:
            raise InvalidSpec("tty_size: given without tty=True")
        return None
    initial = size() if callable(size) else size
    return _checked(initial if initial is not None else DEFAULT_SIZE)


def window_source(tty: bool, size: SizeArg) -> Callable[[], WindowSize | None] | None:
    """What the supervisor polls for the terminal's size while a tty run goes on."""
    if not tty or not callable(size):
        return None
    follow = size

    def current() -> WindowSize | None:
        value = follow()
        if value is None:
            return None
        try:
            checked = _checked(value)
        except InvalidSpec:
            return None  # a transient bad reading (e.g. a detached terminal) keeps the size
        return checked["rows"], checked["cols"]
    return current


def typed_input(data: bytes | None, tty: bool) -> bytes | None:
    """What the supervisor writes to the command's stdin. On a terminal there is no end of
    the stream: the input is typed, then end-of-file (Ctrl-D at the start of a line; a
    partial last line needs a second one), as a user at the keyboard would."""
    if not tty or not data:
        return data
    return data + (EOF if data.endswith(b"\n") else EOF + EOF)
