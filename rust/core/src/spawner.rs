//! Cloning a sandbox's PID 1 straight into its cgroup, so that the caller never writes a pid to
//! `cgroup.procs` (on cgroup v1 the first such write after a quiet spell waits for an RCU grace
//! period, 5-24 ms: it takes a global lock that the kernel only frees after one).
//!
//! - cgroup v2: `clone3(CLONE_INTO_CGROUP)`; when the kernel refuses it (too old, or the cgroup
//!   cannot take the child that way) the plain clone follows and the pid is attached after.
//! - cgroup v1: a thread moves itself alone into the run's cgroups (writing "0" to `tasks`:
//!   migrating oneself needs no global lock), clones PID 1, which starts inside, and moves back
//!   out. The caller's own thread does it, unless it is the process's first thread, whose
//!   cgroup v1 memcg is charged for the whole process's memory: then a long-lived spawner
//!   thread does (one for the life of the process, because PID 1's parent-death signal follows
//!   the thread that cloned it). A forked child of the process (no such thread), or a failure
//!   to enter, clones on the caller's thread and attaches after.

use crate::cgroup::RunCgroup;
use crate::spawn;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

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

/// Opens a cgroup v2 directory for CLONE_INTO_CGROUP.
fn open_dir(path: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// Clones PID 1 (`flags`, running `child`) directly into `cgroup` when it can (see the module
/// documentation), else on this thread, to be attached by the caller. `pids_limit` is the
/// run's pids limit (restored after the spawner thread leaves the cgroup).
pub(crate) fn clone_in(
    flags: libc::c_ulong,
    cgroup: Option<&RunCgroup>,
    pids_limit: Option<u64>,
    child: &(dyn Fn() + Sync),
) -> std::io::Result<Cloned> {
    let plain = || {
        spawn::clone_with(flags, child).map(|(pid, pidfd)| Cloned {
            pid,
            pidfd,
            attached: cgroup.is_none(),
        })
    };
    let Some(cg) = cgroup else { return plain() };
    if let Some(dir) = cg.v2_path() {
        if NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed) {
            return plain();
        }
        let Ok(fd) = open_dir(dir) else {
            return plain();
        };
        let fd_raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        return match clone3_into(flags, fd_raw, child) {
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
        };
    }
    // A thread other than the process's first can enter itself: moving it does not move the
    // process's memory charges (v1 memcg follows the mm's owner, the first thread), and the
    // parent-death signal then follows the caller's thread, as for a plain clone.
    // SAFETY: gettid and getpid have no side effects.
    let first_thread = unsafe { libc::gettid() == libc::getpid() };
    if !leader_alive() {
        // The first thread has exited: the mm's owner may be any thread, this one included.
        return plain();
    }
    match clone_in_v1(flags, cg, pids_limit, child, first_thread) {
        Some(r) => r.map(|(pid, pidfd)| Cloned {
            pid,
            pidfd,
            attached: true,
        }),
        // No spawner thread here (a forked child), or the thread could not enter.
        None => plain(),
    }
}

/// Whether the process's first thread is alive (then it owns the mm, whose memory charges
/// follow the owner's memcg on cgroup v1; once it has exited, another thread may own it).
fn leader_alive() -> bool {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{}/stat", std::process::id()));
    let state = stat.ok().and_then(|s| {
        s.rsplit_once(')')
            .map(|(_, r)| r.trim_start().chars().next())
    });
    matches!(state, Some(Some(c)) if c != 'Z' && c != 'X')
}

/// cgroup v1: enters `cg` with this thread (or the spawner thread: `via_spawner`), clones,
/// leaves. `None`: the thread could not enter (nothing was cloned).
fn clone_in_v1(
    flags: libc::c_ulong,
    cg: &RunCgroup,
    pids_limit: Option<u64>,
    child: &(dyn Fn() + Sync),
    via_spawner: bool,
) -> Option<std::io::Result<(libc::pid_t, OwnedFd)>> {
    let job = move || -> Option<std::io::Result<(libc::pid_t, OwnedFd)>> {
        cg.enter_thread(pids_limit).ok()?;
        let r = spawn::clone_with(flags, child);
        if let Err(e) = cg.leave_thread(pids_limit) {
            // The thread is still in the run's cgroup: its removal retries, then records it.
            crate::cell::teardown::record_error(format!(
                "a thread could not leave the run's cgroup after cloning PID 1: {e}"
            ));
        }
        Some(r)
    };
    if via_spawner {
        on_spawner(job).flatten()
    } else {
        job()
    }
}

/// A job for the spawner thread, borrowed from a caller that waits until it has run.
type Job = Box<dyn FnOnce() + Send + 'static>;

struct Spawner {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// The process the thread belongs to (a forked child has no such thread).
    owner: u32,
}

fn spawner() -> Option<&'static Spawner> {
    static S: OnceLock<Option<Spawner>> = OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cellblock-spawn".into())
            // Only short syscall sequences and a fork run here.
            .stack_size(256 << 10)
            .spawn(move || {
                for job in rx {
                    // A panicking job must not end the thread: PID 1s it cloned would die.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .ok()?;
        Some(Spawner {
            jobs: Mutex::new(tx),
            owner: std::process::id(),
        })
    })
    .as_ref()
    .filter(|s| s.owner == std::process::id())
}

/// Runs `f` on the spawner thread and returns its result; `None` when there is no spawner
/// thread (or `f` panicked).
fn on_spawner<R: Send>(f: impl FnOnce() -> R + Send) -> Option<R> {
    let sp = spawner()?;
    let (tx, rx) = mpsc::sync_channel::<R>(1);
    let job: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
        let r = f();
        let _ = tx.send(r);
    });
    // SAFETY: only the lifetime is widened. The job borrows from this frame, and this function
    // returns only once the job has run or been dropped: `rx.recv()` returns when `tx` (owned
    // by the job) sent or was dropped with the job; a job the channel refused is handed back
    // and dropped here.
    let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + '_>, Job>(job) };
    let sent = match sp.jobs.lock() {
        Ok(tx) => tx.send(job).map_err(|e| drop(e.0)),
        Err(_) => {
            drop(job);
            Err(())
        }
    };
    sent.ok()?;
    rx.recv().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawner_runs_jobs_that_borrow() {
        let local = [1u8, 2, 3];
        let sum = on_spawner(|| local.iter().map(|x| *x as u32).sum::<u32>());
        assert_eq!(sum, Some(6));
        // The job ran on another thread (the spawner), not this one.
        let here = std::thread::current().id();
        assert_ne!(on_spawner(|| std::thread::current().id()), Some(here));
    }

    #[test]
    fn a_panicking_job_keeps_the_spawner() {
        assert_eq!(on_spawner(|| -> u8 { panic!("job fails") }), None);
        assert_eq!(on_spawner(|| 7), Some(7));
    }

    /// A child that waits until `release` is written to (or closed), then exits: raw syscalls
    /// only.
    fn waiter(fd: libc::c_int) -> impl Fn() + Sync {
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
        let c = clone_in(0, Some(&cg), None, &child).expect("clone");
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
        let c = clone_in(0, Some(&cg), None, &child).expect("the plain clone follows");
        drop(w);
        end(&c.pidfd);
        assert!(!c.attached, "the caller must attach it");
        // Only a refusal for lack of kernel support disables the try for later runs.
        assert!(!NO_CLONE_INTO_CGROUP.load(Ordering::Relaxed));
        cg.remove().expect("remove the temp dir");
    }

    #[test]
    fn v1_threads_clone_inside_and_leave() {
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
        // The caller's own thread, then the spawner thread (for a caller's first thread).
        for via_spawner in [false, true] {
            let (r, w) = pipe();
            let child = waiter(std::os::fd::AsRawFd::as_raw_fd(&r));
            // pids.max is 1: the clone succeeds only because the entering thread's own place
            // was added for the time it is inside.
            let (pid, pidfd) = clone_in_v1(0, &cg, Some(1), &child, via_spawner)
                .expect("the thread entered")
                .expect("clone");
            let lines = cgroup_lines(pid);
            let threads: Vec<String> = std::fs::read_dir("/proc/self/task")
                .expect("our threads")
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("cgroup")).ok())
                .collect();
            let pids_max = cg
                .dir_paths()
                .iter()
                .find(|d| d.join("pids.max").exists())
                .map(|d| std::fs::read_to_string(d.join("pids.max")).expect("pids.max"));
            drop(w);
            end(&pidfd);
            for ctrl in ["memory", "pids", "cpuacct"] {
                let line = lines
                    .lines()
                    .find(|l| {
                        l.split(':')
                            .nth(1)
                            .is_some_and(|c| c.split(',').any(|x| x == ctrl))
                    })
                    .expect("v1 line");
                assert!(line.ends_with(&format!("/{name}")), "{ctrl}: {lines}");
            }
            assert!(
                threads.iter().all(|t| !t.contains(&name)),
                "a thread stayed inside"
            );
            assert_eq!(pids_max.as_deref().map(str::trim), Some("1"));
        }
        cg.remove().expect("nothing is left in the cgroup");
    }

    #[test]
    fn our_first_thread_is_alive() {
        assert!(leader_alive());
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
