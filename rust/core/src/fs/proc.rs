//! The host-describing entries of the sandbox's /proc, masked: files with an empty file or
//! `/dev/null` bound over them, directories with an empty read-only directory.

use super::builder::Builder;
use crate::error::Result;

/// /proc files that describe the host (boot arguments, kernel build and configuration,
/// modules, disks, RAID, devices, interrupts, memory layout, timers, keys, every file lock of
/// the machine, its cgroup controllers, its boot id, the host paths and helpers the kernel runs
/// for core dumps, module loading and power-off) rather
/// than the sandbox: inside they read as empty (`/dev/null` bound over them).
///
/// Not masked: `/proc/uptime` and `btime` in `/proc/stat`. Programs read both (uptime,
/// psutil, top), so an empty file would break them; the sandbox's time namespace (see
/// [`crate::timens`]), whose boot-time offset the kernel applies to both, shows the sandbox's
/// uptime and creation time in them instead of the host's.
pub const MASKED_PROC_FILES: &[&str] = &[
    "mdstat",
    "locks",
    "cgroups",
    "sys/kernel/random/boot_id",
    "sys/kernel/core_pattern",
    "sys/kernel/modprobe",
    "sys/kernel/poweroff_cmd",
    "cmdline",
    "bootconfig",
    "config.gz",
    "version",
    "kallsyms",
    "kcore",
    "modules",
    "partitions",
    "diskstats",
    "swaps",
    "devices",
    "interrupts",
    "softirqs",
    "iomem",
    "ioports",
    "dma",
    "misc",
    "mtrr",
    "consoles",
    "keys",
    "key-users",
    "latency_stats",
    "timer_list",
    "sched_debug",
    "slabinfo",
    "vmallocinfo",
    "pagetypeinfo",
    "buddyinfo",
    "zoneinfo",
];

/// /proc directories that describe the host's hardware, drivers and load (pressure stall
/// information of the whole machine): inside they are empty (one empty directory of the root
/// bound read-only over each: a bind costs ~2 us where a tmpfs, a new superblock, costs ~27).
pub const MASKED_PROC_DIRS: &[&str] = &[
    "acpi", "asound", "bus", "driver", "fs", "irq", "scsi", "tty", "pressure",
];

/// An empty file in the root, bound read-only over the masked entries of /proc/sys.
const EMPTY_FILE: &str = "/.cellblock-empty";
/// An empty directory (in the root's tmpfs, or beside a rootfs's overlay), bound read-only
/// over the masked directories of /proc.
pub(super) const EMPTY_DIR: &str = "/.cellblock-empty-dir";

/// Masks the host-describing entries of the sandbox's /proc (those for which `exists` says
/// the kernel has them). Needs /proc mounted and /dev/null bound in the new root.
///
/// What the kernel still shows: `/proc/self/mountinfo` (and `/proc/<pid>/mountinfo`,
/// `/proc/mounts`) is generated per reader and cannot be overmounted for every process; it
/// lists every mount of the sandbox with, for each bind, the path of its source inside the
/// host filesystem (e.g. `/usr`, or a runtime prefix such as `/root/.pyenv/versions/3.11.7`,
/// bound at that same path so that its compiled-in paths keep working), the filesystem type
/// and the host's device numbers. Nothing else of the host's tree is listed.
pub(super) fn mask_host_proc(b: &mut Builder<'_>, exists: impl Fn(&str) -> bool) -> Result<()> {
    let files: Vec<&str> = MASKED_PROC_FILES
        .iter()
        .copied()
        .filter(|n| exists(n))
        .collect();
    if files.iter().any(|n| n.starts_with("sys/")) {
        b.write(EMPTY_FILE, Vec::new())?;
    }
    for name in files {
        if name.starts_with("sys/") {
            // /proc/sys stays read-only: an empty regular file, bound read-only, refuses
            // writes (EROFS) where a device node would ignore the mount's read-only flag.
            b.bind(EMPTY_FILE, &format!("/proc/{name}"), true, true)?;
        } else {
            b.bind("/dev/null", &format!("/proc/{name}"), false, true)?;
        }
    }
    let dirs: Vec<&str> = MASKED_PROC_DIRS
        .iter()
        .copied()
        .filter(|n| exists(n))
        .collect();
    if !dirs.is_empty() {
        // Nothing can be created in it: each bind is read-only (and so is the root).
        let empty = b.empty_dir(EMPTY_DIR)?;
        for name in dirs {
            b.bind(&empty, &format!("/proc/{name}"), true, false)?;
        }
    }
    Ok(())
}
