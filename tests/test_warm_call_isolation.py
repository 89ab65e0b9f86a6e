"""Nothing of one stateless warm call reaches another: a Node call's changes to its process
(`process`, `require`'s modules, `Buffer.prototype`) end with it, since each stateless Node call
runs in a fresh process; and what exec makes dumpable again (the ready Node worker, a call's
subprocess) cannot be opened through /proc/<pid>/mem by another call or by a command of the
session, each warm worker and each command being in a Landlock domain of its own.

Everything runs twice: as this process's user (root in CI) and as uid 65534 (setpriv), each
identity running one script (`SCRIPT`) that makes every attempt and prints what it saw as JSON.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import IS_ROOT, run_json_script

#: Run by a stateless Python call: opens for writing the memory of every Node process it can
#: see (the ready worker of the next Node call among them) and, as the control that the method
#: works, its own and its own subprocess's.
NODE_MEM = textwrap.dedent("""\
    import errno, json, os, subprocess
    def attempt(pid):
        try:
            open(f"/proc/{pid}/mem", "r+b", buffering=0).close()
            return "OK"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    nodes = {}
    for name in os.listdir("/proc"):
        try:
            argv0 = open(f"/proc/{name}/cmdline", "rb").read().split(b"\\0")[0]
        except OSError:
            continue
        if name.isdigit() and os.path.basename(argv0) == b"node":
            nodes[name] = attempt(name)
    child = subprocess.Popen(["python3", "-c", "import os, time\\n"
                              "open('/tmp/me', 'w').write(os.readlink('/proc/self'))\\n"
                              "time.sleep(5)"])
    while not os.path.exists("/tmp/me") or not open("/tmp/me").read():
        pass
    own_child = attempt(open("/tmp/me").read())
    child.kill()
    print(json.dumps({"nodes": nodes, "self": attempt("self"), "own_child": own_child}))
""")

#: A stateless call whose subprocess (dumpable after its exec) waits, its /proc pid published.
VICTIM = textwrap.dedent("""\
    import errno, os, subprocess, time
    child = subprocess.Popen(["python3", "-c", "import os, time\\n"
                              "open('/tmp/vpid.x', 'w').write(os.readlink('/proc/self'))\\n"
                              "os.rename('/tmp/vpid.x', '/tmp/vpid')\\n"
                              "time.sleep(8)"])
    while not os.path.exists("/tmp/vpid"):
        time.sleep(0.01)
    try:
        open(f"/proc/{open('/tmp/vpid').read()}/mem", "r+b", buffering=0).close()
        print("OK")
    except OSError as e:
        print(errno.errorcode.get(e.errno))
    child.wait()
""")

#: A concurrent stateless call: opens the victim's subprocess's memory for writing.
SIBLING = textwrap.dedent("""\
    import errno, os, time
    for _ in range(1000):
        if os.path.exists("/tmp/vpid"):
            break
        time.sleep(0.01)
    pid = open("/tmp/vpid").read()
    alive = os.path.exists(f"/proc/{pid}/mem")
    try:
        open(f"/proc/{pid}/mem", "r+b", buffering=0).close()
        print("OK", alive)
    except OSError as e:
        print(errno.errorcode.get(e.errno), alive)
""")

SCRIPT = textwrap.dedent("""\
    import json, sys, threading, time
    from cellblock.session import Sandbox

    spec = json.loads(sys.argv[1])
    out = {}
    with Sandbox(warm=("python", "node")) as sb:
        patched = sb.run_node(
            "process.pwned = 'yes'; require('fs').pwnedFs = 'yes';"
            "Buffer.prototype.pwn = 7; globalThis.g = 1; process.pid")
        seen = sb.run_node(
            "[typeof process.pwned, typeof require('fs').pwnedFs, typeof Buffer.alloc(1).pwn,"
            " typeof g, process.pid].join(' ')")
        out["node"] = [patched.value, seen.value]
        # Let the next Node worker get ready, then reach for it from a Python call.
        time.sleep(2)
        mem = sb.run_python(spec["node_mem"], timeout=30)
        out["node_mem"] = json.loads(mem.stdout) if mem.ok else mem.stderr
        out["node_after"] = sb.run_node("typeof Buffer.alloc(1).pwn").value
        victim = {}
        t = threading.Thread(target=lambda: victim.update(
            r=sb.run_python(spec["victim"], timeout=30)))
        t.start()
        sibling = sb.run_python(spec["sibling"], timeout=30)
        t.join()
        out["victim"] = victim["r"].stdout.strip()
        out["sibling"] = sibling.stdout.strip() or sibling.stderr[-500:]
        # The same attempts from commands of the session (not warm calls).
        assert sb.run(["rm", "-f", "/tmp/me", "/tmp/vpid"]).ok
        time.sleep(1)
        cmd = sb.run(["python3", "-c", spec["node_mem"]], timeout=30)
        out["run_node_mem"] = json.loads(cmd.stdout) if cmd.ok else cmd.stderr
        t = threading.Thread(target=lambda: victim.update(
            r=sb.run_python(spec["victim"], timeout=30)))
        t.start()
        cmd = sb.run(["python3", "-c", spec["sibling"]], timeout=30)
        t.join()
        out["run_victim"] = victim["r"].stdout.strip()
        out["run_sibling"] = cmd.stdout.strip() or cmd.stderr[-500:]
    print(json.dumps(out))
""")


def run_script(identity: str, nobody_dir: Path | None) -> dict[str, Any]:
    spec = {"node_mem": NODE_MEM, "victim": VICTIM, "sibling": SIBLING}
    return run_json_script(identity, nobody_dir, SCRIPT, spec)


@pytest.fixture(scope="module", params=["self", "nobody"],
                ids=["root" if IS_ROOT else "user", "nobody"])
def seen(request: pytest.FixtureRequest) -> dict[str, Any]:
    nobody_dir = request.getfixturevalue("nobody_dir") if request.param == "nobody" else None
    return run_script(request.param, nobody_dir)


def test_a_node_call_cannot_patch_the_next_ones_process(seen: dict[str, Any]) -> None:
    patched_pid, seen_now = seen["node"]
    *types, pid = seen_now.strip("'").split()
    assert types == ["undefined"] * 4, seen_now
    # A process of its own, not the one the first call patched.
    assert pid != patched_pid, seen["node"]


def test_a_python_call_cannot_open_the_ready_node_worker(seen: dict[str, Any]) -> None:
    got = seen["node_mem"]
    assert isinstance(got, dict), got
    # The method works on what is the call's own ...
    assert got["self"] == "OK" and got["own_child"] == "OK", got
    # ... and the ready Node worker (and any other Node process) is out of reach.
    assert got["nodes"], "no Node worker was ready to attack"
    assert set(got["nodes"].values()) <= {"EACCES", "EPERM"}, got
    assert seen["node_after"] == "'undefined'"


def test_concurrent_calls_cannot_open_each_others_subprocesses(seen: dict[str, Any]) -> None:
    # The victim reaches its own subprocess; the sibling, while it lives, cannot.
    assert seen["victim"] == "OK", seen
    assert seen["sibling"] in ("EACCES True", "EPERM True"), seen


def test_session_commands_cannot_open_warm_processes(seen: dict[str, Any]) -> None:
    # A command of the session (`Sandbox.run`) is in a Landlock domain of its own too.
    got = seen["run_node_mem"]
    assert isinstance(got, dict), got
    assert got["self"] == "OK" and got["own_child"] == "OK", got
    assert got["nodes"], "no Node worker was ready to attack"
    assert set(got["nodes"].values()) <= {"EACCES", "EPERM"}, got
    assert seen["run_victim"] == "OK", seen
    assert seen["run_sibling"] in ("EACCES True", "EPERM True"), seen
