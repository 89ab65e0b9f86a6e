"""Process isolation: namespaces, identity, privileges, and that nothing outlives a run.

Each escape is attempted from inside, as root and as uid 65534. Processes left behind are looked
for from the host by their exact command line (`sleep <marker>`), so the check does not depend on
anything the sandbox says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

import pytest

from conftest import PRELUDE, Cli, Runner, processes_with_argv, remove_cgroups_of, wait_for

NAMESPACES = ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"]

#: Starts three processes running `sleep MARK` that try to outlive the run: a daemon(3)-style
#: double-forked setsid child ignoring TERM and HUP, a new-session shell child ignoring TERM, and
#: a plain background child. Reports how many are alive inside, then does {ending}.
DAEMONS = PRELUDE + textwrap.dedent('''\
    import signal, subprocess, time
    mark = {mark!r}
    quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.execvp("sleep", ["sleep", mark])
        os._exit(0)
    os.wait()
    subprocess.Popen(["sh", "-c", f"trap '' TERM HUP; sleep {{mark}}; true"],
                     start_new_session=True, **quiet)
    subprocess.Popen(["sleep", mark], **quiet)
    want = b"sleep\\0" + mark.encode() + b"\\0"
    def alive():
        n = 0
        for p in os.listdir("/proc"):
            try:
                n += p.isdigit() and open(f"/proc/{{p}}/cmdline", "rb").read() == want
            except OSError:
                pass
        return n
    deadline = time.monotonic() + 30
    while alive() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    report(alive=alive())
    {ending}
''')
ENDINGS = {
    "exit": "sys.exit(0)",
    "timeout": "time.sleep(3600)",
    "output_limit": "while True: sys.stdout.write('x' * 65536)",
}


def uid_map_outside(sandbox: Runner) -> int:
    """The host uid that uid 0 of this caller's sandboxes maps to."""
    out = sandbox.probe('report(uid_map=open("/proc/self/uid_map").read().split())')
    return int(out["uid_map"][1])


def test_every_namespace_is_new(sandbox: Runner) -> None:
    host = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES}
    out = sandbox.probe(f"report(**{{n: os.readlink('/proc/self/ns/' + n) for n in {NAMESPACES}}})")
    same = [ns for ns in NAMESPACES if out[ns] == host[ns]]
    assert not same, f"shared with the host: {same}"


def test_identity_is_root_inside_without_privileges(sandbox: Runner) -> None:
    out = sandbox.probe("""
        status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines())
        report(ids=[os.getuid(), os.geteuid(), os.getgid(), os.getegid()], groups=os.getgroups(),
               caps={k: status[k].strip()
                     for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
               nnp=status["NoNewPrivs"].strip(),
               uid_map=open("/proc/self/uid_map").read().split(),
               gid_map=open("/proc/self/gid_map").read().split())
    """)
    assert out["ids"] == [0, 0, 0, 0]
    assert out["groups"] in ([], [0])
    assert set(out["caps"].values()) == {"0000000000000000"}, out["caps"]
    assert out["nnp"] == "1"
    for mapping in (out["uid_map"], out["gid_map"]):
        inside, outside, count = mapping
        assert (inside, count) == ("0", "1"), mapping
        if sandbox.privileged:
            # Root's sandboxes map to an unused unprivileged uid, never to host root.
            assert int(outside) not in (0, sandbox.caller_uid), mapping
        else:
            assert int(outside) == sandbox.caller_uid, mapping


PRIVILEGED_CALLS = """
    import ctypes, platform
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = libc.ptrace.restype = ctypes.c_long
    def call(fn, *args):
        def go():
            if fn(*args) == -1:
                raise OSError(ctypes.get_errno(), "")
        return attempt(go)
    finit_module = {"x86_64": 313, "aarch64": 273}[platform.machine()]
    handle = ctypes.create_string_buffer(b"\\x08\\0\\0\\0\\x01\\0\\0\\0" + b"\\0" * 8)
    report(mount=call(libc.mount, b"none", b"/tmp", b"tmpfs", 0, None),
           umount_proc=call(libc.umount2, b"/proc", 2),
           sethostname=call(libc.sethostname, b"x", 1),
           chroot=call(libc.chroot, b"/tmp"),
           setgroups=attempt(os.setgroups, [0, 1]),
           ptrace_init=call(libc.ptrace, 16, 1, None, None),
           open_by_handle_at=call(libc.open_by_handle_at, -100, handle, 0),
           finit_module=call(libc.syscall, finit_module, -1, b"", 0),
           mknod=attempt(os.mknod, "/tmp/mem", 0o600 | 0o020000, os.makedev(1, 1)),
           chown=attempt(os.chown, "/usr/bin/env", 0, 0),
           proc_1_mem=attempt(lambda: open("/proc/1/mem", "rb")),
           proc_1_environ=attempt(lambda: open("/proc/1/environ", "rb").read()))
"""


@pytest.mark.parametrize("profile", [None, "none"], ids=["default-seccomp", "no-seccomp"])
def test_privileged_operations_fail(sandbox: Runner, profile: str | None) -> None:
    # Without seccomp too: the dropped capabilities alone must refuse every one of these.
    kwargs = {"profile": profile} if profile else {}
    out = sandbox.probe(PRIVILEGED_CALLS, **kwargs)
    # Kernels built without module support answer ENOSYS: refused all the same.
    allowed = {k: v for k, v in out.items() if v not in ("EPERM", "EACCES", "EROFS")
               and (k, v) != ("finit_module", "ENOSYS")}
    assert not allowed, allowed


def test_host_processes_cannot_be_signalled(sandbox: Runner, marker: str) -> None:
    # A host process of the very uid the sandbox maps to: only the pid namespace protects it.
    uid = uid_map_outside(sandbox)
    victim = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                               "sleep", marker])
    try:
        wait_for(lambda: processes_with_argv(["sleep", marker]), "the host victim")
        out = sandbox.probe(f"""
            report(pid=attempt(os.kill, {victim.pid}, 9), group=attempt(os.kill, -{victim.pid}, 9),
                   everyone=attempt(os.kill, -1, 9),
                   caller=attempt(os.kill, {sandbox.stats()["pid"]}, 9))
        """)
        assert out["pid"] == "ESRCH" and out["group"] == "ESRCH" and out["caller"] == "ESRCH"
        assert out["everyone"] in ("ESRCH", "OK")
        assert victim.poll() is None, "a host process was killed from inside the sandbox"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("ending", ["exit", "output_limit"])
def test_descendants_die_with_the_run(sandbox: Runner, marker: str, ending: str) -> None:
    res = sandbox.run(["python3", "-c", DAEMONS.format(mark=marker, ending=ENDINGS[ending])],
                      max_output="64K", timeout=60)
    assert json.loads(res.stdout.splitlines()[0]) == {"alive": 3}
    assert res.reason == ("exited" if ending == "exit" else "output_limit")
    assert processes_with_argv(["sleep", marker]) == []


def test_descendants_die_on_timeout(sandbox: Runner, marker: str) -> None:
    wait = sandbox.start(["python3", "-c", DAEMONS.format(mark=marker, ending=ENDINGS["timeout"])],
                         timeout=6)
    # Seen from the host while the run is alive: the check below can fail.
    found = wait_for(lambda: len(processes_with_argv(["sleep", marker])) == 3, "3 daemons", 6)
    res = wait()
    assert found and res.reason == "timeout" and res.exit_code is None
    assert json.loads(res.stdout.splitlines()[0]) == {"alive": 3}
    assert processes_with_argv(["sleep", marker]) == []


def test_init_reaps_orphans(sandbox: Runner) -> None:
    out = sandbox.probe("""
        import signal, subprocess, time
        # The shell exits at once; its `sleep` is orphaned to PID 1. Once killed it is a zombie
        # until PID 1 reaps it.
        sh = subprocess.run(["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True, check=True)
        pid = int(sh.stdout)
        parent = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.01)
        report(parent=parent, reaped=not os.path.exists(f"/proc/{pid}"))
    """)
    assert out == {"parent": "1", "reaped": True}


def test_init_forwards_signals_to_the_command(sandbox: Runner) -> None:
    out = sandbox.probe("""
        import signal, time
        got = []
        signal.signal(signal.SIGTERM, lambda *a: got.append(1))
        os.kill(1, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        report(got=bool(got))
    """)
    assert out["got"]


def test_stdin_is_empty_without_input(sandbox: Runner) -> None:
    res = sandbox.run(["cat"], timeout=3)
    assert (res.reason, res.exit_code, res.stdout) == ("exited", 0, "")


def test_stdin_is_delivered(sandbox: Runner) -> None:
    res = sandbox.run(["cat"], stdin="hello\n" * 50_000, timeout=20)
    assert res.reason == "exited" and res.stdout == "hello\n" * 50_000


def test_killing_the_caller_kills_the_run(cli: Cli, marker: str) -> None:
    proc = cli.popen(["run", "--timeout", "120", "--", "sleep", marker],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: processes_with_argv(["sleep", marker]), "the sandboxed sleep", 60)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    try:
        wait_for(lambda: not processes_with_argv(["sleep", marker]),
                 "the sandbox to die with its caller", 5)
    finally:
        for pid in processes_with_argv(["sleep", marker]):
            os.kill(pid, signal.SIGKILL)
        # A supervisor killed by SIGKILL cannot remove its cgroups: that is not what is tested.
        remove_cgroups_of(proc.pid)


def test_concurrent_runs(sandbox: Runner, marker: str) -> None:
    # Eight runs from eight threads of one caller. All eight sleeps are seen alive at the same
    # time from the host: the runs really overlap (the GIL is released), and each gets its own
    # output back.
    duration = "4." + marker.split(".")[1]
    wait = sandbox.start_many([(["sh", "-c", f"echo run-{i}; sleep {duration}; echo done-{i}"], {})
                               for i in range(8)])
    try:
        wait_for(lambda: len(processes_with_argv(["sleep", duration])) == 8, "8 live runs", 60)
    finally:
        results = wait()
    assert [(r.reason, r.exit_code, r.stdout) for r in results] == [
        ("exited", 0, f"run-{i}\ndone-{i}\n") for i in range(8)]
