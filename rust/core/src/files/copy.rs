//! Copying between two sessions, by the supervisor (`Sandbox.fork`): one session's workspace
//! into another's, and one file of a scratch mount into another session's.
//!
//! Both sides are reached as the files API reaches them (see [`super`]): from each sandbox's
//! root with `RESOLVE_IN_ROOT`, with the thread's credentials lowered to the sandboxes' own.
//! The walk then goes one name at a time from directory descriptors, never following a
//! symlink (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`): symlinks are copied as symlinks (their
//! text, resolved later inside the fork only), directories and regular files with their mode
//! bits and times; fifos, sockets and devices are skipped and reported, as is anything on
//! another mount. A file is copied up to the size it had when it was looked at, so a file
//! that a process of the source keeps growing cannot make the copy endless. The destination's
//! own disk limit (its tmpfs) applies: a full one ends the copy with [`Error::Fork`].

use super::open::{open_in_root, scratch_mount_ids, Lowered};
use super::{cstring, io_error, perform, Op};
use crate::error::{Error, Result};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Deepest directory nesting copied; deeper directories are skipped and reported.
pub const MAX_DEPTH: usize = 128;

/// What [`crate::Session::copy_workspace_to`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Regular files copied.
    pub files: u64,
    /// Directories copied (the workspace itself not counted).
    pub dirs: u64,
    /// Symlinks copied (as symlinks).
    pub symlinks: u64,
    /// Bytes of file data copied.
    pub bytes: u64,
    /// Paths not copied, each with the reason (e.g. "/workspace/f (a fifo)").
    pub skipped: Vec<String>,
}

fn errno() -> i32 {
    crate::error::errno()
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open of this module and is owned here.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// statx of `name` in `dir` (or of `dir` itself when `name` is empty), not following links.
fn stat_at(dir: RawFd, name: &CStr) -> Result<libc::statx, i32> {
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: statx fills a zeroed struct we own.
    unsafe {
        let mut stx: libc::statx = std::mem::zeroed();
        let r = libc::statx(
            dir,
            name.as_ptr(),
            flags,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID,
            &mut stx,
        );
        if r == 0 {
            Ok(stx)
        } else {
            Err(errno())
        }
    }
}

/// One name of `dir` opened with `flags` (never following a symlink), or the errno.
fn open_at(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    // SAFETY: openat of one name (no '/') relative to a directory fd we hold.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        Err(errno())
    } else {
        Ok(owned(fd))
    }
}

/// The names in a directory (without `.` and `..`).
fn names_of(dir: RawFd) -> Result<Vec<CString>, i32> {
    // fdopendir takes ownership of its fd: give it a fresh one of the same directory.
    let again = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: fdopendir on a directory fd we own; on success the stream owns it.
    let stream = unsafe { libc::fdopendir(again.as_raw_fd()) };
    if stream.is_null() {
        return Err(errno());
    }
    std::mem::forget(again);
    let mut names = Vec::new();
    loop {
        // SAFETY: readdir on the stream opened above; the entry is valid until the next call.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: d_name is NUL-terminated within the entry.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: closing the stream (and its fd) once.
    unsafe { libc::closedir(stream) };
    names.sort(); // a report in the same order every time
    Ok(names)
}

/// Copies `len` bytes from `src` to `dst` (both at offset 0) in the kernel; fewer when the
/// source is shorter now. Returns the bytes copied.
fn copy_data(src: RawFd, dst: RawFd, len: u64) -> std::io::Result<u64> {
    let mut done = 0u64;
    let mut splice = true;
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        let n = if splice {
            // SAFETY: copy_file_range between two fds we hold, with the files' own offsets.
            let n = unsafe {
                libc::copy_file_range(
                    src,
                    std::ptr::null_mut(),
                    dst,
                    std::ptr::null_mut(),
                    want,
                    0,
                )
            };
            if n < 0
                && matches!(
                    errno(),
                    libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP
                )
            {
                // Two tmpfs instances: this kernel does not splice across them; sendfile does.
                splice = false;
                continue;
            }
            n
        } else {
            // SAFETY: sendfile between two fds we hold, with the source's own offset.
            unsafe { libc::sendfile(dst, src, std::ptr::null_mut(), want) }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as u64;
    }
    Ok(done)
}

fn set_times(fd: RawFd, stx: &libc::statx) {
    let ts = [
        libc::timespec {
            tv_sec: stx.stx_atime.tv_sec,
            tv_nsec: i64::from(stx.stx_atime.tv_nsec),
        },
        libc::timespec {
            tv_sec: stx.stx_mtime.tv_sec,
            tv_nsec: i64::from(stx.stx_mtime.tv_nsec),
        },
    ];
    // SAFETY: futimens of an fd we hold with two timespecs we own. Best effort: times are
    // a nicety, and a failure (e.g. an O_PATH fd) changes nothing else.
    unsafe { libc::futimens(fd, ts.as_ptr()) };
}

fn set_mode(fd: RawFd, stx: &libc::statx) -> std::io::Result<()> {
    // SAFETY: fchmod of an fd we hold.
    if unsafe { libc::fchmod(fd, libc::mode_t::from(stx.stx_mode) & 0o7777) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The walk of one copy: the source's workspace mount and what was done so far.
struct Walk {
    mount: u64,
    report: CopyReport,
}

/// An error of the source side: the path and the errno.
fn src_error(path: &str, e: i32) -> Error {
    io_error(path, std::io::Error::from_raw_os_error(e))
}

/// An error of the destination side: the fork cannot be made as asked.
fn dst_error(path: &str, e: std::io::Error) -> Error {
    let why = if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        "the fork's disk limit is reached".to_string()
    } else {
        e.to_string()
    };
    Error::Fork(format!("copying {path} into the fork: {why}"))
}

impl Walk {
    fn dir(&mut self, src: RawFd, dst: RawFd, path: &str, depth: usize) -> Result<()> {
        let names = names_of(src).map_err(|e| src_error(path, e))?;
        for name in names {
            let sub = format!("{path}/{}", String::from_utf8_lossy(name.as_bytes()));
            let stx = match stat_at(src, &name) {
                Ok(s) => s,
                // Removed by a process of the source meanwhile: as if it had never been.
                Err(libc::ENOENT) => continue,
                Err(e) => return Err(src_error(&sub, e)),
            };
            if stx.stx_mnt_id != self.mount {
                self.report.skipped.push(format!("{sub} (another mount)"));
                continue;
            }
            match u32::from(stx.stx_mode) & libc::S_IFMT {
                libc::S_IFDIR => self.subdir(src, dst, &name, &sub, depth)?,
                libc::S_IFREG => self.file(src, dst, &name, &sub, &stx)?,
                libc::S_IFLNK => self.symlink(src, dst, &name, &sub)?,
                kind => {
                    let what = match kind {
                        libc::S_IFIFO => "a fifo",
                        libc::S_IFSOCK => "a socket",
                        _ => "a device",
                    };
                    self.report.skipped.push(format!("{sub} ({what})"));
                }
            }
        }
        Ok(())
    }

    /// Opens the entry `name` of the source directory `src` with `flags` (never following a
    /// symlink). `None` when there is nothing to copy: the entry was removed by a process of
    /// the source meanwhile (as if it had never been), or is unreadable to the sandbox's own
    /// uid (e.g. mode 000 as a non-root uid), which is reported as skipped.
    fn open_source(
        &mut self,
        src: RawFd,
        name: &CStr,
        flags: i32,
        path: &str,
    ) -> Result<Option<OwnedFd>> {
        match open_at(src, name, flags, 0) {
            Ok(fd) => Ok(Some(fd)),
            Err(libc::ENOENT) => Ok(None),
            Err(libc::EACCES) => {
                self.report.skipped.push(format!("{path} (not readable)"));
                Ok(None)
            }
            Err(e) => Err(src_error(path, e)),
        }
    }

    /// Whether `fd` (just opened from a name) is what was looked at: same inode, same
    /// mount, same kind. A process of the source may swap names at any time.
    fn same(&self, fd: RawFd, stx: &libc::statx) -> bool {
        stat_at(fd, c"").is_ok_and(|now| {
            now.stx_ino == stx.stx_ino
                && now.stx_mnt_id == self.mount
                && (now.stx_mode & libc::S_IFMT as u16) == (stx.stx_mode & libc::S_IFMT as u16)
        })
    }

    fn subdir(
        &mut self,
        src: RawFd,
        dst: RawFd,
        name: &CStr,
        path: &str,
        depth: usize,
    ) -> Result<()> {
        if depth >= MAX_DEPTH {
            self.report
                .skipped
                .push(format!("{path} (deeper than {MAX_DEPTH} directories)"));
            return Ok(());
        }
        let Some(from) = self.open_source(src, name, libc::O_RDONLY | libc::O_DIRECTORY, path)?
        else {
            return Ok(());
        };
        let Ok(stx) = stat_at(from.as_raw_fd(), c"") else {
            return Err(src_error(path, errno()));
        };
        if stx.stx_mnt_id != self.mount {
            self.report.skipped.push(format!("{path} (another mount)"));
            return Ok(());
        }
        // Made owner-only first, its own mode set once its content is in (a read-only
        // directory could not be filled).
        // SAFETY: mkdirat of one name in a directory fd we hold.
        if unsafe { libc::mkdirat(dst, name.as_ptr(), 0o700) } < 0 {
            return Err(dst_error(path, std::io::Error::last_os_error()));
        }
        let to = open_at(dst, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .map_err(|e| dst_error(path, std::io::Error::from_raw_os_error(e)))?;
        self.dir(from.as_raw_fd(), to.as_raw_fd(), path, depth + 1)?;
        set_mode(to.as_raw_fd(), &stx).map_err(|e| dst_error(path, e))?;
        set_times(to.as_raw_fd(), &stx);
        self.report.dirs += 1;
        Ok(())
    }

    fn file(
        &mut self,
        src: RawFd,
        dst: RawFd,
        name: &CStr,
        path: &str,
        stx: &libc::statx,
    ) -> Result<()> {
        // Non-blocking: a name swapped for a fifo meanwhile must not wait for a writer.
        let Some(from) = self.open_source(src, name, libc::O_RDONLY | libc::O_NONBLOCK, path)?
        else {
            return Ok(());
        };
        if !self.same(from.as_raw_fd(), stx) {
            self.report
                .skipped
                .push(format!("{path} (changed while copied)"));
            return Ok(());
        }
        let to = open_at(
            dst,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(|e| dst_error(path, std::io::Error::from_raw_os_error(e)))?;
        let n = copy_data(from.as_raw_fd(), to.as_raw_fd(), stx.stx_size)
            .map_err(|e| dst_error(path, e))?;
        set_mode(to.as_raw_fd(), stx).map_err(|e| dst_error(path, e))?;
        set_times(to.as_raw_fd(), stx);
        self.report.files += 1;
        self.report.bytes += n;
        Ok(())
    }

    fn symlink(&mut self, src: RawFd, dst: RawFd, name: &CStr, path: &str) -> Result<()> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: readlinkat of one name into a buffer we own, of the length we pass.
        let n =
            unsafe { libc::readlinkat(src, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len() - 1) };
        if n < 0 {
            return match errno() {
                libc::ENOENT => Ok(()),
                // Swapped for something else meanwhile.
                libc::EINVAL => {
                    self.report
                        .skipped
                        .push(format!("{path} (changed while copied)"));
                    Ok(())
                }
                e => Err(src_error(path, e)),
            };
        }
        buf.truncate(n as usize);
        let target = CString::new(buf).map_err(|_| src_error(path, libc::EINVAL))?;
        // SAFETY: symlinkat of one name in a directory fd we hold; the target is only text.
        if unsafe { libc::symlinkat(target.as_ptr(), dst, name.as_ptr()) } < 0 {
            return Err(dst_error(path, std::io::Error::last_os_error()));
        }
        self.report.symlinks += 1;
        Ok(())
    }
}

/// Opens `/workspace` of a sandbox (a directory, the workspace mount's root); returns it and
/// its mount id.
fn workspace_of(root: RawFd) -> Result<(OwnedFd, u64)> {
    let path = cstring(crate::fs::WORKSPACE)?;
    let fd = open_in_root(
        root,
        &path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
    )
    .map(owned)
    .map_err(|e| src_error(crate::fs::WORKSPACE, e))?;
    let stx = stat_at(fd.as_raw_fd(), c"").map_err(|e| src_error(crate::fs::WORKSPACE, e))?;
    if scratch_mount_ids(root)[0] != stx.stx_mnt_id || stx.stx_mnt_id == 0 {
        return Err(Error::PathEscape(format!(
            "{}: not the sandbox's workspace mount",
            crate::fs::WORKSPACE
        )));
    }
    Ok((fd, stx.stx_mnt_id))
}

impl crate::Session {
    /// Copies this session's `/workspace` into `dest`'s `/workspace` (which should be empty:
    /// an existing name is an error). See the module docs for what is copied and how.
    pub fn copy_workspace_to(&self, dest: &crate::Session) -> Result<CopyReport> {
        let from = self.files_target()?;
        let to = dest.files_target()?;
        if from.as_root != to.as_root {
            return Err(Error::Fork(
                "the two sessions were built by different users".into(),
            ));
        }
        let _creds = Lowered::enter(from.as_root)?;
        let (src, mount) = workspace_of(from.root.as_raw_fd())?;
        let (dst, _) = workspace_of(to.root.as_raw_fd())?;
        let mut walk = Walk {
            mount,
            report: CopyReport::default(),
        };
        walk.dir(src.as_raw_fd(), dst.as_raw_fd(), crate::fs::WORKSPACE, 0)?;
        if let Ok(stx) = stat_at(src.as_raw_fd(), c"") {
            // The workspace root's own mode (its owner may have changed it).
            set_mode(dst.as_raw_fd(), &stx).map_err(|e| dst_error(crate::fs::WORKSPACE, e))?;
        }
        Ok(walk.report)
    }

    /// Copies one regular file of this session's scratch mounts (`path`, resolved as the
    /// files API resolves it) to `dest_path` of `dest`'s, raw (no redaction: both sessions
    /// hold the same secrets). A source larger than `max_size` bytes is refused
    /// (`FileTooLarge`); at most the size it had when opened is copied. Returns the bytes.
    pub fn copy_file_to(
        &self,
        path: &str,
        dest: &crate::Session,
        dest_path: &str,
        max_size: u64,
    ) -> Result<u64> {
        let from = perform(&self.files_target()?, Op::Read, path)?
            .ok_or_else(|| Error::setup("open a sandbox file"))?;
        let size = std::fs::File::from(from.try_clone().map_err(|e| io_error(path, e))?)
            .metadata()
            .map_err(|e| io_error(path, e))?
            .len();
        if size > max_size {
            return Err(io_error(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::FileTooLarge,
                    format!("{size} bytes, more than max_size {max_size}"),
                ),
            ));
        }
        let to = perform(&dest.files_target()?, Op::Write, dest_path)?
            .ok_or_else(|| Error::setup("open a sandbox file"))?;
        // Opened non-blocking by the files API; a regular file is written blocking.
        // SAFETY: fcntl on an fd we own.
        unsafe {
            let flags = libc::fcntl(to.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(to.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        copy_data(from.as_raw_fd(), to.as_raw_fd(), size).map_err(|e| dst_error(dest_path, e))
    }
}
