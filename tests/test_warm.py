"""Warm runtimes: Python and Node interpreters kept running inside a session, and one-shot
`cellblock.pool.run_python` / `run_node` from pre-warmed single-use sandboxes.

Stateless calls must share nothing (globals, imports, monkey-patching, environment, processes);
stateful calls must share everything of the interpreter; timeouts, output caps and redaction
must hold even though the output crosses a socket served by code inside the sandbox. The
runtime is also attacked from inside: killed, its socket removed, an impostor put in its place.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from test_session import footprint, private_tempdir, settled_footprint  # noqa: F401 (fixture)

import cellblock
from cellblock import pool
from cellblock.policy import Policy
from cellblock.session import Sandbox
from conftest import Cli, processes_with_argv

TOKEN = "tok-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def sb() -> Any:
    with Sandbox(secrets={"API_TOKEN": TOKEN}, warm=("python", "node")) as sandbox:
        yield sandbox


# ---- Python, stateless -----------------------------------------------------------------------

def test_stateless_calls_share_nothing(sb: Sandbox) -> None:
    first = sb.run_python(textwrap.dedent("""\
        import builtins, json, os, sys
        x = 1
        json.dumps = lambda *a, **k: "patched"
        builtins.len = lambda obj: -1
        os.environ["LEAK"] = "1"
        os.chdir("/tmp")
        sys.modules["injected"] = sys
        sys.path.append("/leak")
        import decimal; decimal.getcontext().prec = 3
    """))
    assert first.ok, first.stderr
    second = sb.run_python(textwrap.dedent("""\
        import decimal, json, os, sys
        print("x" in globals(), json.dumps({}), len([1]), "LEAK" in os.environ, os.getcwd(),
              "injected" in sys.modules, "/leak" in sys.path, decimal.getcontext().prec)
    """))
    assert second.stdout.split() == [
        "False", "{}", "1", "False", "/workspace", "False", "False", "28",
    ]


def test_stateless_call_processes_end_with_it(sb: Sandbox, marker: str) -> None:
    res = sb.run_python(textwrap.dedent(f"""\
        import os, subprocess
        subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
        if os.fork() == 0:          # a daemon: double fork, new session
            os.setsid()
            if os.fork() == 0:
                os.execvp("sleep", ["sleep", "{marker}"])
            os._exit(0)
        print("started")
    """))
    assert res.stdout == "started\n"
    assert not processes_with_argv(["sleep", marker])


def test_value_error_and_exit(sb: Sandbox) -> None:
    res = sb.run_python("print('out')\n6 * 7")
    assert (res.stdout, res.value, res.error, res.exit_code) == ("out\n", "42", None, 0)
    assert sb.run_python("x = 1").value is None
    res = sb.run_python("def f():\n    raise ValueError('bad')\nf()")
    assert res.exit_code == 1 and res.reason == "exited"
    assert res.error is not None and res.error.endswith("ValueError: bad\n")
    assert 'File "<string>", line 2, in f' in res.error and "zygote" not in res.error
    assert res.stderr == res.error
    assert sb.run_python("import sys; sys.exit(3)").exit_code == 3
    assert "SyntaxError" in (sb.run_python("def (").error or "")


def test_stdin_env_cwd_per_call(sb: Sandbox) -> None:
    res = sb.run_python("import os, sys; print(sys.stdin.read(), os.environ['X'], os.getcwd())",
                        stdin="piped", env={"X": "y"}, cwd="/tmp")
    assert res.stdout == "piped y /tmp\n"


def test_stateless_timeout_kills_only_that_call(sb: Sandbox) -> None:
    assert sb.run_python("kept = 'state'", stateful=True).ok
    other: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: other.setdefault("r", sb.run_python(
        "import os, time\n"
        "while not os.path.exists('/tmp/go-warm'): time.sleep(0.02)\n"
        "print('survived')",
        timeout=120)))
    waiter.start()
    res = sb.run_python("while True: pass", timeout=1)
    assert res.reason == "timeout" and res.exit_code is None
    sb.write_file("/tmp/go-warm", "")
    waiter.join(timeout=120)
    assert other["r"].stdout == "survived\n"
    assert sb.run_python("kept", stateful=True).value == "'state'"


def test_output_cap_and_cpu_time(sb: Sandbox) -> None:
    res = sb.run_python("import sys\nfor _ in range(100): sys.stdout.write('a' * 10000)",
                        max_output=1000)
    assert (res.reason, len(res.stdout_bytes), res.stdout_truncated) == ("output_limit", 1000, True)
    res = sb.run_python("while True: pass", cpu_time=1, timeout=60)
    assert res.reason == "cpu_time"
    assert sb.run_python("print('fine')").stdout == "fine\n"


def test_secrets_are_redacted_on_the_host(sb: Sandbox) -> None:
    code = textwrap.dedent("""\
        import base64, os, sys
        t = os.environ["API_TOKEN"]
        print(t); print(base64.b64encode(t.encode()).decode()); print(t.encode().hex())
        for ch in t:                      # one byte per write: split across frames
            sys.stdout.write(ch); sys.stdout.flush()
        print(t, file=sys.stderr)
        raise ValueError(t)
    """)
    for stateful in (False, True):
        res = sb.run_python(code, stateful=stateful)
        blob = res.stdout + res.stderr + (res.error or "")
        for form in (TOKEN, base64.b64encode(TOKEN.encode()).decode(), TOKEN.encode().hex()):
            assert form not in blob
        assert "[REDACTED:API_TOKEN]" in res.stdout and "[REDACTED:API_TOKEN]" in (res.error or "")
        assert res.redactions["API_TOKEN"] >= 5
    assert TOKEN not in (sb.run_python("import os; os.environ['API_TOKEN']").value or "")


def test_concurrent_stateless_calls(sb: Sandbox) -> None:
    results: dict[int, str] = {}

    def worker(n: int) -> None:
        for i in range(5):
            results[n * 10 + i] = sb.run_python(f"print({n * 10 + i})").stdout
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {k: f"{k}\n" for k in range(80) if k % 10 < 5}


# ---- Python, stateful ------------------------------------------------------------------------

def test_stateful_kernel_keeps_state(sb: Sandbox) -> None:
    setup = "import math\ndef area(r):\n    return math.pi * r * r\ncount = 41"
    assert sb.run_python(setup, stateful=True).ok
    assert sb.run_python("1/0", stateful=True).exit_code == 1
    assert sb.run_python("count += 1\ncount", stateful=True).value == "42"
    assert sb.run_python("round(area(1), 2)", stateful=True).value == "3.14"
    assert sb.run_python("'count' in globals()").value == "False"  # stateless sees none of it


def test_stateful_timeout_restarts_the_kernel(sb: Sandbox) -> None:
    assert sb.run_python("lost = 1", stateful=True).ok
    assert sb.run_python("while True: pass", stateful=True, timeout=1).reason == "timeout"
    res = sb.run_python("lost", stateful=True)
    assert res.exit_code == 1 and "NameError" in (res.error or "")
    res = sb.run_python("import os; os._exit(7)", stateful=True)
    assert (res.reason, res.exit_code) == ("exited", 7)
    assert sb.run_python("'fresh'", stateful=True).value == "'fresh'"


# ---- the runtime attacked from inside --------------------------------------------------------

def test_runtime_recovers_from_being_killed_or_unlinked() -> None:
    with Sandbox() as sb:
        # kill(-1) ends the zygote, the relays and the kernels but spares its caller, which
        # then exits 0, unless the end of the zygote's namespace kills it first: the report
        # says which (the kernel's record, not a relay's).
        res = sb.run_python("import os, signal; os.kill(-1, signal.SIGKILL)")
        assert (res.reason, res.exit_code, res.signal) in (
            ("exited", 0, None), ("signaled", None, 9))
        assert sb.run_python("print(1)").stdout == "1\n"
        assert sb.run(["rm", "-rf", "/tmp/.cellblock"]).ok
        assert sb.run_python("print(2)").stdout == "2\n"
        assert sb.run(["sh", "-c", "rm -rf /tmp/.cellblock && ln -s /etc /tmp/.cellblock"]).ok
        assert sb.run_python("print(3)").stdout == "3\n"


IMPOSTOR = textwrap.dedent("""\
    import os, socket, threading
    BEGUN = b"a" + bytes(4)
    def flood(conn):
        conn.sendall(BEGUN)
        while True:
            conn.sendall(b"o" + (65536).to_bytes(4, "big") + b"x" * 65536)
    def serve(behaviour):
        path = "/tmp/.cellblock/zygote.sock"
        os.unlink(path)
        srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen()
        def loop():
            while True:
                conn, _ = srv.accept()
                if behaviour == "huge-frame":
                    conn.sendall(BEGUN + b"o" + (2**31).to_bytes(4, "big"))
                elif behaviour == "garbage":
                    conn.sendall(b"\\xff" * 64)
                elif behaviour == "flood":
                    threading.Thread(target=flood, args=(conn,), daemon=True).start()
                # "silent": keep the connection, answer nothing
                globals().setdefault("held", []).append(conn)
        threading.Thread(target=loop, daemon=True).start()
""")


# A runtime of the sandbox's own making at the zygote's path (answering huge frames, a flood,
# garbage or nothing) is never talked to: the host checks who listens before it sends a byte
# (tests/test_warm_host_trust.py proves the impostor receives nothing), and the call runs in
# the real runtime, which a new zygote serves.
@pytest.mark.parametrize("behaviour", ["huge-frame", "flood", "silent", "garbage"])
def test_an_impostor_runtime_cannot_harm_the_host(behaviour: str) -> None:
    with Sandbox() as sb:
        impostor = sb.run_python(IMPOSTOR + f"serve({behaviour!r})", stateful=True)
        assert impostor.ok, impostor.stderr
        res = sb.run_python("print('real')", timeout=30, max_output=100_000)
        assert (res.reason, res.stdout) == ("exited", "real\n"), res
        assert sb.run_python("print('again')", timeout=30).stdout == "again\n"


# ---- Node ------------------------------------------------------------------------------------

def test_node_stateless_contexts_are_fresh(sb: Sandbox) -> None:
    assert sb.run_node(
        "globalThis.x = 1; Array.prototype.sum = function () { return 0 }; var v = 2"
    ).ok
    res = sb.run_node("[typeof x, typeof [].sum, typeof v].join(' ')")
    assert res.value == "'undefined undefined undefined'"


def test_node_stateful_context_persists(sb: Sandbox) -> None:
    assert sb.run_node("let a = 40; const f = (n) => n + 2", stateful=True).ok
    assert sb.run_node("f(a)", stateful=True).value == "42"
    assert sb.run_node("typeof a").value == "'undefined'"


def test_node_values_errors_exits_and_timers(sb: Sandbox) -> None:
    res = sb.run_node("console.log('out'); ({a: [1, 2]})")
    assert (res.stdout, res.value) == ("out\n", "{ a: [ 1, 2 ] }")
    res = sb.run_node("setTimeout(() => console.log('later'), 50); 'now'")
    assert (res.stdout, res.value) == ("later\n", "'now'")
    assert sb.run_node("Promise.resolve(6 * 7)").value == "42"
    res = sb.run_node("throw new TypeError('bad')")
    assert res.exit_code == 1
    assert "TypeError: bad" in (res.error or "") and "TypeError: bad" in res.stderr
    assert sb.run_node("process.exit(3)").exit_code == 3
    assert sb.run_node("require('path').join('a', 'b')").value == "'a/b'"


def test_node_timeout_and_output_cap(sb: Sandbox) -> None:
    assert sb.run_node("while (true) {}", timeout=1).reason == "timeout"
    assert sb.run_node("setInterval(() => {}, 10)", timeout=1).reason == "timeout"
    res = sb.run_node("for (let i = 0; i < 100; i++) process.stdout.write('a'.repeat(10000))",
                      max_output=1000)
    assert (res.reason, len(res.stdout_bytes)) == ("output_limit", 1000)
    assert sb.run_node("1 + 1").value == "2"


def test_node_secrets_are_redacted(sb: Sandbox) -> None:
    res = sb.run_node(
        "const t = process.env.API_TOKEN;"
        "console.log(t); console.error(Buffer.from(t).toString('base64')); t"
    )
    blob = res.stdout + res.stderr + (res.value or "")
    assert TOKEN not in blob and base64.b64encode(TOKEN.encode()).decode() not in blob
    assert res.redactions["API_TOKEN"] == 3


# ---- one-shot pool ---------------------------------------------------------------------------

def test_one_shot_runs_get_fresh_sandboxes() -> None:
    first = pool.run_python(
        "open('/tmp/mark', 'w').write('x'); open('/workspace/w', 'w').write('y'); 1"
    )
    assert first.ok and first.value == "1"
    second = pool.run_python(
        "import os; print(os.path.exists('/tmp/mark'), os.path.exists('/workspace/w'))"
    )
    assert second.stdout == "False False\n"
    node = pool.run_node("require('fs').writeFileSync('/tmp/n', 'x'); 5")
    assert node.value == "5"
    assert pool.run_node("require('fs').existsSync('/tmp/n')").value == "false"


def test_one_shot_limits_and_secrets() -> None:
    token = "one-shot-" + secrets.token_hex(8)
    res = pool.run_python("import os; print(os.environ['T'])", secrets={"T": token})
    assert res.stdout == "[REDACTED:T]\n"
    assert pool.run_python("while True: pass", timeout=1).reason == "timeout"
    assert pool.run_python("print(1)", memory="128M").stdout == "1\n"  # a pool of its own


@pytest.mark.usefixtures("private_tempdir")
def test_pool_shutdown_leaves_nothing() -> None:
    pool.shutdown()  # the default pools of earlier tests refill in the background
    before = footprint()
    p = pool.Pool("python", Policy(), size=2)
    assert p.run("print('pooled')").stdout == "pooled\n"
    assert p.run("print('again')").stdout == "again\n"
    p.shutdown()
    assert settled_footprint(before) == before


def test_pool_of_size_zero_still_serves() -> None:
    p = pool.Pool("python", Policy(), size=0)
    try:
        assert p.run("6 * 7").value == "42"
    finally:
        p.shutdown()


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_shell_python_keeps_state_and_files(cli: Cli) -> None:
    script = textwrap.dedent("""\
        x = 20
        def twice(n):
            return 2 * n

        twice(x) + 2
        open('f.txt', 'w').write('hi')
        import os; os.listdir('.')
        1/0
        print('after')
    """).encode()
    res = cli.run(["shell"], input=script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode().split("\n") == ["42", "2", "['f.txt']", "after", ""]
    assert b"ZeroDivisionError" in res.stderr


def test_cli_shell_node_and_shell_profiles(cli: Cli) -> None:
    res = cli.run(["shell", "--profile", "node"], input=b"let a = 5\na * 2\nconsole.log('x')\n")
    assert res.stdout == b"10\nx\n", res.stderr
    res = cli.run(["shell", "--profile", "shell"], input=b"echo hi > f\ncat f\nls\n")
    assert res.stdout == b"hi\nf\n", res.stderr


def test_cli_run_python(cli: Cli) -> None:
    res = cli.run(["run-python", "-"], input=b"import sys\nprint('hey')\nsys.exit(5)\n")
    assert (res.returncode, res.stdout) == (5, b"hey\n")
    with tempfile.TemporaryDirectory() as tmp:  # readable by uid 65534 too
        os.chmod(tmp, 0o755)
        prog = Path(tmp) / "p.py"
        prog.write_text("print(input())\n1 + 1\n")
        prog.chmod(0o644)
        res = cli.run(["run-python", "--json", str(prog)], input=b"piped\n")
    report = json.loads(res.stdout)
    assert (report["stdout"], report["value"], report["reason"]) == ("piped\n", "2", "exited")
    res = cli.run(["run-python", "--timeout", "1", "-"], input=b"while True: pass\n")
    assert res.returncode == 124


def test_sandbox_and_run_python_are_exported() -> None:
    assert cellblock.Sandbox is Sandbox
    assert cellblock.run_python is pool.run_python and cellblock.run_node is pool.run_node
