"""Host details are masked inside the sandbox: attempts from inside to read the host's boot
arguments and other host-describing /proc entries, and what /proc/self/mountinfo still shows
(a kernel limit, documented in the README and checked here against what it says).
"""

from __future__ import annotations

import os
from pathlib import Path

from conftest import REPO, Runner

#: Entries the core masks (rust/core/src/fs.rs MASKED_PROC_FILES / MASKED_PROC_DIRS).
MASKED_FILES = ["cmdline", "version", "modules", "partitions", "diskstats", "swaps",
                "devices", "interrupts", "iomem", "ioports", "kallsyms", "timer_list",
                "sched_debug", "zoneinfo", "buddyinfo", "consoles", "keys", "key-users",
                "mdstat", "locks", "cgroups", "sys/kernel/random/boot_id",
                # Host paths and helpers the kernel runs (core dumps, module loading, power-off).
                "sys/kernel/core_pattern", "sys/kernel/modprobe", "sys/kernel/poweroff_cmd"]
MASKED_DIRS = ["acpi", "bus", "driver", "fs", "irq", "scsi", "tty", "asound", "pressure"]


def test_host_describing_proc_entries_read_empty(sandbox: Runner) -> None:
    host_cmdline = Path("/proc/cmdline").read_text().strip()
    assert host_cmdline, "the host has boot arguments to hide"
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    out = sandbox.probe(f"""
        files, dirs = {MASKED_FILES!r}, {MASKED_DIRS!r}
        def read(p):
            try:
                with open(p, "rb") as f:
                    return f.read(65536).decode(errors="replace")
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
        def write(p):
            with open(p, "w") as f:
                f.write("x")
        def listing(p):
            try:
                return os.listdir(p)
            except OSError as e:
                return errno.errorcode.get(e.errno, str(e.errno))
        report(files={{n: read("/proc/" + n) for n in files if os.path.exists("/proc/" + n)}},
               dirs={{n: listing("/proc/" + n) for n in dirs if os.path.exists("/proc/" + n)}},
               write_dir=attempt(write, "/proc/acpi/x") if os.path.exists("/proc/acpi") else None,
               write_sys={{n: attempt(write, "/proc/" + n) for n in files
                           if n.startswith("sys/") and os.path.exists("/proc/" + n)}},
               after_write={{n: read("/proc/" + n) for n in files
                             if n.startswith("sys/") and os.path.exists("/proc/" + n)}},
               # The sandbox's own entries are still there.
               self_status=read("/proc/self/status")[:5], uptime=bool(read("/proc/uptime")))
    """)
    host_files = [n for n in MASKED_FILES if os.path.exists(f"/proc/{n}")]
    host_dirs = [n for n in MASKED_DIRS if os.path.exists(f"/proc/{n}")]
    assert "cmdline" in host_files and sorted(out["files"]) == sorted(host_files)
    assert out["files"] == {n: "" for n in host_files}, out["files"]
    assert host_cmdline not in repr(out)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert boot_id and boot_id not in repr(out)
    assert out["dirs"] == {n: [] for n in host_dirs}, out["dirs"]
    # A write to a masked /proc/sys entry reaches nothing of the host's (it goes to /dev/null
    # or is refused); the host's crash-dump helper is as it was.
    sys_files = [n for n in host_files if n.startswith("sys/")]
    assert "sys/kernel/core_pattern" in sys_files
    assert set(out["write_sys"]) == set(sys_files), out["write_sys"]
    assert out["after_write"] == {n: "" for n in sys_files}, out["after_write"]
    assert Path("/proc/sys/kernel/core_pattern").read_text() == core_pattern
    if "acpi" in host_dirs:
        assert out["write_dir"] in ("EROFS", "EACCES"), out["write_dir"]
    assert out["self_status"] == "Name:" and out["uptime"] is True


def test_mountinfo_shows_only_what_the_readme_documents(sandbox: Runner) -> None:
    # Not maskable (generated per reader): it lists the sandbox's own mounts, and for binds
    # the source path inside the host filesystem: the system directories and the runtime
    # prefixes bound at their host paths. Nothing else of the host's tree.
    prefixes = sandbox.stats()["ro_binds"]
    out = sandbox.probe("""
        lines = open("/proc/self/mountinfo").read().splitlines()
        report(mounts=[(l.split()[3], l.split()[4]) for l in lines])
    """)
    shown = {root for root, _ in out["mounts"]}
    points = {point for _, point in out["mounts"]}
    for prefix in prefixes:
        assert prefix in points, (prefix, points)
    system = {"/", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/tmp",
              "/workspace", "/shm", "/null", "/zero", "/full", "/random", "/urandom", "/tty",
              "/sys", "/.cellblock-empty", "/.cellblock-empty-dir"}
    for root in shown:
        assert root in system or root in prefixes or root.startswith("/etc/"), root
    assert not any(r.startswith(("/work/", "/home", "/var/run")) for r in shown), shown
    readme = (REPO / "README.md").read_text()
    assert "/proc/self/mountinfo" in readme and "runtime prefixes" in readme
    assert "/proc/cmdline" in readme
