"""A stateful bash over a cellblock session: cwd, variables, functions and aliases survive
between calls, like the SDK's persistent `BashSession`, by replaying the shell's state.

Each call is one `bash` run in the session; an EXIT trap saves the shell's state (``declare
-p``, ``declare -f``, ``alias -p``, ``pwd``) in the session's /tmp and the next call sources
it first. Background jobs do not outlive their call (the session ends each call's processes).
"""

from __future__ import annotations

import posixpath
import re

from cellblock.session import Sandbox

#: Where the shell's state lives inside the sandbox.
STATE_DIR = "/tmp/.cellblock-bash"

#: Same bounds as the SDK's reference bash tool.
BASH_OUTPUT_LIMIT = 100 * 1024
BASH_DEFAULT_TIMEOUT = 120.0

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

#: Variables bash owns (read-only or recomputed), never replayed.
_SKIP = (
    r"^declare -[-a-zA-Z]*r[-a-zA-Z]* |^declare -[^ ]+ (BASH[A-Z_]*|BASHOPTS|SHELLOPTS|EUID|UID"
    r"|PPID|PIPESTATUS|FUNCNAME|GROUPS|DIRSTACK|RANDOM|SRANDOM|SECONDS|LINENO|HISTCMD"
    r"|EPOCHSECONDS|EPOCHREALTIME|SHLVL|PWD|_|COMP_WORDBREAKS|__cb_[a-z_]*)(=|$)"
)

# The command comes on stdin (never through argv or a file the command could race). Builtins
# only, but for one grep, to keep a call cheap.
_WRAPPER = f"""
__cb_dir={STATE_DIR}
IFS= read -r -d '' __cb_cmd
shopt -s expand_aliases
[ -d "$__cb_dir" ] || mkdir -p "$__cb_dir"
if [ -f "$__cb_dir/state" ]; then . "$__cb_dir/state" >/dev/null 2>&1; fi
__cb_cwd=/workspace
[ -f "$__cb_dir/cwd" ] && IFS= read -r __cb_cwd <"$__cb_dir/cwd"
cd -- "$__cb_cwd" 2>/dev/null || cd /workspace
__cb_save() {{
  __cb_rc=$?
  {{ declare -p | grep -Ev '{_SKIP}'; declare -f; alias -p; }} >"$__cb_dir/state" 2>/dev/null
  printf '%s\\n' "$PWD" >"$__cb_dir/cwd" 2>/dev/null
  exit $__cb_rc
}}
trap __cb_save EXIT
exec 2>&1 </dev/null
eval "$__cb_cmd"
"""


class BashError(Exception):
    """A bash call that did not succeed; the message is what the model sees."""


class SandboxBash:
    """The bash of one work item's sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox

    def restart(self) -> None:
        """Forgets the shell's state (cwd back to /workspace, variables gone)."""
        if any(e.name == posixpath.basename(STATE_DIR) for e in self._sandbox.list_dir("/tmp")):
            self._sandbox.remove(STATE_DIR, recursive=True)

    def exec(self, command: str, timeout: float = BASH_DEFAULT_TIMEOUT) -> tuple[str, int]:
        """Runs `command`; returns its combined output (ANSI stripped, the last
        BASH_OUTPUT_LIMIT bytes) and exit status. Raises BashError on timeout."""
        result = self._sandbox.run(
            ["/bin/bash", "--noprofile", "--norc", "-c", _WRAPPER],
            stdin=command.encode(), timeout=timeout,
            env={"PS1": "", "PS2": "", "TERM": "dumb"},
        )
        if result.reason == "timeout":
            raise BashError(f"bash: bash command timed out after {timeout}s")
        data = result.stdout_bytes + result.stderr_bytes
        truncated = len(data) > BASH_OUTPUT_LIMIT or result.stdout_truncated
        text = _ANSI.sub("", data[-BASH_OUTPUT_LIMIT:].decode(errors="replace")).rstrip("\n")
        if truncated:
            text = "[output truncated]\n" + text
        if result.exit_code is None:
            raise BashError(f"bash: command ended by {result.reason}\n{text}".rstrip())
        return text, result.exit_code
