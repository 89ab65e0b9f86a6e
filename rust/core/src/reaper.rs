//! The session reaper: a small process outside the sandbox that cleans a session up when its
//! owner dies without closing it (SIGKILL, crash).
//!
//! A session's PID 1 ends when the owner's end of the lifeline closes, and the kernel then kills
//! every process of the sandbox, but a paused session's processes are frozen: on cgroup v1 a
//! frozen task cannot die until thawed, and nobody would remove the cgroups. The reaper is
//! forked from the owner when the session opens, holds another read end of the lifeline, and on
//! EOF thaws the session, kills its PID 1 and removes its cgroups (bounded), then exits. Like a
//! forked sandbox child it runs raw syscalls only on data prepared before the fork.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// How long the reaper keeps trying to remove the cgroups once the sandbox is being killed.
const REMOVE_FOR_MS: u64 = 20_000;
/// Pause between removal attempts.
const RETRY_NS: i64 = 10_000_000;

/// What the reaper needs, opened and built before the fork.
#[derive(Debug)]
pub struct ReaperPlan {
    /// Thaw files (`cgroup.freeze` / `freezer.state`), opened for writing, with the thaw value.
    thaw: Vec<(OwnedFd, &'static [u8])>,
    /// The session's cgroup directories, removed last.
    dirs: Vec<CString>,
}

impl ReaperPlan {
    /// Opens the thaw files and builds the paths of a session's cgroups.
    pub fn new(thaw: &[(PathBuf, &'static [u8])], dirs: &[PathBuf]) -> Result<ReaperPlan> {
        let cpath = |p: &PathBuf| {
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::InvalidSpec(format!("NUL in cgroup path {}", p.display())))
        };
        let mut files = Vec::new();
        for (path, value) in thaw {
            let c = cpath(path)?;
            // SAFETY: open of a path we built; the fd is owned right below.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(Error::io_at(
                    path.display().to_string(),
                    std::io::Error::last_os_error(),
                ));
            }
            // SAFETY: fresh fd.
            files.push((unsafe { OwnedFd::from_raw_fd(fd) }, *value));
        }
        let dirs = dirs.iter().map(cpath).collect::<Result<Vec<_>>>()?;
        Ok(ReaperPlan { thaw: files, dirs })
    }
}

/// Forks the reaper of a session whose PID 1 is `holder` and whose lifeline read end is
/// `lifeline`. Returns the reaper's pidfd (its exit signal is 0: only this pidfd reaps it).
pub fn start(plan: &ReaperPlan, lifeline: &OwnedFd, holder: &OwnedFd) -> Result<OwnedFd> {
    let mut pidfd: libc::c_int = -1;
    let (life, pfd) = (lifeline.as_raw_fd(), holder.as_raw_fd());
    // SAFETY: a raw clone without CLONE_VM is a fork; the child only runs `reap_main`, which
    // makes raw syscalls on data prepared before the fork and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::CLONE_PIDFD as libc::c_ulong,
            0,
            &mut pidfd as *mut libc::c_int,
            0,
            0,
        )
    };
    if pid == 0 {
        reap_main(plan, life, pfd);
    }
    if pid < 0 {
        return Err(Error::setup("fork the session's reaper"));
    }
    // SAFETY: CLONE_PIDFD stored a fresh fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(pidfd) })
}

/// The reaper process. Never returns.
fn reap_main(plan: &ReaperPlan, lifeline: libc::c_int, holder: libc::c_int) -> ! {
    let mut keep = [lifeline, holder, -1, -1, -1, -1];
    for (slot, (fd, _)) in keep[2..].iter_mut().zip(&plan.thaw) {
        *slot = fd.as_raw_fd();
    }
    crate::child::close_other_fds(&keep);
    // SAFETY: raw syscalls on fds we hold and on paths built before the fork; no allocation.
    unsafe {
        // Its own session: a Ctrl-C meant for the owner's terminal must not kill the reaper.
        libc::setsid();
        let mut b = 0u8;
        while libc::read(lifeline, (&mut b as *mut u8).cast(), 1) != 0
            && crate::error::errno() == libc::EINTR
        {}
        let mut waited_ms = 0;
        loop {
            for (fd, value) in &plan.thaw {
                libc::write(fd.as_raw_fd(), value.as_ptr().cast(), value.len());
            }
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                holder,
                libc::SIGKILL,
                std::ptr::null::<u8>(),
                0,
            );
            let mut left = 0;
            for d in &plan.dirs {
                if libc::rmdir(d.as_ptr()) < 0 && crate::error::errno() != libc::ENOENT {
                    left += 1;
                }
            }
            if left == 0 || waited_ms >= REMOVE_FOR_MS {
                libc::_exit(if left == 0 { 0 } else { 1 });
            }
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: RETRY_NS,
            };
            libc::nanosleep(&ts, std::ptr::null_mut());
            waited_ms += (RETRY_NS / 1_000_000) as u64;
        }
    }
}
