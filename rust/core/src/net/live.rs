//! Live policy changes: the sandbox's firewall rules follow a new allowlist.
//!
//! The rules live in the sandbox's network namespace, which the (threaded) supervisor cannot
//! join. As for exposed ports (`expose.rs`), a helper forked from the supervisor joins the
//! network namespace (and, unprivileged, the user namespace that owns it), runs `nft -f -`
//! with a ruleset that deletes and re-creates the sandbox's table in one transaction, and
//! exits. It joins neither the pid nor the mount namespace: the sandbox never sees it, and
//! `nft` is the host's.

use super::allow::Allowlist;
use super::child::{run_nft, ChildPlan};
use crate::error::{Error, Result};
use crate::spawn::{self, Holder};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long loading the new rules may take.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Replaces the firewall rules of `holder`'s sandbox with those for `allow` (the rules
/// [`super::setup_in_child`] loaded at creation for the first list). Atomic: on failure the
/// old rules stay.
pub fn reload_rules(holder: &Holder, allow: &Allowlist) -> Result<()> {
    let plan = ChildPlan::for_reload(allow)?;
    let pidfd = holder.pidfd.as_raw_fd();
    let ns = if holder.root {
        // Root built the network namespace in the initial user namespace.
        libc::CLONE_NEWNET
    } else {
        libc::CLONE_NEWUSER | libc::CLONE_NEWNET
    };
    let (_, child) =
        spawn::clone_with(0, || reload_main(pidfd, ns, &plan)).map_err(|e| Error::Setup {
            stage: "start the firewall updater",
            source: e,
        })?;
    match wait_exit(&child, Instant::now() + RELOAD_TIMEOUT) {
        Some(0) => Ok(()),
        Some(1) => Err(Error::Network(
            "cannot enter the sandbox's network namespace to update its rules".into(),
        )),
        Some(code) => Err(Error::Network(format!(
            "nft refused the new rules (status {code}); the old policy stays"
        ))),
        None => {
            spawn::kill_and_reap_within(&child, Duration::from_secs(1));
            Err(Error::Network(
                "updating the sandbox's rules timed out; the old policy stays".into(),
            ))
        }
    }
}

/// The helper's whole life (raw syscalls only: it is a copy of a threaded process).
fn reload_main(pidfd: libc::c_int, ns: libc::c_int, plan: &ChildPlan) -> ! {
    crate::child::close_other_fds(&[pidfd]);
    // SAFETY: prctl, setns through a pidfd we hold, _exit.
    unsafe {
        // Not dumpable: nothing of the sandbox's user namespace may ptrace it.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        if libc::setns(pidfd, ns) < 0 {
            libc::_exit(1);
        }
        libc::close(pidfd);
        // Fill fds 0-2 (closed above), so that nft's stdin socket does not land on 0, where
        // run_nft's dup2 onto 0 would keep it close-on-exec.
        for _ in 0..3 {
            libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        }
        libc::_exit(if run_nft(plan).is_ok() { 0 } else { 2 });
    }
}

/// The exit status of the child behind `pidfd`, reaped; `None` if it is not done by `deadline`.
fn wait_exit(pidfd: &OwnedFd, deadline: Instant) -> Option<i32> {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        // SAFETY: polls one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as libc::c_int) };
        if r > 0 {
            break;
        }
    }
    // SAFETY: waitid on our own child's pidfd into a zeroed local siginfo.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::__WALL,
        );
        if r < 0 {
            return None;
        }
        Some(if info.si_code == libc::CLD_EXITED {
            info.si_status()
        } else {
            128 + info.si_status()
        })
    }
}
