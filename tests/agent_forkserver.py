"""A fork server for the kill -9 tests: imports the CLI, the agent loop and the anthropic SDK
once, then forks one child per request to run `cellblock.cli.main(argv)` (start-up without
the seconds of imports). Protocol: JSON lines on stdin/stdout.

  {"op": "start", "argv": [...], "env": {...}, "stdout": PATH, "stderr": PATH} -> {"pid": N}
  {"op": "wait", "pid": N} -> {"status": exit status (negative: killed by that signal)}

A child stays unreaped (a zombie) until `wait`, so its pid cannot be reused while the test
signals it through a pidfd.
"""

from __future__ import annotations

import json
import os
import sys

import anthropic  # noqa: F401  (preloaded for the children)

import cellblock.cli
import cellblock.commands.agent
import cellblock.memory.agent


def child(req: dict[str, object]) -> None:
    out = os.open(str(req["stdout"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(str(req["stderr"]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.environ.clear()
    os.environ.update(req["env"])  # type: ignore[arg-type]
    code: object = 0
    try:
        code = cellblock.cli.main(list(req["argv"]))  # type: ignore[call-overload]
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child(req)
            reply: dict[str, int] = {"pid": pid}
        else:
            _, status = os.waitpid(req["pid"], 0)
            reply = {"status": os.waitstatus_to_exitcode(status)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
