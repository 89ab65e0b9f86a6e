"""Seccomp: refused calls fail with EPERM and are reported; real programs still run.

Every refusal is attempted by the sandboxed program itself (Python ctypes `syscall()`), with
arguments that would fail harmlessly (EFAULT, EBADF, EINVAL...) or succeed if the filter let the
call through, so only the filter can produce both EPERM and a violation.
"""

from __future__ import annotations

import hashlib
import json
import platform
import signal
import subprocess
import sys
import textwrap
from typing import Any

import pyseccomp
import pytest

import cellblock
from cellblock import SeccompError, SeccompPolicy
from cellblock.seccomp import cache_info, compile_filter, known_profiles, profile_for_argv
from conftest import PRELUDE, TEST_PROFILE, Runner

PROFILES = ["default", "python", "node", "shell"]

CLONE_NEWUSER = 0x10000000
SIGCHLD = 17

#: (syscall, args): each must be refused in every profile. Labels of repeated calls get the args.
REFUSED: list[tuple[str, tuple[int, ...]]] = [
    ("unshare", (CLONE_NEWUSER,)),
    ("setns", (-1, 0)),
    ("clone", (CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)),
    ("mount", (0, 0, 0, 0, 0)),
    ("umount2", (0, 0)),
    ("pivot_root", (0, 0)),
    ("chroot", (0,)),
    ("fsopen", (0, 0)),
    ("fsmount", (-1, 0, 0)),
    ("fsconfig", (-1, 0, 0, 0, 0)),
    ("fspick", (-1, 0, 0)),
    ("move_mount", (-1, 0, -1, 0, 0)),
    ("open_tree", (-1, 0, 0)),
    ("mount_setattr", (-1, 0, 0, 0, 0)),
    ("ptrace", (-1, 0, 0, 0)),
    ("process_vm_readv", (0, 0, 0, 0, 0, 0)),
    ("process_vm_writev", (0, 0, 0, 0, 0, 0)),
    ("process_madvise", (-1, 0, 0, 0, 0)),
    ("kcmp", (0, 0, -1, 0, 0)),
    ("pidfd_getfd", (-1, -1, 0)),
    ("bpf", (-1, 0, 0)),
    ("perf_event_open", (0, 0, -1, -1, 0)),
    ("userfaultfd", (0,)),
    ("io_uring_setup", (0, 0)),
    ("io_uring_enter", (-1, 0, 0, 0, 0, 0)),
    ("io_uring_register", (-1, 0, 0, 0)),
    ("keyctl", (-1, 0, 0, 0, 0)),
    ("add_key", (0, 0, 0, 0, 0)),
    ("request_key", (0, 0, 0, 0)),
    ("kexec_load", (0, 0, 0, 0xDEAD0000)),
    ("kexec_file_load", (-1, -1, 0, 0, 0xDEAD0000)),
    ("init_module", (0, 0, 0)),
    ("finit_module", (-1, 0, 0)),
    ("delete_module", (0, 0)),
    ("reboot", (0, 0, 0, 0)),
    ("swapon", (0, 0)),
    ("swapoff", (0,)),
    ("settimeofday", (0, 0)),
    ("clock_settime", (-1, 0)),
    ("clock_adjtime", (-1, 0)),
    ("adjtimex", (0,)),
    ("stime", (0,)),
    ("sethostname", (0, 0)),
    ("setdomainname", (0, 0)),
    ("iopl", (5,)),
    ("ioperm", (0, 0, 0)),
    ("vhangup", ()),
    ("acct", (0,)),
    ("quotactl", (0, 0, 0, 0)),
    ("quotactl_fd", (-1, 0, 0, 0)),
    ("lookup_dcookie", (0, 0, 0)),
    ("syslog", (10, 0, 0)),
    ("open_by_handle_at", (-1, 0, 0)),
    ("name_to_handle_at", (-1, 0, 0, 0, 0)),
    # ADDR_NO_RANDOMIZE would turn ASLR off.
    ("personality", (0x0040000,)),
    # AF_PACKET raw, AF_NETLINK/NETLINK_AUDIT, AF_NETLINK/NETLINK_KOBJECT_UEVENT, AF_VSOCK, AF_ALG.
    ("socket", (17, 3, 0)),
    ("socket", (16, 3, 9)),
    ("socket", (16, 3, 15)),
    ("socket", (40, 1, 0)),
    ("socket", (38, 5, 0)),
]

#: Calls the payload makes through libc's syscall(): label, number, args. A `clone` that the
#: filter wrongly lets through returns 0 in the child, which leaves at once.
SYSCALL_PAYLOAD = PRELUDE + textwrap.dedent("""\
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out = {}
    for label, nr, args in json.loads(sys.argv[1]):
        ctypes.set_errno(0)
        r = libc.syscall(nr, *(ctypes.c_long(a) for a in args))
        if r == 0 and label.startswith("clone"):
            os._exit(0)
        out[label] = errno.errorcode.get(ctypes.get_errno(), "?") if r == -1 else f"returned {r}"
    report(**out)
""")


def nr(name: str) -> int:
    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)


def label(name: str, args: tuple[int, ...]) -> str:
    return f"{name}{args}" if sum(n == name for n, _ in REFUSED) > 1 else name


def as_kwarg(policy: SeccompPolicy) -> dict[str, Any]:
    """The policy as plain data, which `run` validates back (and the worker can receive)."""
    return policy.model_dump()


def seccomp_counts(res: Any) -> dict[str, int]:
    return {v["syscall"]: v["count"] for v in res.violations if v["kind"] == "seccomp"}


def run_syscalls(sandbox: Runner, calls: list[tuple[str, int, tuple[int, ...]]],
                 **kwargs: Any) -> tuple[dict[str, str], dict[str, int], Any]:
    """Runs the syscall payload; returns (label -> errno name, violations, result)."""
    res = sandbox.run(["python3", "-c", SYSCALL_PAYLOAD, json.dumps(calls)], timeout=60, **kwargs)
    assert res.reason == "exited" and res.exit_code == 0, (res.reason, res.exit_code, res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1]), seccomp_counts(res), res


NATIVE_REFUSED = [(label(n, a), nr(n), a) for n, a in REFUSED if nr(n) >= 0]


@pytest.mark.parametrize("profile", PROFILES)
def test_refused_calls_fail_with_eperm_and_are_reported(sandbox: Runner, profile: str) -> None:
    errnos, violations, res = run_syscalls(sandbox, NATIVE_REFUSED, profile=profile)
    assert res.seccomp_profile == profile
    not_eperm = {k: v for k, v in errnos.items() if v != "EPERM"}
    assert not not_eperm, f"calls not refused with EPERM: {not_eperm}"
    for name in {n for n, _ in REFUSED if nr(n) >= 0}:
        expected = sum(n == name for n, _ in REFUSED)
        assert violations.get(name) == expected, f"{name}: {violations.get(name)} reported"


def test_clone3_answers_enosys_without_a_violation(sandbox: Runner) -> None:
    # clone3's flags are in memory a filter cannot read: ENOSYS makes glibc fall back to clone.
    errnos, violations, _ = run_syscalls(sandbox, [("clone3", nr("clone3"), (0, 0))],
                                         profile="python")
    assert errnos == {"clone3": "ENOSYS"}
    assert "clone3" not in violations


def test_allowed_argument_uses_still_work(sandbox: Runner) -> None:
    out = sandbox.probe("""
        import ctypes, threading
        libc = ctypes.CDLL(None, use_errno=True)
        route = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)  # NETLINK_ROUTE
        route.close()
        t = threading.Thread(target=lambda: None)
        t.start(); t.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        report(persona=libc.personality(0xFFFFFFFF), links=len(socket.if_nameindex()),
               child=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
               addr=socket.getaddrinfo("127.0.0.1", 80)[0][4][0],
               unix=attempt(socket.socketpair), udp=attempt(socket.socket, socket.AF_INET6,
                                                            socket.SOCK_DGRAM))
    """, profile="python")
    assert out == {"persona": 0, "links": out["links"], "child": 7, "addr": "127.0.0.1",
                   "unix": "OK", "udp": "OK"}
    assert out["links"] >= 1


def test_calls_of_child_processes_are_reported(sandbox: Runner) -> None:
    res = sandbox.run(["python3", "-c", PRELUDE + textwrap.dedent("""\
        import ctypes, subprocess
        code = "import ctypes; print(ctypes.CDLL(None).unshare(0x10000000))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        report(child=out.stdout.strip())
    """)], profile="python", timeout=60)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"child": "-1"}
    assert seccomp_counts(res) == {"unshare": 1}


def test_on_violation_kill_ends_the_run(sandbox: Runner) -> None:
    code = ("import ctypes; print('before', flush=True); "
            "ctypes.CDLL(None).unshare(0x10000000); print('after', flush=True)")
    res = sandbox.run(["python3", "-c", code], timeout=60,
                      seccomp=as_kwarg(SeccompPolicy(base="python", on_violation="kill")))
    assert res.reason == "seccomp"
    assert res.stdout.split() == ["before"]
    assert seccomp_counts(res) == {"unshare": 1}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 ABIs")
def test_other_abis_kill_the_process(sandbox: Runner) -> None:
    # x32 getpid (39 | __X32_SYSCALL_BIT), then the i386 ABI through `int 0x80` (getpid = 20).
    x32 = "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39); print('survived')"
    int80 = textwrap.dedent("""\
        import ctypes, mmap
        code = b"\\xb8\\x14\\x00\\x00\\x00\\xcd\\x80\\xc3"  # mov eax, 20; int 0x80; ret
        m = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(code)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        print("pid", ctypes.CFUNCTYPE(ctypes.c_int)(addr)())
        print("survived")
    """)
    for code in (x32, int80):
        res = sandbox.run(["python3", "-c", code], profile="python", timeout=60)
        assert "survived" not in res.stdout
        assert (res.reason, res.signal) == ("signaled", signal.SIGSYS), res


PYTHON_WORK = textwrap.dedent("""\
    import asyncio, ctypes, json, multiprocessing, os, sqlite3, ssl, subprocess, sys, threading
    import zlib

    def square(x):
        return x * x

    async def echo_roundtrip():
        async def handle(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping\\n")
        line = await reader.readline()
        writer.close()
        server.close()
        await server.wait_closed()
        return line.decode().strip()

    if __name__ == "__main__":
        out = {}
        out["json"] = json.loads(json.dumps({"a": [1, 2, 3]}))["a"][2]
        db = sqlite3.connect(":memory:")
        db.execute("create table t(x)")
        db.executemany("insert into t values (?)", [(i,) for i in range(10)])
        out["sqlite3"] = db.execute("select sum(x) from t").fetchone()[0]
        got = []
        threads = [threading.Thread(target=got.append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["threading"] = sorted(got)
        with multiprocessing.Pool(2) as pool:
            out["multiprocessing"] = pool.map(square, range(5))
        out["subprocess"] = subprocess.run([sys.executable, "-c", "print(6*7)"],
                                           capture_output=True, text=True).stdout.strip()
        out["asyncio"] = asyncio.run(echo_roundtrip())
        ctx = ssl.create_default_context()
        out["ssl"] = [ctx.verify_mode == ssl.CERT_REQUIRED, len(ssl.RAND_bytes(16))]
        out["zlib"] = len(zlib.decompress(zlib.compress(b"x" * 1000)))
        out["ctypes"] = ctypes.CDLL(None).getpid() == os.getpid()
        print(json.dumps(out, sort_keys=True))
""")

NODE_WORK = textwrap.dedent("""\
    const fs = require("fs"), cp = require("child_process"), crypto = require("crypto");
    const http = require("http"), os = require("os"), path = require("path");
    const { Worker } = require("worker_threads");
    const out = {};
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "cb-"));
    fs.writeFileSync(path.join(dir, "a.txt"), "hello");
    out.fs = fs.readFileSync(path.join(dir, "a.txt"), "utf8");
    fs.rmSync(dir, { recursive: true });
    out.child_process = cp.execFileSync(process.execPath,
                                        ["-e", "process.stdout.write(String(6*7))"]).toString();
    out.crypto = crypto.createHash("sha256").update("abc").digest("hex").slice(0, 8);
    new Promise((resolve) => {
      const src = "require('worker_threads').parentPort.postMessage(21 * 2)";
      new Worker(src, { eval: true }).on("message", resolve);
    }).then((v) => {
      out.worker_threads = v;
      const server = http.createServer((req, res) => res.end("pong:" + req.url));
      server.listen(0, "127.0.0.1", () => {
        http.get({ host: "127.0.0.1", port: server.address().port, path: "/x" }, (res) => {
          let body = "";
          res.on("data", (c) => (body += c));
          res.on("end", () => {
            out.http = body;
            server.close();
            console.log(JSON.stringify(out));
          });
        });
      });
    });
""")

SHELL_WORK = textwrap.dedent("""\
    set -euo pipefail
    d=$(mktemp -d)
    seq 1 100 | grep 7 | sed 's/7/X/g' | awk '{n += length($0)} END {print "awk", n}'
    printf 'b\\na\\nb\\n' | sort | uniq -c | tr -s ' ' | sed 's/^ //' | tr '\\n' ';'; echo
    mkdir -p "$d/src" && echo data > "$d/src/f.txt"
    tar -C "$d" -czf "$d/a.tgz" src && tar -tzf "$d/a.tgz" | sort | tr '\\n' ' '; echo
    echo "a,b,c" | cut -d, -f2 | xargs -I{} echo "cut {}"
    cat "$d/src/f.txt" | wc -c | xargs echo wc
    rm -rf "$d"
""")


def test_python_real_work_runs_under_its_profile(sandbox: Runner) -> None:
    res = sandbox.run(["python3", "-c", PYTHON_WORK], profile="python", timeout=120)
    assert res.reason == "exited" and res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {
        "asyncio": "PING", "ctypes": True, "json": 3, "multiprocessing": [0, 1, 4, 9, 16],
        "sqlite3": 45, "ssl": [True, 16], "subprocess": "42", "threading": [0, 1, 2, 3],
        "zlib": 1000,
    }
    assert res.violations == []


def test_node_real_work_runs_under_its_profile(sandbox: Runner) -> None:
    res = sandbox.run(["node", "-e", NODE_WORK], profile="node", timeout=120)
    if res.reason == "exited" and res.exit_code == 127 and "not found" in res.stderr:
        pytest.skip("node is not installed")
    assert res.reason == "exited" and res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {"fs": "hello", "child_process": "42",
                                      "crypto": "ba7816bf", "worker_threads": 42,
                                      "http": "pong:/x"}
    assert res.violations == []


def test_shell_real_work_runs_under_its_profile(sandbox: Runner) -> None:
    res = sandbox.run(["bash", "-c", SHELL_WORK], profile="shell", timeout=120)
    assert res.reason == "exited" and res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == ["awk 37", "1 a;2 b;", "src/ src/f.txt ", "cut b", "wc 5"]
    assert res.violations == []


@pytest.mark.skipif(bool(TEST_PROFILE), reason="CELLBLOCK_TEST_PROFILE overrides the choice")
@pytest.mark.parametrize("argv, profile", [
    (["python3", "-c", "pass"], "python"),
    (["bash", "-c", "true"], "shell"),
    (["sh", "-c", "true"], "shell"),
    (["true"], "default"),
])
def test_profile_is_chosen_from_argv_and_reported(sandbox: Runner, argv: list[str],
                                                  profile: str) -> None:
    res = sandbox.run(argv, timeout=60)
    assert res.reason == "exited" and res.exit_code == 0, res.stderr
    assert res.seccomp_profile == profile


@pytest.mark.parametrize("argv0, profile", [
    ("python3", "python"), ("/usr/bin/python3.11", "python"), ("python", "python"),
    ("node", "node"), ("/usr/bin/nodejs", "node"), ("sh", "shell"), ("/bin/bash", "shell"),
    ("dash", "shell"), ("zsh", "shell"), ("perl", "default"), ("nodemon", "default"),
])
def test_profile_for_argv(argv0: str, profile: str) -> None:
    assert profile_for_argv([argv0, "x"]) == profile


def test_custom_policy_allows_and_denies(sandbox: Runner) -> None:
    calls = [("msgget", nr("msgget"), (0, 0o600 | 0o1000)), ("mkdir", nr("mkdir"), (0, 0o700))]
    # Under the profile: msgget is refused; mkdir(NULL) is allowed (and faults on the pointer).
    errnos, violations, _ = run_syscalls(sandbox, calls, profile="python")
    assert errnos == {"msgget": "EPERM", "mkdir": "EFAULT"}
    assert violations == {"msgget": 1}
    custom = SeccompPolicy(base="python", allow=["msgget"], deny=["mkdir"])
    errnos, violations, res = run_syscalls(sandbox, calls, seccomp=as_kwarg(custom))
    assert errnos["mkdir"] == "EPERM" and violations == {"mkdir": 1}
    assert errnos["msgget"] != "EPERM"  # a queue id, or an error from the kernel itself
    assert res.seccomp_profile == "python+custom"


def test_deny_wins_over_allow() -> None:
    both = compile_filter(SeccompPolicy(allow=["msgget"], deny=["msgget"]))
    assert "msgget" in both.names.values()


@pytest.mark.parametrize("policy, message", [
    (SeccompPolicy(base="nope"), "unknown seccomp profile 'nope' (known: default, node, python"),
    (SeccompPolicy(allow=["frobnicate"]), "unknown syscall 'frobnicate'"),
    (SeccompPolicy(deny=["frobnicate"]), "unknown syscall 'frobnicate'"),
    (SeccompPolicy(allow=["ptrace"]), "'ptrace' is refused in every profile"),
    (SeccompPolicy(allow=["unshare"]), "'unshare' is refused in every profile"),
    (SeccompPolicy(allow=["clone"]), "'clone' is only allowed with fixed arguments"),
    (SeccompPolicy(allow=["socket"]), "'socket' is only allowed with fixed arguments"),
    (SeccompPolicy(deny=["sendmsg"]), "'sendmsg' cannot be denied: the sandbox needs it"),
    (SeccompPolicy(deny=["execve"]), "'execve' cannot be denied"),
])
def test_bad_policies_are_clear_errors(policy: SeccompPolicy, message: str) -> None:
    with pytest.raises(SeccompError, match=message.replace("(", r"\(")):
        compile_filter(policy)


def test_unknown_profile_fails_the_run() -> None:
    with pytest.raises(SeccompError, match="unknown seccomp profile 'pyhton'"):
        cellblock.run(["true"], profile="pyhton")


def test_policy_is_strict() -> None:
    with pytest.raises(ValueError):
        SeccompPolicy(on_violation="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SeccompPolicy(extra=1)  # type: ignore[call-arg]


def test_every_profile_compiles_for_this_architecture() -> None:
    assert set(PROFILES) <= set(known_profiles())
    for profile in known_profiles():
        f = compile_filter(profile)
        assert f.profile == profile and f.on_violation == "errno"
        assert len(f.bpf) % 8 == 0 and 0 < len(f.bpf) // 8 <= 4096
        assert {"unshare", "ptrace", "bpf", "mount", "clone", "socket"} <= set(f.names.values())
        assert "read" not in f.names.values()


def test_bpf_is_deterministic_and_cached() -> None:
    first = compile_filter("shell")
    before = cache_info()
    again = compile_filter(SeccompPolicy(base="shell"))
    assert again is first
    assert cache_info().hits == before.hits + 1
    assert cache_info().misses == before.misses
    # Same bytes from a fresh interpreter, i.e. from libseccomp itself rather than the cache.
    code = ("import hashlib, cellblock.seccomp as s; "
            "print(hashlib.sha256(s.compile_filter('shell').bpf).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert fresh == hashlib.sha256(first.bpf).hexdigest()


def test_allow_and_deny_order_do_not_matter() -> None:
    a = compile_filter(SeccompPolicy(allow=["msgget", "msgsnd"], deny=["mkdir", "rmdir"]))
    b = compile_filter(SeccompPolicy(allow=["msgsnd", "msgget", "msgget"], deny=["rmdir", "mkdir"]))
    assert a is b
