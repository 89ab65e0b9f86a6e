//! The fork server's side: a small, single-threaded process that clones each PID 1 it is asked for.
//!
//! It is the supervisor's child, started once (see [`super::launch`]). PID 1s are cloned with
//! `CLONE_PARENT`, so each is the supervisor's child as if the supervisor had cloned it: the
//! supervisor reaps it and holds its pidfd; the fork server keeps nothing of a run once it replied.

use super::wire::{self, Mounts, Reply, PIPE_FDS};
use crate::cell::init::ServePlan;
use crate::child::{self, InitPlan, JoinPlan, TARGET_STACK};
use crate::fdpass;
use crate::fs::MountPlan;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// The control socket's fd in the fork server (set up by the launcher before exec).
pub const CONTROL_FD: RawFd = 3;

/// The first message a fork server sends: it is ready for requests, in this version's wire format
/// (a fork server of another build, e.g. started from a package upgraded on disk, is not used).
pub(crate) const HELLO: &[u8] = concat!(
    "cellblock-forkserver ",
    env!("CARGO_PKG_VERSION"),
    " wire 1"
)
.as_bytes();

/// Serves requests on [`CONTROL_FD`] until the supervisor closes it; never returns.
pub fn serve() -> ! {
    // SAFETY: prctl with a static NUL-terminated name; chdir to "/" so that no PID 1 inherits
    // a working directory of the supervisor's.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"cellblock-fsrv".as_ptr(), 0, 0, 0);
        libc::chdir(c"/".as_ptr());
    }
    // SAFETY: the launcher placed the control socket at CONTROL_FD for this process.
    let sock = unsafe { BorrowedFd::borrow_raw(CONTROL_FD) };
    if fdpass::send_msg(CONTROL_FD, HELLO, &[]).is_err() {
        exit(1);
    }
    let mut buf = vec![0u8; wire::REQUEST_CAP];
    let mut plans: Vec<Option<MountPlan>> = (0..wire::PLAN_SLOTS).map(|_| None).collect();
    loop {
        let (n, fds) = match fdpass::recv_msg(sock, &mut buf) {
            Ok((0, _)) => exit(0),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => (0, Vec::new()),
            Err(_) => exit(0),
        };
        let (reply, pidfd) = match handle(&buf[..n], &fds, &mut plans) {
            Ok((reply, pidfd)) => (reply, Some(pidfd)),
            Err(errno) => (
                Reply {
                    pid: 0,
                    errno,
                    attached: false,
                    serve_buf: 0,
                },
                None,
            ),
        };
        // The run's fds are PID 1's now; the request may hold the run's environment.
        drop(fds);
        buf[..n].fill(0);
        let Ok(bytes) = postcard::to_stdvec(&reply) else {
            exit(1)
        };
        let passed: Vec<RawFd> = pidfd.iter().map(AsRawFd::as_raw_fd).collect();
        if fdpass::send_msg(CONTROL_FD, &bytes, &passed).is_err() {
            exit(0);
        }
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends this single-threaded process without running Python's finalizers.
    unsafe { libc::_exit(code) }
}

/// Clones the PID 1 a request describes: the reply (and PID 1's pidfd) or an errno.
fn handle(
    bytes: &[u8],
    fds: &[OwnedFd],
    plans: &mut [Option<MountPlan>],
) -> Result<(Reply, OwnedFd), i32> {
    let req = wire::decode(bytes).ok_or(libc::EPROTO)?;
    let slot = match req.mounts {
        Some(Mounts::New(slot, plan)) => {
            let s = plans.get_mut(usize::from(slot)).ok_or(libc::EPROTO)?;
            *s = Some(plan);
            Some(slot)
        }
        Some(Mounts::Slot(slot)) => Some(slot),
        None => None,
    };
    let mounts = match slot {
        Some(slot) => Some(
            plans
                .get(usize::from(slot))
                .and_then(Option::as_ref)
                .ok_or(libc::EPROTO)?,
        ),
        None => None,
    };
    // A sandbox's PID 1 has a mount plan; a session call's joiner enters an existing one.
    let valid = fds.len() == req.layout.count()
        && req.serve != req.target.is_some()
        && mounts.is_some() != req.join.is_some()
        && req.layout.holder == req.join.is_some();
    if !valid {
        return Err(libc::EPROTO);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let (pipes, rest) = raw.split_at(PIPE_FDS);
    let pipes: &[RawFd; PIPE_FDS] = pipes.try_into().map_err(|_| libc::EPROTO)?;
    let (holder, rest) = if req.layout.holder {
        (rest[0], &rest[1..])
    } else {
        (-1, rest)
    };
    let (netns, rest) = if req.layout.netns {
        (rest[0], &rest[1..])
    } else {
        (-1, rest)
    };
    let (tasks, rest) = rest.split_at(usize::from(req.layout.tasks));
    let cgroup_dir = rest.first().copied();
    let target = match req.target {
        Some(t) => Some(t.into_plan().map_err(|_| libc::EPROTO)?),
        None => None,
    };
    // A cell's PID 1 receives its command into its copy of this buffer and runs it on its copy
    // of this stack; ours are freed once it is cloned.
    let cell_buf = vec![
        0u64;
        if req.serve {
            crate::cell::wire::REQUEST_CAP / 8
        } else {
            0
        }
    ];
    let cell_stack = vec![0u8; if req.serve { TARGET_STACK } else { 0 }];
    let serve = ServePlan {
        buf: cell_buf.as_ptr().cast_mut().cast(),
        stack_top: child::stack_top(&cell_stack),
        last_cap: crate::spawn::last_cap(),
    };
    let init = InitPlan {
        mounts,
        identity: &req.identity,
        hostname: &req.hostname,
        target: target.as_ref(),
        fds: wire::child_fds(pipes),
        pdeathsig: req.pdeathsig,
        lifeline: -1,
        wipe: crate::spawn::wipe_ranges(),
        net: req.net.as_ref(),
        serve: req.serve.then_some(&serve),
        netns,
        join_tasks: tasks,
    };
    // CLONE_PARENT: PID 1 (or a call's joiner) is the supervisor's child (its exit signal is
    // ours: none).
    let flags = req.flags as libc::c_ulong | libc::CLONE_PARENT as libc::c_ulong;
    let join = req.join.map(|root| JoinPlan {
        pidfd: holder,
        root,
    });
    let start = || match &join {
        Some(join) => child::join_main(join, &init),
        None => child::init_main(&init),
    };
    let reply = |pid, attached| Reply {
        pid,
        errno: 0,
        attached,
        serve_buf: if req.serve {
            cell_buf.as_ptr() as u64
        } else {
            0
        },
    };
    if let Some(dir) = cgroup_dir {
        // Refused for this cgroup or this kernel: the plain clone, the supervisor attaches.
        if let Ok((pid, pidfd)) = crate::spawner::clone3_into(flags, dir, start) {
            return Ok((reply(pid, true), pidfd));
        }
    }
    crate::spawn::clone_with(flags, start)
        .map(|(pid, pidfd)| (reply(pid, false), pidfd))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}
