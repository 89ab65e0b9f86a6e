//! Cloning a sandbox's PID 1 straight into its cgroup, so that the supervisor never writes a pid
//! to `cgroup.procs` on the run's path (on cgroup v1 the first such write after a quiet spell
//! waits for an RCU grace period, 5-24 ms: it takes a global lock that the kernel only frees
//! after one).
//!
//! - cgroup v2: `clone3(CLONE_INTO_CGROUP)`; when the kernel refuses it (too old, or the cgroup
//!   cannot take the child that way) the plain clone follows and the pid is attached after.
//! - cgroup v1: a plain clone; PID 1 moves itself into the run's hierarchies as its first act
//!   (writing "0" to each `tasks` file: migrating oneself alone takes no global lock), before
//!   it forks anything (see [`crate::child::InitPlan::join_tasks`]).

use crate::cgroup::RunCgroup;
use crate::spawn;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// A PID 1 just cloned.
#[derive(Debug)]
pub(crate) struct Cloned {
    /// Host pid.
    pub(crate) pid: libc::pid_t,
    /// pidfd (CLONE_PIDFD).
    pub(crate) pidfd: OwnedFd,
    /// Whether it started inside its cgroup (false: the caller must attach it).
    pub(crate) attached: bool,
}

/// `struct clone_args` of clone3(2), up to `cgroup` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// CLONE_INTO_CGROUP (linux/sched.h; not in every libc release).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Set once the kernel showed it has no `clone3(CLONE_INTO_CGROUP)`: later runs skip the try.
static NO_CLONE_INTO_CGROUP: AtomicBool = AtomicBool::new(false);

/// Whether an error of clone3 means the kernel does not know the call or the flag.
fn kernel_lacks_clone3(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
    )
}

/// clone3 with CLONE_INTO_CGROUP and CLONE_PIDFD, exit signal 0 (like
/// [`spawn::clone_with`]): the child starts in the cgroup whose directory `cgroup_fd` is open
/// on, and runs `child`, which never returns.
pub(crate) fn clone3_into(
    flags: libc::c_ulong,
    cgroup_fd: libc::c_int,
    child: impl FnOnce(),
) -> std::io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: libc::c_int = -1;
    // c_ulong is u64 here, u32 on 32-bit targets.
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let flags = flags as u64;
    let mut args = CloneArgs {
        flags: flags | libc::CLONE_PIDFD as u64 | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        cgroup: cgroup_fd as u64,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 without CLONE_VM and without a stack is a fork; the kernel reads `args`
    // (size given) and writes the pidfd into `pidfd`. The child only runs `child`, which never
    // returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == 0 {
        child();
        // SAFETY: unreachable in practice (the child functions never return); never unwind.
        unsafe { libc::_exit(127) };
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CLONE_PIDFD stored a fresh fd that we now own.
    Ok((pid as libc::pid_t, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// Whether `clone3(CLONE_INTO_CGROUP)` is worth trying (the kernel has not refused it yet).
pub(crate) fn clone_into_cgroup_works() -> bool {
    !NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed)
}

/// Opens a cgroup v2 directory for CLONE_INTO_CGROUP.
pub(crate) fn open_dir(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// Clones PID 1 (`flags`, running `child`) directly into `cgroup` when it is a v2 cgroup and
/// the kernel can; `attached` says whether it started inside (v1: PID 1 joins by itself).
pub(crate) fn clone_in(
    flags: libc::c_ulong,
    cgroup: Option<&RunCgroup>,
    child: &dyn Fn(),
) -> std::io::Result<Cloned> {
    let plain = || {
        spawn::clone_with(flags, child).map(|(pid, pidfd)| Cloned {
            pid,
            pidfd,
            attached: cgroup.is_none(),
        })
    };
    let Some(dir) = cgroup.and_then(RunCgroup::v2_path) else {
        return plain();
    };
    if NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed) {
        return plain();
    }
    let Ok(fd) = open_dir(dir) else {
        return plain();
    };
    match clone3_into(flags, std::os::fd::AsRawFd::as_raw_fd(&fd), child) {
        Ok((pid, pidfd)) => Ok(Cloned {
            pid,
            pidfd,
            attached: true,
        }),
        Err(e) => {
            if kernel_lacks_clone3(&e) {
                NO_CLONE_INTO_CGROUP.store(true, Ordering::Relaxed);
            }
            // Refused for this cgroup (or for the namespaces: then the plain clone says so).
            plain()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that waits until `release` is written to (or closed), then exits: raw syscalls
    /// only.
    fn waiter(fd: libc::c_int) -> impl Fn() {
        move || {
            let mut b = 0u8;
            // SAFETY: a read into a local byte, then exit, in the forked child.
            unsafe {
                libc::read(fd, (&mut b as *mut u8).cast(), 1);
                libc::_exit(0)
            }
        }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn cgroup_lines(pid: libc::pid_t) -> String {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the child's cgroups")
    }

    fn end(pidfd: &OwnedFd) {
        assert!(spawn::kill_and_reap(pidfd));
    }

    #[test]
    fn clone3_puts_the_child_in_a_v2_cgroup() {
        // This machine's unified hierarchy (hybrid) or the only one (v2): a child of our own.
        let own = crate::cgroup::layout()
            .v2_dir
            .clone()
            .expect("a cgroup2 hierarchy is mounted (hybrid or unified)");
        let name = crate::cgroup::unique_name();
        let dir = own.join(&name);
        std::fs::create_dir(&dir).expect("a child of our own v2 cgroup");
        let cg = RunCgroup::over(Some(dir.clone()), Vec::new());
        let (r, w) = pipe();
        let child = waiter(std::os::fd::AsRawFd::as_raw_fd(&r));
        let c = clone_in(0, Some(&cg), &child).expect("clone");
        let lines = cgroup_lines(c.pid);
        drop(w);
        end(&c.pidfd);
        assert!(c.attached, "CLONE_INTO_CGROUP was refused");
        let v2 = lines
            .lines()
            .find(|l| l.starts_with("0::"))
            .expect("v2 line");
        assert!(v2.ends_with(&format!("/{name}")), "{lines}");
        cg.remove().expect("the cgroup is empty again");
    }

    #[test]
    fn a_refused_clone3_falls_back_to_attaching() {
        // Not a cgroup directory: the kernel refuses CLONE_INTO_CGROUP for it (EBADF).
        let dir = std::env::temp_dir().join(format!("cellblock-notcg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cg = RunCgroup::over(Some(dir.clone()), Vec::new());
        let (r, w) = pipe();
        let child = waiter(std::os::fd::AsRawFd::as_raw_fd(&r));
        let c = clone_in(0, Some(&cg), &child).expect("the plain clone follows");
        drop(w);
        end(&c.pidfd);
        assert!(!c.attached, "the caller must attach it");
        // Only a refusal for lack of kernel support disables the try for later runs.
        assert!(!NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed));
        cg.remove().expect("remove the temp dir");
    }

    #[test]
    fn a_v1_child_joins_its_cgroup_by_itself() {
        let limits = crate::spec::Limits {
            memory: Some(64 << 20),
            pids: Some(1),
            ..Default::default()
        };
        let cg = RunCgroup::create(&limits, false).expect("cgroups as root");
        assert!(cg.v2_path().is_none(), "this test is for v1 hierarchies");
        let name = cg.dir_paths()[0]
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let tasks = cg.open_tasks().expect("the tasks files");
        let raw: Vec<libc::c_int> = tasks.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
        let (r, w) = pipe();
        let read_fd = std::os::fd::AsRawFd::as_raw_fd(&r);
        // The child does what PID 1 does first: "0" to each tasks file, then waits.
        let child = move || {
            for fd in &raw {
                // SAFETY: a write to an fd inherited from the parent, in the forked child.
                if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } != 1 {
                    // SAFETY: exit without unwinding in the forked child.
                    unsafe { libc::_exit(3) };
                }
            }
            waiter(read_fd)()
        };
        let c = clone_in(0, Some(&cg), &child).expect("clone");
        assert!(!c.attached, "on v1 the child joins by itself");
        // pids.max is 1: the child fits, and nothing of ours went in with it.
        let joined = wait_until(tasks.len(), || {
            cgroup_lines(c.pid)
                .lines()
                .filter(|l| l.ends_with(&format!("/{name}")))
                .count()
        });
        let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
            .expect("our threads")
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("cgroup")).ok())
            .collect();
        drop(w);
        end(&c.pidfd);
        assert_eq!(
            joined,
            tasks.len(),
            "the child is in every hierarchy of the run"
        );
        assert!(
            threads.iter().all(|t| !t.contains(&name)),
            "a thread of ours went in"
        );
        drop(tasks);
        cg.remove().expect("nothing is left in the cgroup");
    }

    /// Polls `f` (up to 2 s) until it returns `want`; returns its last value.
    fn wait_until(want: usize, f: impl Fn() -> usize) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let n = f();
            if n == want || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn kernel_refusals_are_told_apart() {
        for errno in [libc::ENOSYS, libc::E2BIG, libc::EINVAL] {
            assert!(kernel_lacks_clone3(&std::io::Error::from_raw_os_error(
                errno
            )));
        }
        assert!(!kernel_lacks_clone3(&std::io::Error::from_raw_os_error(
            libc::EPERM
        )));
    }
}
