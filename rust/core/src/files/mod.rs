//! The files API of a session: reading, writing, listing and removing files of the sandbox.
//!
//! The supervisor opens with the sandbox's own restrictions, in the calling thread:
//! - view: paths are resolved from the sandbox's root (its holder's `/proc/<pid>/root`) with
//!   `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so `..`, absolute symlinks and
//!   `/proc/*/root` tricks resolve as they would inside;
//! - credentials: for the duration of each operation the thread's effective uid/gid become the
//!   host ids of the sandbox's uid 0 (sessions built by root) and its effective capabilities are
//!   emptied (credentials are per thread for raw syscalls), exactly what the sandbox's own
//!   processes have, so the kernel judges every permission as it judges theirs;
//! - place and kind: what a path resolves to is first opened `O_PATH` (no side effect on any
//!   kind of file: a terminal, a fifo, a procfs entry) and must be a regular file (or a
//!   directory, for listing) on one of the writable scratch mounts, by the descriptor's mount id;
//!   only then is exactly that inode reopened (through `/proc/self/fd`) for reading; writes
//!   create one name in a checked scratch directory, never through a symlink, non-blocking.
//!
//! Data then moves on the descriptor with no lock held, in chunks, with the session's secrets
//! redacted from what is read. (A helper process joined to the sandbox's namespaces would give
//! the same judgement, at the price of one fork of the caller per operation: 5-40 ms here.)

use crate::error::{Error, Result};
use crate::redact::StreamRedactor;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

mod copy;
mod open;

pub use copy::CopyReport;

pub use open::FilesTarget;
use open::{perform, Lowered, Op};

/// The sandbox's writable scratch mounts: the only places the files API reads or writes.
pub const SCRATCH_MOUNTS: [&std::ffi::CStr; 3] = [c"/workspace", c"/tmp", c"/dev/shm"];

/// Default most bytes [`crate::Session::read_file`] returns (larger files: `FileTooLarge`).
pub const DEFAULT_MAX_READ: u64 = 64 << 20;

/// Most entries one [`crate::Session::list_dir`] returns.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// An entry of a directory, as listed by [`crate::Session::list_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File name (secrets redacted).
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    pub kind: &'static str,
    /// Size in bytes (0 for anything but regular files).
    pub size: u64,
}

/// An [`Error::IoAt`] naming the path as given to the files API, keeping the errno.
pub(crate) fn io_error(path: &str, source: std::io::Error) -> Error {
    Error::io_at(path, source)
}

fn errno_error(path: &str, errno: i32) -> Error {
    io_error(path, std::io::Error::from_raw_os_error(errno))
}

/// Whether `e` is the size cap of a read (or listing) being exceeded.
pub fn is_too_large(e: &Error) -> bool {
    matches!(e, Error::IoAt { source, .. } if source.kind() == std::io::ErrorKind::FileTooLarge)
}

fn too_large(path: &str, what: String) -> Error {
    io_error(
        path,
        std::io::Error::new(std::io::ErrorKind::FileTooLarge, what),
    )
}

pub(crate) fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::PathEscape("path contains a NUL byte".into()))
}

/// The absolute in-sandbox form of a files-API path (relative paths are under /workspace).
pub(crate) fn sandbox_path(path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(Error::PathEscape("empty path".into()));
    }
    if path.contains('\0') {
        return Err(Error::PathEscape("path contains a NUL byte".into()));
    }
    // `..` could only be re-rooted, never leave; refusing it outright makes intent explicit.
    if path.split('/').any(|c| c == "..") {
        return Err(Error::PathEscape(format!("{path}: '..' is not allowed")));
    }
    Ok(if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{}/{}", crate::fs::WORKSPACE, path)
    })
}

/// A file of the sandbox opened for reading: redacted chunks, at most `max_size` bytes.
#[derive(Debug)]
pub struct FileReader {
    file: std::fs::File,
    path: String,
    size: u64,
    max_size: u64,
    read: u64,
    redactor: StreamRedactor,
    done: bool,
}

impl FileReader {
    /// The file's size when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk (at most `max_len` bytes read from the file; secrets redacted, so the
    /// chunk may differ in length). Empty at the end of the file.
    pub fn read_chunk(&mut self, max_len: usize) -> Result<Vec<u8>> {
        // Sized for what is left (plus a little, to see the end or growth in one read).
        let left = self.size.saturating_sub(self.read).saturating_add(4096);
        let mut buf = vec![0u8; max_len.clamp(1, 16 << 20).min(left as usize)];
        let mut out = Vec::new();
        while out.is_empty() && !self.done {
            let n = match self.file.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(&self.path, e)),
            };
            if n == 0 {
                self.done = true;
                self.redactor.finish(&mut out);
                break;
            }
            self.read += n as u64;
            if self.read > self.max_size {
                self.done = true;
                return Err(too_large(
                    &self.path,
                    format!("file grew past max_size {} bytes while read", self.max_size),
                ));
            }
            self.redactor.feed(&buf[..n], &mut out);
        }
        Ok(out)
    }

    /// Reads everything that is left.
    pub fn read_to_end(&mut self) -> Result<Vec<u8>> {
        let mut all = Vec::with_capacity(self.size.min(self.max_size) as usize);
        loop {
            let chunk = self.read_chunk(1 << 20)?;
            if chunk.is_empty() {
                return Ok(all);
            }
            all.extend_from_slice(&chunk);
        }
    }
}

/// A file of the sandbox opened (created, truncated) for writing.
#[derive(Debug)]
pub struct FileWriter {
    file: std::fs::File,
    path: String,
}

impl FileWriter {
    /// Appends `data` to the file.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file
            .write_all(data)
            .map_err(|e| io_error(&self.path, e))
    }
}

impl crate::Session {
    /// Opens a regular file of the sandbox for reading in chunks (secrets redacted); refuses
    /// a file larger than `max_size` bytes (`ErrorKind::FileTooLarge`). Relative paths are
    /// under /workspace; the file must be on a scratch mount (/workspace, /tmp, /dev/shm).
    pub fn open_read(&self, path: &str, max_size: u64) -> Result<FileReader> {
        let fd = perform(&self.files_target()?, Op::Read, path)?
            .ok_or_else(|| Error::setup("open a sandbox file"))?;
        let file = std::fs::File::from(fd);
        let size = file.metadata().map_err(|e| io_error(path, e))?.len();
        if size > max_size {
            return Err(too_large(
                path,
                format!("{size} bytes, more than max_size {max_size}"),
            ));
        }
        Ok(FileReader {
            file,
            path: path.to_string(),
            size,
            max_size,
            read: 0,
            redactor: self.redactor().stream(),
            done: false,
        })
    }

    /// Reads a whole regular file of the sandbox (secrets redacted), at most `max_size` bytes.
    pub fn read_file(&self, path: &str, max_size: u64) -> Result<Vec<u8>> {
        self.open_read(path, max_size)?.read_to_end()
    }

    /// Opens (creates or truncates) a regular file of the sandbox for writing in chunks,
    /// creating missing parent directories; never writes through a symlink.
    pub fn open_write(&self, path: &str) -> Result<FileWriter> {
        let fd = perform(&self.files_target()?, Op::Write, path)?
            .ok_or_else(|| Error::setup("open a sandbox file"))?;
        let file = std::fs::File::from(fd);
        // Opened non-blocking (a fifo must not wait); a regular file is written blocking.
        // SAFETY: fcntl on the fd we own.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        Ok(FileWriter {
            file,
            path: path.to_string(),
        })
    }

    /// Writes a file of the sandbox (created or truncated), creating missing parents.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        self.open_write(path)?.write(data)
    }

    /// Creates `path` and its missing parents as directories.
    pub fn make_dirs(&self, path: &str) -> Result<()> {
        perform(&self.files_target()?, Op::MakeDirs, path).map(|_| ())
    }

    /// Removes a file, symlink or empty directory of the sandbox (a symlink itself, never its
    /// target).
    pub fn remove(&self, path: &str) -> Result<()> {
        perform(&self.files_target()?, Op::Remove, path).map(|_| ())
    }

    /// Lists a directory of the sandbox, sorted by name (secrets redacted from the names).
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let target = self.files_target()?;
        let fd =
            perform(&target, Op::List, path)?.ok_or_else(|| Error::setup("open a sandbox file"))?;
        // /proc/self/fd/N names exactly the directory checked above; entries are read and
        // stat'ed with the sandbox's credentials too.
        let dir_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let _creds = Lowered::enter(target.as_root)?;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir_path).map_err(|e| io_error(path, e))? {
            let entry = entry.map_err(|e| io_error(path, e))?;
            if out.len() >= MAX_LIST_ENTRIES {
                return Err(too_large(
                    path,
                    format!("more than {MAX_LIST_ENTRIES} entries"),
                ));
            }
            let ft = entry.file_type().map_err(|e| io_error(path, e))?;
            let kind = if ft.is_symlink() {
                "symlink"
            } else if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else {
                "other"
            };
            let size = if kind == "file" {
                entry.metadata().map(|m| m.len()).unwrap_or(0)
            } else {
                0
            };
            let raw = entry.file_name();
            let (name, _) = self
                .redactor()
                .redact(std::os::unix::ffi::OsStrExt::as_bytes(raw.as_os_str()));
            out.push(DirEntry {
                name: String::from_utf8_lossy(&name).into_owned(),
                kind,
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_errno_and_path() {
        let e = errno_error("/workspace/x", libc::ENOENT);
        assert_eq!(
            (e.errno(), e.path()),
            (Some(libc::ENOENT), Some("/workspace/x"))
        );
        assert!(e.to_string().contains("/workspace/x"));
        assert!(is_too_large(&too_large("p", "big".into())));
    }
}
