//! cgroup limits: a per-run child of the cgroup this process is in, on v2 or v1 hierarchies.
//!
//! Decisions (where the hierarchies are, which controllers are usable, the paths of a run's
//! cgroups) are pure functions over `/proc/self/cgroup` and `/proc/self/mountinfo` text; the
//! rest is plain file I/O in the supervisor. Nothing here runs in the forked child.

use crate::report::Enforcer;
use crate::spec::Limits;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Controllers cellblock uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// Memory limit, peak and OOM events.
    Memory,
    /// Number of tasks.
    Pids,
    /// CPU bandwidth (quota).
    Cpu,
    /// CPU time accounting (v1 `cpuacct`; part of `cpu` on v2).
    CpuAcct,
    /// Freezing (pause/resume).
    Freezer,
}

impl Controller {
    fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::CpuAcct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }
}

/// Where this process sits in the cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Layout {
    /// v2: the directory of our own cgroup, if a cgroup2 hierarchy is mounted.
    pub v2_dir: Option<PathBuf>,
    /// v2: controllers available in our own cgroup (`cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    /// v1: (controller, directory of our own cgroup in its hierarchy).
    pub v1_dirs: Vec<(String, PathBuf)>,
}

/// Parses `/proc/self/mountinfo` and `/proc/self/cgroup` text into the directories of our own
/// cgroup in each hierarchy (pure).
pub fn parse_layout(mountinfo: &str, self_cgroup: &str) -> Layout {
    // mount point -> (fstype, super options)
    let mut v2_mount: Option<String> = None;
    let mut v1_mounts: Vec<(Vec<String>, String)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rfields: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rfields.len() < 3 {
            continue;
        }
        // Only mounts of a hierarchy's root can be used to reach our own cgroup by path.
        if fields[3] != "/" {
            continue;
        }
        let mount_point = fields[4].to_string();
        match rfields[0] {
            // Prefer the canonical location if several are mounted.
            "cgroup2" if v2_mount.is_none() || mount_point == "/sys/fs/cgroup" => {
                v2_mount = Some(mount_point)
            }
            "cgroup" => {
                let ctrls = rfields[2].split(',').map(str::to_string).collect();
                v1_mounts.push((ctrls, mount_point));
            }
            _ => {}
        }
    }
    let mut layout = Layout::default();
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrls.is_empty() {
            if let Some(m) = &v2_mount {
                layout.v2_dir = Some(Path::new(m).join(rel));
            }
            continue;
        }
        for ctrl in ctrls.split(',') {
            if let Some((_, m)) = v1_mounts.iter().find(|(c, _)| c.iter().any(|x| x == ctrl)) {
                layout
                    .v1_dirs
                    .push((ctrl.to_string(), Path::new(m).join(rel)));
            }
        }
    }
    layout
}

/// The layout of this process, read once.
pub fn layout() -> &'static Layout {
    static LAYOUT: OnceLock<Layout> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let cg = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut l = parse_layout(&mi, &cg);
        if let Some(dir) = &l.v2_dir {
            l.v2_controllers = fs::read_to_string(dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
        }
        l
    })
}

/// The kernel's counts of a cgroup's limits being reached (see [`RunCgroup::limit_events`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitEvents {
    /// Times memory usage reached the limit (plus OOM kills); `None`: not readable.
    pub memory: Option<u64>,
    /// Forks refused by the pids limit; `None`: not readable.
    pub pids: Option<u64>,
    /// Periods throttled by the CPU quota; `None`: not readable.
    pub cpus: Option<u64>,
}

impl LimitEvents {
    /// The events counted since `before` (per counter; `None` where either is unreadable).
    pub fn since(self, before: LimitEvents) -> LimitEvents {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        LimitEvents {
            memory: d(self.memory, before.memory),
            pids: d(self.pids, before.pids),
            cpus: d(self.cpus, before.cpus),
        }
    }

    /// (limit name, count) for each counter.
    pub fn by_limit(self) -> [(&'static str, Option<u64>); 3] {
        [
            ("memory", self.memory),
            ("pids", self.pids),
            ("cpus", self.cpus),
        ]
    }
}

/// Which controllers a run's cgroup needs (the directories made before limits are set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Kind {
    /// A pids controller (a pids limit).
    pub(crate) pids: bool,
    /// A cpu controller (a CPU quota).
    pub(crate) cpu: bool,
    /// A freezer (sessions).
    pub(crate) freezer: bool,
}

impl Kind {
    /// The kind a run with `limits` needs.
    pub(crate) fn of(limits: &Limits, want_freezer: bool) -> Kind {
        Kind {
            pids: limits.pids.is_some(),
            cpu: limits.cpus.is_some(),
            freezer: want_freezer,
        }
    }
}

/// A cgroup created for one run (or one session), removed on drop.
#[derive(Debug)]
pub struct RunCgroup {
    /// v2 directory, when the unified hierarchy is used.
    v2: Option<PathBuf>,
    /// v1 directories per controller used.
    v1: Vec<(Controller, PathBuf)>,
    /// Limit name -> enforcer, for the limits this cgroup enforces.
    enforced: Vec<(&'static str, Enforcer)>,
    /// Set once the directories are removed (removal may be asked from a shared reference).
    removed: AtomicBool,
}

/// Removes per-run cgroups left by cellblock processes that died without cleaning up (killed
/// with SIGKILL). Only our own naming scheme, only for owners that no longer exist: the name
/// carries the owner's pid and start time, so a live process that reuses the pid is not taken
/// for the owner (names without a start time fall back to the pid alone). A stale cgroup may
/// still hold processes (a session paused when its owner died): it is thawed first, since a
/// frozen task cannot die on cgroup v1, then its processes are killed and it is removed
/// (bounded). What fails is recorded with the cell pool's teardown errors. Returns how many
/// stale cgroups were found.
fn remove_stale(layout: &Layout) -> usize {
    let dirs = layout
        .v2_dir
        .iter()
        .chain(layout.v1_dirs.iter().map(|(_, d)| d));
    let mut stale = Vec::new();
    for dir in dirs {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| owner_is_gone(n, start_time)) {
                stale.push(entry.path());
            }
        }
    }
    let fail = |dir: &Path, what: &str, e: io::Error| {
        crate::cell::teardown::record_error(format!("stale cgroup {}: {what}: {e}", dir.display()));
    };
    for dir in &stale {
        match thaw_dir(dir) {
            Ok(()) => {}
            // No freezer in this hierarchy, or already removed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => fail(dir, "thaw", e),
        }
    }
    // A stale cgroup may hold children (a warm call's, when its owner died mid-call): their
    // processes die too, and they are removed first, deepest first.
    let mut all = Vec::new();
    for dir in &stale {
        subtree(dir, &mut all, 0);
    }
    all.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in &all {
        if let Err(e) = kill_members(dir) {
            fail(dir, "kill its processes", e);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for dir in &all {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    fail(dir, "remove", e);
                    break;
                }
            }
        }
    }
    stale.len()
}

/// `dir` and every cgroup below it (bounded depth: ours nest two levels).
fn subtree(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    out.push(dir.to_path_buf());
    if depth >= 4 {
        return;
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subtree(&entry.path(), out, depth + 1);
        }
    }
}

/// Whether the cellblock cgroup `name` (`cellblock-<pid>-<n>[-<start time>]`) belongs to a
/// process that no longer exists. `start_of` gives a live pid's start time (pure otherwise).
fn owner_is_gone(name: &str, start_of: impl Fn(u32) -> Option<u64>) -> bool {
    let Some(rest) = name.strip_prefix("cellblock-") else {
        return false;
    };
    let mut parts = rest.split('-');
    let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    let stamp = parts.nth(1).and_then(|s| s.parse::<u64>().ok());
    match (start_of(pid), stamp) {
        (None, _) => true,
        // The pid lives: the owner only if it started when the owner did.
        (Some(now), Some(then)) => now != then,
        (Some(_), None) => false,
    }
}

/// The start time of process `pid` (clock ticks after boot, /proc/<pid>/stat field 22), or
/// `None` when it does not exist.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Sweeps now the cgroups of cellblock processes that died without cleaning up (see
/// `remove_stale`: frozen ones are thawed, their processes killed, the directories removed).
/// A long-lived process that creates sandboxes (the HTTP service) calls this at start, so that
/// what a killed predecessor left is reclaimed before any request; every process also sweeps
/// once before its first cgroup. Returns how many stale cgroups were found.
pub fn sweep_stale() -> usize {
    remove_stale(layout())
}

/// Thaws the cgroup at `dir` (v2 `cgroup.freeze`, v1 `freezer.state`), if it has a freezer.
fn thaw_dir(dir: &Path) -> io::Result<()> {
    let (file, value) = thaw_file_in(dir).ok_or(io::ErrorKind::NotFound)?;
    fs::write(dir.join(file), value)
}

/// The freezer file of the cgroup at `dir` and the value that thaws it.
fn thaw_file_in(dir: &Path) -> Option<(&'static str, &'static [u8])> {
    if dir.join("cgroup.freeze").exists() {
        Some(("cgroup.freeze", b"0"))
    } else if dir.join("freezer.state").exists() {
        Some(("freezer.state", b"THAWED"))
    } else {
        None
    }
}

/// SIGKILLs every process in the cgroup at `dir` (v2 `cgroup.kill` where the kernel has it).
fn kill_members(dir: &Path) -> io::Result<()> {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return Ok(());
    }
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for pid in procs
        .lines()
        .filter_map(|l| l.trim().parse::<libc::pid_t>().ok())
    {
        // SAFETY: kill(2) of a process listed in a stale cgroup of our own naming scheme.
        if unsafe { libc::kill(pid, libc::SIGKILL) } < 0 {
            let e = io::Error::last_os_error();
            // Already gone is what we want.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// `cellblock-<pid>-<n>-<start time>`: the start time tells the owner from a later process
/// that reuses its pid (see [`owner_is_gone`]).
pub(crate) fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static START: OnceLock<u64> = OnceLock::new();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let start = *START.get_or_init(|| start_time(pid).unwrap_or(0));
    format!("cellblock-{pid}-{n}-{start}")
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

impl RunCgroup {
    /// Creates cgroups enforcing what the limits ask for and the hierarchies allow. Limits that
    /// cannot be enforced here are left to the caller (rlimit fallback). Returns `None` when no
    /// cgroup at all could be created (unprivileged without delegation).
    pub fn create(limits: &Limits, want_freezer: bool) -> Option<RunCgroup> {
        let mut cg = RunCgroup::make(Kind::of(limits, want_freezer))?;
        cg.apply(limits);
        Some(cg)
    }

    /// Creates the directories of a cgroup of `kind`, no limit set yet (see [`RunCgroup::apply`]).
    pub(crate) fn make(kind: Kind) -> Option<RunCgroup> {
        let layout = layout();
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            remove_stale(layout);
        });
        let name = unique_name();
        let mut cg = RunCgroup {
            v2: None,
            v1: Vec::new(),
            enforced: Vec::new(),
            removed: AtomicBool::new(false),
        };
        let wants_v2 = ["memory", "pids", "cpu"]
            .into_iter()
            .any(|c| layout.v2_controllers.iter().any(|x| x == c));
        if let (Some(dir), true) = (&layout.v2_dir, wants_v2) {
            let path = dir.join(&name);
            if fs::create_dir(&path).is_ok() {
                cg.v2 = Some(path);
                return Some(cg);
            }
        }
        let v1_dir = |c: Controller| {
            layout
                .v1_dirs
                .iter()
                .find(|(n, _)| n == c.v1_name())
                .map(|(_, d)| d.join(&name))
        };
        let mut need: Vec<Controller> = vec![Controller::CpuAcct, Controller::Memory];
        if kind.pids {
            need.push(Controller::Pids);
        }
        if kind.cpu {
            need.push(Controller::Cpu);
        }
        if kind.freezer {
            need.push(Controller::Freezer);
        }
        for c in need {
            if let Some(path) = v1_dir(c) {
                if fs::create_dir(&path).is_ok() {
                    cg.v1.push((c, path));
                }
            }
        }
        if cg.v1.is_empty() {
            return None;
        }
        Some(cg)
    }

    /// Sets `limits` on a cgroup made by [`RunCgroup::make`] for their [`Kind`] (once).
    pub(crate) fn apply(&mut self, limits: &Limits) {
        if let Some(path) = self.v2.clone() {
            // Enabling controllers for our child needs them in our own subtree_control.
            let sub = path
                .parent()
                .and_then(|d| fs::read_to_string(d.join("cgroup.subtree_control")).ok())
                .unwrap_or_default();
            let on = |c: &str| sub.split_whitespace().any(|x| x == c);
            self.apply_v2(&path, limits, &on);
        } else {
            self.apply_v1(limits);
        }
    }

    fn apply_v2(&mut self, path: &Path, limits: &Limits, on: &dyn Fn(&str) -> bool) {
        if let Some(mem) = limits.memory {
            if on("memory") && write(&path.join("memory.max"), &mem.to_string()).is_ok() {
                let _ = write(&path.join("memory.swap.max"), "0");
                self.enforced.push(("memory", Enforcer::CgroupV2));
            }
        }
        if let Some(p) = limits.pids {
            if on("pids") && write(&path.join("pids.max"), &p.to_string()).is_ok() {
                self.enforced.push(("pids", Enforcer::CgroupV2));
            }
        }
        if let Some(cpus) = limits.cpus {
            let quota = (cpus * 100_000.0).round().max(1000.0) as u64;
            if on("cpu") && write(&path.join("cpu.max"), &format!("{quota} 100000")).is_ok() {
                self.enforced.push(("cpus", Enforcer::CgroupV2));
            }
        }
        // cpu.stat usage_usec exists in every v2 cgroup: CPU time is always measurable.
        if limits.cpu_time.is_some() {
            self.enforced.push(("cpu_time", Enforcer::CgroupV2));
        }
    }

    fn apply_v1(&mut self, limits: &Limits) {
        for (c, path) in &self.v1 {
            match c {
                Controller::Memory => {
                    if let Some(mem) = limits.memory {
                        if write(&path.join("memory.limit_in_bytes"), &mem.to_string()).is_ok() {
                            // Swap must not extend the limit; the file is absent without swap
                            // accounting, which is fine.
                            let _ =
                                write(&path.join("memory.memsw.limit_in_bytes"), &mem.to_string());
                            self.enforced.push(("memory", Enforcer::CgroupV1));
                        }
                    }
                }
                Controller::Pids => {
                    if let Some(p) = limits.pids {
                        if write(&path.join("pids.max"), &p.to_string()).is_ok() {
                            self.enforced.push(("pids", Enforcer::CgroupV1));
                        }
                    }
                }
                Controller::Cpu => {
                    if let Some(cpus) = limits.cpus {
                        let quota = (cpus * 100_000.0).round().max(1000.0) as u64;
                        if write(&path.join("cpu.cfs_period_us"), "100000").is_ok()
                            && write(&path.join("cpu.cfs_quota_us"), &quota.to_string()).is_ok()
                        {
                            self.enforced.push(("cpus", Enforcer::CgroupV1));
                        }
                    }
                }
                Controller::CpuAcct => {
                    if limits.cpu_time.is_some() {
                        self.enforced.push(("cpu_time", Enforcer::CgroupV1));
                    }
                }
                Controller::Freezer => {}
            }
        }
    }

    /// What this cgroup enforces: (limit name, enforcer).
    pub fn enforced(&self) -> &[(&'static str, Enforcer)] {
        &self.enforced
    }

    /// Whether `limit` is enforced by this cgroup.
    pub fn enforces(&self, limit: &str) -> bool {
        self.enforced.iter().any(|(n, _)| *n == limit)
    }

    /// Moves process `pid` into every cgroup of the run.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        let s = pid.to_string();
        if let Some(p) = &self.v2 {
            write(&p.join("cgroup.procs"), &s)?;
        }
        for (_, p) in &self.v1 {
            write(&p.join("cgroup.procs"), &s)?;
        }
        Ok(())
    }

    /// The v2 directory of this cgroup (for `clone3(CLONE_INTO_CGROUP)`), when v2 is used.
    pub fn v2_path(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// The `tasks` file of each v1 hierarchy of the run, open for writing, for PID 1 to move
    /// itself in by writing "0" (see [`crate::child::InitPlan::join_tasks`]). A thread that
    /// migrates itself alone takes no global lock, so unlike a pid written to `cgroup.procs` by
    /// the supervisor this never waits for an RCU grace period (5-24 ms after a quiet spell).
    /// Empty on cgroup v2 (a child is cloned into it instead).
    pub(crate) fn open_tasks(&self) -> io::Result<Vec<OwnedFd>> {
        self.v1
            .iter()
            .map(|(_, p)| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(p.join("tasks"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    fn v1_path(&self, c: Controller) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(x, _)| *x == c)
            .map(|(_, p)| p.as_path())
    }

    fn read_key(path: &Path, key: &str) -> Option<u64> {
        let text = fs::read_to_string(path).ok()?;
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
    }

    fn read_u64(path: &Path) -> Option<u64> {
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// CPU time used so far by every process of the run.
    pub fn cpu_time(&self) -> Option<Duration> {
        if let Some(p) = &self.v2 {
            return Self::read_key(&p.join("cpu.stat"), "usage_usec").map(Duration::from_micros);
        }
        let p = self.v1_path(Controller::CpuAcct)?;
        Self::read_u64(&p.join("cpuacct.usage")).map(Duration::from_nanos)
    }

    /// Peak memory usage of the run.
    pub fn peak_memory(&self) -> Option<u64> {
        if let Some(p) = &self.v2 {
            return Self::read_u64(&p.join("memory.peak"));
        }
        let p = self.v1_path(Controller::Memory)?;
        Self::read_u64(&p.join("memory.max_usage_in_bytes"))
    }

    /// Number of processes the kernel's OOM killer killed in the run.
    pub fn oom_kills(&self) -> u64 {
        if let Some(p) = &self.v2 {
            return Self::read_key(&p.join("memory.events"), "oom_kill").unwrap_or(0);
        }
        self.v1_path(Controller::Memory)
            .and_then(|p| Self::read_key(&p.join("memory.oom_control"), "oom_kill"))
            .unwrap_or(0)
    }

    /// How often each limit of this cgroup was reached, as the kernel counts it: memory
    /// (`memory.events` max + oom_kill on v2, `memory.failcnt` + oom_kill on v1), pids
    /// (`pids.events` max), cpus (`cpu.stat` nr_throttled). `None` where the counter is not
    /// readable (e.g. a warm call's child cgroup without the controller).
    pub fn limit_events(&self) -> LimitEvents {
        if let Some(p) = &self.v2 {
            let mem = p.join("memory.events");
            return LimitEvents {
                memory: Self::read_key(&mem, "max")
                    .map(|m| m + Self::read_key(&mem, "oom_kill").unwrap_or(0)),
                pids: Self::read_key(&p.join("pids.events"), "max"),
                cpus: Self::read_key(&p.join("cpu.stat"), "nr_throttled"),
            };
        }
        let v1 = |c: Controller| self.v1_path(c);
        LimitEvents {
            memory: v1(Controller::Memory).and_then(|p| {
                let fail = Self::read_u64(&p.join("memory.failcnt"))?;
                Some(fail + Self::read_key(&p.join("memory.oom_control"), "oom_kill").unwrap_or(0))
            }),
            pids: v1(Controller::Pids).and_then(|p| Self::read_key(&p.join("pids.events"), "max")),
            cpus: v1(Controller::Cpu)
                .and_then(|p| Self::read_key(&p.join("cpu.stat"), "nr_throttled")),
        }
    }

    /// A child of this cgroup for one warm call: accounting only (CPU time, peak memory, OOM
    /// kills of that call alone), no limits of its own; the session's limits apply above it.
    /// On v2 only `cpu.stat` exists in it (the session cgroup holds processes, so it cannot
    /// enable controllers for children). `None` when no child could be made.
    pub fn child(&self) -> Option<RunCgroup> {
        let name = unique_name();
        let mut cg = RunCgroup {
            v2: None,
            v1: Vec::new(),
            enforced: Vec::new(),
            removed: AtomicBool::new(false),
        };
        if let Some(p) = &self.v2 {
            let path = p.join(&name);
            fs::create_dir(&path).ok()?;
            cg.v2 = Some(path);
            return Some(cg);
        }
        for (c, p) in &self.v1 {
            if matches!(c, Controller::Memory | Controller::CpuAcct) {
                let path = p.join(&name);
                if fs::create_dir(&path).is_ok() {
                    cg.v1.push((*c, path));
                }
            }
        }
        (!cg.v1.is_empty()).then_some(cg)
    }

    /// Whether this cgroup reports peak memory and OOM kills (v1 memory, or v2 with memory).
    pub fn measures_memory(&self) -> bool {
        match &self.v2 {
            Some(p) => p.join("memory.peak").exists(),
            None => self.v1_path(Controller::Memory).is_some(),
        }
    }

    /// Host pids of the processes in this cgroup.
    pub fn procs(&self) -> Vec<i32> {
        self.dirs()
            .next()
            .and_then(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Moves every process of this cgroup back to its parent (before it is removed while they
    /// live on, e.g. a stateful kernel between calls).
    pub fn release_to_parent(&self) -> io::Result<()> {
        for dir in self.dirs() {
            let parent = dir
                .parent()
                .ok_or_else(|| io::Error::other("cgroup without parent"))?;
            let text = fs::read_to_string(dir.join("cgroup.procs"))?;
            for pid in text.lines() {
                // A process that exited meanwhile is gone from the list anyway.
                let _ = write(&parent.join("cgroup.procs"), pid.trim());
            }
        }
        Ok(())
    }

    /// Freezes (true) or thaws (false) every process of the run.
    pub fn freeze(&self, frozen: bool) -> io::Result<()> {
        if let Some(p) = &self.v2 {
            return write(&p.join("cgroup.freeze"), if frozen { "1" } else { "0" });
        }
        let p = self.v1_path(Controller::Freezer).ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "no freezer cgroup available")
        })?;
        write(
            &p.join("freezer.state"),
            if frozen { "FROZEN" } else { "THAWED" },
        )
    }

    /// Whether pause/resume is possible.
    pub fn can_freeze(&self) -> bool {
        self.v2.is_some() || self.v1_path(Controller::Freezer).is_some()
    }

    fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.v2.iter().chain(self.v1.iter().map(|(_, p)| p))
    }

    /// The freezer files of this cgroup with the value that thaws them (for the reaper).
    pub fn thaw_files(&self) -> Vec<(PathBuf, &'static [u8])> {
        if let Some(p) = &self.v2 {
            return vec![(p.join("cgroup.freeze"), b"0")];
        }
        self.v1_path(Controller::Freezer)
            .map(|p| vec![(p.join("freezer.state"), &b"THAWED"[..])])
            .unwrap_or_default()
    }

    /// The directories of this cgroup, one per hierarchy used.
    pub fn dir_paths(&self) -> Vec<PathBuf> {
        self.dirs().cloned().collect()
    }

    /// Removes the cgroups, waiting (bounded) for exiting processes to leave them. The error
    /// names the directory that could not be removed.
    pub fn remove(&self) -> crate::error::Result<()> {
        if self.removed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = Ok(());
        for dir in self.dirs() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        last = Err(crate::error::Error::io_at(dir.display().to_string(), e));
                        break;
                    }
                }
            }
        }
        last
    }
}

#[cfg(test)]
impl RunCgroup {
    /// A cgroup over existing directories (tests of the code that uses one).
    pub(crate) fn over(v2: Option<PathBuf>, v1: Vec<(Controller, PathBuf)>) -> RunCgroup {
        RunCgroup {
            v2,
            v1,
            enforced: Vec::new(),
            removed: AtomicBool::new(false),
        }
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const SELF_HYBRID: &str = "\
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
";

    #[test]
    fn stale_names_need_a_gone_owner() {
        let alive = |pid: u32| (pid == 7).then_some(1234);
        // Our naming scheme only.
        assert!(!owner_is_gone("other-9-1", alive));
        assert!(!owner_is_gone("cellblock-x-1", alive));
        // A dead pid, with or without a start time.
        assert!(owner_is_gone("cellblock-9-1", alive));
        assert!(owner_is_gone("cellblock-9-1-1234", alive));
        // A live pid: the owner when the start time matches or is not recorded.
        assert!(!owner_is_gone("cellblock-7-1-1234", alive));
        assert!(!owner_is_gone("cellblock-7-1", alive));
        // A live pid that started later: the pid was reused, the owner is gone.
        assert!(owner_is_gone("cellblock-7-1-99", alive));
    }

    #[test]
    fn names_carry_our_start_time() {
        let name = unique_name();
        let start = start_time(std::process::id()).expect("our own stat");
        assert!(name.ends_with(&format!("-{start}")), "{name}");
        assert!(!owner_is_gone(&name, start_time));
    }

    #[test]
    fn hybrid_layout_finds_v1_dirs_and_unified() {
        let l = parse_layout(MOUNTINFO_HYBRID, SELF_HYBRID);
        assert_eq!(l.v2_dir, Some(PathBuf::from("/sys/fs/cgroup/unified/")));
        assert!(l.v1_dirs.contains(&(
            "memory".into(),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        )));
        assert!(l
            .v1_dirs
            .contains(&("pids".into(), PathBuf::from("/sys/fs/cgroup/pids/"))));
    }

    #[test]
    fn unified_layout() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let l = parse_layout(mi, "0::/user.slice/user-1000.slice/session-3.scope\n");
        assert_eq!(
            l.v2_dir,
            Some(PathBuf::from(
                "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope"
            ))
        );
        assert!(l.v1_dirs.is_empty());
    }

    #[test]
    fn non_root_mounts_are_ignored() {
        // A cgroup namespace-style mount of a subtree cannot be reached by our absolute path.
        let mi = "35 31 0:32 /sub /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let l = parse_layout(mi, "4:memory:/sub/x\n");
        assert!(l.v1_dirs.is_empty());
    }
}
