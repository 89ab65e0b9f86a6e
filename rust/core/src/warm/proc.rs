//! What the kernel says about a warm worker: its pid, CPU time, memory, exit status, limits.

use crate::error::{errno, Error, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

/// The host pid behind a pidfd (from /proc/self/fdinfo).
pub(super) fn pidfd_pid(pidfd: &OwnedFd) -> Option<libc::pid_t> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p: &libc::pid_t| *p > 0)
}

pub(super) fn signal_pidfd(pidfd: &OwnedFd, sig: libc::c_int) -> bool {
    // SAFETY: pidfd_send_signal on a pidfd we hold.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        ) == 0
    }
}

fn ticks() -> f64 {
    // SAFETY: sysconf has no side effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// What /proc/<pid>/stat says of a process, as the kernel keeps it.
pub(super) struct ProcStat {
    state: char,
    /// CPU time of the process itself (what RLIMIT_CPU counts).
    pub(super) own: Duration,
    /// CPU time of the process and of the children it reaped.
    pub(super) total: Duration,
    /// Raw wait status (meaningful for a zombie).
    status: i32,
}

pub(super) fn proc_stat(pid: libc::pid_t) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let secs = |t: u64| Duration::from_secs_f64(t as f64 / ticks());
    // Fields 14-17 (utime, stime, cutime, cstime) and 52 (exit_code), counted from 1.
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        own: secs((11..13).map(num).sum::<Option<u64>>()?),
        total: secs((11..15).map(num).sum::<Option<u64>>()?),
        status: f.get(49).and_then(|v| v.parse::<i32>().ok()).unwrap_or(0),
    })
}

/// The ended worker's wait status and CPU time, read from its zombie. The pidfd still
/// reaching the process afterwards proves the entry was the worker's (it is not reaped yet,
/// so its pid cannot have been reused). None: already reaped (e.g. its relay was killed).
/// The CPU time is always shown; the status only to a privileged reader.
pub(super) fn zombie_exit(pid: libc::pid_t, pidfd: &OwnedFd) -> Option<(i32, Duration)> {
    for _ in 0..50 {
        let st = proc_stat(pid)?;
        if st.state == 'Z' {
            return signal_pidfd(pidfd, 0).then_some((st.status, st.total));
        }
        // The pidfd reports the exit a moment before the entry shows it.
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

/// `struct pidfd_info` of linux/pidfd.h (Linux 6.15+), up to the fields read here.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
    coredump_mask: u32,
    spare: u32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// `_IOWR(PIDFS_IOCTL_MAGIC, 11, struct pidfd_info)`.
const PIDFD_GET_INFO: libc::c_ulong =
    (3 << 30) | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16) | (0xFF << 8) | 11;

/// The worker's wait status as the kernel recorded it when it was reaped (by its relay, or
/// by the call's init if the relay is gone): no privilege needed, nothing to race. Waits a
/// little for the reaping. `Err(())`: this kernel cannot tell (before 6.15).
pub(super) fn reaped_status(pidfd: &OwnedFd) -> Result<Option<i32>, ()> {
    for _ in 0..200 {
        let mut info = PidfdInfo {
            mask: PIDFD_INFO_EXIT,
            ..PidfdInfo::default()
        };
        // SAFETY: PIDFD_GET_INFO fills a struct of the size encoded in the request.
        let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
        if r < 0 && matches!(errno(), libc::EINVAL | libc::ENOTTY) {
            return Err(());
        }
        if r == 0 && info.mask & PIDFD_INFO_EXIT != 0 {
            return Ok(Some(info.exit_code));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(None)
}

const PIDFD_INFO_PID: u64 = 1 << 0;

/// The parent's pid of the process of `pidfd`, in our pid namespace (PIDFD_GET_INFO, Linux
/// 6.13+). None: the process has exited, or this kernel cannot tell.
pub(crate) fn parent_of(pidfd: &OwnedFd) -> Option<libc::pid_t> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_PID,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO fills a struct of the size encoded in the request.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    // ids: pid, tgid, ppid, ...
    (r == 0 && info.mask & PIDFD_INFO_PID != 0).then_some(info.ids[2] as libc::pid_t)
}

pub(super) fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Sets the worker's RLIMIT_CPU to `used + budget` seconds (SIGXCPU there, SIGKILL a second
/// later), or lifts it (`None`).
pub(super) fn limit_cpu(pid: libc::pid_t, used: Duration, budget: Option<f64>) -> Result<()> {
    let lim = match budget {
        Some(b) => {
            let soft = (used.as_secs_f64() + b).ceil().max(1.0) as u64;
            libc::rlimit {
                rlim_cur: soft,
                rlim_max: soft + 1,
            }
        }
        None => libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        },
    };
    // SAFETY: prlimit on the worker with a limit struct we own.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_CPU, &lim, std::ptr::null_mut()) } < 0 {
        return Err(Error::setup("limit the warm call's CPU time"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn proc_stat_reads_a_zombie_status() {
        // SAFETY: a plain fork; the child only exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: leaving the child at once.
            unsafe { libc::_exit(7) };
        }
        // SAFETY: pidfd_open on our own child.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
        super::super::conn::poll_one(raw, libc::POLLIN, Duration::from_secs(5));
        let (status, _) = zombie_exit(pid, &pidfd).expect("zombie readable");
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        assert_eq!(
            zombie_exit(pid, &pidfd),
            None,
            "a reaped pid is never read as ours"
        );
        assert_eq!(
            reaped_status(&pidfd),
            Ok(Some(st)),
            "the kernel kept the status"
        );
    }
}
