//! One step of building the root ([`Op`]) and its replay in the forked child with raw
//! syscalls only (no allocation).

use crate::error::errno;
use std::ffi::CString;

pub(super) const MS_MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MS_MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(super) const MS_MOUNT_ATTR_NODEV: u64 = 0x4;
pub(super) const MS_MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// One step of building the root.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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

pub(super) fn apply_op(op: &Op) -> Result<(), i32> {
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
