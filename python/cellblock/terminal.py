"""Terminals: `run(..., tty=True)` gives the command a pseudo-terminal of the sandbox's own.

The core opens the pty in the sandbox's private devpts instance and makes it the command's
stdin, stdout, stderr and controlling terminal; the supervisor reads its output (stdout and
stderr merged into `stdout`, redacted and capped as usual) and types `stdin` into it.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellblock.errors import InvalidSpec

#: Window size when none is given: the classic terminal.
DEFAULT_SIZE = (24, 80)

#: TERM of tty runs whose environment names none.
DEFAULT_TERM = "xterm"

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


def checked_size(size: Any) -> dict[str, Any]:
    """`{"rows", "cols"}` of a `(rows, cols)` window; InvalidSpec naming what is wrong."""
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
    return checked_size(initial if initial is not None else DEFAULT_SIZE)


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
            checked = checked_size(value)
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


class Typist:
    """Types what arrives on a readable fd (e.g. the caller's keyboard) into a tty run's
    terminal, as it arrives, from a thread of its own; `attach` is the run's `on_terminal`."""

    def __init__(self, source: int) -> None:
        self.source = source
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None

    def attach(self, master: int) -> None:
        """Starts typing into `master` (borrowed: a dup is kept)."""
        target = os.dup(master)
        self._thread = threading.Thread(target=self._copy, args=(target,), daemon=True,
                                        name="cellblock-typist")
        self._thread.start()

    def _copy(self, target: int) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.source, self._stop_r], [], [])
                if self._stop_r in ready:
                    return
                data = os.read(self.source, 4096)
                if not data:
                    return  # the source ended: nothing more is typed
                view = memoryview(data)
                while view:
                    view = view[os.write(target, view):]
        except OSError:
            return  # the terminal is gone (EIO) or the source failed: the run goes on alone
        finally:
            os.close(target)

    def close(self) -> None:
        """Stops typing (bounded wait: a write blocked on a full terminal is abandoned)."""
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        os.close(self._stop_r)
        os.close(self._stop_w)


@contextmanager
def typing_from(tty: bool, source: int | None) -> Iterator[Callable[[int], None] | None]:
    """The `on_terminal` hook of a run whose keystrokes come from `source` (None: none)."""
    if source is None:
        yield None
        return
    if not tty:
        raise InvalidSpec("tty_input: given without tty=True")
    typist = Typist(source)
    try:
        yield typist.attach
    finally:
        typist.close()


@contextmanager
def raw_keyboard(fd: int) -> Iterator[None]:
    """The caller's terminal in raw mode for the duration (keys, Ctrl-C included, go to the
    sandbox's terminal, whose own line discipline echoes and signals), restored after."""
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
