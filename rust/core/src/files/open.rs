//! Resolving and opening one files-API path with the sandbox's view and credentials: the
//! syscall layer of [`super`] (plans are pure data; only [`perform`] touches the kernel).

use super::{cstring, errno_error, io_error, sandbox_path, SCRATCH_MOUNTS};
use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

/// The components of an absolute path, without empty and `.` parts.
fn components(full: &str) -> Vec<&str> {
    full.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect()
}

/// Where and as whom the files API acts for one session: the sandbox's root directory and
/// whether the session was built by root (its uid 0 is then [`crate::spawn::ROOT_PATH_HOST_UID`]
/// on the host).
#[derive(Debug)]
pub struct FilesTarget {
    /// The sandbox's root (`/proc/<holder>/root`, opened `O_PATH`).
    pub root: OwnedFd,
    /// Whether the session was built by root.
    pub as_root: bool,
}

impl FilesTarget {
    /// The target of a live holder (called under the session's lock: the holder is alive and
    /// not reaped, so its pid names it).
    pub(crate) fn of(holder: &crate::spawn::Holder) -> Result<FilesTarget> {
        let p = cstring(&format!("/proc/{}/root", holder.pid))?;
        // SAFETY: open of a path we built; the fd is owned right below.
        let fd = unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(Error::SessionClosed(format!(
                "cannot reach the session's root: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(FilesTarget {
            // SAFETY: fresh fd.
            root: unsafe { OwnedFd::from_raw_fd(fd) },
            as_root: holder.root,
        })
    }
}

/// The calling thread's credentials lowered to the sandbox's (see the module docs) until
/// dropped. Raw syscalls: they change this thread only, never the caller's other threads.
pub(super) struct Lowered {
    as_root: bool,
    caps: [u32; 6],
}

const CAP_VERSION_3: [u32; 2] = [0x2008_0522, 0];

impl Lowered {
    pub(super) fn enter(as_root: bool) -> Result<Lowered> {
        let mut caps = [0u32; 6];
        // SAFETY: capget/capset of this thread with a v3 header and two data structs.
        if unsafe { libc::syscall(libc::SYS_capget, CAP_VERSION_3.as_ptr(), caps.as_mut_ptr()) } < 0
        {
            return Err(Error::setup("read the thread's capabilities"));
        }
        let guard = Lowered { as_root, caps };
        let id = crate::spawn::ROOT_PATH_HOST_UID as libc::c_long;
        // SAFETY: per-thread credential changes; the guard restores them on every path.
        unsafe {
            if as_root
                && (libc::syscall(libc::SYS_setresgid, -1, id, -1) < 0
                    || libc::syscall(libc::SYS_setresuid, -1, id, -1) < 0)
            {
                return Err(Error::setup("take the sandbox's uid"));
            }
            // Effective capabilities: none (permitted kept, to restore them).
            let lowered = [0, caps[1], caps[2], 0, caps[4], caps[5]];
            if libc::syscall(libc::SYS_capset, CAP_VERSION_3.as_ptr(), lowered.as_ptr()) < 0 {
                return Err(Error::setup("drop the thread's capabilities"));
            }
        }
        Ok(guard)
    }
}

impl Drop for Lowered {
    fn drop(&mut self) {
        // SAFETY: restoring this thread's own credentials (the real and saved uid stayed 0, so
        // the effective uid may return to it; capabilities return to what they were).
        unsafe {
            if self.as_root {
                libc::syscall(libc::SYS_setresuid, -1, 0, -1);
                libc::syscall(libc::SYS_setresgid, -1, 0, -1);
            }
            libc::syscall(libc::SYS_capset, CAP_VERSION_3.as_ptr(), self.caps.as_ptr());
        }
    }
}

/// What one operation does inside the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// Open a regular file for reading (symlinks followed inside the sandbox's root).
    Read,
    /// Create the missing parents, then open (create) a regular file for writing, never
    /// through a symlink, truncated once it is known to be a regular file.
    Write,
    /// Open a directory for listing.
    List,
    /// Create the directory and its missing parents.
    MakeDirs,
    /// Remove a file, symlink or empty directory (a symlink itself, never its target).
    Remove,
}

/// A directory to create: its full path, its parent and its name (all in-sandbox).
#[derive(Debug)]
struct DirStep {
    full: CString,
    parent: CString,
    name: CString,
}

/// An operation on one path, with every path it touches prepared.
#[derive(Debug)]
struct Plan {
    op: Op,
    /// The whole path (Read, List; the final check of MakeDirs).
    full: CString,
    /// Parent directory and final name (Write, Remove).
    parent: CString,
    name: CString,
    /// Directories to create, outermost first (Write: the parents; MakeDirs: all).
    dirs: Vec<DirStep>,
}

impl Plan {
    fn new(op: Op, path: &str) -> Result<Plan> {
        let full = sandbox_path(path)?;
        let parts = components(&full);
        let join = |p: &[&str]| format!("/{}", p.join("/"));
        let (parent, name) = match parts.split_last() {
            Some((name, rest)) => (join(rest), name.to_string()),
            None => ("/".to_string(), String::new()),
        };
        if matches!(op, Op::Write | Op::Remove) && name.is_empty() {
            return Err(Error::PathEscape(format!("{path}: not a file name")).at(path));
        }
        let upto = match op {
            Op::Write => parts.len().saturating_sub(1),
            Op::MakeDirs => parts.len(),
            _ => 0,
        };
        let mut dirs = Vec::new();
        for i in 1..=upto {
            dirs.push(DirStep {
                full: cstring(&join(&parts[..i]))?,
                parent: cstring(&join(&parts[..i - 1]))?,
                name: cstring(parts[i - 1])?,
            });
        }
        Ok(Plan {
            op,
            full: cstring(&join(&parts))?,
            parent: cstring(&parent)?,
            name: cstring(if name.is_empty() { "." } else { &name })?,
            dirs,
        })
    }
}

/// Why an operation failed (first word of a [`Fail`]).
mod status {
    /// A syscall failed with the errno in the record.
    pub const ERRNO: u32 = 2;
    /// The path resolved outside the scratch mounts.
    pub const OUTSIDE: u32 = 3;
    /// The path is not a regular file (or not a directory, for listing); mode in the record.
    pub const KIND: u32 = 4;
    /// The file changed between the check and the open.
    pub const RACE: u32 = 5;
}

/// Performs one operation with the sandbox's view and credentials. Returns the opened
/// descriptor for Read/Write/List.
pub(super) fn perform(target: &FilesTarget, op: Op, path: &str) -> Result<Option<OwnedFd>> {
    let plan = Plan::new(op, path)?;
    let done = {
        let _creds = Lowered::enter(target.as_root)?;
        let root = target.root.as_raw_fd();
        let scratch = scratch_mount_ids(root);
        do_op(&plan, root, &scratch)
    };
    match done {
        // SAFETY: a fresh fd opened by `do_op`, owned from here on.
        Ok(fd) => Ok(fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })),
        Err((status::OUTSIDE, _, _)) => Err(Error::PathEscape(format!(
            "{path}: outside the sandbox's scratch mounts (/workspace, /tmp, /dev/shm)"
        ))
        .at(path)),
        Err((status::KIND, _, mode)) => Err(kind_error(path, op, mode)),
        Err((status::RACE, _, _)) => Err(errno_error(path, libc::EAGAIN)),
        Err((_, errno, _)) => Err(errno_from_os(path, errno)),
    }
}

/// The error for a path that is not what `op` works on.
fn kind_error(path: &str, op: Op, mode: u32) -> Error {
    let what = match mode & libc::S_IFMT {
        libc::S_IFDIR => return errno_error(path, libc::EISDIR),
        libc::S_IFREG => return errno_error(path, libc::ENOTDIR),
        libc::S_IFIFO => "a fifo",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a character device",
        libc::S_IFBLK => "a block device",
        libc::S_IFLNK => "a symlink",
        _ => "not a regular file",
    };
    let want = if op == Op::List {
        "a directory"
    } else {
        "a regular file"
    };
    io_error(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}, not {want}: the files API only reads and writes regular files"),
        ),
    )
}

fn errno_from_os(path: &str, errno: i32) -> Error {
    match errno {
        // Magic links and symlinks where none may be followed.
        libc::ELOOP | libc::EXDEV => Error::PathEscape(format!(
            "{path}: {}",
            std::io::Error::from_raw_os_error(errno)
        ))
        .at(path),
        _ => errno_error(path, errno),
    }
}

/// A failed operation: (status kind, errno, file mode).
type Fail = (u32, i32, u32);

fn errno_fail(e: i32) -> Fail {
    (status::ERRNO, e, 0)
}

/// Mount ids of the scratch mounts (0 where a path is missing or not a mount of its own),
/// resolved inside the sandbox's root like any other path.
pub(super) fn scratch_mount_ids(root: RawFd) -> [u64; 3] {
    let mut ids = [0u64; 3];
    for (id, path) in ids.iter_mut().zip(SCRATCH_MOUNTS) {
        let Ok(fd) = open_in_root(root, path, libc::O_PATH | libc::O_NOFOLLOW) else {
            continue;
        };
        if let Some(stx) = statx_of(fd, c"", libc::AT_EMPTY_PATH) {
            if (stx.stx_attributes & libc::STATX_ATTR_MOUNT_ROOT as u64) != 0 {
                *id = stx.stx_mnt_id;
            }
        }
        close(fd);
    }
    ids
}

fn statx_of(dirfd: RawFd, path: &std::ffi::CStr, flags: i32) -> Option<libc::statx> {
    // SAFETY: statx fills a zeroed struct we own.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            dirfd,
            path.as_ptr(),
            flags,
            libc::STATX_TYPE | libc::STATX_INO | libc::STATX_MNT_ID,
            &mut stx,
        );
        (r == 0).then_some(stx)
    }
}

/// Checks that `fd` is on a scratch mount and of the wanted type; returns (dev, ino).
fn check_fd(fd: RawFd, scratch: &[u64; 3], want: u32) -> Result<(u64, u64), Fail> {
    let stx =
        statx_of(fd, c"", libc::AT_EMPTY_PATH).ok_or_else(|| errno_fail(crate::error::errno()))?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(errno_fail(libc::ENOSYS));
    }
    if !scratch.iter().any(|&id| id != 0 && id == stx.stx_mnt_id) {
        return Err((status::OUTSIDE, 0, 0));
    }
    let mode = u32::from(stx.stx_mode);
    if mode & libc::S_IFMT != want {
        return Err((status::KIND, 0, mode));
    }
    let dev = (u64::from(stx.stx_dev_major) << 32) | u64::from(stx.stx_dev_minor);
    Ok((dev, stx.stx_ino))
}

/// openat2 with `resolve` flags; the fd is closed on exec. Returns the fd or the errno.
fn open_how(
    dirfd: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> Result<RawFd, i32> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve,
    };
    // SAFETY: openat2 with a valid open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        Err(crate::error::errno())
    } else {
        Ok(fd as RawFd)
    }
}

/// Resolves `path` inside the sandbox's root: `..` stops at the root, absolute symlinks are
/// re-rooted, magic links (/proc/*/root, /proc/*/fd/*) are refused.
pub(super) fn open_in_root(root: RawFd, path: &std::ffi::CStr, flags: i32) -> Result<RawFd, i32> {
    open_how(
        root,
        path,
        flags,
        0,
        RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    )
}

fn close(fd: RawFd) {
    // SAFETY: closing an fd this module opened and did not hand out.
    unsafe { libc::close(fd) };
}

/// Opens a directory of a scratch mount (O_PATH), for creating or removing in it.
fn scratch_dir(root: RawFd, path: &std::ffi::CStr, scratch: &[u64; 3]) -> Result<RawFd, Fail> {
    let dir = open_in_root(root, path, libc::O_PATH | libc::O_DIRECTORY).map_err(errno_fail)?;
    if let Err(f) = check_fd(dir, scratch, libc::S_IFDIR) {
        close(dir);
        return Err(f);
    }
    Ok(dir)
}

/// Resolves `path` (O_PATH: no side effect on any kind of file), checks it, then reopens
/// exactly that inode with `flags` (through /proc/self/fd, so nothing is resolved again).
fn open_checked(
    root: RawFd,
    path: &std::ffi::CStr,
    flags: i32,
    want: u32,
    scratch: &[u64; 3],
) -> Result<RawFd, Fail> {
    let probe = open_in_root(root, path, libc::O_PATH).map_err(errno_fail)?;
    let checked = check_fd(probe, scratch, want);
    let reopened = checked.and_then(|id| {
        let again =
            cstring(&format!("/proc/self/fd/{probe}")).map_err(|_| errno_fail(libc::EINVAL))?;
        let fd = open_how(
            libc::AT_FDCWD,
            &again,
            flags | libc::O_NONBLOCK | libc::O_NOCTTY,
            0,
            0,
        )
        .map_err(errno_fail)?;
        match check_fd(fd, scratch, want) {
            Ok(same) if same == id => Ok(fd),
            other => {
                close(fd);
                Err(other.err().unwrap_or((status::RACE, 0, 0)))
            }
        }
    });
    close(probe);
    reopened
}

fn make_dirs(root: RawFd, steps: &[DirStep], scratch: &[u64; 3]) -> Result<(), Fail> {
    for step in steps {
        match open_in_root(root, &step.full, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(fd) => {
                close(fd);
                continue;
            }
            Err(libc::ENOENT) => {}
            Err(e) => return Err(errno_fail(e)),
        }
        let dir = scratch_dir(root, &step.parent, scratch)?;
        // SAFETY: mkdirat relative to a directory fd checked above; the name has no '/'.
        let r = unsafe { libc::mkdirat(dir, step.name.as_ptr(), 0o755) };
        let e = crate::error::errno();
        close(dir);
        if r < 0 && e != libc::EEXIST {
            return Err(errno_fail(e));
        }
    }
    Ok(())
}

fn do_op(plan: &Plan, root: RawFd, scratch: &[u64; 3]) -> Result<Option<RawFd>, Fail> {
    match plan.op {
        Op::Read => {
            open_checked(root, &plan.full, libc::O_RDONLY, libc::S_IFREG, scratch).map(Some)
        }
        Op::List => open_checked(
            root,
            &plan.full,
            libc::O_RDONLY | libc::O_DIRECTORY,
            libc::S_IFDIR,
            scratch,
        )
        .map(Some),
        Op::MakeDirs => {
            make_dirs(root, &plan.dirs, scratch)?;
            let fd = open_in_root(root, &plan.full, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(errno_fail)?;
            let checked = check_fd(fd, scratch, libc::S_IFDIR);
            close(fd);
            checked.map(|_| None)
        }
        Op::Write => {
            make_dirs(root, &plan.dirs, scratch)?;
            let dir = scratch_dir(root, &plan.parent, scratch)?;
            // SAFETY: openat of one name (no '/') in a checked directory, never following a
            // symlink; O_NONBLOCK so a fifo with no reader fails (ENXIO) instead of waiting.
            let fd = unsafe {
                libc::openat(
                    dir,
                    plan.name.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_NOFOLLOW
                        | libc::O_NONBLOCK
                        | libc::O_NOCTTY
                        | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                )
            };
            let e = crate::error::errno();
            close(dir);
            if fd < 0 {
                return Err(errno_fail(e));
            }
            if let Err(f) = check_fd(fd, scratch, libc::S_IFREG) {
                close(fd);
                return Err(f);
            }
            // Truncated only now that it is known to be a regular file of the sandbox.
            // SAFETY: ftruncate of the fd we just checked.
            if unsafe { libc::ftruncate(fd, 0) } < 0 {
                let e = crate::error::errno();
                close(fd);
                return Err(errno_fail(e));
            }
            Ok(Some(fd))
        }
        Op::Remove => {
            let dir = scratch_dir(root, &plan.parent, scratch)?;
            // SAFETY: unlinkat of one name (no '/') in a checked directory.
            let mut r = unsafe { libc::unlinkat(dir, plan.name.as_ptr(), 0) };
            if r < 0 && crate::error::errno() == libc::EISDIR {
                // SAFETY: as above.
                r = unsafe { libc::unlinkat(dir, plan.name.as_ptr(), libc::AT_REMOVEDIR) };
            }
            let e = crate::error::errno();
            close(dir);
            if r < 0 {
                return Err(errno_fail(e));
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_parents_and_steps() {
        let p = Plan::new(Op::Write, "a/b/c.txt").expect("plan");
        assert_eq!(p.full.to_str().ok(), Some("/workspace/a/b/c.txt"));
        assert_eq!(p.parent.to_str().ok(), Some("/workspace/a/b"));
        assert_eq!(p.name.to_str().ok(), Some("c.txt"));
        let steps: Vec<_> = p.dirs.iter().filter_map(|d| d.full.to_str().ok()).collect();
        assert_eq!(steps, ["/workspace", "/workspace/a", "/workspace/a/b"]);
        assert_eq!(p.dirs[0].parent.to_str().ok(), Some("/"));
    }

    #[test]
    fn bad_paths_are_refused_before_any_syscall() {
        for bad in ["", "a\0b", "../x", "/tmp/../etc"] {
            assert!(
                matches!(Plan::new(Op::Read, bad), Err(Error::PathEscape(_))),
                "{bad:?}"
            );
        }
        // Not a file name: a PathEscape naming the path.
        for (op, bad) in [(Op::Write, "/"), (Op::Remove, "/.")] {
            let e = Plan::new(op, bad).err();
            assert_eq!(e.as_ref().map(|e| e.kind()), Some("PathEscape"), "{bad:?}");
            assert_eq!(e.as_ref().and_then(|e| e.path()), Some(bad), "{bad:?}");
        }
    }
}
