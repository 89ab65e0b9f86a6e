//! The sandbox filesystem: a fresh tmpfs root with read-only binds of the runtime, or (with a
//! `rootfs`) a read-only overlay of two lower layers: a small tmpfs directory holding the
//! generated files and mount points, over that directory. Nothing is ever written to it.
//!
//! [`MountPlan::build`] decides everything in the parent (pure apart from reading the host's
//! directory entries); [`MountPlan::apply`] replays the plan in the forked child with raw
//! syscalls only — no allocation — and reports the index of a failing step.

use crate::error::errno;
use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

mod cache;
pub use cache::cached;

/// Where the new root is assembled (in the child's private mount namespace, so the host never
/// sees it). The first that exists on the host is used.
pub(crate) const BASE_CANDIDATES: &[&str] = &["/mnt", "/tmp", "/var/tmp"];

/// Host directories bound read-only when they exist (symlinks, as on merged-/usr systems, are
/// recreated as symlinks).
pub(crate) const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
];

/// What of the host's /etc runtimes need. Everything else (shadow, ssh keys, sudoers, the host's
/// user list) stays invisible.
pub(crate) const ETC_ALLOW: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pki",
    "profile",
    "protocols",
    "python3",
    "python3.11",
    "rpc",
    "services",
    "ssl",
    "timezone",
];

/// /etc files up to this size are copied rather than bound.
const COPY_MAX: u64 = 256 * 1024;

/// Host device nodes bound into the sandbox's /dev.
pub(crate) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Options of the sandbox's devpts mount: a new instance whose ptmx anyone inside may open,
/// holding at most 256 terminals (every instance draws on the kernel's one `kernel.pty.max`
/// pool, so an unbounded sandbox could leave other containers on the host without ptys).
pub const DEVPTS_OPTIONS: &str = "newinstance,ptmxmode=0666,mode=0620,max=256";

/// Hostname inside every sandbox.
pub const HOSTNAME: &str = "cellblock";

/// Working directory (and HOME) of runs.
pub const WORKSPACE: &str = "/workspace";

const MS_MOUNT_ATTR_RDONLY: u64 = 0x1;
const MS_MOUNT_ATTR_NOSUID: u64 = 0x2;
const MS_MOUNT_ATTR_NODEV: u64 = 0x4;
const MS_MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// One step of building the root.
#[derive(Debug, Clone)]
pub enum Op {
    /// `mkdir(path, mode)`; an existing directory is fine.
    Mkdir(CString, u32),
    /// Create an empty file (a mount point for a file bind).
    Touch(CString),
    /// `symlink(target, link)`.
    Symlink(CString, CString),
    /// Create `path` with `data` (mode 0644).
    Write(CString, Vec<u8>),
    /// `mount(2)`.
    Mount {
        /// Source (None for pseudo filesystems).
        src: Option<CString>,
        /// Mount point.
        dst: CString,
        /// Filesystem type (None for binds).
        fstype: Option<CString>,
        /// MS_* flags.
        flags: libc::c_ulong,
        /// Filesystem options.
        data: Option<CString>,
    },
    /// `mount_setattr(2)`: set MOUNT_ATTR_* on `path` (recursively when asked).
    SetAttr(CString, u64, bool),
    /// `chown(path, uid, uid)`.
    Chown(CString, u32),
    /// `chmod(path, mode)` (mkdir's mode is filtered by the umask; this is not).
    Chmod(CString, u32),
    /// `umount2(path, MNT_DETACH)`.
    Detach(CString),
    /// `rmdir(path)`.
    Rmdir(CString),
}

impl Op {
    /// Human description for error messages.
    pub fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Op::Mkdir(p, _) => format!("mkdir {}", s(p)),
            Op::Touch(p) => format!("create {}", s(p)),
            Op::Symlink(t, l) => format!("symlink {} -> {}", s(l), s(t)),
            Op::Write(p, _) => format!("write {}", s(p)),
            Op::Mount {
                src, dst, fstype, ..
            } => format!(
                "mount {} on {} ({})",
                src.as_ref().map(s).unwrap_or_default(),
                s(dst),
                fstype.as_ref().map(s).unwrap_or_else(|| "bind".into())
            ),
            Op::SetAttr(p, _, _) => format!("set mount attributes of {}", s(p)),
            Op::Chown(p, _) => format!("chown {}", s(p)),
            Op::Chmod(p, _) => format!("chmod {}", s(p)),
            Op::Detach(p) => format!("unmount {}", s(p)),
            Op::Rmdir(p) => format!("rmdir {}", s(p)),
        }
    }
}

/// Inputs of a mount plan.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Size cap of the scratch tmpfs (/tmp, /workspace, /dev/shm), bytes.
    pub disk: u64,
    /// Owner (uid and gid, as seen by the process doing the mounts) of writable directories.
    pub owner: u32,
    /// Extra read-only binds (same path inside).
    pub ro_binds: &'a [String],
    /// A host directory that becomes the root (read-only overlay lower layer) instead of the
    /// host's system directories and filtered /etc.
    pub rootfs: Option<&'a str>,
    /// Content of /etc/resolv.conf.
    pub resolv_conf: &'a str,
}

/// The complete, prepared list of steps that builds the sandbox root.
#[derive(Debug)]
pub struct MountPlan {
    /// Directory the new root is mounted on (inside the private mount namespace).
    pub base: CString,
    /// The steps, in order.
    pub ops: Vec<Op>,
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString> {
    CString::new(s.as_ref().to_vec())
        .map_err(|_| Error::InvalidSpec("path contains a NUL byte".into()))
}

/// Path under the new root.
fn under(base: &str, path: &str) -> String {
    format!("{base}{path}")
}

/// Where the sandbox finds the CA bundle that trusts its own CA (credential runs).
pub const CA_BUNDLE: &str = "/etc/cellblock/ca-certificates.crt";

/// The system bundle replaced (by a bind of [`CA_BUNDLE`]) when the host has it.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

impl MountPlan {
    /// A copy of `self` whose sandbox trusts `ca_pem` on top of the host's CAs: written to
    /// [`CA_BUNDLE`] (with the host's bundle) and bound read-only over the system bundle when
    /// the host has one (a regular file, no symlink on its path).
    pub fn with_ca(&self, ca_pem: &str) -> Result<MountPlan> {
        let base = self
            .base
            .to_str()
            .map_err(|_| Error::InvalidSpec("base path".into()))?;
        // Generated files are written under the root, or, on a rootfs, into the overlay's top
        // layer before the overlay is mounted (see `build`).
        let gen = base
            .strip_suffix("/.root")
            .map(|host| format!("{host}/.gen"));
        let written_at = |prefix: &str| -> Result<Option<usize>> {
            let resolv = cstr(under(prefix, "/etc/resolv.conf"))?;
            Ok(self
                .ops
                .iter()
                .position(|op| matches!(op, Op::Write(p, _) if *p == resolv))
                .map(|i| i + 1))
        };
        let (prefix, at, rootfs) = match (written_at(base)?, &gen) {
            (Some(at), _) => (base, at, false),
            (None, Some(gen)) => match written_at(gen)? {
                Some(at) => (gen.as_str(), at, true),
                None => return Err(Error::InvalidSpec("mount plan without /etc".into())),
            },
            (None, None) => return Err(Error::InvalidSpec("mount plan without /etc".into())),
        };
        // A rootfs keeps its own system bundle: the sandbox's clients find the CA through the
        // variables pointing at CA_BUNDLE.
        let plain = !rootfs
            && ["/etc", "/etc/ssl", "/etc/ssl/certs", SYSTEM_CA_BUNDLE]
                .iter()
                .all(|p| {
                    Path::new(p)
                        .symlink_metadata()
                        .is_ok_and(|m| !m.file_type().is_symlink())
                });
        let mut bundle = if plain {
            std::fs::read(SYSTEM_CA_BUNDLE).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !bundle.is_empty() && !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(ca_pem.as_bytes());
        let mut ops = Vec::new();
        let mut pre = Vec::new();
        let mut b = Builder {
            base: prefix,
            gen: None,
            pre: &mut pre,
            ops: &mut ops,
        };
        b.mkdir_p("/etc/cellblock")?;
        b.ops
            .push(Op::Write(cstr(under(prefix, CA_BUNDLE))?, bundle));
        if plain {
            b.bind(CA_BUNDLE, SYSTEM_CA_BUNDLE, true, true)?;
        }
        let mut all = self.ops.clone();
        all.splice(at..at, ops);
        Ok(MountPlan {
            base: self.base.clone(),
            ops: all,
        })
    }

    /// Decides the root's layout from the host's state and the inputs.
    pub fn build(input: &PlanInput<'_>) -> Result<MountPlan> {
        let host_base = BASE_CANDIDATES
            .iter()
            .find(|p| Path::new(p).is_dir())
            .ok_or_else(|| Error::InvalidSpec("no directory to assemble the root in".into()))?;
        let mut ops = Vec::new();
        let mut pre = Vec::new();
        // The root: a small tmpfs holding only mount points and generated files; with a rootfs,
        // that tmpfs holds the top layer (`gen`) of an overlay over it.
        if let Some(rootfs) = input.rootfs {
            check_rootfs(rootfs)?;
        }
        let overlay = input.rootfs.is_some();
        let base = if overlay {
            format!("{host_base}/.root")
        } else {
            host_base.to_string()
        };
        let gen = format!("{host_base}/.gen");
        let base = base.as_str();
        let mut b = Builder {
            base,
            gen: overlay.then_some(gen.as_str()),
            pre: &mut pre,
            ops: &mut ops,
        };
        if !overlay {
            b.mount(
                None,
                "",
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_NODEV,
                Some("size=1m,mode=0755"),
            )?;
            for dir in SYSTEM_DIRS {
                b.bind_host(dir)?;
            }
        }
        for dir in input.ro_binds {
            let p = Path::new(dir);
            if !p.is_absolute() {
                return Err(Error::InvalidSpec(format!(
                    "ro_binds: {dir:?} is not absolute"
                )));
            }
            // Already visible through a system directory bind.
            if !overlay && SYSTEM_DIRS.iter().any(|s| p.starts_with(s)) {
                continue;
            }
            if !p.is_dir() {
                return Err(Error::InvalidSpec(format!(
                    "ro_binds: {dir:?} is not a directory"
                )));
            }
            b.mkdir_p(dir)?;
            b.bind(dir, dir, true, false)?;
        }

        // /etc: a filtered view plus generated identity files.
        b.mkdir_p("/etc")?;
        // A rootfs brings its own /etc; the host's is not looked at.
        let etc_allow: &[&str] = if overlay { &[] } else { ETC_ALLOW };
        for name in etc_allow {
            let host = format!("/etc/{name}");
            match Path::new(&host).symlink_metadata() {
                // Small regular files are copied into the root: a write is much cheaper than a
                // bind mount plus its read-only remount, and the root is read-only anyway.
                Ok(m) if m.is_file() && m.len() <= COPY_MAX => match std::fs::read(&host) {
                    Ok(data) => b.write(&host, data)?,
                    Err(_) => continue,
                },
                Ok(_) => b.bind_host(&host)?,
                Err(_) => {}
            }
        }
        let files: [(&str, &[u8]); 5] = [
            ("/etc/passwd", b"root:x:0:0:root:/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
            ("/etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
            ("/etc/hostname", b"cellblock\n"),
            ("/etc/hosts", b"127.0.0.1\tlocalhost cellblock\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
            ("/etc/resolv.conf", input.resolv_conf.as_bytes()),
        ];
        for (path, data) in files {
            b.write(path, data.to_vec())?;
        }

        // Scratch space: one tmpfs capped at `disk`, shared by /tmp, /workspace and /dev/shm so
        // the cap is the total. Its mount point is in the root's tmpfs, or (the overlay being
        // read-only) beside the overlay.
        let scratch = if overlay {
            format!("{host_base}/.scratch")
        } else {
            under(base, "/.scratch")
        };
        b.ops.push(Op::Mkdir(cstr(&scratch)?, 0o755));
        let opts = format!(
            "size={},mode=0755,uid={},gid={}",
            input.disk.max(4096),
            input.owner,
            input.owner
        );
        b.ops.push(Op::Mount {
            src: None,
            dst: cstr(&scratch)?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cstr(&opts)?),
        });
        for (sub, mode) in [("tmp", 0o1777), ("workspace", 0o755), ("shm", 0o1777)] {
            let p = cstr(format!("{scratch}/{sub}"))?;
            b.ops.push(Op::Mkdir(p.clone(), 0o755));
            b.ops.push(Op::Chown(p.clone(), input.owner));
            b.ops.push(Op::Chmod(p, mode));
        }
        b.mkdir_p("/tmp")?;
        b.bind(&format!("{scratch}/tmp"), "/tmp", false, false)?;
        b.mkdir_p(WORKSPACE)?;
        b.bind(&format!("{scratch}/workspace"), WORKSPACE, false, false)?;

        // /dev: a few device nodes, no others.
        b.mkdir_p("/dev")?;
        b.mount(
            None,
            "/dev",
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("size=64k,mode=0755"),
        )?;
        for dev in DEVICES {
            let host = format!("/dev/{dev}");
            if Path::new(&host).exists() {
                b.ops.push(Op::Touch(cstr(under(base, &host))?));
                b.bind(&host, &host, false, false)?;
                let dst = cstr(under(base, &host))?;
                b.ops.push(Op::SetAttr(
                    dst,
                    MS_MOUNT_ATTR_NOSUID | MS_MOUNT_ATTR_NOEXEC,
                    false,
                ));
            }
        }
        b.mkdir_p("/dev/shm")?;
        b.bind(&format!("{scratch}/shm"), "/dev/shm", false, false)?;
        // A private devpts instance: the sandbox's terminals are its own, none of the host's is
        // listed or reachable. No gid= option: the sandbox has no tty group (slaves get the
        // opener's gid), and on the unprivileged path only gid 0 is mapped anyway.
        b.mkdir_p("/dev/pts")?;
        b.mount(
            Some("devpts"),
            "/dev/pts",
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(DEVPTS_OPTIONS),
        )?;
        for (link, target) in [
            ("/dev/ptmx", "pts/ptmx"),
            ("/dev/fd", "/proc/self/fd"),
            ("/dev/stdin", "/proc/self/fd/0"),
            ("/dev/stdout", "/proc/self/fd/1"),
            ("/dev/stderr", "/proc/self/fd/2"),
        ] {
            b.ops
                .push(Op::Symlink(cstr(target)?, cstr(under(base, link))?));
        }
        // The scratch mount point itself is not needed once its parts are bound.
        b.ops.push(Op::Detach(cstr(&scratch)?));
        b.ops.push(Op::Rmdir(cstr(&scratch)?));

        // /proc for the new pid namespace, with /proc/sys read-only.
        b.mkdir_p("/proc")?;
        b.mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            None,
        )?;
        b.bind("/proc/sys", "/proc/sys", false, true)?;
        let sys = cstr(under(base, "/proc/sys"))?;
        b.ops.push(Op::SetAttr(
            sys,
            MS_MOUNT_ATTR_RDONLY
                | MS_MOUNT_ATTR_NOSUID
                | MS_MOUNT_ATTR_NODEV
                | MS_MOUNT_ATTR_NOEXEC,
            true,
        ));
        mask_host_proc(&mut b, |name| Path::new("/proc").join(name).exists())?;
        if let Some(rootfs) = input.rootfs {
            let mut all = overlay_ops(host_base, &gen, base, rootfs, pre)?;
            all.append(&mut ops);
            ops = all;
        }
        Ok(MountPlan {
            base: cstr(base)?,
            ops,
        })
    }

    /// Replays the plan. Child-side: raw syscalls only, no allocation. On failure returns the
    /// index of the failing op and errno.
    pub fn apply(&self) -> Result<(), (u32, i32)> {
        for (i, op) in self.ops.iter().enumerate() {
            if let Err(errno) = apply_op(op) {
                return Err((i as u32, errno));
            }
        }
        Ok(())
    }
}

/// /proc files that describe the host (boot arguments, kernel build and configuration,
/// modules, disks, RAID, devices, interrupts, memory layout, timers, keys, every file lock of
/// the machine, its cgroup controllers, its boot id, the host paths and helpers the kernel runs
/// for core dumps, module loading and power-off) rather
/// than the sandbox: inside they read as empty (`/dev/null` bound over them).
///
/// Not masked: the host's boot time (`/proc/uptime`, `btime` in `/proc/stat`). Programs read
/// both (uptime, psutil, top), so an empty file would break them; the honest fix is a time
/// namespace (CLONE_NEWTIME, Linux >= 5.6, whose boottime offset the kernel applies to both
/// files), which belongs to the spawn path. What they reveal is when the host booted, not
/// its configuration.
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
/// information of the whole machine): inside they are empty (a read-only tmpfs over each).
pub const MASKED_PROC_DIRS: &[&str] = &[
    "acpi", "asound", "bus", "driver", "fs", "irq", "scsi", "tty", "pressure",
];

/// Masks the host-describing entries of the sandbox's /proc (those for which `exists` says
/// the kernel has them). Needs /proc mounted and /dev/null bound in the new root.
///
/// What the kernel still shows: `/proc/self/mountinfo` (and `/proc/<pid>/mountinfo`,
/// `/proc/mounts`) is generated per reader and cannot be overmounted for every process; it
/// lists every mount of the sandbox with, for each bind, the path of its source inside the
/// host filesystem (e.g. `/usr`, or a runtime prefix such as `/root/.pyenv/versions/3.11.7`,
/// bound at that same path so that its compiled-in paths keep working), the filesystem type
/// and the host's device numbers. Nothing else of the host's tree is listed.
/// An empty file in the root, bound read-only over the masked entries of /proc/sys.
const EMPTY_FILE: &str = "/.cellblock-empty";

fn mask_host_proc(b: &mut Builder<'_>, exists: impl Fn(&str) -> bool) -> Result<()> {
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
    for name in MASKED_PROC_DIRS.iter().filter(|n| exists(n)) {
        b.mount(
            None,
            &format!("/proc/{name}"),
            Some("tmpfs"),
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("size=4k,mode=0555"),
        )?;
    }
    Ok(())
}

/// Characters that would end or split a path inside overlayfs's option string.
const OVERLAY_OPTION_CHARS: &[char] = &[',', ':', '\\', '=', '\n'];

/// Refuses a rootfs overlayfs cannot take or that is not a directory.
fn check_rootfs(rootfs: &str) -> Result<()> {
    let path = Path::new(rootfs);
    if !path.is_absolute() {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} is not absolute"
        )));
    }
    if rootfs.contains(OVERLAY_OPTION_CHARS) {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} contains one of , : \\ = or a newline (overlayfs cannot take it)"
        )));
    }
    if !path.is_dir() {
        return Err(Error::InvalidSpec(format!(
            "rootfs: {rootfs:?} is not a directory"
        )));
    }
    Ok(())
}

/// The steps that come before the rest with a rootfs: the tmpfs on `host_base`, the `gen`
/// layer's directories and files (`pre`), then the overlay of `gen` over `rootfs` on `root`.
/// No upper layer: the overlay is read-only, and entries of `gen` hide whatever the rootfs
/// has at those names (a symlink where the plan needs a directory is never followed).
fn overlay_ops(
    host_base: &str,
    gen: &str,
    root: &str,
    rootfs: &str,
    pre: Vec<Op>,
) -> Result<Vec<Op>> {
    let mut ops = vec![
        Op::Mount {
            src: None,
            dst: cstr(host_base)?,
            fstype: Some(cstr("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(cstr("size=1m,mode=0755")?),
        },
        Op::Mkdir(cstr(gen)?, 0o755),
        Op::Mkdir(cstr(root)?, 0o755),
    ];
    ops.extend(pre);
    // nosuid and nodev: a setuid file or a device node in the rootfs is inert.
    ops.push(Op::Mount {
        src: Some(cstr("overlay")?),
        dst: cstr(root)?,
        fstype: Some(cstr("overlay")?),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(cstr(format!("lowerdir={gen}:{rootfs}"))?),
    });
    Ok(ops)
}

struct Builder<'a> {
    base: &'a str,
    /// With a rootfs: the top layer's directory, where mount points and generated files are
    /// made (into `pre`) before the read-only overlay is mounted.
    gen: Option<&'a str>,
    pre: &'a mut Vec<Op>,
    ops: &'a mut Vec<Op>,
}

impl Builder<'_> {
    fn mkdir_p(&mut self, path: &str) -> Result<()> {
        let mut cur = String::new();
        for part in path.split('/').filter(|s| !s.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if let Some(gen) = self.gen {
                self.pre.push(Op::Mkdir(cstr(under(gen, &cur))?, 0o755));
            }
            // With a rootfs this exists already (from gen: EEXIST), unless it is inside a
            // tmpfs mounted on the overlay (/dev/shm).
            self.ops
                .push(Op::Mkdir(cstr(under(self.base, &cur))?, 0o755));
        }
        Ok(())
    }

    /// A generated file (mode 0644): in the root's tmpfs, or in the rootfs's top layer.
    fn write(&mut self, path: &str, data: Vec<u8>) -> Result<()> {
        match self.gen {
            Some(gen) => self.pre.push(Op::Write(cstr(under(gen, path))?, data)),
            None => self
                .ops
                .push(Op::Write(cstr(under(self.base, path))?, data)),
        }
        Ok(())
    }

    fn mount(
        &mut self,
        src: Option<&str>,
        dst: &str,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> Result<()> {
        self.ops.push(Op::Mount {
            src: src.map(cstr).transpose()?,
            dst: cstr(under(self.base, dst))?,
            fstype: fstype.map(cstr).transpose()?,
            flags,
            data: data.map(cstr).transpose()?,
        });
        Ok(())
    }

    /// Bind `src` (host path, or a path under the new root when `src_in_root`) onto `dst`.
    fn bind(&mut self, src: &str, dst: &str, readonly: bool, src_in_root: bool) -> Result<()> {
        let src_path = if src_in_root {
            under(self.base, src)
        } else {
            src.to_string()
        };
        self.ops.push(Op::Mount {
            src: Some(cstr(src_path)?),
            dst: cstr(under(self.base, dst))?,
            fstype: None,
            flags: libc::MS_BIND | libc::MS_REC,
            data: None,
        });
        if readonly {
            self.ops.push(Op::SetAttr(
                cstr(under(self.base, dst))?,
                MS_MOUNT_ATTR_RDONLY | MS_MOUNT_ATTR_NOSUID | MS_MOUNT_ATTR_NODEV,
                true,
            ));
        }
        Ok(())
    }

    /// Mirror a host path read-only: directories and files are bound, symlinks recreated.
    fn bind_host(&mut self, path: &str) -> Result<()> {
        let Ok(meta) = Path::new(path).symlink_metadata() else {
            return Ok(());
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(|e| Error::Setup {
                stage: "readlink",
                source: e,
            })?;
            self.ops.push(Op::Symlink(
                cstr(target.as_os_str().as_bytes())?,
                cstr(under(self.base, path))?,
            ));
        } else if meta.is_dir() {
            self.mkdir_p(path)?;
            self.bind(path, path, true, false)?;
        } else {
            self.ops.push(Op::Touch(cstr(under(self.base, path))?));
            self.bind(path, path, true, false)?;
        }
        Ok(())
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(ret: libc::c_long) -> Result<(), i32> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

fn apply_op(op: &Op) -> Result<(), i32> {
    match op {
        Op::Mkdir(p, mode) => {
            // SAFETY: p is a valid NUL-terminated path.
            let r = unsafe { libc::mkdir(p.as_ptr(), *mode) };
            if r < 0 && errno() != libc::EEXIST {
                return Err(errno());
            }
            Ok(())
        }
        Op::Touch(p) => {
            // SAFETY: valid path; the fd is closed right away.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                )
            };
            check(fd as libc::c_long)?;
            // SAFETY: fd was just opened.
            unsafe { libc::close(fd) };
            Ok(())
        }
        Op::Symlink(target, link) => {
            // SAFETY: valid paths.
            check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) } as libc::c_long)
        }
        Op::Write(p, data) => {
            // SAFETY: valid path; fd closed below.
            let fd = unsafe {
                libc::open(
                    p.as_ptr(),
                    libc::O_CREAT
                        | libc::O_WRONLY
                        | libc::O_TRUNC
                        | libc::O_CLOEXEC
                        | libc::O_NOFOLLOW,
                    0o644,
                )
            };
            check(fd as libc::c_long)?;
            let mut off = 0;
            while off < data.len() {
                // SAFETY: the slice bounds are checked by the loop.
                let n = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
                if n <= 0 {
                    let e = errno();
                    // SAFETY: fd is open.
                    unsafe { libc::close(fd) };
                    return Err(e);
                }
                off += n as usize;
            }
            // SAFETY: fd is open.
            unsafe { libc::close(fd) };
            Ok(())
        }
        Op::Mount {
            src,
            dst,
            fstype,
            flags,
            data,
        } => {
            // SAFETY: every pointer is a valid C string or null, as mount(2) allows.
            check(unsafe {
                libc::mount(
                    opt_ptr(src),
                    dst.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                )
            } as libc::c_long)
        }
        Op::SetAttr(p, set, recursive) => {
            let attr = MountAttr {
                attr_set: *set,
                attr_clr: 0,
                propagation: 0,
                userns_fd: 0,
            };
            let flags = if *recursive {
                libc::AT_RECURSIVE as libc::c_uint
            } else {
                0
            };
            // SAFETY: attr lives for the call and its size is passed.
            check(unsafe {
                libc::syscall(
                    libc::SYS_mount_setattr,
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    flags,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                )
            })
        }
        Op::Chown(p, uid) => {
            // SAFETY: valid path.
            check(unsafe { libc::chown(p.as_ptr(), *uid, *uid) } as libc::c_long)
        }
        Op::Chmod(p, mode) => {
            // SAFETY: valid path.
            check(unsafe { libc::chmod(p.as_ptr(), *mode) } as libc::c_long)
        }
        Op::Detach(p) => {
            // SAFETY: valid path.
            check(unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } as libc::c_long)
        }
        Op::Rmdir(p) => {
            // SAFETY: valid path.
            check(unsafe { libc::rmdir(p.as_ptr()) } as libc::c_long)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> MountPlan {
        MountPlan::build(&PlanInput {
            disk: 1 << 20,
            owner: 0,
            ro_binds: &[],
            rootfs: None,
            resolv_conf: "",
        })
        .expect("plan")
    }

    fn descriptions(p: &MountPlan) -> Vec<String> {
        p.ops.iter().map(Op::describe).collect()
    }

    #[test]
    fn plan_never_exposes_secrets_of_etc() {
        let d = descriptions(&plan()).join("\n");
        for bad in ["/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/sudoers"] {
            assert!(
                !d.contains(&format!("mount {bad} ")),
                "{bad} is bound:\n{d}"
            );
        }
        assert!(d.contains("write /"));
    }

    #[test]
    fn plan_has_no_host_home_or_work() {
        let d = descriptions(&plan()).join("\n");
        for bad in [
            "mount /root",
            "mount /home",
            "mount /work",
            "mount /var/run",
            "mount /run",
        ] {
            assert!(!d.contains(bad), "{bad}:\n{d}");
        }
    }

    #[test]
    fn system_binds_are_read_only() {
        let p = plan();
        for (i, op) in p.ops.iter().enumerate() {
            if let Op::Mount {
                src: Some(src),
                fstype: None,
                ..
            } = op
            {
                let s = src.to_string_lossy();
                if s == "/usr" {
                    assert!(
                        matches!(&p.ops[i + 1], Op::SetAttr(_, a, true) if a & MS_MOUNT_ATTR_RDONLY != 0)
                    );
                }
            }
        }
    }

    #[test]
    fn host_describing_proc_entries_are_masked_after_proc_is_mounted() {
        let d = descriptions(&plan());
        let proc_at = d
            .iter()
            .position(|l| l.starts_with("mount proc on ") && l.ends_with("/proc (proc)"))
            .expect("proc is mounted");
        let null_at = d
            .iter()
            .position(|l| l.contains("/dev/null on ") && l.ends_with("/proc/cmdline (bind)"))
            .expect("/proc/cmdline is masked");
        assert!(proc_at < null_at, "{d:?}");
        // Only entries the kernel has are masked (a missing mount point would fail the run).
        let mut b_ops = Vec::new();
        let mut pre = Vec::new();
        let mut b = Builder {
            base: "/mnt",
            gen: None,
            pre: &mut pre,
            ops: &mut b_ops,
        };
        mask_host_proc(&mut b, |n| n == "cmdline" || n == "acpi").expect("masks");
        let masked: Vec<String> = b_ops.iter().map(Op::describe).collect();
        assert_eq!(
            masked,
            [
                "mount /mnt/dev/null on /mnt/proc/cmdline (bind)",
                "mount  on /mnt/proc/acpi (tmpfs)",
            ]
        );
    }

    #[test]
    fn dev_pts_is_a_private_devpts_instance_with_ptmx_linked() {
        let p = plan();
        let devpts = p
            .ops
            .iter()
            .find_map(|op| match op {
                Op::Mount {
                    dst,
                    fstype: Some(t),
                    data,
                    ..
                } if t.as_bytes() == b"devpts" => Some((dst.clone(), data.clone())),
                _ => None,
            })
            .expect("devpts is mounted");
        assert!(devpts.0.to_string_lossy().ends_with("/dev/pts"));
        let data = devpts.1.expect("options").into_string().expect("utf-8");
        assert!(data.split(',').any(|o| o == "newinstance"), "{data}");
        assert!(data.split(',').any(|o| o == "ptmxmode=0666"), "{data}");
        assert!(data.split(',').any(|o| o == "max=256"), "{data}");
        let d = descriptions(&p).join("\n");
        assert!(
            d.contains("symlink /mnt/dev/ptmx -> pts/ptmx") || d.contains("/dev/ptmx -> pts/ptmx"),
            "{d}"
        );
    }

    #[test]
    fn relative_ro_bind_is_rejected() {
        let binds = vec!["relative/dir".to_string()];
        let e = MountPlan::build(&PlanInput {
            disk: 1,
            owner: 0,
            ro_binds: &binds,
            rootfs: None,
            resolv_conf: "",
        });
        assert!(matches!(e, Err(Error::InvalidSpec(_))));
    }

    #[test]
    fn a_rootfs_replaces_the_host_system_dirs_and_etc() {
        let dir =
            std::env::temp_dir().join(format!("cellblock-rootfs-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test dir");
        let rootfs = dir.display().to_string();
        let p = MountPlan::build(&PlanInput {
            disk: 1 << 20,
            owner: 0,
            ro_binds: &[],
            rootfs: Some(&rootfs),
            resolv_conf: "",
        })
        .expect("plan");
        std::fs::remove_dir(&dir).expect("test dir");
        let d = descriptions(&p);
        let joined = d.join("\n");
        assert!(
            d.iter()
                .any(|l| l.starts_with("mount overlay on ") && l.ends_with("(overlay)")),
            "{joined}"
        );
        for host in SYSTEM_DIRS.iter().chain(&["/etc/ssl", "/etc/ld.so.cache"]) {
            assert!(
                !joined.contains(&format!("mount {host} ")),
                "{host}:\n{joined}"
            );
        }
        // Generated files and mount points are made in the top layer before the overlay is
        // mounted; nothing is written through the overlay, which has no upper layer.
        let overlay = d
            .iter()
            .position(|l| l.starts_with("mount overlay on "))
            .expect("overlay");
        let hostname = d
            .iter()
            .position(|l| l.starts_with("write ") && l.ends_with("/.gen/etc/hostname"))
            .expect("hostname is written");
        assert!(hostname < overlay, "{joined}");
        assert!(d
            .iter()
            .any(|l| l.starts_with("mkdir ") && l.ends_with("/.gen/workspace")));
        assert!(!d
            .iter()
            .any(|l| l.starts_with("write ") && l.contains("/.root/")));
        let data = p.ops.iter().find_map(|op| match op {
            Op::Mount {
                fstype: Some(t),
                data: Some(data),
                ..
            } if t.as_bytes() == b"overlay" => Some(data.to_string_lossy().into_owned()),
            _ => None,
        });
        let data = data.expect("overlay options");
        assert!(
            data.starts_with("lowerdir=") && !data.contains("upperdir"),
            "{data}"
        );
        assert!(p.base.to_string_lossy().ends_with("/.root"));
    }

    #[test]
    fn an_unusable_rootfs_is_refused() {
        for bad in ["relative", "/no/such/rootfs", "/tmp/a,upperdir=/etc"] {
            let e = MountPlan::build(&PlanInput {
                disk: 1,
                owner: 0,
                ro_binds: &[],
                rootfs: Some(bad),
                resolv_conf: "",
            });
            assert!(matches!(e, Err(Error::InvalidSpec(_))), "{bad}");
        }
    }
}
