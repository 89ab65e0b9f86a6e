//! Parts made ahead for the cold path: network namespaces, empty run cgroups and the fork server
//! that clones PID 1 (see [`crate::forkserver`]).
//!
//! A run that finds no ready cell builds its sandbox on the caller's path. Two of its parts
//! cost the most to make and depend on nothing in the run: a network namespace (~0.45 ms on a
//! quiet machine, several ms under load; the kernel registers a whole network stack) and the
//! run's cgroup directories (~0.25 ms of mkdir on cgroup v1). A background thread makes a few
//! of each ahead; each is handed out once, to one run, and never reused.
//!
//! - Network namespaces only for a supervisor running as root: PID 1 then joins the namespace
//!   with `setns` instead of cloning a new one, and it is owned by the initial user namespace
//!   exactly as a cloned one would be. `lo` is brought up when it is made. Runs with an egress
//!   allowlist build their own (the proxy's sockets are made inside).
//! - Cgroups per [`Kind`] (which controllers); the run's limits are written when it takes one.
//!
//! Sizing follows demand as for cells: a kind's first request only records it; later requests
//! keep [`PER_KIND`] ready while requests keep coming; a kind unused for [`IDLE`] keeps none.
//! Ready parts are dropped at process exit (cgroups removed), with the cells.

use super::pool::IDLE;
use crate::cgroup::{Kind, RunCgroup};
use crate::spec::Limits;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Parts of one kind kept ready.
const PER_KIND: usize = 2;
/// How long the maker sleeps when there is nothing to do.
const TICK: Duration = Duration::from_millis(500);

/// Counters of the parts made ahead, for tests and benches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartStats {
    /// Cold runs that took a ready network namespace.
    pub netns_hits: u64,
    /// Cold runs that took a ready cgroup.
    pub cgroup_hits: u64,
    /// Network namespaces ready now.
    pub netns_ready: usize,
    /// Cgroups ready now.
    pub cgroups_ready: usize,
}

#[derive(Debug)]
struct Want {
    /// Requests so far (the first only records the kind).
    asked: u64,
    last_use: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Off: nothing is made ahead ([`super::configure`] turns parts off with cells).
    disabled: bool,
    netns: Vec<OwnedFd>,
    netns_want: Option<Want>,
    /// Set when this thread cannot make network namespaces (not root, or setns back failed).
    netns_broken: bool,
    /// Set when no cgroup can be made here (unprivileged without delegation): not retried.
    cgroups_broken: bool,
    cgroups: HashMap<Kind, Vec<RunCgroup>>,
    cgroup_want: HashMap<Kind, Want>,
    forkserver_want: Option<Want>,
    /// Set when the fork server could not be started: not retried.
    forkserver_broken: bool,
    /// A part is being made (the lock is not held meanwhile).
    making: bool,
    stats: PartStats,
}

struct Parts {
    state: Mutex<State>,
    /// Wakes the maker (demand changed).
    wake: Condvar,
    /// Signals that the part being made is stored or dropped.
    made: Condvar,
    /// The process the parts belong to (a forked child must not use them).
    owner: u32,
}

fn parts_cell() -> &'static OnceLock<Option<&'static Parts>> {
    static PARTS: OnceLock<Option<&'static Parts>> = OnceLock::new();
    &PARTS
}

/// The maker, started on first use; None in a forked child of its owner, when cells are
/// turned off for the process (`CELLBLOCK_CELLS=0`) or when no thread could be started.
fn parts() -> Option<&'static Parts> {
    let p = (*parts_cell().get_or_init(|| {
        if std::env::var("CELLBLOCK_CELLS").is_ok_and(|m| m == "0") {
            return None;
        }
        let p: &'static Parts = Box::leak(Box::new(Parts {
            state: Mutex::new(State {
                netns_broken: !crate::spawn::is_root(),
                ..State::default()
            }),
            wake: Condvar::new(),
            made: Condvar::new(),
            owner: std::process::id(),
        }));
        std::thread::Builder::new()
            .name("cellblock-parts".into())
            .stack_size(256 << 10)
            .spawn(move || maker(p))
            .ok()?;
        super::register_exit_flush();
        Some(p)
    }))?;
    (p.owner == std::process::id()).then_some(p)
}

fn lock(p: &Parts) -> Option<MutexGuard<'_, State>> {
    p.state.lock().ok()
}

impl Want {
    fn new(now: Instant) -> Want {
        Want {
            asked: 0,
            last_use: now,
        }
    }

    /// Records a request; true when the kind is now wanted (see [`Want::wanted`]).
    fn ask(&mut self, now: Instant) -> bool {
        self.asked += 1;
        self.last_use = now;
        self.wanted()
    }

    /// Asked for more than once: the maker keeps some ready.
    fn wanted(&self) -> bool {
        self.asked > 1
    }
}

/// A fresh network namespace with `lo` up, made ahead (root only), or None: the run clones
/// its own.
pub(crate) fn netns() -> Option<OwnedFd> {
    let p = parts()?;
    let mut st = lock(p)?;
    if st.netns_broken || st.disabled {
        return None;
    }
    let now = Instant::now();
    let wakes = st.netns_want.get_or_insert_with(|| Want::new(now)).ask(now);
    let fd = st.netns.pop();
    if fd.is_some() {
        st.stats.netns_hits += 1;
    }
    if wakes {
        p.wake.notify_all();
    }
    fd
}

/// A cgroup for a run with `limits` (directories made ahead, limits written now), or None: the
/// run creates its own.
pub(crate) fn cgroup(limits: &Limits, want_freezer: bool) -> Option<RunCgroup> {
    let p = parts()?;
    let kind = Kind::of(limits, want_freezer);
    let mut st = lock(p)?;
    if st.disabled || st.cgroups_broken {
        return None;
    }
    let now = Instant::now();
    let wakes = st
        .cgroup_want
        .entry(kind)
        .or_insert_with(|| Want::new(now))
        .ask(now);
    let cg = st.cgroups.get_mut(&kind).and_then(Vec::pop);
    if cg.is_some() {
        st.stats.cgroup_hits += 1;
    }
    if wakes {
        p.wake.notify_all();
    }
    drop(st);
    let mut cg = cg?;
    cg.apply(limits);
    Some(cg)
}

/// Whether the fork server serves this cold run: true when it is running; otherwise records the
/// demand (the maker starts it once asked for twice).
pub(crate) fn want_forkserver() -> bool {
    let Some(p) = parts() else { return false };
    let Some(mut st) = lock(p) else { return false };
    if st.disabled || st.forkserver_broken {
        return false;
    }
    let now = Instant::now();
    let wakes = st
        .forkserver_want
        .get_or_insert_with(|| Want::new(now))
        .ask(now);
    let running = crate::forkserver::running();
    if wakes && !running {
        p.wake.notify_all();
    }
    running
}

/// Records that the fork server misbehaved: no fork server is started again in this process.
pub(crate) fn forkserver_failed() {
    if let Some(mut st) = parts().and_then(lock) {
        st.forkserver_broken = true;
    }
}

/// What the maker should make next.
enum Job {
    Netns,
    Cgroup(Kind),
    Forkserver,
}

impl State {
    /// Forgets idle kinds; returns the parts they no longer need (an idle fork server is stopped).
    fn expire(&mut self, now: Instant) -> (Vec<OwnedFd>, Vec<RunCgroup>) {
        let idle = |w: &Want| now.duration_since(w.last_use) >= IDLE;
        if self.forkserver_want.as_ref().is_some_and(idle) {
            self.forkserver_want = None;
            crate::forkserver::stop();
        }
        let mut fds = Vec::new();
        if self.netns_want.as_ref().is_some_and(idle) {
            self.netns_want = None;
            fds = std::mem::take(&mut self.netns);
        }
        self.cgroup_want.retain(|_, w| !idle(w));
        let mut cgs = Vec::new();
        let wanted = &self.cgroup_want;
        self.cgroups.retain(|k, v| {
            let keep = wanted.contains_key(k);
            if !keep {
                cgs.append(v);
            }
            keep
        });
        (fds, cgs)
    }

    fn next(&self) -> Option<Job> {
        let wanted = |w: &Option<&Want>| w.is_some_and(|w| w.asked > 1);
        if !self.forkserver_broken
            && wanted(&self.forkserver_want.as_ref())
            && !crate::forkserver::running()
        {
            return Some(Job::Forkserver);
        }
        if !self.netns_broken && wanted(&self.netns_want.as_ref()) && self.netns.len() < PER_KIND {
            return Some(Job::Netns);
        }
        self.cgroup_want
            .iter()
            .filter(|(_, w)| w.wanted())
            .map(|(k, _)| *k)
            .find(|k| self.cgroups.get(k).map_or(0, Vec::len) < PER_KIND)
            .map(Job::Cgroup)
    }
}

fn maker(p: &'static Parts) {
    let Some(mut st) = lock(p) else { return };
    loop {
        let (fds, cgs) = st.expire(Instant::now());
        let Some(job) = st.next() else {
            drop(st);
            drop((fds, cgs));
            st = match lock(p).and_then(|g| p.wake.wait_timeout(g, TICK).ok()) {
                Some((g, _)) => g,
                None => return,
            };
            continue;
        };
        st.making = true;
        drop(st);
        drop((fds, cgs));
        // Not while a run of this process is starting: on small machines it would compete.
        super::defer_to_runs();
        match job {
            // Started on this thread: it never exits, so PID 1s the fork server clones (whose
            // parent thread it is) keep their parent-death signal for the process's end.
            Job::Forkserver => {
                let started = crate::forkserver::start();
                st = match lock(p) {
                    Some(g) => g,
                    None => return,
                };
                if !started {
                    st.forkserver_broken = true;
                } else if st.forkserver_want.is_none() {
                    // Drained meanwhile.
                    crate::forkserver::stop();
                }
            }
            Job::Netns => {
                let made = make_netns();
                st = match lock(p) {
                    Some(g) => g,
                    None => return,
                };
                match made {
                    Ok(fd) if st.netns_want.is_some() => st.netns.push(fd),
                    // Drained meanwhile.
                    Ok(fd) => drop(fd),
                    // Still in the new namespace, or none can be made: make no more.
                    _ => st.netns_broken = true,
                }
            }
            Job::Cgroup(kind) => {
                let made = RunCgroup::make(kind);
                st = match lock(p) {
                    Some(g) => g,
                    None => return,
                };
                match made {
                    Some(cg) if st.cgroup_want.contains_key(&kind) => {
                        st.cgroups.entry(kind).or_default().push(cg)
                    }
                    Some(cg) => drop(cg),
                    // Cannot make cgroups here (runs fall back to the rlimits): stop trying.
                    None => {
                        st.cgroups_broken = true;
                        st.cgroup_want.clear();
                    }
                }
            }
        }
        st.making = false;
        p.made.notify_all();
    }
}

fn open_own_netns() -> std::io::Result<OwnedFd> {
    // SAFETY: open(2) of a proc path with a static, NUL-terminated name.
    let fd = unsafe {
        libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a network namespace on this thread only (the process's other threads stay in
/// theirs), brings its `lo` up, keeps an fd to it and returns the thread to its own namespace
/// (no fd is kept open between two).
fn make_netns() -> std::io::Result<OwnedFd> {
    let home = open_own_netns()?;
    // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread to a new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let made = crate::child::loopback_up()
        .map_err(std::io::Error::from_raw_os_error)
        .and_then(|()| open_own_netns());
    // SAFETY: setns back to the namespace this thread started in (an fd we own).
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    made
}

/// Turns making parts ahead on or off (off drops the ready ones).
pub(crate) fn configure(enabled: bool) {
    let Some(p) = parts() else { return };
    if let Some(mut st) = lock(p) {
        st.disabled = !enabled;
    }
    if !enabled {
        drain(Instant::now() + Duration::from_secs(5));
    }
}

/// Drops every ready part (their cgroups are removed) and forgets demand, after waiting (at
/// most until `deadline`) for a part being made.
pub(crate) fn drain(deadline: Instant) {
    if let Some(Some(p)) = parts_cell().get() {
        if p.owner != std::process::id() {
            return;
        }
        let Some(mut st) = lock(p) else { return };
        st.netns_want = None;
        st.cgroup_want.clear();
        st.forkserver_want = None;
        while st.making {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = match p.made.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
        }
        let fds = std::mem::take(&mut st.netns);
        let cgs: Vec<RunCgroup> = st.cgroups.drain().flat_map(|(_, v)| v).collect();
        drop(st);
        drop((fds, cgs));
        crate::forkserver::stop();
    }
}

/// The counters of the parts made ahead.
pub fn stats() -> PartStats {
    let Some(p) = parts_cell().get().copied().flatten() else {
        return PartStats::default();
    };
    if p.owner != std::process::id() {
        return PartStats::default();
    }
    let Some(st) = lock(p) else {
        return PartStats::default();
    };
    PartStats {
        netns_ready: st.netns.len(),
        cgroups_ready: st.cgroups.values().map(Vec::len).sum(),
        ..st.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ns_id(path: &str) -> u64 {
        std::fs::metadata(path).expect("a namespace").ino()
    }

    /// Whether `lo` is up in the namespace of the calling thread.
    fn lo_is_up() -> bool {
        // SAFETY: a socket for one ioctl on a zeroed ifreq we own, then closed.
        unsafe {
            let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            assert!(sock >= 0);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            ifr.ifr_name[0] = b'l' as libc::c_char;
            ifr.ifr_name[1] = b'o' as libc::c_char;
            let r = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr);
            libc::close(sock);
            r == 0 && ifr.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0
        }
    }

    #[test]
    fn a_namespace_made_ahead_is_new_with_lo_up_and_the_thread_goes_home() {
        let made = std::thread::spawn(|| {
            let before = ns_id("/proc/thread-self/ns/net");
            let fd = make_netns().expect("as root");
            let after = ns_id("/proc/thread-self/ns/net");
            let new = ns_id(&format!("/proc/self/fd/{}", fd.as_raw_fd()));
            // SAFETY: joining the new namespace with this short-lived thread only.
            assert_eq!(
                unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            (before, after, new, lo_is_up())
        })
        .join()
        .expect("thread");
        let (before, after, new, up) = made;
        assert_eq!(
            before, after,
            "the maker thread is back in its own namespace"
        );
        assert_ne!(new, before, "the namespace made is a new one");
        assert!(up, "lo is up in the namespace made");
    }

    #[test]
    fn a_kind_is_made_ahead_only_once_asked_for_again() {
        let mut st = State::default();
        let now = Instant::now();
        let kind = Kind {
            pids: true,
            cpu: false,
            freezer: false,
        };
        let w = st.cgroup_want.entry(kind).or_insert_with(|| Want::new(now));
        assert!(!w.ask(now), "a first request only records the kind");
        assert!(st.next().is_none());
        let w = st.cgroup_want.get_mut(&kind).expect("recorded");
        assert!(w.ask(now));
        assert!(matches!(st.next(), Some(Job::Cgroup(k)) if k == kind));
        // Idle kinds are forgotten.
        let (_, dropped) = st.expire(now + IDLE);
        assert!(dropped.is_empty());
        assert!(st.cgroup_want.is_empty() && st.next().is_none());
    }
}
