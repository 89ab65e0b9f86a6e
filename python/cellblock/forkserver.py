"""The fork server: the small helper process that clones cold runs' PID 1 (see the native core's
`forkserver` module). Cloning PID 1 from the calling process copies its page tables on every run
and leaves all of its memory copy-on-write; the fork server is this interpreter started afresh in
isolated mode (`-I -S`, an almost empty environment) with only the native module loaded.

The core starts it in the background once a process makes a second cold run, and stops it
when cold runs stop (with the cells: `cellblock.cells.drain()`, at exit). `CELLBLOCK_FORKSERVER=0`
turns it off; `cellblock.cells.stats().forkserver_clones` counts the runs it served.
"""

from __future__ import annotations

import os
import sys

from cellblock import _native

#: What the fork server runs: load the native module from its file alone (not the package, whose
#: imports the fork server does not need) and serve on fd 3.
BOOT = """\
import sys
from importlib.util import module_from_spec, spec_from_file_location
spec = spec_from_file_location("cellblock._native", sys.argv[1])
native = module_from_spec(spec)
spec.loader.exec_module(native)
native.forkserver_serve()
"""


def command() -> list[str] | None:
    """The fork server's command line, or None when this interpreter cannot start one (embedded,
    without an executable of its own)."""
    exe = sys.executable
    native = getattr(_native, "__file__", None)
    if not exe or not native or not os.access(exe, os.X_OK):
        return None
    return [exe, "-I", "-S", "-c", BOOT, native]


def install() -> None:
    """Tells the core how to start a fork server (once per process)."""
    argv = command()
    if argv is not None:
        _native.forkserver_set_command(argv)
