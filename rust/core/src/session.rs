//! Sessions: one sandbox (namespaces, cgroup, workspace) serving many calls until closed.
//!
//! The session's PID 1 only holds the namespaces open. Each call joins them and gets a pid
//! namespace of its own nested in the session's, so a call's timeout kills exactly that call's
//! processes while files, network and the cgroup are shared. The files API resolves paths with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from the sandbox's own root, so `..`,
//! absolute symlinks and `/proc/*/root` tricks cannot leave it.

use crate::error::{Error, Result};
use crate::report::{Enforcer, RunReport};
use crate::spawn::{self, Holder};
use crate::spec::RunSpec;
use crate::supervise::{self, Hooks};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

/// A kind of directory entry, as listed by [`Session::list_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// "file", "dir", "symlink" or "other".
    pub kind: &'static str,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// A live session. Methods take `&self`: calls from several threads run concurrently.
#[derive(Debug)]
pub struct Session {
    /// None once closed.
    holder: Mutex<Option<Holder>>,
    /// Environment and secrets every call gets (the session's spec).
    base: RunSpec,
    /// Owner uid/gid (as seen from the host) of files written through the files API.
    owner: Option<u32>,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

impl Session {
    /// Opens a session: builds the sandbox with the spec's session-wide limits (memory, pids,
    /// cpus, disk), filesystem, environment and secrets. `spec.argv` is ignored.
    pub fn open(spec: &RunSpec) -> Result<Session> {
        let holder = spawn::start_holder(spec)?;
        let owner = holder.root.then_some(spawn::ROOT_PATH_HOST_UID);
        Ok(Session {
            holder: Mutex::new(Some(holder)),
            base: spec.clone(),
            owner,
        })
    }

    /// Runs `f` with the live holder (the lock is held meanwhile).
    fn with_holder<T>(&self, f: impl FnOnce(&Holder) -> Result<T>) -> Result<T> {
        let guard = self
            .holder
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?;
        let holder = guard
            .as_ref()
            .ok_or_else(|| Error::SessionClosed("the session is closed".into()))?;
        if !alive(holder) {
            return Err(Error::SessionClosed(
                "the session's sandbox has exited".into(),
            ));
        }
        f(holder)
    }

    /// Session-wide enforcement (memory, pids, cpus, disk).
    pub fn enforcement(&self) -> Result<BTreeMap<String, Option<Enforcer>>> {
        self.with_holder(|h| Ok(h.enforcement.clone()))
    }

    /// Runs one command in the session. The call's `env` and `secrets` are added to the
    /// session's; its `limits.timeout`, `cpu_time` and `max_output` apply to this call only.
    pub fn exec(&self, call: &RunSpec, hooks: Hooks<'_>) -> Result<RunReport> {
        let mut spec = call.clone();
        let mut env = self.base.env.clone();
        env.extend(call.env.clone());
        spec.env = env;
        let mut secrets = self.base.secrets.clone();
        secrets.extend(call.secrets.iter().cloned());
        spec.secrets = secrets;
        let redactor = crate::redactor_for(&spec)?;
        let (started, oom_before, net_before) = self.with_holder(|holder| {
            let oom = holder.cgroup.as_ref().map_or(0, |c| c.oom_kills());
            let net = holder.egress.as_ref().map(|e| e.snapshot());
            Ok((spawn::start_call(holder, &spec)?, oom, net))
        })?;
        let mut report = supervise::supervise_spec(started, &spec, &redactor, hooks);
        // An OOM kill in the session's cgroup during this call ended it for lack of memory.
        // The session's egress outlives the call: report what changed during it (concurrent
        // calls of one session share these counters).
        if let Ok(guard) = self.holder.lock() {
            if let (Some(e), Some((before, seen))) =
                (guard.as_ref().and_then(|h| h.egress.as_ref()), net_before)
            {
                let (now, _) = e.snapshot();
                report.network = Some(crate::NetworkStats {
                    connections: now.connections - before.connections,
                    bytes_out: now.bytes_out - before.bytes_out,
                    bytes_in: now.bytes_in - before.bytes_in,
                });
                report.violations.extend(e.violations_since(seen));
            }
            if let Some(cg) = guard.as_ref().and_then(|h| h.cgroup.as_ref()) {
                if cg.oom_kills() > oom_before && report.reason != crate::Reason::Timeout {
                    report.reason = crate::Reason::Memory;
                }
            }
        }
        Ok(report)
    }

    /// Supervises one warm call of the session's warm runtime (see [`crate::warm`]): the
    /// call's `env`/`secrets` are added to the session's as in [`Session::exec`], its
    /// timeout, CPU time and output cap apply, and it is accounted in its own child of the
    /// session's cgroup. `Ok(None)`: the worker was gone before the code began.
    pub fn warm_call(
        &self,
        call: &RunSpec,
        req: crate::warm::WarmRequest<'_>,
        hooks: Hooks<'_>,
    ) -> Result<Option<crate::warm::WarmOutcome>> {
        let mut spec = call.clone();
        let mut secrets = self.base.secrets.clone();
        secrets.extend(call.secrets.iter().cloned());
        spec.secrets = secrets;
        let redactor = crate::redactor_for(&spec)?;
        let ctx = self.with_holder(|h| {
            Ok(crate::warm::CallContext {
                enforcement: h.enforcement.clone(),
                cgroup: h.cgroup.as_ref().and_then(|c| c.child()),
            })
        })?;
        crate::warm::supervise_call(&spec, req, ctx, &redactor, hooks)
    }

    /// Freezes every process of the session (cgroup freezer); state is kept.
    pub fn pause(&self) -> Result<()> {
        self.freeze(true)
    }

    /// Thaws a paused session.
    pub fn resume(&self) -> Result<()> {
        self.freeze(false)
    }

    fn freeze(&self, on: bool) -> Result<()> {
        self.with_holder(|h| {
            let cg = h
                .cgroup
                .as_ref()
                .filter(|c| c.can_freeze())
                .ok_or_else(|| Error::Setup {
                    stage: "pause/resume",
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "no freezer cgroup (unprivileged?)",
                    ),
                })?;
            cg.freeze(on).map_err(|e| Error::Setup {
                stage: "pause/resume",
                source: e,
            })
        })
    }

    /// Whether the session is open and its sandbox alive.
    pub fn is_open(&self) -> bool {
        self.holder
            .lock()
            .map(|g| g.as_ref().is_some_and(alive))
            .unwrap_or(false)
    }

    /// Kills every process of the session and removes its cgroup. Idempotent.
    pub fn close(&self) -> Result<()> {
        let holder = self
            .holder
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?
            .take();
        if let Some(mut h) = holder {
            if let Some(cg) = &h.cgroup {
                // A frozen session cannot die: thaw it first.
                let _ = cg.freeze(false);
            }
            spawn::kill_and_reap(&h.pidfd);
            drop(h.lifeline);
            if let Some(cg) = h.cgroup.as_mut() {
                cg.remove().map_err(|e| Error::Setup {
                    stage: "remove the session's cgroup",
                    source: e,
                })?;
            }
        }
        Ok(())
    }

    /// Opens `path` inside the sandbox (relative paths are relative to /workspace).
    fn open_in(&self, path: &str, flags: i32, mode: u32) -> Result<OwnedFd> {
        self.with_holder(|h| {
            let root = open_root(h)?;
            open_beneath(&root, path, flags, mode)
        })
    }

    /// Connects to a unix stream socket inside the sandbox (path resolved like the files API, the
    /// socket itself never followed as a symlink) and returns the connected socket.
    ///
    /// The address handed to connect(2) is `/proc/self/fd/N` of an `O_PATH` descriptor of the
    /// socket inode, so nothing is resolved again outside the sandbox's root.
    pub fn connect_unix(&self, path: &str) -> Result<OwnedFd> {
        let target = self.open_in(path, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        // SAFETY: socket(2) with constant arguments; the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = format!("/proc/self/fd/{}", target.as_raw_fd());
        // SAFETY: an all-zero sockaddr_un is valid; the name (< 30 bytes) fits sun_path.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, src) in addr.sun_path.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + name.len() + 1) as libc::socklen_t;
        // SAFETY: connect with a sockaddr_un we own and its length.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Io(std::io::Error::new(
                e.kind(),
                format!("{path}: {e}"),
            )));
        }
        Ok(sock)
    }

    /// Reads a whole file of the sandbox.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let fd = self.open_in(path, libc::O_RDONLY, 0)?;
        let mut f = std::fs::File::from(fd);
        if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                format!("{path}: is a directory"),
            )));
        }
        let mut out = Vec::new();
        f.read_to_end(&mut out)?;
        Ok(out)
    }

    /// Writes a file of the sandbox (created or truncated), creating missing parent directories.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        if let Some((parent, _)) = sandbox_path(path)?.rsplit_once('/') {
            if !parent.is_empty() {
                self.make_dirs(parent)?;
            }
        }
        let fd = self.open_in(
            path,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o644,
        )?;
        if let Some(uid) = self.owner {
            // SAFETY: fchown on a descriptor we own.
            unsafe { libc::fchown(fd.as_raw_fd(), uid, uid) };
        }
        std::fs::File::from(fd).write_all(data)?;
        Ok(())
    }

    /// Creates `path` and its missing parents as directories.
    pub fn make_dirs(&self, path: &str) -> Result<()> {
        let full = sandbox_path(path)?;
        let mut cur = String::new();
        for part in full.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            let (parent, name) = cur.rsplit_once('/').unwrap_or(("", part));
            let dir = self.open_in(
                if parent.is_empty() { "/" } else { parent },
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?;
            let cname = cstring(name)?;
            // SAFETY: mkdirat relative to a directory fd resolved inside the sandbox root; the
            // name has no '/'.
            let r = unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), 0o755) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(Error::Io(e));
                }
            } else if let Some(uid) = self.owner {
                // SAFETY: fchownat relative to the same directory fd, not following symlinks.
                unsafe {
                    libc::fchownat(
                        dir.as_raw_fd(),
                        cname.as_ptr(),
                        uid,
                        uid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
            }
        }
        Ok(())
    }

    /// Lists a directory of the sandbox.
    pub fn list_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let fd = self.open_in(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        // /proc/self/fd/N of a directory fd we hold is a safe handle for read_dir: it names
        // exactly the directory resolved inside the sandbox.
        let dir_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir_path)? {
            let entry = entry?;
            let ft = entry.file_type()?;
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
            out.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind,
                size,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes a file, symlink or empty directory of the sandbox (a symlink itself, never its
    /// target).
    pub fn remove(&self, path: &str) -> Result<()> {
        let full = sandbox_path(path)?;
        let (parent, name) = full
            .rsplit_once('/')
            .ok_or_else(|| Error::PathEscape(path.into()))?;
        if name.is_empty() || name == "." || name == ".." {
            return Err(Error::PathEscape(format!(
                "{path}: cannot remove this path"
            )));
        }
        let dir = self.open_in(
            if parent.is_empty() { "/" } else { parent },
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let cname = cstring(name)?;
        // SAFETY: unlinkat relative to a directory resolved inside the sandbox; the name has no '/'.
        let mut r = unsafe { libc::unlinkat(dir.as_raw_fd(), cname.as_ptr(), 0) };
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EISDIR) {
            // SAFETY: as above.
            r = unsafe { libc::unlinkat(dir.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR) };
        }
        if r < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

fn alive(h: &Holder) -> bool {
    let mut pfd = libc::pollfd {
        fd: h.pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling our own pidfd without waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::PathEscape("path contains a NUL byte".into()))
}

/// The absolute in-sandbox form of a files-API path (relative paths are under /workspace).
fn sandbox_path(path: &str) -> Result<String> {
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

/// A directory fd of the sandbox's root, through the holder's /proc entry.
fn open_root(h: &Holder) -> Result<OwnedFd> {
    let p = cstring(&format!("/proc/{}/root", h.pid))?;
    // SAFETY: open of a path we built; the fd is owned below.
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
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// openat2 inside `root`: `..` stops at the root, absolute symlinks are re-rooted, and magic
/// links (/proc/*/root, /proc/*/fd/*) are refused.
fn open_beneath(root: &OwnedFd, path: &str, flags: i32, mode: u32) -> Result<OwnedFd> {
    let full = sandbox_path(path)?;
    let c = cstring(&full)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            mode as u64
        } else {
            0
        },
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) => Error::PathEscape(format!("{path}: {e}")),
            _ => Error::Io(std::io::Error::new(e.kind(), format!("{path}: {e}"))),
        });
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}
