"""Filesystem isolation: every claim is attempted from inside the sandbox, as root and as 65534.

The host's private paths are absent, the runtime is read-only, scratch space is private to the
run and capped, /proc shows only the sandbox, /proc/sys is read-only and /dev is minimal.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from conftest import REPO, Runner

#: Host paths no sandbox may see (checked only when they exist on the host).
HIDDEN = [
    "/root", "/home", "/work", str(REPO), "/var/run", "/run", "/var", "/boot",
    "/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh", "/etc/crontab",
]
WRITE_DENIED = {"EROFS", "EACCES", "EPERM"}
DEVICES = {"null", "zero", "full", "random", "urandom", "tty"}
DEV_EXTRAS = {"shm", "pts", "ptmx", "fd", "stdin", "stdout", "stderr"}


def test_host_private_paths_are_absent(sandbox: Runner, tmp_path: Path) -> None:
    host_file = tmp_path / "host-only"
    host_file.write_text("host data")
    paths = [p for p in HIDDEN if os.path.lexists(p)] + [str(host_file)]
    assert str(REPO) in paths and "/etc/shadow" in paths
    out = sandbox.probe(f"""
        seen = {{}}
        for p in {paths!r}:
            try:
                seen[p] = sorted(os.listdir(p)) if os.path.isdir(p) else open(p).read()
            except OSError as e:
                seen[p] = errno.errorcode[e.errno]
        report(seen=seen)
    """)
    binds = sandbox.stats()["ro_binds"]
    for path, seen in out["seen"].items():
        # A parent of a bound interpreter prefix (e.g. /root for a pyenv prefix) exists, but
        # holds nothing except the way down to that prefix.
        way_down = {b[len(path):].lstrip("/").split("/")[0] for b in binds
                    if b.startswith(path.rstrip("/") + "/")}
        if way_down:
            assert seen == sorted(way_down), (path, seen)
        else:
            assert seen == "ENOENT", (path, seen)


def test_shadow_files_are_not_readable(sandbox: Runner) -> None:
    assert Path("/etc/shadow").exists()
    out = sandbox.probe("""
        paths = ("/etc/shadow", "/etc/gshadow")
        report(**{p: attempt(lambda: open(p, "rb").read()) for p in paths})
    """)
    assert out == {"/etc/shadow": "ENOENT", "/etc/gshadow": "ENOENT"}


def test_root_and_runtime_are_read_only(sandbox: Runner) -> None:
    out = sandbox.probe("""
        def create(p):
            os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o644))
        res = {p: attempt(create, p) for p in (
            "/cellblock-probe", "/usr/cellblock-probe", "/etc/cellblock-probe",
            "/bin/cellblock-probe", "/lib/cellblock-probe",
            os.path.join(sys.prefix, "cellblock-probe"))}
        # Files the sandbox itself owns on its root (generated /etc files) are read-only too.
        res["append /etc/hosts"] = attempt(lambda: open("/etc/hosts", "a").write("x"))
        res["unlink /etc/hostname"] = attempt(os.unlink, "/etc/hostname")
        res["append /etc/passwd"] = attempt(lambda: open("/etc/passwd", "a").write("x"))
        res["chmod /usr/bin/env"] = attempt(os.chmod, "/usr/bin/env", 0o4777)
        res["mkdir /new"] = attempt(os.mkdir, "/new")
        res["rename /etc/hosts"] = attempt(os.rename, "/etc/hosts", "/etc/hosts2")
        res["truncate python"] = attempt(os.truncate, os.path.realpath(sys.executable), 0)
        report(**res)
    """)
    bad = {k: v for k, v in out.items() if v not in WRITE_DENIED}
    assert not bad, bad


def test_scratch_space_is_writable(sandbox: Runner) -> None:
    out = sandbox.probe("""
        res = {}
        for d in ("/tmp", "/workspace", "/dev/shm"):
            p = os.path.join(d, "probe")
            with open(p, "w") as f:
                f.write(d)
            res[d] = open(p).read()
        report(cwd=os.getcwd(), home=os.environ["HOME"], res=res)
    """)
    assert out["cwd"] == "/workspace" and out["home"] == "/workspace"
    assert out["res"] == {"/tmp": "/tmp", "/workspace": "/workspace", "/dev/shm": "/dev/shm"}


def test_scratch_space_is_capped_by_disk(sandbox: Runner) -> None:
    out = sandbox.probe("""
        def fill(path, limit):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            written = 0
            try:
                while written < limit:
                    written += os.write(fd, b"x" * (1 << 20))
                return written, "OK"
            except OSError as e:
                return written, errno.errorcode[e.errno]
            finally:
                os.close(fd)
        report(tmp=fill("/tmp/big", 16 << 20), ws=fill("/workspace/big", 16 << 20))
    """, disk="4M")
    written, err = out["tmp"]
    assert err == "ENOSPC" and written <= 4 << 20
    # /tmp and /workspace share the cap: the second file finds it used up.
    assert out["ws"][1] == "ENOSPC" and written + out["ws"][0] <= 4 << 20


def test_proc_shows_only_the_sandbox(sandbox: Runner) -> None:
    caller = sandbox.stats()["pid"]
    host_init = Path("/proc/1/cmdline").read_bytes()
    out = sandbox.probe(f"""
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        report(pids=pids, me=os.getpid(), ppid=os.getppid(),
               caller=attempt(os.stat, "/proc/{caller}"),
               init=open("/proc/1/cmdline", "rb").read().hex())
    """)
    # PID 1 is cellblock's init, the command is its first child; nothing else exists.
    assert out["pids"] == [1, out["me"]] and out["ppid"] == 1 and out["me"] == 2
    assert out["caller"] == "ENOENT"
    assert bytes.fromhex(out["init"]) != host_init


def test_proc_sys_is_read_only(sandbox: Runner) -> None:
    # Global knobs are only opened for writing, never written: success would already be the bug.
    knobs = [p for p in ("/proc/sys/vm/drop_caches", "/proc/sys/kernel/core_pattern",
                         "/proc/sysrq-trigger") if os.path.exists(p)]
    out = sandbox.probe(f"""
        def write(p, data):
            with open(p, "w") as f:
                f.write(data)
        def open_for_write(p):
            os.close(os.open(p, os.O_WRONLY))
        res = {{p: attempt(open_for_write, p) for p in {knobs!r}}}
        report(hostname=attempt(write, "/proc/sys/kernel/hostname", "escaped"),
               readable=open("/proc/sys/kernel/ostype").read().strip(), **res)
    """)
    assert out.pop("readable") == "Linux"
    bad = {k: v for k, v in out.items() if v not in WRITE_DENIED}
    assert not bad, bad


def test_dev_is_minimal(sandbox: Runner) -> None:
    out = sandbox.probe("""
        def write(p):
            with open(p, "wb", buffering=0) as f:
                f.write(b"x")
        report(dev=sorted(os.listdir("/dev")), pts=os.listdir("/dev/pts"),
               null=attempt(write, "/dev/null"), full=attempt(write, "/dev/full"),
               urandom=len(open("/dev/urandom", "rb").read(16)),
               zero=open("/dev/zero", "rb").read(4).hex(),
               mknod=attempt(os.mknod, "/tmp/disk", 0o600 | 0o060000, os.makedev(8, 0)),
               mem=attempt(os.stat, "/dev/mem"))
    """)
    assert set(out["dev"]) == DEVICES | DEV_EXTRAS
    # The sandbox's own devpts instance: its ptmx, no terminal of the host (see test_tty.py).
    assert out["pts"] == ["ptmx"]
    assert out["null"] == "OK" and out["full"] == "ENOSPC"
    assert out["urandom"] == 16 and out["zero"] == "00000000"
    assert out["mknod"] == "EPERM" and out["mem"] == "ENOENT"


def test_python3_is_the_callers_interpreter(sandbox: Runner) -> None:
    prefix = sandbox.stats()["prefix"]
    out = sandbox.probe("""
        import shutil
        report(prefix=os.path.realpath(sys.base_prefix), which=shutil.which("python3"))
    """)
    assert out["prefix"] == prefix
    assert out["which"].startswith(prefix + "/")


def test_files_do_not_survive_a_run(sandbox: Runner) -> None:
    name = f"planted-{secrets.token_hex(6)}"
    paths = [f"/tmp/{name}", f"/workspace/{name}", f"/dev/shm/{name}"]
    planted = sandbox.probe(f"""
        for p in {paths!r}:
            open(p, "w").write("x")
        report(ok=all(os.path.exists(p) for p in {paths!r}))
    """)
    assert planted["ok"]
    later = sandbox.probe(f"report(**{{p: attempt(os.stat, p) for p in {paths!r}}})")
    assert later == {p: "ENOENT" for p in paths}
    assert not any(os.path.lexists(p) for p in (f"/tmp/{name}", f"/dev/shm/{name}"))


@pytest.mark.parametrize("path", ["/", "/usr", "/tmp", "/proc", "/dev"])
def test_mounts_are_nosuid(sandbox: Runner, path: str) -> None:
    out = sandbox.probe(f"report(flags=os.statvfs({path!r}).f_flag)")
    assert out["flags"] & os.ST_NOSUID
