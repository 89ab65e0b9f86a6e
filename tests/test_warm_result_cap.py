"""A warm call's result (value, traceback, rich outputs) crosses a socket in one frame that the
host takes up to 4 MiB. Code in the sandbox makes that frame as large as it likes: a traceback
of a 5 MiB message, a 5 MiB repr, or a worker that writes an oversized frame of its own. The
call must still return: a capped, marked error from an honest worker, and a marked, dropped
result from a dishonest one (the supervisor never buffers past its cap). As root and uid 65534.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import IS_ROOT, run_json_script

SCRIPT = """\
import json, sys
from cellblock.session import Sandbox

def summary(r):
    return {"reason": r.reason, "exit_code": r.exit_code, "value": (r.value or "")[:40],
            "value_len": len(r.value or ""), "error_head": (r.error or "")[:200],
            "error_tail": (r.error or "")[-200:], "error_len": len(r.error or ""),
            "result_truncated": r.result_truncated, "stderr_len": len(r.stderr_bytes)}

out = {}
with Sandbox(warm=("python", "node")) as sb:
    for name, (lang, code, stateful) in json.loads(sys.argv[1]).items():
        run = sb.run_python if lang == "python" else sb.run_node
        out[name] = summary(run(code, stateful=stateful, timeout=60, max_output=64 << 20))
    out["after"] = summary(sb.run_python("6 * 7", stateful=True))
print(json.dumps(out))
"""

HUGE = 5 << 20
# The worker's own result pipe (fd 4 in a worker: ctl_out) carries an oversized frame that the
# relay forwards as the result: what a worker that patched the server out would send.
FORGED = f"""\
import os, json
payload = json.dumps({{"exit_code": 0, "value": "x" * {HUGE}, "error": None,
                       "outputs": [], "call": None}}).encode()
for fd in range(3, 64):
    try:
        os.fstat(fd)
    except OSError:
        continue
    if os.readlink(f"/proc/self/fd/{{fd}}").startswith("pipe:") and fd > 2:
        try:
            os.write(fd, b"r" + len(payload).to_bytes(4, "big") + payload[:16])
            os.write(fd, payload[16:])
        except OSError:
            pass
os._exit(0)
"""

PAYLOADS = {
    "traceback": ("python", f"raise ValueError('x' * {HUGE})", False),
    "traceback_kernel": ("python", f"raise ValueError('\\u2603' * {HUGE})", True),
    "traceback_value": ("python", f"class A:\n    def __repr__(self):\n        raise "
                        f"RuntimeError('y' * {HUGE})\nA()", False),
    "node_error": ("node", f"throw new Error('x'.repeat({HUGE}))", False),
    "node_value": ("node", "({[Symbol.for('nodejs.util.inspect.custom')]: () => "
                   "'\\u2603'.repeat(1 << 21)})", False),
    "forged": ("python", FORGED, False),
}


@pytest.fixture(scope="module", params=["self", "nobody"],
                ids=["root" if IS_ROOT else "user", "nobody"])
def reports(request: pytest.FixtureRequest) -> dict[str, Any]:
    nobody_dir: Path | None = (request.getfixturevalue("nobody_dir")
                               if request.param == "nobody" else None)
    return run_json_script(request.param, nobody_dir, SCRIPT, PAYLOADS)


@pytest.mark.parametrize("name", ["traceback", "traceback_kernel", "traceback_value",
                                  "node_error"])
def test_a_huge_traceback_comes_back_capped_and_marked(reports: dict[str, Any],
                                                       name: str) -> None:
    r = reports[name]
    assert (r["reason"], r["exit_code"]) == ("exited", 1), r
    assert r["result_truncated"] is True, r
    assert 0 < r["error_len"] <= 1 << 20, r
    assert "Error" in r["error_head"] + r["error_tail"], r  # the exception's type is kept


def test_a_huge_value_comes_back_capped_and_marked(reports: dict[str, Any]) -> None:
    r = reports["node_value"]
    assert (r["reason"], r["exit_code"], r["value"][:2]) == ("exited", 0, "\u2603" * 2), r
    assert r["result_truncated"] is True and 0 < r["value_len"] <= 1 << 20, r


def test_an_oversized_result_frame_is_dropped_and_marked(reports: dict[str, Any]) -> None:
    r = reports["forged"]
    assert r["reason"] == "exited" and r["result_truncated"] is True, r
    assert r["value_len"] == 0 and "result" in r["error_head"], r


def test_the_runtime_serves_on(reports: dict[str, Any]) -> None:
    assert reports["after"]["value"] == "42", reports["after"]
