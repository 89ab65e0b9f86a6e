//! The fork server: a small helper process that clones the PID 1 of cold runs and of cells, and
//! session calls' joiners, instead of the caller.
//!
//! Cloning PID 1 from the caller (a Python process of 40 MiB or a service of several GiB)
//! copies the caller's page tables on every run (0.65 ms for 38 MiB, 1.3 ms from cold caches)
//! and write-protects all of its memory, so the caller's next writes fault once per page; and
//! PID 1 starts as a copy of the caller's heap. The fork server is a fresh, single-threaded
//! process started once by the supervisor (the embedding layer says how: [`set_command`]; the
//! Python package starts its interpreter in isolated mode with only the native module loaded). It
//! receives each run's prepared plan and fds over a socket (see [`wire`]) and clones PID 1 with
//! `CLONE_PARENT`: the supervisor is PID 1's parent, reaps it and holds its pidfd as before.
//!
//! The fork server is a part made ahead (see [`crate::cell::parts`]): the first cold run only
//! records demand, the parts thread starts it, it is stopped when idle, on a drain and at exit, and
//! it dies with the supervisor (`PR_SET_PDEATHSIG` on the parts thread, which never exits, and EOF
//! on its socket). PID 1s it cloned have the parts thread as parent thread, so their parent-death
//! signal also fires only when the supervisor's process ends. Without a fork server (not
//! configured, `CELLBLOCK_FORKSERVER=0`, a forked child of the supervisor, a request too
//! large) PID 1 is cloned from the caller as before.

mod launch;
mod serve;
mod wire;

pub use serve::{serve, CONTROL_FD};

use crate::cgroup::RunCgroup;
use crate::child::{InitPlan, JoinPlan};
use crate::fdpass;
use crate::fs::MountPlan;
use crate::spawner::Cloned;
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a starting fork server may take to say it is ready.
const START_LIMIT: Duration = Duration::from_secs(10);

/// The program (and arguments) that becomes a fork server: it must call [`serve`] with its control
/// socket at [`CONTROL_FD`].
static COMMAND: OnceLock<Vec<CString>> = OnceLock::new();

/// The running fork server, if any.
static FORKSERVER: Mutex<Option<Forkserver>> = Mutex::new(None);

/// Processes the fork server cloned (PID 1s of runs and cells, session calls' joiners).
static CLONES: AtomicU64 = AtomicU64::new(0);

/// A started fork server.
#[derive(Debug)]
struct Forkserver {
    /// Our end of its control socket.
    sock: OwnedFd,
    /// Its pidfd (it is our child).
    pidfd: OwnedFd,
    /// The process it belongs to (a forked child of the supervisor must not use it).
    owner: u32,
    /// The mount plans it holds, by slot (kept alive here, so that an address is never
    /// reused for another plan while its slot names it), and the slot to replace next.
    plans: Vec<Arc<MountPlan>>,
    next_slot: u8,
}

impl Forkserver {
    /// Where `plan` goes: (slot, whether it must be sent); its slot when the fork server holds
    /// it.
    fn slot_for(&self, plan: &Arc<MountPlan>) -> (u8, bool) {
        match self.plans.iter().position(|p| Arc::ptr_eq(p, plan)) {
            Some(i) => (i as u8, false),
            None => (self.next_slot, true),
        }
    }

    /// Records that the fork server now holds `plan` in `slot` (sent there).
    fn sent(&mut self, slot: u8, plan: &Arc<MountPlan>) {
        self.next_slot = (slot + 1) % wire::PLAN_SLOTS;
        match self.plans.get_mut(usize::from(slot)) {
            Some(p) => *p = Arc::clone(plan),
            None => self.plans.push(Arc::clone(plan)),
        }
    }
}

impl Drop for Forkserver {
    fn drop(&mut self) {
        if self.owner == std::process::id() {
            crate::spawn::kill_and_reap(&self.pidfd);
        }
    }
}

/// Sets how a fork server is started (once per process; later calls are ignored): `argv[0]` is
/// executed with these arguments, a minimal environment and its control socket at
/// [`CONTROL_FD`]. Until this is set cold runs clone PID 1 from the caller.
pub fn set_command(argv: Vec<String>) -> crate::Result<()> {
    let argv = argv
        .into_iter()
        .map(|a| {
            CString::new(a).map_err(|_| {
                crate::Error::InvalidSpec("forkserver command: NUL in argument".into())
            })
        })
        .collect::<crate::Result<Vec<_>>>()?;
    if argv.is_empty() {
        return Err(crate::Error::InvalidSpec(
            "forkserver command: empty".into(),
        ));
    }
    let _ = COMMAND.set(argv);
    Ok(())
}

/// Whether cold runs may use a fork server in this process (configured, not turned off).
pub(crate) fn enabled() -> bool {
    static OFF: OnceLock<bool> = OnceLock::new();
    COMMAND.get().is_some()
        && !*OFF.get_or_init(|| std::env::var("CELLBLOCK_FORKSERVER").is_ok_and(|v| v == "0"))
}

/// Counters of the fork server, for tests and benches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForkserverStats {
    /// Processes the fork server cloned (PID 1s of runs and cells, session calls' joiners).
    pub clones: u64,
    /// A fork server is running now.
    pub running: bool,
    /// Its host pid (0 when none).
    pub pid: i32,
}

/// The fork server's counters.
pub fn stats() -> ForkserverStats {
    let z = FORKSERVER.lock().ok();
    let live = z
        .as_ref()
        .and_then(|g| g.as_ref())
        .filter(|z| z.owner == std::process::id());
    ForkserverStats {
        clones: CLONES.load(Ordering::Relaxed),
        running: live.is_some(),
        pid: live
            .and_then(|z| crate::spawn::pidfd_pid(&z.pidfd))
            .unwrap_or(0),
    }
}

/// Whether a fork server of this process is running.
pub(crate) fn running() -> bool {
    FORKSERVER
        .lock()
        .ok()
        .is_some_and(|z| z.as_ref().is_some_and(|z| z.owner == std::process::id()))
}

/// Stops the fork server (PID 1s it cloned are not affected: they are the supervisor's children).
pub(crate) fn stop() {
    let z = FORKSERVER.lock().ok().and_then(|mut g| g.take());
    match z {
        // A forked child's copy: forget it without touching the parent's fork server.
        Some(z) if z.owner != std::process::id() => std::mem::forget(z),
        z => drop(z),
    }
}

/// Starts a fork server (on the parts thread, which must outlive every PID 1 it clones); true when
/// one is running afterwards.
pub(crate) fn start() -> bool {
    if running() {
        return true;
    }
    let Some(argv) = COMMAND.get() else {
        return false;
    };
    match launch::launch(argv) {
        Ok(z) => {
            if let Ok(mut g) = FORKSERVER.lock() {
                stop_forked_copy(&mut g);
                *g = Some(z);
                return true;
            }
            false
        }
        Err(_) => false,
    }
}

fn stop_forked_copy(g: &mut Option<Forkserver>) {
    if g.as_ref().is_some_and(|z| z.owner != std::process::id()) {
        if let Some(z) = g.take() {
            std::mem::forget(z);
        }
    }
}

/// A PID 1 the fork server cloned.
#[derive(Debug)]
pub(crate) struct FromForkserver {
    pub(crate) cloned: Cloned,
    /// A cell's PID 1 (`init.serve`): the address of its request buffer, in its memory.
    pub(crate) serve_buf: usize,
}

/// Has the fork server clone the PID 1 of `init` (`mounts`: its mount plan; `flags`: its
/// namespaces; `cgroup`: the run's cgroup, cloned into on v2), or with `join` (and no mount
/// plan) a session call's joiner. A cell's PID 1 (`init.serve`) gets the fork server's own
/// buffer and stack. None when there is no fork server or the request does not suit one: the
/// caller clones the process itself then (nothing was started). `deadline`: the run's set-up
/// deadline.
pub(crate) fn clone(
    init: &InitPlan<'_>,
    mounts: Option<&Arc<MountPlan>>,
    join: Option<&JoinPlan>,
    flags: libc::c_ulong,
    cgroup: Option<&RunCgroup>,
    deadline: Instant,
) -> Option<std::io::Result<FromForkserver>> {
    let serve = init.serve.is_some();
    let suits =
        init.lifeline < 0 && serve != init.target.is_some() && mounts.is_some() != join.is_some();
    if !enabled() || !suits {
        return None;
    }
    // Runs and cells start a fork server on demand; session calls only use a running one (a
    // process that only opens sessions keeps no helper process).
    let available = match join {
        Some(_) => running(),
        None => crate::cell::parts::want_forkserver(),
    };
    if !available {
        return None;
    }
    let target = init.target.map(wire::TargetRef::of);
    let cgroup_dir = cgroup
        .and_then(RunCgroup::v2_path)
        .filter(|_| crate::spawner::clone_into_cgroup_works())
        .and_then(|d| crate::spawner::open_dir(d).ok());
    let layout = wire::FdLayout {
        holder: join.is_some(),
        netns: init.netns >= 0,
        tasks: u8::try_from(init.join_tasks.len()).ok()?,
        cgroup_dir: cgroup_dir.is_some(),
    };
    let mut fds: Vec<RawFd> = wire::pipe_fds(&init.fds).to_vec();
    fds.extend(join.map(|j| j.pidfd));
    if init.netns >= 0 {
        fds.push(init.netns);
    }
    fds.extend_from_slice(init.join_tasks);
    fds.extend(cgroup_dir.as_ref().map(AsRawFd::as_raw_fd));
    if fds.len() > fdpass::MAX_FDS {
        return None;
    }
    let mut g = FORKSERVER.lock().ok()?;
    stop_forked_copy(&mut g);
    let z = g.as_mut()?;
    let slot = mounts.map(|m| (m, z.slot_for(m)));
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let request = wire::RequestRef {
        flags: flags as u64,
        layout,
        pdeathsig: init.pdeathsig,
        mounts: slot.map(|(m, (slot, new))| {
            if new {
                wire::MountsRef::New(slot, m)
            } else {
                wire::MountsRef::Slot(slot)
            }
        }),
        identity: init.identity,
        hostname: init.hostname,
        target,
        serve,
        join: join.map(|j| j.root),
        net: init.net,
    };
    let bytes = wire::encode(&request)?;
    match fdpass::send_msg(z.sock.as_raw_fd(), &bytes, &fds) {
        Ok(()) => {}
        // Too large for the socket (its buffer is capped by the kernel): this run only.
        Err(libc::EMSGSIZE | libc::ENOBUFS) => return None,
        // Nothing was started: the fork server is gone.
        Err(_) => {
            *g = None;
            return None;
        }
    }
    if let Some((m, (slot, true))) = slot {
        z.sent(slot, m);
    }
    let reply = match read_reply(z, deadline) {
        Ok((r, _)) if r.errno == libc::EPROTO => {
            // It could not read the request (nothing was started): not a fork server to keep, nor
            // to start again in this process.
            *g = None;
            drop(g);
            crate::cell::parts::forkserver_failed();
            return None;
        }
        Ok(r) => r,
        Err(e) => {
            // It took the request and did not answer: it may have cloned PID 1 or not. The
            // fork server is stopped (and reaped: none of its fds remains open); the caller finds
            // out whether a PID 1 holds the run's fds (see [`ended_without_answer`]).
            *g = None;
            let ended = e.kind() != std::io::ErrorKind::TimedOut;
            return Some(Err(if ended {
                std::io::Error::new(std::io::ErrorKind::ConnectionAborted, ENDED)
            } else {
                e
            }));
        }
    };
    drop(g);
    Some(match reply {
        (r, Some(pidfd)) if r.errno == 0 && r.pid > 0 && (r.serve_buf != 0) == serve => {
            CLONES.fetch_add(1, Ordering::Relaxed);
            Ok(FromForkserver {
                cloned: Cloned {
                    pid: r.pid,
                    pidfd,
                    attached: r.attached || cgroup.is_none(),
                },
                serve_buf: r.serve_buf as usize,
            })
        }
        (r, _) if r.errno == 0 => Err(std::io::Error::other(
            "an incomplete answer from the fork server",
        )),
        (r, _) => Err(std::io::Error::from_raw_os_error(r.errno)),
    })
}

/// The error of a fork server that ended with a request unanswered.
const ENDED: &str = "the fork server ended without answering";

/// Whether `e` says the fork server ended with the request unanswered: it may have cloned PID 1 or
/// not; nothing of it remains.
pub(crate) fn ended_without_answer(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionAborted && e.to_string() == ENDED
}

fn read_reply(
    z: &Forkserver,
    deadline: Instant,
) -> std::io::Result<(wire::Reply, Option<OwnedFd>)> {
    if !crate::spawn::wait_readable(&z.sock, deadline) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the fork server did not answer",
        ));
    }
    let mut buf = [0u8; 64];
    let (n, mut fds) = fdpass::recv_msg(z.sock.as_fd(), &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the fork server ended",
        ));
    }
    let reply: wire::Reply = postcard::from_bytes(&buf[..n])
        .map_err(|_| std::io::Error::other("unreadable answer from the fork server"))?;
    Ok((reply, fds.pop()))
}
