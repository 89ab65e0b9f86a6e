"""A stateful bash over a cellblock session: cwd, variables, functions, aliases and shell
options survive between calls, like the SDK's persistent `BashSession`, by replaying the
shell's state. As in the SDK, each session thread has a shell (a state) of its own.

Each call is one `bash` run in the session; an EXIT trap saves the shell's state (``declare
-p``, ``declare -f``, ``alias -p``, ``set +o``, ``shopt -p``, ``pwd``) in the session's /tmp
and the next call of the same thread sources it first. Not kept, unlike the reference's live
shell: background jobs (the session ends each call's processes), open file descriptors, traps,
read-only variables and the directory stack. A call that is killed (timeout, interrupt)
keeps the state saved by the call before it.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import threading
import uuid
from typing import IO

from cellblock.errors import CellblockError
from cellblock.integrations.managed_agents._sdk import BASH_DEFAULT_TIMEOUT, BashOutput
from cellblock.session import Sandbox

#: Where the shells' states live inside the sandbox (one folder per session thread).
STATE_DIR = "/tmp/.cellblock-bash"

#: Variables bash owns (read-only or recomputed), never replayed.
_SKIP = (
    r"^declare -[-a-zA-Z]*r[-a-zA-Z]* |^declare -[^ ]+ (BASH[A-Z_]*|BASHOPTS|SHELLOPTS|EUID|UID"
    r"|PPID|PIPESTATUS|FUNCNAME|GROUPS|DIRSTACK|RANDOM|SRANDOM|SECONDS|LINENO|HISTCMD"
    r"|EPOCHSECONDS|EPOCHREALTIME|SHLVL|PWD|_|COMP_WORDBREAKS|__cb_[a-z_]*)(=|$)"
)

# The command comes on stdin (never through argv or a file the command could race); the
# state folder comes as $1. Builtins only, but for one grep, to keep a call cheap. Options
# are restored last, right before the command, so `set -e` or `set -u` of an earlier call
# cannot stop the wrapper itself; the trap turns tracing off before it saves anything.
_WRAPPER = f"""
__cb_dir=$1
IFS= read -r -d '' __cb_cmd
shopt -s expand_aliases
[ -d "$__cb_dir" ] || mkdir -p "$__cb_dir"
if [ -f "$__cb_dir/state" ]; then . "$__cb_dir/state" >/dev/null 2>&1; fi
__cb_cwd=/workspace
[ -f "$__cb_dir/cwd" ] && IFS= read -r __cb_cwd <"$__cb_dir/cwd"
cd -- "$__cb_cwd" 2>/dev/null || cd /workspace
__cb_save() {{
  {{ __cb_rc=$?; __cb_opts=$(set +o; shopt -p); set +xv; set +eu; }} 2>/dev/null
  {{ declare -p | grep -Ev '{_SKIP}'; declare -f; alias -p; }} >"$__cb_dir/state" 2>/dev/null
  printf '%s\\n' "$__cb_opts" >"$__cb_dir/opts" 2>/dev/null
  printf '%s\\n' "$PWD" >"$__cb_dir/cwd" 2>/dev/null
  exit $__cb_rc
}}
trap __cb_save EXIT
exec </dev/null
if [ -f "$__cb_dir/opts" ]; then . "$__cb_dir/opts" >/dev/null 2>&1; fi
eval "$__cb_cmd"
"""


class BashError(Exception):
    """A bash call that did not succeed; the message is what the model sees."""


def thread_key(thread: object) -> str:
    """The state folder name of a session thread's shell (`None`: the tool used outside a
    session thread, e.g. called directly)."""
    if thread is None:
        return "default"
    return hashlib.sha256(repr(thread).encode()).hexdigest()[:24]


class SandboxBash:
    """The bash of one session thread in a work item's sandbox. Calls run one at a time (a
    lock): two calls of one shell would each save a state missing the other's changes."""

    def __init__(self, sandbox: Sandbox, key: str = "default") -> None:
        self._sandbox = sandbox
        self._dir = posixpath.join(STATE_DIR, key)
        self._lock = threading.Lock()

    @property
    def state_dir(self) -> str:
        """The sandbox folder holding this shell's state."""
        return self._dir

    def restart(self) -> None:
        """Forgets the shell's state (cwd back to /workspace, variables gone)."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        parent, name = posixpath.split(self._dir)
        try:
            present = any(e.name == name for e in self._sandbox.list_dir(parent))
        except CellblockError:  # no state folder yet
            return
        if present:
            self._sandbox.remove(self._dir, recursive=True)
        self.saved_output = None

    def exec(
        self, command: str, timeout: float = BASH_DEFAULT_TIMEOUT,
        cancel: threading.Event | None = None,
    ) -> tuple[str, int]:
        """Runs `command`; returns its output as the SDK's bash tool gives it (stdout, then
        stderr, or stderr first if it failed; ANSI stripped; past the SDK's
        `BASH_OUTPUT_LIMIT` it names a file in the sandbox that holds all of it) and its
        exit status, -1 after a timeout. Raises BashError when `cancel` is set (before the
        call starts or while it runs: its processes are killed)."""
        with self._lock:
            # A call interrupted while it waited for the shell never starts.
            if cancel is not None and cancel.is_set():
                raise BashError("bash: command interrupted")
            result = self._sandbox.run(
                ["/bin/bash", "--noprofile", "--norc", "-c", _WRAPPER, "bash", self._dir],
                stdin=command.encode(), timeout=timeout, cancel=cancel,
                env={"PS1": "", "PS2": "", "TERM": "dumb", "HISTFILE": ""},
            )
            if cancel is not None and cancel.is_set():
                raise BashError("bash: command interrupted")
            code = result.exit_code if result.exit_code is not None else -1
            end = ""
            if result.reason == "timeout":
                end = f"\ncommand timed out after {timeout:g}s\n"  # the SDK's words
            elif result.exit_code is None:
                end = f"\ncommand ended by {result.reason}\n"
            if result.stdout_truncated or result.stderr_truncated:
                end += "\n[output cut at the sandbox's max_output]\n"
            # The SDK's own output assembly (order, ANSI, limit, saved file); the sentinel is
            # one no output can hold, since a sandbox run's output ends with the run.
            output = BashOutput(f"__cellblock_{uuid.uuid4().hex}__")
            output.stdout.add(result.stdout_bytes)
            output.stderr.add(result.stderr_bytes)
            text = output.finish(code, stderr_end=end, create_file=self._saved_output_file)
        return text, code

    #: The sandbox file holding the last long output of this shell (`read` may open it).
    saved_output: str | None = None

    def _saved_output_file(self) -> IO[bytes]:
        if self.saved_output is not None:
            try:
                self._sandbox.remove(self.saved_output)
            except CellblockError:
                pass  # the command removed it already
        self.saved_output = posixpath.join(self._dir, f"output-{uuid.uuid4().hex[:12]}.txt")
        return _SandboxFile(self._sandbox, self.saved_output)


class _SandboxFile(io.BytesIO):
    """A file that the SDK's output saver writes; it lands in the sandbox when closed."""

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        super().__init__()
        self._sandbox = sandbox
        self.name = name

    def close(self) -> None:
        if not self.closed:
            try:
                self._sandbox.write_file(self.name, self.getvalue())
            except CellblockError as e:
                raise OSError(str(e)) from e  # the SDK's saver then names no file
            finally:
                super().close()
