"""The host trusts nothing the warm runtime's side of the sandbox says or serves: an error
message is worded on the host (a forged one carries neither forged text nor a secret), and a
process of the sandbox that puts its own socket where the zygote listens receives nothing.

Everything runs twice: as this process's user (root in CI) and as uid 65534 (setpriv), each
identity running one script (`SCRIPT`) that makes every attempt and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import IS_ROOT, run_json_script

#: Mixed case on purpose; the session's secret and one given to a single call.
SECRET = "Zq7SessionTok3nXv"
CALL_SECRET = "Kp4CallTok3nWy9"

#: Run in the stateful kernel: the kernel's loop now answers every request with a made-up
#: "cwd" failure whose text and errno carry forged words and the call's secret.
FORGE_CWD = textwrap.dedent("""\
    import sys
    f = sys._getframe()
    while f is not None and "run_code" not in f.f_globals:
        f = f.f_back
    real = f.f_globals["run_code"]
    def forged(req, module, filename):
        if not req.get("cwd"):
            return real(req, module, filename)
        tok = (req.get("env") or {}).get("CALLTOKEN", "none")
        return {"exit_code": 127, "value": None, "error": None,
                "cwd_error": "FORGED " + tok, "cwd_errno": "FORGED " + tok}
    f.f_globals["run_code"] = forged
    "patched"
""")

#: Run in the stateful kernel: a thread puts its own listener where the zygote's socket is
#: (atomically, by rename), logs every byte a connection sends it and answers with a forged
#: result frame.
IMPOSTOR = textwrap.dedent("""\
    import json, os, socket, threading
    path = "/tmp/.cellblock/zygote.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path + ".x")
    except FileNotFoundError:
        pass
    srv.bind(path + ".x")
    srv.listen(16)
    os.rename(path + ".x", path)
    fake = json.dumps({"exit_code": 0, "signal": None, "value": "'FORGED'", "error": None,
                       "call": None}).encode()
    def serve():
        while True:
            c, _ = srv.accept()
            c.settimeout(2)
            got = b""
            try:
                for kind in (b"k", b"r", b"d"):
                    c.sendall(kind + len(fake).to_bytes(4, "big") + fake)
                while len(got) < 1 << 20:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            with open("/tmp/impostor.log", "ab") as log:
                log.write(len(got).to_bytes(4, "big") + got)
            c.close()
    threading.Thread(target=serve, daemon=True).start()
    os.path.exists(path) and "listening"
""")

SCRIPT = textwrap.dedent("""\
    import json, sys
    import cellblock
    from cellblock.session import Sandbox

    spec = json.loads(sys.argv[1])
    SECRET, CALL_SECRET = spec["secret"], spec["call_secret"]
    out = {}

    def error_of(fn, *args, **kw):
        try:
            r = fn(*args, **kw)
            return {"raised": None, "value": getattr(r, "value", None)}
        except cellblock.CellblockError as e:
            return {"raised": type(e).__name__, "message": str(e)}

    with Sandbox(warm=("python", "node"), secrets={"TOKEN": SECRET}) as sb:
        # 1. The path of a missing cwd holds a secret (session's and call's).
        for lang, call in (("python", sb.run_python), ("node", sb.run_node)):
            out[f"cwd_secret_{lang}"] = error_of(
                call, "1", cwd=f"/no/{SECRET}/{CALL_SECRET}", timeout=30,
                secrets={"CALLTOKEN": CALL_SECRET})
        # 1. A patched kernel forges the cwd failure's words.
        out["forge_installed"] = sb.run_python(spec["forge_cwd"], stateful=True).value
        out["forged_cwd"] = error_of(sb.run_python, "1", stateful=True, cwd="/tmp",
                                     secrets={"CALLTOKEN": CALL_SECRET}, timeout=30)
        # 2. A fresh kernel becomes an impostor of the zygote; stateless calls follow.
        sb.run_python("import os; os._exit(0)", stateful=True)
        out["impostor"] = sb.run_python(spec["impostor"], stateful=True).value
        out["after"] = [
            error_of(sb.run_python, "import os; len(os.environ['CALLTOKEN']) * 0 + 45",
                     secrets={"CALLTOKEN": CALL_SECRET}, timeout=60),
            error_of(sb.run_node, "process.env.CALLTOKEN.length * 0 + 46",
                     secrets={"CALLTOKEN": CALL_SECRET}, timeout=60),
            error_of(sb.run_python, "sum(range(10))", secrets={"CALLTOKEN": CALL_SECRET},
                     timeout=60),
        ]
        log = sb.run(["python3", "-c",
                      "import os; p='/tmp/impostor.log';"
                      "print(open(p,'rb').read().hex() if os.path.exists(p) else '')"])
        out["impostor_log"] = bytes.fromhex(log.stdout.strip()).decode("latin-1")
        out["impostor_log_exists"] = sb.run(["test", "-e", "/tmp/impostor.log"]).exit_code
    print(json.dumps(out))
""")


def run_script(identity: str, nobody_dir: Path | None) -> dict[str, Any]:
    spec = {"secret": SECRET, "call_secret": CALL_SECRET, "forge_cwd": FORGE_CWD,
            "impostor": IMPOSTOR}
    return run_json_script(identity, nobody_dir, SCRIPT, spec)


@pytest.fixture(scope="module", params=["self", "nobody"],
                ids=["root" if IS_ROOT else "user", "nobody"])
def seen(request: pytest.FixtureRequest) -> dict[str, Any]:
    nobody_dir = request.getfixturevalue("nobody_dir") if request.param == "nobody" else None
    return run_script(request.param, nobody_dir)


def no_secret(value: Any) -> None:
    dumped = json.dumps(value)
    for s in (SECRET, CALL_SECRET, SECRET.lower(), CALL_SECRET.lower()):
        assert s not in dumped, (s, dumped)


@pytest.mark.parametrize("language", ["python", "node"])
def test_missing_cwd_error_is_redacted(seen: dict[str, Any], language: str) -> None:
    got = seen[f"cwd_secret_{language}"]
    assert got["raised"] == "InvalidSpec", got
    assert got["message"] == (
        "cwd /no/[REDACTED:TOKEN]/[REDACTED:CALLTOKEN]: No such file or directory"), got


def test_forged_cwd_failure_is_worded_by_the_host(seen: dict[str, Any]) -> None:
    assert seen["forge_installed"] == "'patched'"
    got = seen["forged_cwd"]
    # The kernel did answer with its forgery (the call raised) ...
    assert got["raised"] == "InvalidSpec", got
    # ... but nothing of its words reached the caller: the host names the path it asked for.
    assert got["message"] == "cwd /tmp: cannot be entered", got
    no_secret(got)


def test_an_impostor_of_the_zygote_receives_nothing(seen: dict[str, Any]) -> None:
    # The impostor was really in place, listening at the zygote's path ...
    assert seen["impostor"] == "True" or seen["impostor"] == "'listening'", seen["impostor"]
    # ... and the calls after it ran in the real runtime, with real results.
    assert [a.get("value") for a in seen["after"]] == ["45", "46", "45"], seen["after"]
    assert all(a["raised"] is None for a in seen["after"]), seen["after"]
    # The host hung up on it before sending a byte (each connection logs its byte count).
    log = seen["impostor_log"].encode("latin-1")
    received = []
    while log:
        n = int.from_bytes(log[:4], "big")
        received.append(log[4:4 + n])
        log = log[4 + n:]
    assert received, "the host never connected to the impostor"
    assert all(r == b"" for r in received), received
    no_secret(seen)
