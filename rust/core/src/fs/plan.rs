//! The mount plan: [`MountPlan::build`] decides the root's whole layout in the parent,
//! [`MountPlan::with_ca`] adds a sandbox CA to it, [`MountPlan::apply`] replays it in the child.

use super::builder::{check_rootfs, cstr, overlay_ops, under, Builder};
use super::op::{
    apply_op, Op, MS_MOUNT_ATTR_NODEV, MS_MOUNT_ATTR_NOEXEC, MS_MOUNT_ATTR_NOSUID,
    MS_MOUNT_ATTR_RDONLY,
};
use super::proc::mask_host_proc;
use super::{
    BASE_CANDIDATES, CA_BUNDLE, COPY_MAX, DEVICES, DEVPTS_OPTIONS, ETC_ALLOW, SYSTEM_DIRS,
    WORKSPACE,
};
use crate::error::{Error, Result};
use std::ffi::CString;
use std::path::Path;

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
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MountPlan {
    /// Directory the new root is mounted on (inside the private mount namespace).
    pub base: CString,
    /// The steps, in order.
    pub ops: Vec<Op>,
}

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

#[cfg(test)]
mod tests;
