//! The pool: a few ready cells per policy shape, built ahead by one background thread.
//!
//! Sizing follows demand: a shape's first run only records it (a process that runs once, such
//! as the CLI, never builds a cell it would not use); each later run that finds no cell ready
//! asks for one more (up to [`Bounds::per_shape`]); a shape that goes
//! [`DECAY`] without such a miss wants one fewer, and one unused for [`IDLE`] none at all.
//! The whole pool holds at most [`Bounds::max_cells`] cells (each one process, one cgroup and
//! a copy-on-write image of the caller), and a cell older than [`MAX_AGE`] is replaced so that
//! the copied /etc files stay fresh.

use super::init::ServePlan;
use super::teardown::{self, Remains};
use super::wire;
use crate::cgroup::RunCgroup;
use crate::child::{self, InitPlan};
use crate::error::{Error, Result};
use crate::fs;
use crate::spawn::{self, Pipes};
use crate::spec::{Limits, RunSpec};
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// A shape unused this long loses its cells.
pub const IDLE: Duration = Duration::from_secs(10);
/// A shape that saw no miss for this long wants one cell fewer.
pub const DECAY: Duration = Duration::from_secs(2);
/// Cells older than this are replaced.
pub const MAX_AGE: Duration = Duration::from_secs(30);
/// How long the builder sleeps when there is nothing to do.
const TICK: Duration = Duration::from_millis(500);
/// Builder threads: two builds overlap (one cell's PID 1 sets its sandbox up while the next is
/// cloned), so back-to-back runs of one shape find cells ready about as fast as they come.
const BUILDERS: usize = 2;
/// After a failed build, the shape is not built again for this long.
const RETRY: Duration = Duration::from_secs(5);
/// In wait mode, how long a run waits for a cell before taking the cold path.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// The parts of a spec fixed when a sandbox is built (limits the cgroup and the mounts carry,
/// extra binds); everything else is sent with the request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Shape {
    memory: Option<u64>,
    pids: Option<u64>,
    cpus_bits: Option<u64>,
    cpu_time: bool,
    disk: Option<u64>,
    ro_binds: Vec<String>,
    rootfs: Option<String>,
    /// (device, inode) of each bind source and of the rootfs, as the run names them: a cell
    /// keeps what was at the path when it was built, so a directory replaced since (an
    /// environment removed and built again at the same store path) is another shape.
    sources: Vec<Option<(u64, u64)>>,
}

impl Shape {
    /// The shape of `spec`, or None when it cannot use a cell (an egress allowlist needs a
    /// proxy made for the run).
    pub fn of(spec: &RunSpec) -> Option<Shape> {
        // A terminal is opened by the command's process and its master passed out: cells take
        // neither, such runs build their sandbox.
        if spec.net.is_some() || spec.tty.is_some() {
            return None;
        }
        let l = &spec.limits;
        Some(Shape {
            memory: l.memory,
            pids: l.pids,
            cpus_bits: l.cpus.map(f64::to_bits),
            cpu_time: l.cpu_time.is_some(),
            disk: l.disk,
            ro_binds: spec.ro_binds.clone(),
            rootfs: spec.rootfs.clone(),
            sources: spec
                .ro_binds
                .iter()
                .chain(spec.rootfs.as_ref())
                .map(|p| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino())))
                .collect(),
        })
    }

    /// A spec a cell of this shape is built from.
    fn spec(&self) -> RunSpec {
        RunSpec {
            argv: vec!["cell".into()],
            limits: Limits {
                memory: self.memory,
                pids: self.pids,
                cpus: self.cpus_bits.map(f64::from_bits),
                cpu_time: self.cpu_time.then_some(1.0),
                disk: self.disk,
                ..Limits::default()
            },
            ro_binds: self.ro_binds.clone(),
            rootfs: self.rootfs.clone(),
            ..RunSpec::default()
        }
    }
}

/// The supervisor's ends of a ready cell.
#[derive(Debug)]
pub(crate) struct CellIo {
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) status: OwnedFd,
    pub(crate) err: OwnedFd,
    /// Control socket: the request goes out, the seccomp listener comes back.
    pub(crate) sock: OwnedFd,
}

/// A ready cell. Dropping it unused queues its teardown.
#[derive(Debug)]
pub(crate) struct Cell {
    pub(crate) pid: libc::pid_t,
    pub(crate) pidfd: Option<OwnedFd>,
    pub(crate) cgroup: Option<RunCgroup>,
    pub(crate) io: Option<CellIo>,
    /// Address of PID 1's receive buffer.
    pub(crate) buf: usize,
    built: Instant,
}

impl Drop for Cell {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            teardown::later(Remains {
                pidfd,
                cgroup: self.cgroup.take(),
            });
        }
    }
}

impl Cell {
    /// PID 1 is still alive (a cell whose late set-up failed has exited).
    fn alive(&self) -> bool {
        let Some(fd) = &self.pidfd else { return false };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one pidfd without waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
    }
}

/// Builds one cell of `shape`: the same sandbox as a cold run's, PID 1 left waiting.
fn build(shape: &Shape) -> Result<Cell> {
    let spec = shape.spec();
    let cgroup = RunCgroup::create(&spec.limits, false);
    let (mounts, identity) = spawn::prepare_sandbox(&spec, "")?;
    let mut p = Pipes::new()?;
    // PID 1 receives into its copy of this buffer and runs the command on its copy of this
    // stack: both must exist before the clone; the parent's copies are not used afterwards.
    let buf = vec![0u64; wire::REQUEST_CAP / 8];
    let stack = vec![0u8; child::TARGET_STACK];
    let serve = ServePlan {
        buf: buf.as_ptr().cast_mut().cast(),
        stack_top: child::stack_top(&stack),
        last_cap: spawn::last_cap(),
    };
    // PID 1 moves itself into a v1 cgroup (see `spawn::start`); else it is attached below.
    let tasks = cgroup
        .as_ref()
        .and_then(|c| c.open_tasks().ok())
        .unwrap_or_default();
    let join_tasks: Vec<libc::c_int> = tasks.iter().map(AsRawFd::as_raw_fd).collect();
    let init = InitPlan {
        mounts: Some(&*mounts),
        identity: &identity,
        hostname: fs::HOSTNAME.as_bytes(),
        target: None,
        fds: p.child,
        // The builder thread lives as long as the process: PID 1 dies with its owner.
        pdeathsig: true,
        lifeline: -1,
        wipe: spawn::wipe_ranges(),
        net: None,
        serve: Some(&serve),
        netns: -1,
        join_tasks: &join_tasks,
    };
    let flags = spawn::sandbox_clone_flags();
    // From the fork server when one runs (the caller's memory is then not copied), else cloned
    // here. A fork server that ended with the request fails this build: the pool tries again.
    let deadline = Instant::now() + spawn::SETUP_DEADLINE;
    let (pid, pidfd, buf_addr, attached) = match crate::forkserver::clone(
        &init,
        Some(&mounts),
        None,
        flags,
        cgroup.as_ref(),
        deadline,
    ) {
        Some(r) => {
            let z = r.map_err(spawn::clone_error)?;
            (z.cloned.pid, z.cloned.pidfd, z.serve_buf, z.cloned.attached)
        }
        None => {
            let (pid, pidfd) =
                spawn::clone_with(flags, || child::init_main(&init)).map_err(spawn::clone_error)?;
            (pid, pidfd, buf.as_ptr() as usize, cgroup.is_none())
        }
    };
    p.child_owned.clear();
    let mut cell = Cell {
        pid,
        pidfd: Some(pidfd),
        cgroup,
        io: None,
        buf: buf_addr,
        built: Instant::now(),
    };
    drop(tasks);
    // v2 (or a v1 `tasks` file that could not be opened): attached here, off every caller's
    // path (on v1 the first attach after a quiet period waits for an RCU grace period).
    if let Some(cg) = cell
        .cgroup
        .as_ref()
        .filter(|_| join_tasks.is_empty() && !attached)
    {
        cg.add(pid).map_err(|e| Error::Setup {
            stage: "join the run's cgroup",
            source: e,
        })?;
    }
    let mut byte = [0u8; 1];
    if std::fs::File::from(p.ready).read(&mut byte).unwrap_or(0) != 1 {
        return Err(
            spawn::read_error(&p.err, Some(&*mounts), None, "cell").unwrap_or_else(|| {
                Error::Setup {
                    stage: "build the sandbox",
                    source: std::io::Error::other("PID 1 died"),
                }
            }),
        );
    }
    if spawn::is_root() {
        spawn::write_root_maps(pid).map_err(|e| Error::Setup {
            stage: "write uid/gid maps",
            source: e,
        })?;
    }
    // SAFETY: one byte to the go pipe.
    if unsafe { libc::write(p.go.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        return Err(Error::setup("release PID 1"));
    }
    cell.io = Some(CellIo {
        stdin: p.stdin,
        stdout: p.stdout,
        stderr: p.stderr,
        status: p.status,
        err: p.err,
        sock: p.sock,
    });
    Ok(cell)
}

/// Limits of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Ready cells in all, at most.
    pub max_cells: usize,
    /// Ready cells of one shape, at most.
    pub per_shape: usize,
}

impl Default for Bounds {
    fn default() -> Bounds {
        Bounds {
            max_cells: 4,
            per_shape: 4,
        }
    }
}

/// Counters of the pool, for tests and benches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether runs use cells.
    pub enabled: bool,
    /// Runs that found a ready cell.
    pub hits: u64,
    /// Runs that found none (cold path).
    pub misses: u64,
    /// Cells built.
    pub built: u64,
    /// Builds that failed.
    pub failed: u64,
    /// Cells ready now.
    pub ready: usize,
    /// Teardowns not finished.
    pub pending_teardown: usize,
    /// Teardowns that could not remove their cgroup (after the run's report was returned).
    pub teardown_failures: u64,
    /// The most recent of those failures and of the stale-cgroup sweep's, each naming the path
    /// and errno (bounded).
    pub teardown_errors: Vec<String>,
    /// The bounds in force.
    pub max_cells: usize,
    /// Network namespaces and cgroups made ahead for the cold path ([`super::parts`]).
    pub parts: super::parts::PartStats,
    /// Cells taken by a run that could not use them (request larger than the cell's buffer,
    /// or the cell died meanwhile): the run took the cold path and counts as a miss.
    pub fallbacks: u64,
    /// Why the most recent failed build failed.
    pub last_build_error: Option<String>,
}

#[derive(Debug)]
struct Demand {
    want: usize,
    last_use: Instant,
    last_miss: Instant,
    retry_at: Instant,
}

impl Demand {
    /// A shape first seen at `now`: no cell wanted yet.
    fn new(now: Instant) -> Demand {
        Demand {
            want: 0,
            last_use: now,
            last_miss: now,
            retry_at: now,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    ready: HashMap<Shape, Vec<Cell>>,
    demand: HashMap<Shape, Demand>,
    /// Shapes of the cells being built (one entry per build).
    building: Vec<Shape>,
    enabled: bool,
    /// Runs wait for a cell of their shape instead of taking the cold path
    /// (`CELLBLOCK_CELLS=wait`: proves a test suite passes entirely through cells).
    wait: bool,
    bounds: Bounds,
    stats: Stats,
}

impl State {
    /// Cells ready or being built.
    fn total(&self) -> usize {
        self.ready.values().map(Vec::len).sum::<usize>() + self.building.len()
    }

    /// Applies decay, idleness and age; returns the cells to drop.
    fn expire(&mut self, now: Instant) -> Vec<Cell> {
        let mut dropped = Vec::new();
        self.demand
            .retain(|_, d| now.duration_since(d.last_use) < IDLE);
        for d in self.demand.values_mut() {
            if d.want > 1 && now.duration_since(d.last_miss) >= DECAY {
                d.want -= 1;
                d.last_miss = now;
            }
        }
        for (shape, cells) in self.ready.iter_mut() {
            let want = self.demand.get(shape).map_or(0, |d| d.want);
            cells.retain(|c| now.duration_since(c.built) < MAX_AGE && c.alive());
            while cells.len() > want {
                dropped.extend(cells.pop());
            }
        }
        // Dead or old cells were dropped by `retain` (queued for teardown by Drop).
        self.ready.retain(|_, v| !v.is_empty());
        dropped
    }

    /// The shape most short of cells, if the bounds allow another.
    fn next_to_build(&self, now: Instant) -> Option<Shape> {
        if !self.enabled || self.total() >= self.bounds.max_cells {
            return None;
        }
        self.demand
            .iter()
            .filter(|(_, d)| d.retry_at <= now)
            .map(|(s, d)| {
                let have = self.ready.get(s).map_or(0, Vec::len)
                    + self.building.iter().filter(|b| *b == s).count();
                (d.want.min(self.bounds.per_shape).saturating_sub(have), s)
            })
            .filter(|(short, _)| *short > 0)
            .max_by_key(|(short, _)| *short)
            .map(|(_, s)| s.clone())
    }
}

struct Pool {
    state: Mutex<State>,
    /// Wakes the builder (demand changed).
    wake: Condvar,
    /// Signals that a build finished.
    built: Condvar,
    /// The process the pool belongs to (a forked child must not use its cells).
    owner: u32,
}

fn pool_cell() -> &'static OnceLock<Option<&'static Pool>> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    &POOL
}

/// The pool, started on first use; None in a forked child of its owner or when no builder
/// thread could be started.
fn pool() -> Option<&'static Pool> {
    let p = (*pool_cell().get_or_init(|| {
        let mode = std::env::var("CELLBLOCK_CELLS").unwrap_or_default();
        let enabled = mode != "0";
        let p: &'static Pool = Box::leak(Box::new(Pool {
            state: Mutex::new(State {
                enabled,
                wait: mode == "wait",
                stats: Stats {
                    enabled,
                    ..Stats::default()
                },
                ..State::default()
            }),
            wake: Condvar::new(),
            built: Condvar::new(),
            owner: std::process::id(),
        }));
        for _ in 0..BUILDERS {
            std::thread::Builder::new()
                .name("cellblock-cells".into())
                .spawn(move || builder(p))
                .ok()?;
        }
        super::register_exit_flush();
        Some(p)
    }))?;
    (p.owner == std::process::id()).then_some(p)
}

fn lock(p: &Pool) -> Option<MutexGuard<'_, State>> {
    p.state.lock().ok()
}

fn builder(p: &'static Pool) {
    let Some(mut st) = lock(p) else { return };
    loop {
        let now = Instant::now();
        let dropped = st.expire(now);
        let next = st.next_to_build(now);
        let Some(shape) = next else {
            drop(dropped);
            st = match p.wake.wait_timeout(st, TICK) {
                Ok((g, _)) => g,
                Err(_) => return,
            };
            continue;
        };
        st.building.push(shape.clone());
        drop(st);
        drop(dropped);
        super::defer_to_runs();
        let result = build(&shape);
        st = match lock(p) {
            Some(g) => g,
            None => return,
        };
        if let Some(i) = st.building.iter().position(|b| *b == shape) {
            st.building.swap_remove(i);
        }
        match result {
            Ok(cell) => {
                st.stats.built += 1;
                let wanted = st.enabled && st.demand.contains_key(&shape);
                if wanted {
                    st.ready.entry(shape).or_default().push(cell);
                } else {
                    drop(cell);
                }
            }
            Err(e) => {
                st.stats.failed += 1;
                st.stats.last_build_error = Some(e.to_string());
                if let Some(d) = st.demand.get_mut(&shape) {
                    d.retry_at = Instant::now() + RETRY;
                }
            }
        }
        p.built.notify_all();
    }
}

/// A ready cell of `shape` whose PID 1 is alive (dead ones are dropped: teardown queued).
fn pop_alive(st: &mut State, shape: &Shape) -> Option<Cell> {
    let cells = st.ready.get_mut(shape)?;
    while let Some(c) = cells.pop() {
        if c.alive() {
            return Some(c);
        }
    }
    None
}

/// Takes a ready cell of `shape` (and records the demand, so the builder makes more).
pub(crate) fn take(shape: &Shape) -> Option<Cell> {
    let p = pool()?;
    let mut st = lock(p)?;
    if !st.enabled {
        return None;
    }
    let now = Instant::now();
    let per_shape = st.bounds.per_shape;
    let mut found = pop_alive(&mut st, shape);
    // A shape seen before (or any shape in wait mode) asks for one more cell when none is ready.
    let asks = st.demand.contains_key(shape) || st.wait;
    let d = st
        .demand
        .entry(shape.clone())
        .or_insert_with(|| Demand::new(now));
    d.last_use = now;
    if found.is_none() && asks {
        d.want = (d.want + 1).min(per_shape);
        d.last_miss = now;
    }
    p.wake.notify_all();
    let deadline = now + WAIT_LIMIT;
    while found.is_none() && st.wait && st.enabled {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        st = p.built.wait_timeout(st, left).ok()?.0;
        found = pop_alive(&mut st, shape);
    }
    if found.is_some() {
        st.stats.hits += 1;
    } else {
        st.stats.misses += 1;
    }
    found
}

/// A run that took a cell but could not use it (see [`Stats::fallbacks`]): counted as a
/// miss, not a hit.
pub(crate) fn fell_back() {
    let Some(mut st) = pool().and_then(lock) else {
        return;
    };
    st.stats.hits = st.stats.hits.saturating_sub(1);
    st.stats.misses += 1;
    st.stats.fallbacks += 1;
}

/// What [`prepare`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// The cells asked for are ready.
    Ready,
    /// Cells are turned off (or this process is a fork of the pool's owner).
    Disabled,
    /// More cells of one shape were asked for than the bounds allow (the bound is given).
    OverBound(usize),
    /// The cells were not all ready in time; the most recent build error, if any.
    TimedOut(Option<String>),
}

/// Makes the pool hold, within `limit`, at least `count` ready cells of each shape (as many
/// as the shape appears in `shapes`), dropping ready cells of other shapes (and forgetting
/// their demand) when the bound on the whole pool leaves no room. Runs of these shapes made
/// afterwards are served by those cells while they last.
pub fn prepare(shapes: &[Shape], limit: Duration) -> Prepared {
    let deadline = Instant::now() + limit;
    let mut counts: HashMap<&Shape, usize> = HashMap::new();
    for s in shapes {
        *counts.entry(s).or_default() += 1;
    }
    let Some(p) = pool() else {
        return Prepared::Disabled;
    };
    let Some(mut st) = lock(p) else {
        return Prepared::Disabled;
    };
    loop {
        if !st.enabled {
            return Prepared::Disabled;
        }
        let b = st.bounds;
        if counts.values().any(|&n| n > b.per_shape) {
            return Prepared::OverBound(b.per_shape);
        }
        if counts.values().sum::<usize>() > b.max_cells {
            return Prepared::OverBound(b.max_cells);
        }
        let now = Instant::now();
        let have = |st: &State, s: &Shape| {
            st.ready
                .get(s)
                .map_or(0, |v| v.iter().filter(|c| c.alive()).count())
        };
        if counts.iter().all(|(s, &n)| have(&st, s) >= n) {
            return Prepared::Ready;
        }
        // Other shapes give up their cells and their demand: the builder must make room.
        st.demand.retain(|s, _| counts.contains_key(s));
        let dropped: Vec<Cell> = st
            .ready
            .extract_if(|s, _| !counts.contains_key(s))
            .flat_map(|(_, v)| v)
            .collect();
        for (s, &n) in &counts {
            let d = st
                .demand
                .entry((*s).clone())
                .or_insert_with(|| Demand::new(now));
            // Refreshed on every pass so that neither decay nor idleness lowers it meanwhile.
            d.want = d.want.max(n);
            d.last_use = now;
            d.last_miss = now;
        }
        p.wake.notify_all();
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Prepared::TimedOut(st.stats.last_build_error.clone());
        }
        // Dropped (teardown queued) without holding the pool's lock.
        drop(st);
        drop(dropped);
        st = match lock(p) {
            Some(g) => g,
            None => return Prepared::Disabled,
        };
        st = match p.built.wait_timeout(st, left.min(TICK)) {
            Ok((g, _)) => g,
            Err(_) => return Prepared::Disabled,
        };
    }
}

/// Turns cells on or off for runs that do not choose, and sets the bounds (`max_cells` 0
/// keeps none ready). Turning them off drops the ready ones.
pub fn configure(enabled: bool, bounds: Option<Bounds>) {
    super::parts::configure(enabled);
    let Some(p) = pool() else { return };
    let Some(mut st) = lock(p) else { return };
    st.enabled = enabled;
    st.stats.enabled = enabled;
    if let Some(b) = bounds {
        st.bounds = b;
    }
    p.wake.notify_all();
    if !enabled {
        st.demand.clear();
        let dropped: Vec<Cell> = st.ready.drain().flat_map(|(_, v)| v).collect();
        // Dropped (teardown queued) without holding the pool's lock.
        drop(st);
        drop(dropped);
    }
}

/// Drops every ready cell and every part made ahead ([`super::parts`]) and forgets demand, then
/// waits (at most `limit`) until no build is
/// in progress and every teardown is complete: afterwards no process, mount or cgroup of a
/// cell or of a finished run is left. True when everything finished in time.
pub fn drain(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    // Never start the pool just to drain it (process exit without a run).
    if let Some(Some(p)) = pool_cell().get() {
        if p.owner != std::process::id() {
            return true;
        }
        let Some(mut st) = lock(p) else { return false };
        st.demand.clear();
        let dropped: Vec<Cell> = st.ready.drain().flat_map(|(_, v)| v).collect();
        while !st.building.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match p.built.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        // A build that finished meanwhile was dropped (no demand).
        drop(st);
        drop(dropped);
    }
    // After the builds: the fork server goes with the parts.
    super::parts::drain(deadline);
    teardown::flush(deadline.saturating_duration_since(Instant::now()))
}

/// The pool's counters.
pub fn stats() -> Stats {
    let Some(st) = pool().and_then(lock) else {
        return Stats::default();
    };
    Stats {
        ready: st.ready.values().map(Vec::len).sum(),
        pending_teardown: teardown::pending(),
        teardown_failures: teardown::failures(),
        teardown_errors: teardown::errors(),
        max_cells: st.bounds.max_cells,
        parts: super::parts::stats(),
        ..st.stats.clone()
    }
}
