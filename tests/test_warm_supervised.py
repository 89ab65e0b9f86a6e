"""Warm calls are supervised calls: the same payloads give the same report through
`Sandbox.run`, warm stateless and stateful Python and the one-shot pool; nothing the sandbox
says about itself (exit code, CPU time, memory, a "done" frame) makes it into the report; and
stateless calls cannot reach the zygote they were forked from, nor each other.

Everything runs twice: as this process's user (root in CI) and as uid 65534 (setpriv), each
identity running one script (`SCRIPT`) that makes every call and prints the reports as JSON.
"""

from __future__ import annotations

import string
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import IS_ROOT, Caller, run_json_script

MEMORY = "160M"
MiB = 1 << 20

#: name -> (code, call keyword arguments): one limit or event each.
PAYLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "seccomp": ("import ctypes\nprint(ctypes.CDLL(None).syscall(101, -1, 0, 0, 0))", {}),
    "memory": ("x = b'x' * (400 << 20)\nprint(len(x))", {"timeout": 30}),
    "timeout": ("while True: pass", {"timeout": 1.5}),
    "cpu_time": ("while True: pass", {"cpu_time": 1, "timeout": 30}),
    "output": ("print('x' * 100000)", {"max_output": 1000}),
    "exit_code": ("import sys\nsys.exit(3)", {}),
    "signal": ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", {}),
}

#: A frame as the relay and the worker write them, claiming a clean, free, successful end.
FAKE_FRAMES = textwrap.dedent("""\
    import json, os
    def forge():
        fake = json.dumps({"exit_code": 0, "signal": None, "value": "42", "error": None,
                           "cpu_time_s": 0.0, "peak_memory_bytes": 0,
                           "kernel_exited": False}).encode()
        for fd in range(3, 256):
            for kind in (b"r", b"d", b"z"):
                try:
                    os.write(fd, kind + len(fake).to_bytes(4, "big") + fake)
                except OSError:
                    pass
""")

#: name -> code: payloads that lie about how they ended.
FORGERIES: dict[str, str] = {
    # Claims exit 0, then dies of SIGKILL.
    "exit": FAKE_FRAMES + "forge()\nos.kill(os.getpid(), 9)\n",
    # Burns CPU and holds memory, then claims it used none.
    "usage": FAKE_FRAMES + textwrap.dedent("""\
        import time
        held = b"y" * (100 << 20)
        start = time.process_time()
        while time.process_time() - start < 1.2:
            pass
        time.sleep(0.1)
        forge()
    """),
}

#: Run by a stateless call: tries to rewrite `string.ascii_letters` in the zygote, in its own
#: relay and in the stateful kernel (pid given), and to read their fds and environment. The
#: same write on itself is the control that the method works. A fork shares the zygote's
#: addresses, so the target address is known.
ATTACK = textwrap.dedent("""\
    import ctypes, errno, json, os, string, sys
    def attempt(fn, *args):
        try:
            fn(*args)
            return "OK"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    def parent(pid):
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    me = int(os.readlink("/proc/self"))  # pids as /proc (the session's namespace) numbers them
    relay = parent(me)
    targets = {"self": me, "relay": relay, "zygote": parent(relay), "kernel": KERNEL}
    s = string.ascii_letters
    addr = id(s) + sys.getsizeof(s) - len(s) - 1
    assert ctypes.string_at(addr, len(s)) == s.encode()
    def patch(pid):
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as f:
            f.seek(addr)
            f.write(b"PWNED")
    libc = ctypes.CDLL(None, use_errno=True)
    def ptrace(pid):
        if libc.ptrace(16, pid, 0, 0) != 0:  # PTRACE_ATTACH
            raise OSError(ctypes.get_errno(), "ptrace")
    out = {}
    for name, pid in targets.items():
        out[name] = {
            "mem": attempt(patch, pid),
            # Listing fd numbers is allowed to the owner; following one needs ptrace access.
            "fd": attempt(os.readlink, f"/proc/{pid}/fd/0"),
            "fd_open": attempt(lambda p: os.close(os.open(f"/proc/{p}/fd/2", os.O_WRONLY)), pid),
            "environ": attempt(lambda p: open(f"/proc/{p}/environ", "rb").read(), pid),
        }
        if name != "self":
            out[name]["ptrace"] = attempt(ptrace, pid)
    out["self_patched"] = string.ascii_letters[:5]
    print(json.dumps(out))
""")

SCRIPT = textwrap.dedent("""\
    import json, os, sys
    import cellblock
    from cellblock.session import Sandbox

    spec = json.loads(sys.argv[1])
    MEMORY = spec["memory"]

    def summary(r):
        return {
            "reason": r.reason, "exit_code": r.exit_code, "signal": r.signal,
            "violations": sorted(f"{v['kind']}:{v.get('syscall')}" for v in r.violations),
            "enforcement": r.enforcement, "stdout_truncated": r.stdout_truncated,
            "cpu_time_s": r.cpu_time_s, "peak_memory_bytes": r.peak_memory_bytes,
            "stdout": r.stdout[-300:], "stderr": r.stderr[-300:],
            "value": getattr(r, "value", None), "error": getattr(r, "error", None),
            "state_lost": getattr(r, "state_lost", None),
            "limits_hit": sorted(r.limits_hit), "limits_unverified": sorted(r.limits_unverified),
        }

    out = {"parity": {}, "forge": {}}
    with Sandbox(memory=MEMORY, warm=("python",)) as sb:
        for name, (code, kw) in spec["payloads"].items():
            out["parity"][name] = {
                "run": summary(sb.run(["python3", "-c", code], **kw)),
                "stateless": summary(sb.run_python(code, **kw)),
                "stateful": summary(sb.run_python(code, stateful=True, **kw)),
                "pool": summary(cellblock.run_python(code, memory=MEMORY, **kw)),
            }
        for name, code in spec["forgeries"].items():
            out["forge"][name] = {
                "stateless": summary(sb.run_python(code, timeout=30)),
                "pool": summary(cellblock.run_python(code, memory=MEMORY, timeout=30)),
            }
        out["forge"]["usage"]["stateful"] = summary(
            sb.run_python(spec["forgeries"]["usage"], stateful=True, timeout=30))
        sb.run_python("secret_state = 'kept'", stateful=True)
        kernel = sb.run_python("import os; int(os.readlink('/proc/self'))", stateful=True).value
        attack = sb.run_python(spec["attack"].replace("KERNEL", kernel), timeout=30)
        out["attack"] = json.loads(attack.stdout) if attack.ok else attack.stderr
        out["after_stateless"] = sb.run_python("import string; print(string.ascii_letters)").stdout
        out["after_stateful"] = sb.run_python(
            "import string; (secret_state, string.ascii_letters)", stateful=True).value
    print(json.dumps(out))
""")


def run_script(identity: str, nobody_dir: Path | None) -> dict[str, Any]:
    spec = {"memory": MEMORY, "payloads": PAYLOADS, "forgeries": FORGERIES,
            "attack": ATTACK}
    out = run_json_script(identity, nobody_dir, SCRIPT, spec)
    out["privileged"] = identity == "self" and IS_ROOT
    return out


@pytest.fixture(scope="module", params=["self", "nobody"],
                ids=["root" if IS_ROOT else "user", "nobody"])
def reports(request: pytest.FixtureRequest) -> dict[str, Any]:
    nobody_dir = request.getfixturevalue("nobody_dir") if request.param == "nobody" else None
    return run_script(request.param, nobody_dir)


PATHS = ("run", "stateless", "stateful", "pool")


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_same_payload_same_report_on_every_path(reports: dict[str, Any], payload: str) -> None:
    got = reports["parity"][payload]
    first = got["run"]
    for path in PATHS[1:]:
        r = got[path]
        for field in ("reason", "violations", "enforcement", "stdout_truncated"):
            assert r[field] == first[field], (path, field, r, first)
    assert {got[p]["reason"] for p in PATHS} == {first["reason"]}


def test_each_limit_is_reported_for_what_it_is(reports: dict[str, Any]) -> None:
    p = reports["parity"]
    for path in PATHS:
        assert p["seccomp"][path]["violations"] == ["seccomp:ptrace"], path
        assert p["seccomp"][path]["reason"] == "exited" and p["seccomp"][path]["exit_code"] == 0
        assert p["timeout"][path]["reason"] == "timeout", path
        assert p["cpu_time"][path]["reason"] == "cpu_time", path
        assert p["output"][path]["reason"] == "output_limit", path
        assert p["output"][path]["stdout_truncated"], path
        assert (p["exit_code"][path]["reason"], p["exit_code"][path]["exit_code"]) == (
            "exited", 3), path
        assert (p["signal"][path]["reason"], p["signal"][path]["signal"]) == ("signaled", 15)
        # The supervisor's own account of the limits reached, the same on every path.
        for payload, limit in (("timeout", "timeout"), ("cpu_time", "cpu_time"),
                               ("output", "max_output")):
            assert limit in p[payload][path]["limits_hit"], (path, p[payload][path])
        assert p["exit_code"][path]["limits_hit"] == [], (path, p["exit_code"][path])
        mem = p["memory"][path]
        if reports["privileged"]:
            assert mem["reason"] == "memory" and mem["signal"] == 9, (path, mem)
            assert mem["enforcement"]["memory"] in ("cgroup-v1", "cgroup-v2")
            assert "memory" in mem["limits_hit"], (path, mem)
        else:
            # RLIMIT_DATA: the allocation fails inside, which the supervisor cannot see; the
            # report names the enforcer and says the limit is unverified, claiming nothing.
            assert mem["enforcement"]["memory"] == "rlimit", (path, mem)
            assert "memory" in mem["limits_unverified"], (path, mem)
            assert "memory" not in mem["limits_hit"], (path, mem)
    for payload in ("memory", "timeout", "cpu_time", "signal", "output"):
        assert p[payload]["stateful"]["state_lost"] is (
            payload != "memory" or reports["privileged"]), payload
    assert p["exit_code"]["stateful"]["state_lost"] is False


@pytest.mark.parametrize("path", ["stateless", "pool"])
def test_a_forged_exit_is_not_reported(reports: dict[str, Any], path: str) -> None:
    r = reports["forge"]["exit"][path]
    assert (r["reason"], r["exit_code"], r["signal"]) == ("signaled", None, 9), r


@pytest.mark.parametrize("path", ["stateless", "pool", "stateful"])
def test_forged_usage_is_not_reported(reports: dict[str, Any], path: str) -> None:
    r = reports["forge"]["usage"][path]
    assert r["reason"] == "exited" and r["exit_code"] == 0, r
    assert r["cpu_time_s"] >= 1.0, r
    assert r["peak_memory_bytes"] >= 90 * MiB, r


def test_stateless_call_cannot_reach_zygote_relay_or_kernel(reports: dict[str, Any]) -> None:
    a = reports["attack"]
    assert isinstance(a, dict), a
    # The method works: the call can rewrite its own memory.
    assert a["self"]["mem"] == "OK" and a["self_patched"] == "PWNED"
    assert a["self"]["fd"] == "OK" and a["self"]["fd_open"] == "OK"
    for target in ("zygote", "relay", "kernel"):
        got = a[target]
        assert got["mem"] in ("EACCES", "EPERM"), (target, got)
        assert got["fd"] in ("EACCES", "EPERM"), (target, got)
        assert got["fd_open"] in ("EACCES", "EPERM"), (target, got)
        assert got["environ"] in ("EACCES", "EPERM"), (target, got)
        assert got["ptrace"] == "EPERM", (target, got)
    assert reports["after_stateless"].startswith("abcdefghij"), reports["after_stateless"]
    assert reports["after_stateful"] == repr(("kept", string.ascii_letters))


# ---- papercuts (each identity in its own process) --------------------------------------------


def test_stateful_kernel_restart_is_flagged(caller: Caller) -> None:
    caller.run("""
        with Sandbox(warm=("python",)) as sb:
            assert sb.run_python("kept = 1", stateful=True).ok
            died = sb.run_python("import os; os._exit(0)", stateful=True)
            assert died.state_lost and not died.kernel_restarted, died
            again = sb.run_python("kept", stateful=True)
            assert again.kernel_restarted and not again.state_lost, again
            assert again.error is not None and "NameError" in again.error, again
            assert sb.run_python("kept = 2", stateful=True).kernel_restarted is False
            timed_out = sb.run_python("while True: pass", stateful=True, timeout=1)
            assert timed_out.reason == "timeout" and timed_out.state_lost, timed_out
            assert sb.run_python("1", stateful=True).kernel_restarted
    """)


def test_stateless_traceback_shows_only_the_users_frames(caller: Caller) -> None:
    frames = caller.run("""
        with Sandbox(warm=("python",)) as sb:
            res = sb.run_python("def f():\\n    return 1 / 0\\n\\nf()\\n")
        assert res.error is not None, res
        print(json.dumps([line.strip() for line in res.error.splitlines()
                          if line.strip().startswith("File")]))
    """)
    assert frames == ['File "<string>", line 4, in <module>', 'File "<string>", line 2, in f']


@pytest.mark.parametrize("language", ["python", "node"])
def test_missing_cwd_is_a_typed_error_naming_it(caller: Caller, language: str) -> None:
    caller.run("""
        language = sys.argv[1]
        with Sandbox(warm=("python", "node")) as sb:
            with raises(cellblock.CellblockError) as one_shot:
                sb.run(["true"], cwd="/no/such/dir")
            call = sb.run_python if language == "python" else sb.run_node
            with raises(type(one_shot.value)) as warm:
                call("1", cwd="/no/such/dir", timeout=20)
            assert "/no/such/dir" in str(warm.value), warm.value
            # The runtime serves on, a kernel with its state.
            assert call("1 + 1", timeout=20).value == "2"
            assert sb.run_python("kept_cwd = 5", stateful=True).ok
            with raises(type(one_shot.value)):
                sb.run_python("1", stateful=True, cwd="/no/such/dir")
            assert sb.run_python("kept_cwd", stateful=True).value == "5"
    """, language)


def test_node_kernels_are_supervised(caller: Caller) -> None:
    caller.run("""
        with Sandbox(warm=("node",)) as sb:
            assert sb.run_node("var n = 20", stateful=True).ok
            res = sb.run_node("n + 1", stateful=True, timeout=20)
            assert res.value == "21" and res.reason == "exited", res
            out = sb.run_node("process.stdout.write('x'.repeat(5000))", max_output=100)
            assert out.reason == "output_limit", out
            slow = sb.run_node("while (true) {}", timeout=1)
            assert slow.reason == "timeout", slow
            assert sb.run_node("'still' + ' here'").value == "'still here'"
    """)


def test_a_silent_zygote_does_not_hang_a_call_without_deadline(monkeypatch: Any) -> None:
    # The zygote's handshake is bounded even when the call has no timeout: a peer that never
    # answers is "gone" after the handshake limit, not waited for forever.
    import socket

    from cellblock.runtimes import warm
    monkeypatch.setattr(warm, "HANDSHAKE_LIMIT_S", 0.3)
    ours, theirs = socket.socketpair()
    conn = warm._Conn(ours)
    try:
        with pytest.raises(warm._Gone):
            conn.read(None)
        # With a deadline of the call's own, it is that call's timeout.
        with pytest.raises(warm._Timeout):
            conn.read(time.monotonic() + 0.2)
    finally:
        conn.close()
        theirs.close()


def test_reasons_and_enforcers_have_one_definition() -> None:
    from cellblock import _native, result
    assert result.REASONS is _native.REASONS
    assert set(_native.REASONS) == {"exited", "signaled", "timeout", "memory", "cpu_time",
                                   "output_limit", "seccomp", "session_closed", "credential"}
    assert set(_native.ENFORCERS) == {"cgroup-v2", "cgroup-v1", "rlimit", "tmpfs",
                                     "supervisor"}
    with pytest.raises(ValueError):
        result.RunResult(exit_code=0, signal=None, reason="bogus", stdout_bytes=b"",
                         stderr_bytes=b"", stdout_truncated=False, stderr_truncated=False,
                         wall_time_s=0, cpu_time_s=0, peak_memory_bytes=0, violations=[],
                         enforcement={})
