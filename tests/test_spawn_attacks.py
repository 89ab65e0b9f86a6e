"""Red-team attacks on the cold spawn path's recent changes, each made by a payload inside the
sandbox (as root and as uid 65534) and asserted to fail:

- parts made ahead (`cell::parts`): a network namespace and cgroup directories made by a
  background thread and taken by a cold run. A run must see nothing of another run's sockets
  (concurrent or earlier), nothing of the supervisor's namespace, no descriptor of the parts,
  and its limits must be written into the cgroup it took;
- cgroup v1: PID 1 moves itself in through `tasks` files opened before the clone. The command
  must find none of them, must not leave its cgroup, and a fork or thread bomb stops exactly at
  the pids limit;
- /proc's masked directories, now one read-only empty directory of the root bound over each:
  nothing can be written there, unmounted, renamed or mounted over, and no other path reaches
  the host's entries.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import PRELUDE, Runner, processes_with_argv, wait_for

#: Errors a refused attempt may end with (anything else, "OK" above all, is a success).
REFUSED = {"EPERM", "EACCES", "EROFS", "ENOENT", "EINVAL", "EBUSY", "ENOSYS", "EXDEV",
           "ENOTDIR", "ECONNREFUSED"}
MASKED_DIRS = ["acpi", "bus", "driver", "fs", "irq", "scsi", "tty", "asound", "pressure"]


def payload(code: str) -> list[str]:
    return ["python3", "-c", PRELUDE + code]


def last_json(res: SimpleNamespace) -> dict[str, Any]:
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.exit_code,
                                                          res.stderr[-1500:])
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def taking(sandbox: Runner, keys: tuple[str, ...],
           run: Callable[[], list[SimpleNamespace]]) -> list[SimpleNamespace]:
    """Runs `run` until one call took a part of every kind in `keys` (as root: a kind's first
    request only records demand); as uid 65534 (no parts are made) once, checking none was
    taken. The attack is then made against a run that really took parts."""
    if not sandbox.privileged:
        before = sandbox.cells()
        results = run()
        after = sandbox.cells()
        assert all(after[k] == before[k] for k in keys), (before, after)
        return results
    for _ in range(40):
        before = sandbox.cells()
        results = run()
        after = sandbox.cells()
        if all(after[k] > before[k] for k in keys):
            return results
        time.sleep(0.2)
    raise AssertionError(f"no run took parts {keys} in 40 tries: {sandbox.cells()}")


# ---------------------------------------------------------------------------------------------
# 1. Network namespaces made ahead: fresh, private, used once.

LISTENER = """
import time
tcp = socket.socket(); tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("127.0.0.1", PORT)); tcp.listen(8)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.1", PORT + 1))
unix = socket.socket(socket.AF_UNIX); unix.bind(b"\\0" + NAME.encode()); unix.listen(8)
listening = time.monotonic()
time.sleep(3.5)
report(listening=listening, until=time.monotonic(), netns=os.stat("/proc/self/ns/net").st_ino)
"""

#: Tries the sockets a listener (another run: PORT, NAME) and the host (HOST_PORT, HOST_NAME)
#: hold; reads the namespace's socket tables; binds the same addresses (only possible in a
#: namespace of its own).
PROBER = """
import time
time.sleep(DELAY)
at = time.monotonic()
def tcp_to(port):
    s = socket.socket(); s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
    finally:
        s.close()
def unix_to(name):
    s = socket.socket(socket.AF_UNIX); s.settimeout(2)
    try:
        s.connect(b"\\0" + name.encode())
    finally:
        s.close()
def bind_tcp(port):
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen(1); KEEP.append(s)
def bind_unix(name):
    s = socket.socket(socket.AF_UNIX); s.bind(b"\\0" + name.encode()); KEEP.append(s)
KEEP = []
def table(path):
    try:
        return open(path).read()
    except OSError as e:
        return errno.errorcode.get(e.errno, "")
tables = "".join(table("/proc/net/" + t) for t in ("tcp", "tcp6", "udp", "udp6", "unix"))
ports = [f":{p:04X} " for p in (PORT, PORT + 1, HOST_PORT)]
report(at=at,
       tcp_other=attempt(tcp_to, PORT), unix_other=attempt(unix_to, NAME),
       tcp_host=attempt(tcp_to, HOST_PORT), unix_host=attempt(unix_to, HOST_NAME),
       seen_in_tables=[x for x in (NAME, HOST_NAME, *ports) if x in tables],
       bind_tcp=attempt(bind_tcp, PORT), bind_host_port=attempt(bind_tcp, HOST_PORT),
       bind_unix=attempt(bind_unix, NAME), bind_host_name=attempt(bind_unix, HOST_NAME),
       interfaces=[n for _, n in socket.if_nameindex()],
       netns=os.stat("/proc/self/ns/net").st_ino)
"""


def test_sockets_of_a_run_or_the_host_are_reached_by_no_other_run(sandbox: Runner) -> None:
    token = secrets.token_hex(6)
    name, host_name = f"cb-redteam-{token}", f"cb-redteam-host-{token}"
    # The host side (the supervisor's namespace): a listener on loopback and an abstract socket.
    host_tcp = socket.socket()
    host_tcp.bind(("127.0.0.1", 0))
    host_tcp.listen(8)
    host_port = host_tcp.getsockname()[1]
    host_unix = socket.socket(socket.AF_UNIX)
    host_unix.bind(b"\0" + host_name.encode())
    host_unix.listen(8)
    port = 47000 + secrets.randbelow(2000) * 2
    if port in (host_port, host_port - 1):
        port += 4
    consts = (f"PORT, NAME, HOST_PORT, HOST_NAME = {port}, {name!r}, {host_port}, "
              f"{host_name!r}\n")
    listener = payload(consts + LISTENER)

    def prober(delay: float) -> list[str]:
        return payload(consts + f"DELAY = {delay}\n" + PROBER)

    try:
        # The listener and a prober at once (one namespace made ahead each, as root).
        both = taking(sandbox, ("cold_netns_ahead",), lambda: sandbox.run_many(
            [(listener, {"cells": False, "timeout": 30}),
             (prober(1.2), {"cells": False, "timeout": 30})]))
        listened, probed = last_json(both[0]), last_json(both[1])
        # A later run, taking the next namespace made ahead.
        later = last_json(taking(sandbox, ("cold_netns_ahead",), lambda: [sandbox.run(
            prober(0.0), cells=False, timeout=30)])[0])
    finally:
        host_tcp.close()
        host_unix.close()
    # The probe was made while the listener listened: the attack had something to find.
    assert listened["listening"] < probed["at"] < listened["until"], (listened, probed)
    host_ns = os.stat("/proc/self/ns/net").st_ino
    # One namespace each for the two runs alive at once (a later one may reuse a freed inode
    # number: the namespace it numbered is gone), none of them the host's.
    assert len({listened["netns"], probed["netns"], host_ns}) == 3
    assert later["netns"] != host_ns
    for p in (probed, later):
        assert p["interfaces"] == ["lo"], p
        for k in ("tcp_other", "unix_other", "tcp_host", "unix_host"):
            assert p[k] in REFUSED, (k, p)
        assert p["seen_in_tables"] == [], p
        # Free in its own namespace: none of the others' sockets holds the address.
        for k in ("bind_tcp", "bind_host_port", "bind_unix", "bind_host_name"):
            assert p[k] == "OK", (k, p)


SYSCTLS = ["net/ipv4/ip_forward", "net/ipv4/ping_group_range",
           "net/ipv4/ip_unprivileged_port_start", "net/ipv4/conf/all/forwarding",
           "net/ipv4/conf/lo/route_localnet",
           "net/core/somaxconn", "net/ipv4/tcp_syncookies"]


@pytest.mark.parametrize("profile", [None, "none"], ids=["default-seccomp", "no-seccomp"])
def test_a_namespace_made_ahead_refuses_sysctl_and_interface_changes(
        sandbox: Runner, profile: str | None) -> None:
    extra: dict[str, Any] = {"profile": profile} if profile else {}
    code = f"""
import ctypes, fcntl, struct
names = {SYSCTLS!r}
def write(p):
    with open("/proc/sys/" + p, "w") as f:
        f.write("1")
def read(p):
    try:
        return open("/proc/sys/" + p).read().strip()
    except OSError as e:
        return errno.errorcode.get(e.errno, "")
before = {{n: read(n) for n in names}}
writes = {{n: attempt(write, n) for n in names}}
def lo_down():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", 0))  # SIOCSIFFLAGS: lo down
def add_dummy():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fcntl.ioctl(s, 0x8923, struct.pack("16s16x", b"lo:1"))  # SIOCSIFNAME-ish: refused
libc = ctypes.CDLL(None, use_errno=True)
def setns_host():
    fd = os.open("/proc/1/ns/net", os.O_RDONLY)
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
report(before=before, after={{n: read(n) for n in names}}, writes=writes,
       lo_down=attempt(lo_down), rename=attempt(add_dummy), setns=attempt(setns_host),
       interfaces=[n for _, n in socket.if_nameindex()])
"""
    out = last_json(taking(sandbox, ("cold_netns_ahead",), lambda: [sandbox.run(
        payload(code), cells=False, timeout=30, **extra)])[0])
    assert {n: v for n, v in out["writes"].items() if v not in REFUSED} == {}, out
    assert out["before"] == out["after"], out
    for k in ("lo_down", "rename", "setns"):
        assert out[k] in REFUSED, (k, out)
    assert out["interfaces"] == ["lo"], out


# ---------------------------------------------------------------------------------------------
# 2. Descriptors: neither a namespace fd nor a cgroup `tasks` fd reaches the command.

FDS = """
def fds(where):
    out = {}
    for n in os.listdir(where):
        try:
            out[n] = os.readlink(f"{where}/{n}")
        except OSError as e:
            out[n] = errno.errorcode.get(e.errno, "")
    return out
def listing(p):
    try:
        return fds(p)
    except OSError as e:
        return errno.errorcode.get(e.errno, "")
mine = fds("/proc/self/fd")
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    os.write(w, json.dumps(fds("/proc/self/fd")).encode())
    os._exit(0)
os.close(w)
child = json.loads(os.read(r, 65536))
os.waitpid(pid, 0)
# PID 1's descriptors through a pidfd (pidfd_getfd needs ptrace access to it).
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def getfd(n):
    pidfd = libc.syscall(434, 1, 0)  # pidfd_open
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), "pidfd_open")
    try:
        if libc.syscall(438, pidfd, n, 0) < 0:  # pidfd_getfd
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
report(mine=mine, child=child, init=listing("/proc/1/fd"),
       init_open=attempt(lambda: os.open("/proc/1/fd/3", os.O_WRONLY)),
       getfd={n: attempt(getfd, n) for n in range(3, 16)})
"""


def test_no_part_descriptor_reaches_the_command(sandbox: Runner) -> None:
    out = last_json(taking(sandbox, ("cold_netns_ahead", "cold_cgroups_ahead"), lambda: [
        sandbox.run(payload(FDS), cells=False, pids=32, memory="256M", timeout=30)])[0])
    child_pipe = "pipe:"
    for who in ("mine", "child"):
        fds = out[who]
        # The listing's own descriptor is closed by the time it is read (ENOENT); the child
        # also holds its pipe to us.
        extra = {n: t for n, t in fds.items() if n not in ("0", "1", "2") and t != "ENOENT"
                 and not (who == "child" and t.startswith(child_pipe))}
        assert extra == {}, (who, fds)
    # PID 1's descriptors are out of reach (not dumpable); if listed, none is a part.
    init = out["init"]
    if isinstance(init, dict):
        bad = {n: t for n, t in init.items() if t.startswith(("net:", "mnt:", "user:"))
               or "cgroup" in t or t.endswith("/tasks")}
        assert bad == {}, init
    else:
        assert init in REFUSED, init
    assert out["init_open"] in REFUSED, out
    assert {n: v for n, v in out["getfd"].items() if v not in (*REFUSED, "EBADF")} == {}, out


# ---------------------------------------------------------------------------------------------
# 3. cgroups: not visible, not left, limits written into the one taken.

ESCAPE_CGROUP = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def call(fn, *args):
    def go():
        if fn(*args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return attempt(go)
def write(path, data="0"):
    with open(path, "w") as f:
        f.write(data)
def listing(p):
    try:
        return os.listdir(p)
    except OSError as e:
        return errno.errorcode.get(e.errno, "")
own = open("/proc/self/cgroup").read()
targets = ["/sys/fs/cgroup/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs"]
for line in own.splitlines():
    _, ctrl, path = line.split(":", 2)
    for c in ctrl.split(",") or [""]:
        base = "/sys/fs/cgroup/" + c.replace("name=", "")
        for f in ("tasks", "cgroup.procs"):
            targets += [f"{base}/{f}", f"{base}{path}/../{f}", f"{base}{path}/{f}"]
os.makedirs("/tmp/cg", exist_ok=True)
writes = {t: attempt(write, t) for t in targets}
report(own=own, sys_fs_cgroup=listing("/sys/fs/cgroup"),
       writes={t: v for t, v in writes.items() if v not in ("ENOENT", "ENOTDIR")},
       self_cgroup=attempt(write, "/proc/self/cgroup", "/"),
       mount_v1=call(libc.mount, b"cgroup", b"/tmp/cg", b"cgroup", 0, b"pids"),
       mount_v2=call(libc.mount, b"cgroup2", b"/tmp/cg", b"cgroup2", 0, None),
       unshare_cgroupns=call(libc.unshare, 0x02000000))
# Then from new user, mount and cgroup namespaces of its own (allowed without seccomp): a
# cgroup filesystem mounted there would show (and might move) the run's cgroup or the host's.
os.makedirs("/tmp/cg2", exist_ok=True)
nested = {"unshare": call(libc.unshare, 0x10000000 | 0x00020000 | 0x02000000),
          "mount_v2": call(libc.mount, b"cgroup2", b"/tmp/cg2", b"cgroup2", 0, None),
          "mount_v1": call(libc.mount, b"cgroup", b"/tmp/cg", b"cgroup", 0, b"pids"),
          "mount_named": call(libc.mount, b"cgroup", b"/tmp/cg", b"cgroup", 0,
                              b"none,name=systemd")}
if nested["mount_v2"] == "OK":
    nested["v2_move"] = attempt(write, "/tmp/cg2/cgroup.procs", "0")
report(nested=nested)
os.execv("/bin/sleep", ["sleep", MARKER])
"""


def read_or_absent(path: str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return "absent"


def cgroup_paths(pid: int) -> dict[str, str]:
    """Host view: controller -> cgroup path of process `pid`."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(","):
            out[c] = path
    return out


@pytest.mark.parametrize("profile", [None, "none"], ids=["default-seccomp", "no-seccomp"])
def test_a_run_cannot_see_or_leave_its_cgroup(sandbox: Runner, marker: str,
                                              profile: str | None) -> None:
    extra: dict[str, Any] = {"profile": profile} if profile else {}
    pids, memory = 24, 96 << 20
    kwargs = {"cells": False, "pids": pids, "memory": memory, "timeout": 60, **extra}
    if sandbox.privileged:
        # Make demand for this kind first, so the attacked run takes a cgroup made ahead.
        taking(sandbox, ("cold_cgroups_ahead",), lambda: [sandbox.run(["true"], **kwargs)])
        wait_for(lambda: sandbox.cells()["parts_ready"] > 0, "a part made ahead")
    before = sandbox.cells()["cold_cgroups_ahead"]
    wait = sandbox.start(payload(f"MARKER = {marker!r}\n" + ESCAPE_CGROUP), **kwargs)
    try:
        pid = wait_for(lambda: processes_with_argv(["sleep", marker]), "the payload's sleep")[0]
        host_view = cgroup_paths(pid)
        limits = {}
        if sandbox.privileged:
            limits = {
                "pids": Path(f"/sys/fs/cgroup/pids{host_view['pids']}/pids.max").read_text(),
                "memory": Path(f"/sys/fs/cgroup/memory{host_view['memory']}"
                               "/memory.limit_in_bytes").read_text()}
    finally:
        for p in processes_with_argv(["sleep", marker]):
            os.kill(p, 9)
    res = wait()
    out = json.loads(res.stdout.strip().splitlines()[0])
    assert out["sys_fs_cgroup"] in ("ENOENT", []), out
    assert out["writes"] == {}, out
    for k in ("self_cgroup", "mount_v1", "mount_v2"):
        assert out[k] in REFUSED, (k, out)
    nested = json.loads(res.stdout.strip().splitlines()[1])["nested"]
    assert {k: v for k, v in nested.items() if k != "unshare" and v not in REFUSED} == {}, nested
    if sandbox.privileged:
        assert sandbox.cells()["cold_cgroups_ahead"] > before, "the run took a cgroup made ahead"
        name = f"/cellblock-{os.getpid()}-"
        # From the host: after every attempt the command is still in the run's cgroups, and
        # the limits asked for are those written into the cgroup it took.
        for ctrl in ("pids", "memory", "cpuacct"):
            assert name in host_view[ctrl], (ctrl, host_view)
        assert limits == {"pids": f"{pids}\n", "memory": f"{memory}\n"}, limits


BOMB = """
import signal, threading, time
LIMIT = LIMIT_
children, errors = [], []
def tasks():
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                n += len(os.listdir(f"/proc/{p}/task"))
            except OSError:
                pass
    return n
for _ in range(LIMIT * 4):
    try:
        pid = os.fork()
    except OSError as e:
        errors.append(errno.errorcode.get(e.errno, ""))
        break
    if pid == 0:
        signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
        time.sleep(30)
        os._exit(0)
    children.append(pid)
time.sleep(0.2)
forked_peak = tasks()
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
stop = threading.Event()
threads = []
for _ in range(LIMIT * 4):
    t = threading.Thread(target=stop.wait)
    try:
        t.start()
    except RuntimeError:
        errors.append("thread")
        break
    threads.append(t)
thread_peak = tasks()
stop.set()
for t in threads:
    t.join()
report(forked=len(children), forked_peak=forked_peak, thread_peak=thread_peak, errors=errors)
"""


@pytest.mark.parametrize("limit", [6, 11])
def test_a_fork_or_thread_bomb_stops_exactly_at_the_pids_limit(sandbox: Runner, limit: int
                                                               ) -> None:
    res = taking(sandbox, ("cold_cgroups_ahead",), lambda: [sandbox.run(
        payload(BOMB.replace("LIMIT_", str(limit))), cells=False, pids=limit, timeout=60)])[0]
    out = last_json(res)
    assert out["errors"][:1] == ["EAGAIN"] and out["errors"][1:] == ["thread"], out
    # Every task of the sandbox counts: PID 1, the payload and what it started.
    assert out["forked_peak"] <= limit and out["thread_peak"] <= limit, out
    if sandbox.privileged:
        # The cgroup holds the limit exactly: not one task fewer, not one more.
        assert out["forked_peak"] == limit and out["thread_peak"] == limit, out
        assert res.enforcement["pids"] == sandbox.enforcer("pids")
        assert "pids" in res.limits_hit, res.limits_hit


# ---------------------------------------------------------------------------------------------
# 4. /proc's masked directories: one empty read-only directory, bound over each.

MASKED = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
DIRS = DIRS_
EMPTY = "/.cellblock-empty-dir"
def call(fn, *args):
    def go():
        if fn(*args) == -1:
            raise OSError(ctypes.get_errno(), "")
    return attempt(go)
def listing(p):
    try:
        return sorted(os.listdir(p))
    except OSError as e:
        return errno.errorcode.get(e.errno, "")
def create(p):
    with open(p, "w") as f:
        f.write("x")
out = {}
for d in DIRS:
    p = "/proc/" + d
    out[d] = {
        "create": attempt(create, p + "/x"), "mkdir": attempt(os.mkdir, p + "/x"),
        "chmod": attempt(os.chmod, p, 0o777), "rename": attempt(os.rename, p, "/proc/x" + d),
        "rmdir": attempt(os.rmdir, p),
        "umount": call(libc.umount2, p.encode(), 0), "detach": call(libc.umount2, p.encode(), 2),
        "mount_over": call(libc.mount, b"none", p.encode(), b"tmpfs", 0, None),
        "bind_over": call(libc.mount, b"/tmp", p.encode(), None, 0x1000, None),
        "remount_rw": call(libc.mount, None, p.encode(), None, 0x20 | 0x1000, None),
    }
empty = {"create": attempt(create, EMPTY + "/x"), "mkdir": attempt(os.mkdir, EMPTY + "/x"),
         "chmod": attempt(os.chmod, EMPTY, 0o777), "rmdir": attempt(os.rmdir, EMPTY),
         "rename": attempt(os.rename, EMPTY, "/tmp/e"),
         "mount_over": call(libc.mount, b"none", EMPTY.encode(), b"tmpfs", 0, None),
         "remount_rw": call(libc.mount, None, EMPTY.encode(), None, 0x20 | 0x1000, None)}
# Other paths to the same directories (and whatever the kernel would show under them).
paths = [f"{root}/proc/{d}" for d in DIRS for root in
         ("/proc/self/root", "/proc/thread-self/root", f"/proc/{os.getpid()}/root",
          "/proc/1/root", "/proc/self/cwd/..", "//")]
paths += [f"/proc/{w}/{d}" for d in DIRS for w in ("self/..", "1/..", "thread-self/../..")]
seen = {p: listing(p) for p in paths}
files = {p: attempt(lambda p=p: open(p).read()) for p in
         ("/proc/pressure/cpu", "/proc/pressure/memory", "/proc/fs/nfsd/exports",
          "/proc/self/root/proc/pressure/io", "/proc/tty/drivers", "/proc/bus/pci/devices")}
# A fresh procfs would show everything: mounting one must be refused, directly and from new
# user and mount namespaces (where the masks are locked and cannot be lifted either).
os.makedirs("/tmp/newproc", exist_ok=True)
direct = call(libc.mount, b"proc", b"/tmp/newproc", b"proc", 0, None)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    res = {"unshare": call(libc.unshare, 0x10000000 | 0x00020000)}
    res["umount"] = call(libc.umount2, b"/proc/pressure", 2)
    res["mount_proc"] = call(libc.mount, b"proc", b"/tmp/newproc", b"proc", 0, None)
    # Copies of /proc without its masks: a non-recursive bind or a detached clone (open_tree)
    # would leave the masks behind; a recursive one carries them.
    os.makedirs("/tmp/procbind", exist_ok=True)
    res["bind_plain"] = call(libc.mount, b"/proc", b"/tmp/procbind", None, 0x1000, None)
    res["bind_plain_list"] = listing("/tmp/procbind/pressure")
    res["bind_rec"] = call(libc.mount, b"/proc", b"/tmp/procbind", None, 0x1000 | 0x4000, None)
    res["bind_rec_list"] = listing("/tmp/procbind/pressure")
    res["open_tree"] = call(lambda: -1 if libc.syscall(428, -100, b"/proc", 1) < 0 else 0)
    res["open_tree_pressure"] = call(
        lambda: -1 if libc.syscall(428, -100, b"/proc/pressure", 1) < 0 else 0)
    res["pid_unshare"] = call(libc.unshare, 0x20000000)
    if res["pid_unshare"] == "OK":
        # PID 1 of a pid namespace this user namespace owns: may it mount a procfs there?
        gr, gw = os.pipe()
        grand = os.fork()
        if grand == 0:
            got = call(libc.mount, b"proc", b"/tmp/newproc", b"proc", 0, None)
            os.write(gw, json.dumps([got, listing("/tmp/newproc/pressure")]).encode())
            os._exit(0)
        os.close(gw)
        res["pidns_mount_proc"], res["pidns_newproc"] = json.loads(os.read(gr, 65536))
        os.waitpid(grand, 0)
    res["pressure"] = listing("/proc/pressure")
    res["newproc"] = listing("/tmp/newproc/pressure")
    os.write(w, json.dumps(res).encode())
    os._exit(0)
os.close(w)
nested = json.loads(os.read(r, 65536) or b"{}")
os.waitpid(pid, 0)
report(out=out, empty=empty, empty_list=listing(EMPTY), seen=seen, files=files,
       after={d: listing("/proc/" + d) for d in DIRS}, direct=direct,
       newproc=listing("/tmp/newproc/pressure"), nested=nested)
"""


@pytest.mark.parametrize("profile", [None, "none"], ids=["default-seccomp", "no-seccomp"])
@pytest.mark.parametrize("cells", [True, False], ids=["any-path", "cold"])
def test_masked_proc_dirs_cannot_be_opened_up(sandbox: Runner, profile: str | None,
                                              cells: bool) -> None:
    dirs = [d for d in MASKED_DIRS if os.path.isdir(f"/proc/{d}")]
    hidden = {d: sorted(os.listdir(f"/proc/{d}")) for d in dirs}
    # The attack has something to find: the host's entries under these directories.
    assert any(hidden.values()), hidden
    kwargs: dict[str, Any] = {"cells": cells, "timeout": 60}
    if profile:
        kwargs["profile"] = profile
    res = sandbox.run(payload(MASKED.replace("DIRS_", repr(dirs))), **kwargs)
    out = last_json(res)
    succeeded = {(d, k): v for d, r in out["out"].items() for k, v in r.items()
                 if v not in REFUSED}
    assert succeeded == {}, succeeded
    assert {k: v for k, v in out["empty"].items() if v not in REFUSED} == {}, out["empty"]
    assert out["empty_list"] == [], out
    assert out["after"] == {d: [] for d in dirs}, out["after"]
    leaks = {p: v for p, v in out["seen"].items() if v not in ([], *REFUSED)}
    assert leaks == {}, leaks
    assert {p: v for p, v in out["files"].items() if v not in REFUSED} == {}, out["files"]
    assert out["direct"] in REFUSED and out["newproc"] in (*REFUSED, []), out
    nested = out["nested"]
    assert nested["mount_proc"] in REFUSED and nested["umount"] in REFUSED, nested
    assert nested["pressure"] == [] and nested["newproc"] in (*REFUSED, []), nested
    assert nested["bind_plain"] in REFUSED and nested["open_tree"] in REFUSED, nested
    # A recursive copy (allowed in a mount namespace of its own) keeps every mask.
    assert nested["bind_plain_list"] in ([], *REFUSED), nested
    assert nested["bind_rec_list"] in ([], *REFUSED), nested
    if nested["open_tree_pressure"] not in REFUSED:
        # A clone of the masked directory alone is the empty directory itself.
        assert nested["open_tree_pressure"] == "OK", nested
    if nested["pid_unshare"] == "OK":
        assert nested["pidns_mount_proc"] in REFUSED, nested
        assert nested["pidns_newproc"] in (*REFUSED, []), nested


@pytest.fixture(scope="module")
def planted_rootfs() -> Iterator[Path]:
    """A rootfs (dash and its libraries, readable by uid 65534) whose own /.cellblock-empty-dir
    holds entries: what the rootfs's author could plant under /proc's masked directories."""
    top = Path(tempfile.mkdtemp(prefix="cellblock-redteam-rootfs-"))
    try:
        tree = top / "tree"
        out = subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True,
                             check=True).stdout
        for path in ["/bin/dash", *re.findall(r"(/\S+\.so[^\s]*)", out)]:
            dst = tree / path.lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(path), dst)
        (tree / "bin" / "sh").symlink_to("dash")
        for d in ("tmp", "proc", "dev", ".cellblock-empty-dir/planted-dir"):
            (tree / d).mkdir(parents=True)
        (tree / ".cellblock-empty-dir" / "cpu").write_text("some avg10=99.00 avg60=0 total=0\n")
        for root, dirs, files in os.walk(top):
            for n in [*dirs, *files]:
                if not os.path.islink(os.path.join(root, n)):
                    os.chmod(os.path.join(root, n), 0o755)
        top.chmod(0o755)
        yield tree
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("cells", [True, False], ids=["any-path", "cold"])
def test_a_rootfs_cannot_plant_entries_in_the_masked_proc_dirs(
        sandbox: Runner, planted_rootfs: Path, cells: bool) -> None:
    # The empty directory bound over them was once made in the overlay's top layer, which
    # overlayfs merged with the rootfs's own directory of that name: its entries showed here.
    dirs = [d for d in MASKED_DIRS if os.path.isdir(f"/proc/{d}")]
    script = "; ".join(f"echo /proc/{d}/*" for d in dirs)
    res = sandbox.run(["/bin/sh", "-c", script], rootfs=str(planted_rootfs), cells=cells,
                      timeout=30)
    assert (res.reason, res.exit_code) == ("exited", 0), (res.reason, res.stderr)
    # dash echoes a pattern that matched nothing as it is: every directory is empty.
    listed = res.stdout.split()
    assert listed == [f"/proc/{d}/*" for d in dirs], listed


def test_concurrent_runs_take_distinct_parts_seen_from_the_host(sandbox: Runner) -> None:
    """Host view (not the sandbox's word): runs alive at once are in distinct network
    namespaces and distinct cgroups with their own limits, none of them the supervisor's."""
    markers = [f"3600.{secrets.randbelow(10**9):09d}" for _ in range(3)]
    kwargs = {"cells": False, "pids": 16, "memory": 128 << 20, "cpus": 0.5, "timeout": 60}
    if sandbox.privileged:
        taking(sandbox, ("cold_netns_ahead", "cold_cgroups_ahead"),
               lambda: [sandbox.run(["true"], **kwargs)])
        wait_for(lambda: sandbox.cells()["parts_ready"] >= 2, "parts made ahead")
    before = sandbox.cells()
    waits = sandbox.start_many([(["sleep", m], kwargs) for m in markers])
    views: list[tuple[str, dict[str, str]]] = []
    limits: list[tuple[str, ...]] = []
    try:
        for m in markers:
            pid = wait_for(lambda m=m: processes_with_argv(["sleep", m]), "a run's sleep")[0]
            view = cgroup_paths(pid)
            views.append((os.readlink(f"/proc/{pid}/ns/net"), view))
            if sandbox.privileged:
                # Read while the run is alive (its cgroups go with it).
                # (Swap must not extend the memory limit: memsw, where accounted, is the same.)
                limits.append(tuple(read_or_absent(f"/sys/fs/cgroup/{c}{view[c]}/{f}")
                                    for c, f in (("pids", "pids.max"),
                                                 ("memory", "memory.limit_in_bytes"),
                                                 ("memory", "memory.memsw.limit_in_bytes"),
                                                 ("cpu", "cpu.cfs_quota_us"))))
    finally:
        for m in markers:
            for p in processes_with_argv(["sleep", m]):
                os.kill(p, 9)
    waits()
    after = sandbox.cells()
    nets = {n for n, _ in views}
    assert len(nets) == 3 and os.readlink("/proc/self/ns/net") not in nets, views
    if sandbox.privileged:
        assert after["cold_netns_ahead"] > before["cold_netns_ahead"], (before, after)
        assert after["cold_cgroups_ahead"] > before["cold_cgroups_ahead"], (before, after)
        mine = cgroup_paths(os.getpid())
        for ctrl in ("pids", "memory", "cpu"):
            paths = {v[ctrl] for _, v in views}
            assert len(paths) == 3 and mine[ctrl] not in paths, (ctrl, views)
            assert all(f"/cellblock-{os.getpid()}-" in p for p in paths), (ctrl, views)
        memsw = f"{128 << 20}\n" if os.path.exists(
            "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes") else "absent"
        assert limits == [("16\n", f"{128 << 20}\n", memsw, "50000\n")] * 3, limits
