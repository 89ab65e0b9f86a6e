//! Starting a sandbox: prepare everything, clone PID 1 into fresh namespaces, synchronise.
//!
//! The order matters and is the whole design: all allocation happens here, before the clone;
//! the child ([`crate::child`]) only replays prepared data with raw syscalls.

use crate::cgroup::RunCgroup;
use crate::child::{self, CStringArray, ChildFds, Identity, InitPlan, JoinPlan, Stage, TargetPlan};
use crate::error::{Error, Result};
use crate::fdpass;
use crate::fs::{self, MountPlan, PlanInput};
use crate::net;
use crate::reaper::{self, ReaperPlan};
use crate::report::Enforcer;
use crate::seccomp;
use crate::spawner;
use crate::spec::RunSpec;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Host uid (and gid) that uid 0 inside maps to when cellblock runs as root: unprivileged and
/// owning nothing on the host, so even a kernel escape lands without root's file access.
pub const ROOT_PATH_HOST_UID: u32 = 0x6cb0_0000;

/// Default PATH inside the sandbox (extended with interpreter prefixes by the caller).
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

/// The fds of a started sandbox that the supervisor keeps.
#[derive(Debug)]
pub struct Started {
    /// Host pid of PID 1.
    pub pid: libc::pid_t,
    /// pidfd of PID 1 (poll it for exit; signal through it).
    pub pidfd: OwnedFd,
    /// The supervisor's ends of the pipes, the seccomp listener and the egress proxy.
    pub io: Endpoints,
    /// The run's cgroup (None: rlimit fallback).
    pub cgroup: Option<RunCgroup>,
    /// What enforces each requested limit.
    pub enforcement: BTreeMap<String, Option<Enforcer>>,
    /// When the clone happened.
    pub started_at: std::time::Instant,
    /// Our child to reap at the end when PID 1 is not (a session call's joiner).
    pub reaper: Option<OwnedFd>,
}

/// Whether this process is real root: uid 0 of the initial user namespace, able to create
/// cgroups and map arbitrary uids. Root of a nested user namespace (a rootless container) takes
/// the unprivileged path.
pub fn is_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: geteuid has no side effects.
    let euid0 = unsafe { libc::geteuid() == 0 };
    euid0
        && *ROOT.get_or_init(|| {
            std::fs::read_to_string("/proc/self/uid_map")
                .map(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
                .unwrap_or(false)
        })
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(Error::setup("pipe"));
    }
    // SAFETY: both fds are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    fdpass::seqpacket_pair().map_err(|e| Error::Setup {
        stage: "socketpair",
        source: e,
    })
}

fn cstring(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidSpec(format!("{what} contains a NUL byte")))
}

/// The path candidates execve tries for `argv0`, like execvp.
pub fn exec_candidates(argv0: &str, path_var: &str) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{}", d.trim_end_matches('/'), argv0))
        .collect()
}

pub(crate) fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63)
    })
}

/// Everything prepared for one sandbox before the clone.
struct Prepared {
    mounts: std::sync::Arc<MountPlan>,
    identity: Identity,
    target: TargetPlan,
}

pub(crate) fn validate(spec: &RunSpec) -> Result<()> {
    if spec.argv.is_empty() || spec.argv[0].is_empty() {
        return Err(Error::InvalidSpec("argv is empty".into()));
    }
    let l = &spec.limits;
    for (name, v) in [
        ("timeout", l.timeout),
        ("cpu_time", l.cpu_time),
        ("cpus", l.cpus),
    ] {
        if let Some(v) = v {
            if !v.is_finite() || v <= 0.0 {
                return Err(Error::InvalidSpec(format!(
                    "{name} must be a positive number, got {v}"
                )));
            }
        }
    }
    for (name, v) in [
        ("memory", l.memory),
        ("pids", l.pids),
        ("max_output", l.max_output),
        ("disk", l.disk),
    ] {
        if v == Some(0) {
            return Err(Error::InvalidSpec(format!("{name} must be positive")));
        }
    }
    if let Some(cwd) = &spec.cwd {
        if !cwd.starts_with('/') {
            return Err(Error::InvalidSpec(format!(
                "cwd must be an absolute path inside the sandbox, got {cwd:?}"
            )));
        }
    }
    for k in spec.env.keys().chain(spec.secrets.iter().map(|s| &s.name)) {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::InvalidSpec(format!(
                "bad environment variable name {k:?}"
            )));
        }
    }
    // The pids cgroup refuses more (EINVAL), and the rlimit fallback could not be raised that
    // far either: the run would fail in its set-up.
    if let Some(p) = l.pids.filter(|p| *p > MAX_PIDS) {
        return Err(Error::InvalidSpec(format!(
            "pids: {p} is above the kernel's limit of {MAX_PIDS} processes"
        )));
    }
    if let Some(m) = l.memory.filter(|m| *m < MIN_MEMORY) {
        return Err(Error::InvalidSpec(format!(
            "memory: {m} bytes is below the {MIN_MEMORY} bytes a sandbox needs to start"
        )));
    }
    crate::tty::validate(spec.tty.as_ref())?;
    validate_exec_sizes(spec)
}

/// The kernel's limit on one argv or environment string, NUL included (MAX_ARG_STRLEN).
const MAX_ARG_STRLEN: usize = 32 * 4096;
/// The most processes the kernel can have (PID_MAX_LIMIT on 64-bit): the largest pids limit.
const MAX_PIDS: u64 = 4 << 20;
/// The smallest memory limit accepted: below it the sandbox's own set-up is OOM-killed.
const MIN_MEMORY: u64 = 4 << 20;

/// The kernel's limit on argv plus environment: a quarter of the stack rlimit.
fn arg_max() -> usize {
    // SAFETY: sysconf has no side effects.
    let n = unsafe { libc::sysconf(libc::_SC_ARG_MAX) };
    if n > 0 {
        n as usize
    } else {
        MAX_ARG_STRLEN * 16
    }
}

/// Refuses argv/environment strings execve would refuse (E2BIG), naming the culprit.
fn validate_exec_sizes(spec: &RunSpec) -> Result<()> {
    let mut total = 0usize;
    for (i, a) in spec.argv.iter().enumerate() {
        if a.len() + 1 > MAX_ARG_STRLEN {
            return Err(Error::InvalidSpec(format!(
                "argv[{i}] is {} bytes: the kernel's limit for one argument is {} bytes",
                a.len(),
                MAX_ARG_STRLEN - 1
            )));
        }
        total += a.len() + 1;
    }
    let env = spec
        .env
        .iter()
        .map(|(k, v)| (k, v.len()))
        .chain(spec.secrets.iter().map(|s| (&s.name, s.value.len())));
    for (k, vlen) in env {
        let len = k.len() + 1 + vlen + 1;
        if len > MAX_ARG_STRLEN {
            return Err(Error::InvalidSpec(format!(
                "environment variable {k} is {vlen} bytes: the kernel's limit for one variable \
                 (name=value) is {} bytes",
                MAX_ARG_STRLEN - 1
            )));
        }
        total += len;
    }
    if total > arg_max() {
        return Err(Error::InvalidSpec(format!(
            "argv and environment total {total} bytes: the kernel's limit is {} bytes",
            arg_max()
        )));
    }
    Ok(())
}

/// The caller's argv and environment string areas (from /proc/self/stat), wiped in children.
pub(crate) fn wipe_ranges() -> &'static [(usize, usize)] {
    static RANGES: std::sync::OnceLock<Vec<(usize, usize)>> = std::sync::OnceLock::new();
    RANGES.get_or_init(|| {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command name (which may contain anything) start at field 3.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<usize> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
        vec![(field(48), field(49)), (field(50), field(51))]
    })
}

/// (resource, value) applied with setrlimit in the command's process.
pub type Rlimit = (libc::__rlimit_resource_t, u64);

/// RLIMIT_CPU value for a CPU-time budget: whole seconds, at least 1. The child sets the hard
/// limit one second above the soft one, so the kernel sends SIGXCPU (reported as `cpu_time`)
/// before SIGKILL.
fn cpu_rlimit(seconds: f64) -> u64 {
    (seconds.ceil() as u64).max(1)
}

/// Decides rlimits for the limits no cgroup enforces, and records every enforcer.
pub(crate) fn plan_limits(
    spec: &RunSpec,
    cgroup: Option<&RunCgroup>,
) -> (Vec<Rlimit>, BTreeMap<String, Option<Enforcer>>) {
    let l = &spec.limits;
    let mut rlimits = vec![(libc::RLIMIT_CORE, 0)];
    let mut enf = BTreeMap::new();
    let by_cgroup = |name: &str| {
        cgroup.and_then(|c| {
            c.enforced()
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| *e)
        })
    };
    if let Some(mem) = l.memory {
        let e = by_cgroup("memory").or_else(|| {
            // RLIMIT_DATA rather than RLIMIT_AS: runtimes such as V8 reserve far more address
            // space than they use, and would not start under an address-space cap.
            rlimits.push((libc::RLIMIT_DATA, mem));
            Some(Enforcer::Rlimit)
        });
        enf.insert("memory".into(), e);
    }
    if let Some(p) = l.pids {
        let e = by_cgroup("pids").or_else(|| {
            // Counted per user in the run's own user namespace, so the host is unaffected.
            rlimits.push((libc::RLIMIT_NPROC, p));
            Some(Enforcer::Rlimit)
        });
        enf.insert("pids".into(), e);
    }
    if l.cpus.is_some() {
        enf.insert("cpus".into(), by_cgroup("cpus"));
    }
    if let Some(t) = l.cpu_time {
        let e = by_cgroup("cpu_time").or_else(|| {
            // Per process only: the honest best without a cgroup (see cpu_rlimit).
            rlimits.push((libc::RLIMIT_CPU, cpu_rlimit(t)));
            Some(Enforcer::Rlimit)
        });
        enf.insert("cpu_time".into(), e);
    }
    if l.disk.is_some() {
        enf.insert("disk".into(), Some(Enforcer::Tmpfs));
    }
    if l.timeout.is_some() {
        enf.insert("timeout".into(), Some(Enforcer::Supervisor));
    }
    if l.max_output.is_some() {
        enf.insert("max_output".into(), Some(Enforcer::Supervisor));
    }
    (rlimits, enf)
}

fn prepare(
    spec: &RunSpec,
    rlimits: Vec<Rlimit>,
    resolv_conf: &str,
    ca_pem: Option<&str>,
) -> Result<Prepared> {
    let (mounts, identity) = prepare_sandbox(spec, resolv_conf)?;
    let mounts = match ca_pem {
        Some(pem) => std::sync::Arc::new(mounts.with_ca(pem)?),
        None => mounts,
    };
    let target = prepare_target(spec, rlimits, true)?;
    Ok(Prepared {
        mounts,
        identity,
        target,
    })
}

/// The mount plan and identity switch of a sandbox for `spec`.
pub(crate) fn prepare_sandbox(
    spec: &RunSpec,
    resolv_conf: &str,
) -> Result<(std::sync::Arc<MountPlan>, Identity)> {
    let root = is_root();
    // SAFETY: getuid/getgid have no side effects.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let owner = if root { ROOT_PATH_HOST_UID } else { 0 };
    let disk = spec.limits.disk.unwrap_or(64 << 20);
    let mounts = fs::cached(&PlanInput {
        disk,
        owner,
        ro_binds: &spec.ro_binds,
        rootfs: spec.rootfs.as_deref(),
        resolv_conf,
    })?;
    let identity = if root {
        Identity::RootThenUserns
    } else {
        Identity::SelfMapped {
            uid_map: format!("0 {uid} 1\n").into_bytes(),
            gid_map: format!("0 {gid} 1\n").into_bytes(),
        }
    };
    Ok((mounts, identity))
}

/// Everything the command's process needs: argv, environment, exec candidates, cwd, rlimits,
/// seccomp filter, and (`with_stack`) the stack it starts on.
pub(crate) fn prepare_target(
    spec: &RunSpec,
    rlimits: Vec<Rlimit>,
    with_stack: bool,
) -> Result<TargetPlan> {
    let mut env: BTreeMap<&str, &str> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let proxy_env = if spec.net.is_some() {
        net::proxy_env()
    } else {
        Vec::new()
    };
    for (k, v) in &proxy_env {
        env.entry(k.as_str()).or_insert(v.as_str());
    }
    for s in &spec.secrets {
        env.insert(&s.name, &s.value);
    }
    // The placeholders are the only form of a credential the sandbox sees.
    let creds = spec.credentials.as_ref().map_or(&[][..], |c| &c.list[..]);
    for c in creds {
        env.insert(&c.name, &c.placeholder);
    }
    if !creds.is_empty() && spec.net.is_some() {
        // The sandbox's CA, for the usual clients (the system bundle is replaced too).
        for name in CA_ENV {
            env.insert(name, fs::CA_BUNDLE);
        }
    }
    let path_var = env.get("PATH").copied().unwrap_or(DEFAULT_PATH).to_string();
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}"), "environment"))
        .collect::<Result<Vec<_>>>()?;
    let argv = spec
        .argv
        .iter()
        .map(|a| cstring(a, "argv"))
        .collect::<Result<Vec<_>>>()?;
    let exec_candidates = exec_candidates(&spec.argv[0], &path_var)
        .iter()
        .map(|p| cstring(p, "argv[0]"))
        .collect::<Result<Vec<_>>>()?;
    let seccomp = match &spec.seccomp {
        Some(s) => Some(seccomp::Program::from_bytes(&s.bpf)?),
        None => None,
    };
    Ok(TargetPlan {
        argv: CStringArray::new(argv),
        envp: CStringArray::new(envp),
        exec_candidates: CStringArray::new(exec_candidates),
        cwd: cstring(spec.cwd.as_deref().unwrap_or(fs::WORKSPACE), "cwd")?,
        rlimits,
        seccomp,
        last_cap: last_cap(),
        stack: if with_stack {
            vec![0; child::TARGET_STACK]
        } else {
            Vec::new()
        },
        tty: spec.tty,
    })
}

/// Reads an error record written by a child, if any (EOF = none).
pub(crate) fn read_error(
    err: &OwnedFd,
    mounts: Option<&MountPlan>,
    cwd: Option<&std::ffi::CStr>,
    argv0: &str,
) -> Option<Error> {
    let mut rec = [0u8; 12];
    let mut f = std::fs::File::from(err.try_clone().ok()?);
    let mut got = 0;
    while got < rec.len() {
        match f.read(&mut rec[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return None;
    }
    if got < rec.len() {
        return Some(Error::Setup {
            stage: "child",
            source: std::io::Error::other("truncated error record"),
        });
    }
    let word = |i: usize| u32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
    let (stage, index, errno) = (word(0), word(4), word(8) as i32);
    let os = std::io::Error::from_raw_os_error(errno);
    Some(match Stage::from_u32(stage) {
        Some(Stage::Exec) => match errno {
            libc::ENOENT | libc::ENOTDIR => Error::CommandNotFound(argv0.to_string()).at(argv0),
            libc::E2BIG => Error::InvalidSpec(format!(
                "argv and environment of {argv0} are too large for execve (E2BIG): keep each \
                 string under {MAX_ARG_STRLEN} bytes and all of them under {} bytes",
                arg_max()
            )),
            _ => Error::CommandNotFound(format!("{argv0}: {os}")).at(argv0),
        },
        Some(Stage::Mount) => {
            let what = mounts
                .and_then(|m| m.ops.get(index as usize))
                .map(|o| o.describe())
                .unwrap_or_default();
            Error::Setup {
                stage: "mount",
                source: std::io::Error::new(os.kind(), format!("{what}: {os}")),
            }
        }
        Some(Stage::Seccomp) => Error::Seccomp(format!("cannot install the filter: {os}")),
        Some(Stage::Process) if index == 1 => {
            let cwd = cwd.map(|c| c.to_string_lossy()).unwrap_or_default();
            Error::InvalidSpec(format!("cwd {cwd:?}: {os} inside the sandbox")).at(cwd)
        }
        Some(s) => Error::Setup {
            stage: s.describe(),
            source: os,
        },
        None => Error::Setup {
            stage: "child",
            source: os,
        },
    })
}

/// Writes `0 <host> 1` maps for a user namespace created by a root PID 1.
pub(crate) fn write_root_maps(pid: libc::pid_t) -> std::io::Result<()> {
    let map = format!("0 {ROOT_PATH_HOST_UID} 1\n");
    std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
    std::fs::write(format!("/proc/{pid}/gid_map"), &map)
}

/// How long [`kill_and_reap`] waits for a killed child (a sandbox's PID 1 ends once the kernel
/// has torn its namespaces down, which can take a while on a busy host).
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Kills a child through its pidfd and reaps it, waiting at most [`KILL_GRACE`]. False when it
/// did not end in time (e.g. frozen by a cgroup: thaw it first); it is reaped later then.
pub fn kill_and_reap(pidfd: &OwnedFd) -> bool {
    kill_and_reap_within(pidfd, KILL_GRACE)
}

/// How long a sandbox's set-up may take at most before the caller gets [`Error::Deadline`].
pub const SETUP_DEADLINE: Duration = Duration::from_secs(20);
/// How long a killed child may take to die before it is left to [`bury`].
const REAP_GRACE: Duration = Duration::from_millis(500);

/// The set-up deadline of a spec: its timeout (at least a second), at most [`SETUP_DEADLINE`].
fn setup_deadline(spec: &RunSpec) -> Instant {
    let d = spec.limits.timeout.map_or(SETUP_DEADLINE, |t| {
        Duration::from_secs_f64(t.clamp(1.0, SETUP_DEADLINE.as_secs_f64()))
    });
    Instant::now() + d
}

/// Waits until `fd` is readable (or hung up) or `deadline` passes; false on the deadline.
pub(crate) fn wait_readable(fd: &impl AsRawFd, deadline: Instant) -> bool {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one pollfd we own.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        // Ready, or an error the following read will report; a signal only interrupts the wait.
        if r > 0 || (r < 0 && crate::error::errno() != libc::EINTR) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// Children killed but not yet dead (frozen): reaped later by [`reap_buried`].
static BURIED: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

/// Reaps `pidfd` without blocking; true when it is gone (or not our child).
fn try_reap(pidfd: &OwnedFd) -> bool {
    // SAFETY: waitid fills a siginfo on the stack.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let r = libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::__WALL,
        );
        r < 0 || info.si_pid() != 0
    }
}

/// Reaps the buried children that have died meanwhile.
fn reap_buried() {
    if let Ok(mut b) = BURIED.lock() {
        b.retain(|fd| !try_reap(fd));
    }
}

/// Kills a child through its pidfd and reaps it, waiting at most `grace`; a child that does not
/// die in time (frozen by a paused session's cgroup) is reaped later instead of blocking.
/// True when it ended (or was not our child).
pub fn kill_and_reap_within(pidfd: &OwnedFd, grace: Duration) -> bool {
    kill(pidfd);
    if wait_readable(pidfd, Instant::now() + grace) && try_reap(pidfd) {
        return true;
    }
    if let (Ok(dup), Ok(mut b)) = (pidfd.try_clone(), BURIED.lock()) {
        b.push(dup);
    }
    false
}

/// The pipes between the supervisor and a child, both ends, before the clone.
pub(crate) struct Pipes {
    pub(crate) child: ChildFds,
    /// Child ends, closed in the parent right after the clone.
    pub(crate) child_owned: Vec<OwnedFd>,
    pub(crate) stdin: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
    pub(crate) ready: OwnedFd,
    pub(crate) go: OwnedFd,
    pub(crate) err: OwnedFd,
    pub(crate) status: OwnedFd,
    pub(crate) sock: OwnedFd,
}

impl Pipes {
    /// Closes our copies of the child's ends and says whether no other process holds the
    /// child's end of the "ready" pipe (so no PID 1 was started with these pipes). The pipes
    /// cannot serve a child afterwards.
    fn unused_by_any_child(&mut self) -> bool {
        self.child_owned.clear();
        let mut pfd = libc::pollfd {
            fd: self.ready.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        r == 1 && pfd.revents & libc::POLLHUP != 0 && pfd.revents & libc::POLLIN == 0
    }

    pub(crate) fn new() -> Result<Pipes> {
        let (stdin_r, stdin) = pipe()?;
        let (stdout, stdout_w) = pipe()?;
        let (stderr, stderr_w) = pipe()?;
        let (ready, ready_w) = pipe()?;
        let (go_r, go) = pipe()?;
        let (err, err_w) = pipe()?;
        let (status, status_w) = pipe()?;
        let (sock, sock_child) = socketpair()?;
        let child = ChildFds {
            stdin: stdin_r.as_raw_fd(),
            stdout: stdout_w.as_raw_fd(),
            stderr: stderr_w.as_raw_fd(),
            ready: ready_w.as_raw_fd(),
            go: go_r.as_raw_fd(),
            err: err_w.as_raw_fd(),
            status: status_w.as_raw_fd(),
            fdsock: sock_child.as_raw_fd(),
        };
        let child_owned = vec![
            stdin_r, stdout_w, stderr_w, ready_w, go_r, err_w, status_w, sock_child,
        ];
        Ok(Pipes {
            child,
            child_owned,
            stdin,
            stdout,
            stderr,
            ready,
            go,
            err,
            status,
            sock,
        })
    }
}

/// Raw clone returning (pid, pidfd); the child runs `child` and never returns.
pub(crate) fn clone_with(
    flags: libc::c_ulong,
    child: impl FnOnce(),
) -> std::io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: libc::c_int = -1;
    // SAFETY: a raw clone without CLONE_VM is a fork; exit signal 0 keeps the child invisible
    // to waitpid(-1) in the caller's other threads. The child only runs `child`, which never
    // returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags | libc::CLONE_PIDFD as libc::c_ulong,
            0,
            &mut pidfd as *mut libc::c_int,
            0,
            0,
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

pub(crate) fn clone_error(e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS | libc::EACCES) => {
            Error::NamespaceUnavailable(format!("clone of a namespaced PID 1 failed: {e}"))
        }
        _ => Error::Setup {
            stage: "clone",
            source: e,
        },
    }
}

/// The host pid behind a pidfd (from /proc/self/fdinfo).
pub(crate) fn pidfd_pid(pidfd: &OwnedFd) -> Option<libc::pid_t> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// After the clone: place the init in its cgroup, wait until it is built, write the root
/// path's maps, release it, and collect exec errors and the seccomp listener.
fn handshake(pid: libc::pid_t, pidfd: &OwnedFd, p: Pipes, how: Handshake<'_>) -> Result<Endpoints> {
    let Handshake {
        cgroup,
        attached,
        write_maps,
        prepared,
        argv0,
        want_listener,
        net,
        deadline,
        memory,
    } = how;
    let seconds = deadline
        .saturating_duration_since(Instant::now())
        .as_secs_f64();
    let late = |stage: &'static str| Error::Deadline { stage, seconds };
    let fail = |e: Error| -> Error {
        kill_and_reap_within(pidfd, REAP_GRACE);
        // A sandbox OOM-killed while starting was given too little memory to start at all.
        match (cgroup.is_some_and(|c| c.oom_kills() > 0), memory) {
            (true, Some(m)) => Error::InvalidSpec(format!(
                "memory: {m} bytes is too little, the sandbox ran out of memory while starting \
                 ({e})"
            )),
            _ => e,
        }
    };
    if let Some(cg) = cgroup.filter(|_| !attached) {
        if let Err(e) = cg.add(pid) {
            return Err(fail(Error::Setup {
                stage: "join the run's cgroup",
                source: e,
            }));
        }
    }
    if !wait_readable(&p.ready, deadline) {
        return Err(fail(late("wait for the sandbox's set-up")));
    }
    let mut byte = [0u8; 1];
    let ready = std::fs::File::from(p.ready).read(&mut byte).unwrap_or(0) == 1;
    if !ready {
        let e = read_error(
            &p.err,
            Some(&*prepared.mounts),
            Some(&prepared.target.cwd),
            argv0,
        )
        .unwrap_or_else(|| Error::Setup {
            stage: "build the sandbox",
            source: std::io::Error::other("PID 1 died"),
        });
        return Err(fail(e));
    }
    // PID 1 sent the sockets it made in the sandbox's network namespace before "ready".
    let egress = match net {
        Some(n) => {
            let fds = fdpass::recv_fds(std::os::fd::AsFd::as_fd(&p.sock)).map_err(|e| {
                fail(Error::Network(format!(
                    "no egress sockets from the sandbox: {e}"
                )))
            })?;
            let config = net::EgressConfig {
                broker: n.broker.clone(),
                ..net::EgressConfig::default()
            };
            let egress = net::Egress::start_with(n.allow.clone(), fds, config).map_err(fail)?;
            if n.broker.is_some() {
                // For `on_leak = kill`: the egress ends the sandbox itself.
                if let Ok(fd) = pidfd.try_clone() {
                    egress.set_kill_target(fd);
                }
            }
            Some(egress)
        }
        None => None,
    };
    if write_maps {
        if let Err(e) = write_root_maps(pid) {
            return Err(fail(Error::Setup {
                stage: "write uid/gid maps",
                source: e,
            }));
        }
    }
    // SAFETY: one byte to the go pipe.
    if unsafe { libc::write(p.go.as_raw_fd(), [1u8].as_ptr().cast(), 1) } != 1 {
        return Err(fail(Error::setup("release PID 1")));
    }
    drop(p.go);
    if !wait_readable(&p.err, deadline) {
        return Err(fail(late("wait for the command to start")));
    }
    if let Some(e) = read_error(
        &p.err,
        Some(&*prepared.mounts),
        Some(&prepared.target.cwd),
        argv0,
    ) {
        return Err(fail(e));
    }
    // A terminal's master comes first: the command opens it before installing seccomp.
    let tty = match prepared.target.tty {
        Some(_) if !wait_readable(&p.sock, deadline) => {
            return Err(fail(late("wait for the command's terminal")))
        }
        Some(_) => Some(recv_master(&p.sock).map_err(fail)?),
        None => None,
    };
    if want_listener && !wait_readable(&p.sock, deadline) {
        return Err(fail(late("wait for the seccomp listener")));
    }
    let listener = if want_listener {
        match fdpass::recv_fd(std::os::fd::AsFd::as_fd(&p.sock)) {
            Ok(fd) => Some(fd),
            Err(e) => {
                return Err(fail(Error::Seccomp(format!(
                    "no listener from the sandbox: {e}"
                ))))
            }
        }
    } else {
        None
    };
    // The terminal replaces the stdin and stdout pipes: input is typed into it, its output
    // (stdout and stderr merged) is read from it; the stderr pipe just sees EOF.
    let dup = |m: &OwnedFd| {
        m.try_clone().map_err(|e| {
            fail(Error::Setup {
                stage: "dup the terminal",
                source: e,
            })
        })
    };
    let (stdin, stdout, terminal) = match tty {
        Some(master) => (dup(&master)?, dup(&master)?, Some(master)),
        None => (p.stdin, p.stdout, None),
    };
    Ok(Endpoints {
        stdin,
        stdout,
        terminal,
        stderr: p.stderr,
        status: p.status,
        listener,
        egress,
    })
}

/// Receives the master of the command's terminal (see [`crate::tty`]).
fn recv_master(sock: &OwnedFd) -> Result<OwnedFd> {
    let fd = fdpass::recv_fd(std::os::fd::AsFd::as_fd(sock)).map_err(|e| Error::Setup {
        stage: "receive the command's terminal",
        source: e,
    })?;
    if !crate::tty::is_terminal(std::os::fd::AsFd::as_fd(&fd)) {
        return Err(Error::Setup {
            stage: "receive the command's terminal",
            source: std::io::Error::other("the descriptor passed out is not a terminal"),
        });
    }
    Ok(fd)
}

/// What [`handshake`] needs to know about the sandbox being started.
struct Handshake<'a> {
    /// The cgroup to place PID 1 in.
    cgroup: Option<&'a RunCgroup>,
    /// Whether PID 1 started in `cgroup` already (cloned into it).
    attached: bool,
    /// Whether to write the root path's uid/gid maps.
    write_maps: bool,
    /// For naming errors.
    prepared: &'a Prepared,
    /// For naming errors.
    argv0: &'a str,
    /// Whether a seccomp listener will be sent.
    want_listener: bool,
    /// The egress plan, when the run has an allowlist.
    net: Option<&'a NetPrep>,
    /// When to give up waiting for the sandbox.
    deadline: Instant,
    /// The memory limit (for naming a limit too small to start).
    memory: Option<u64>,
}

/// The supervisor's ends once a sandbox runs.
#[derive(Debug)]
pub struct Endpoints {
    /// Write end of the command's stdin.
    pub stdin: OwnedFd,
    /// Read end of the command's stdout.
    pub stdout: OwnedFd,
    /// Read end of the command's stderr.
    pub stderr: OwnedFd,
    /// Read end of PID 1's status pipe.
    pub status: OwnedFd,
    /// The seccomp listener, when a filter was installed.
    pub listener: Option<OwnedFd>,
    /// The egress proxy serving this run (allowlist given).
    pub egress: Option<net::Egress>,
    /// The master of the command's terminal (tty runs), held until the run is over: a last
    /// close would hang the terminal up, and SIGHUP could kill a command that closed its stdio
    /// and is about to exit.
    pub terminal: Option<OwnedFd>,
}

/// Variables pointing TLS clients (OpenSSL, curl, Python requests, pip, Node) at the bundle
/// that trusts the sandbox's CA.
const CA_ENV: [&str; 5] = [
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
];

/// The network side of a sandbox with an allowlist, prepared before the clone.
struct NetPrep {
    allow: net::Allowlist,
    plan: net::ChildPlan,
    /// Credentials and the sandbox's CA (made here, in the supervisor).
    broker: Option<std::sync::Arc<net::Broker>>,
}

impl NetPrep {
    fn ca_pem(&self) -> Option<String> {
        self.broker.as_ref().map(|b| b.ca_pem())
    }
}

fn prepare_net(spec: &RunSpec) -> Result<Option<NetPrep>> {
    let creds = spec.credentials.as_ref().filter(|c| !c.list.is_empty());
    match &spec.net {
        None if creds.is_some() => Err(Error::Credential(
            "credentials need network egress (allow their hosts)".into(),
        )),
        None => Ok(None),
        Some(n) => {
            let allow = net::Allowlist::parse(&n.allow)?;
            let plan = net::ChildPlan::new(&allow)?;
            let broker = match creds {
                Some(c) => Some(std::sync::Arc::new(net::Broker::new(c)?)),
                None => None,
            };
            Ok(Some(NetPrep {
                allow,
                plan,
                broker,
            }))
        }
    }
}

fn resolv_conf_for(spec: &RunSpec) -> &'static str {
    if spec.net.is_some() {
        net::resolv_conf()
    } else {
        ""
    }
}

const NS_FLAGS: libc::c_int = libc::CLONE_NEWPID
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

pub(crate) fn sandbox_clone_flags() -> libc::c_ulong {
    let mut flags = NS_FLAGS as libc::c_ulong;
    if !is_root() {
        flags |= libc::CLONE_NEWUSER as libc::c_ulong;
    }
    flags
}

/// The process the fork server cloned (`served`, see [`crate::forkserver::clone`]), or, when
/// there is none, the one `direct` clones here from `init`. A fork server that ended with the
/// request unanswered may have cloned it or not: when no process holds the pipes `p`, they are
/// replaced and `direct` clones with the new ones; else the fork server's error is returned.
fn clone_unless_served<T>(
    served: Option<std::io::Result<T>>,
    p: &mut Pipes,
    init: &InitPlan<'_>,
    direct: impl Fn(&InitPlan<'_>) -> std::io::Result<T>,
) -> Result<std::io::Result<T>> {
    match served {
        Some(Err(e)) if crate::forkserver::ended_without_answer(&e) => {
            if !p.unused_by_any_child() {
                return Ok(Err(e));
            }
            *p = Pipes::new()?;
            let init = InitPlan {
                fds: p.child,
                ..*init
            };
            Ok(direct(&init))
        }
        Some(r) => Ok(r),
        None => Ok(direct(init)),
    }
}

/// Clones PID 1 into fresh namespaces, builds the sandbox, starts the command.
///
/// Returns once the command has been exec'd (or with the reason it could not be).
pub fn start(spec: &RunSpec) -> Result<Started> {
    validate(spec)?;
    reap_buried();
    let netprep = prepare_net(spec)?;
    // Parts made ahead when there are (see `cell::parts`); a run with an egress allowlist
    // builds its network namespace with the proxy's sockets in it.
    let netns = match netprep {
        None => crate::cell::parts::netns(),
        Some(_) => None,
    };
    let cgroup = crate::cell::parts::cgroup(&spec.limits, false)
        .or_else(|| RunCgroup::create(&spec.limits, false));
    let (rlimits, enforcement) = plan_limits(spec, cgroup.as_ref());
    let ca = netprep.as_ref().and_then(NetPrep::ca_pem);
    let prepared = prepare(spec, rlimits, resolv_conf_for(spec), ca.as_deref())?;
    let p = Pipes::new()?;
    // cgroup v1: PID 1 moves itself in (none of the supervisor's threads enters the run's
    // cgroup, and no pid is written to `cgroup.procs`); if a `tasks` file cannot be opened the
    // supervisor attaches PID 1 after the clone instead.
    let tasks = cgroup
        .as_ref()
        .and_then(|c| c.open_tasks().ok())
        .unwrap_or_default();
    let join_tasks: Vec<libc::c_int> = tasks.iter().map(AsRawFd::as_raw_fd).collect();
    let init = InitPlan {
        mounts: Some(&*prepared.mounts),
        identity: &prepared.identity,
        hostname: fs::HOSTNAME.as_bytes(),
        target: Some(&prepared.target),
        fds: p.child,
        pdeathsig: true,
        lifeline: -1,
        wipe: wipe_ranges(),
        net: netprep.as_ref().map(|n| &n.plan),
        serve: None,
        netns: netns.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        join_tasks: &join_tasks,
    };
    let started_at = std::time::Instant::now();
    let deadline = setup_deadline(spec);
    let mut flags = sandbox_clone_flags();
    if netns.is_some() {
        flags &= !(libc::CLONE_NEWNET as libc::c_ulong);
    }
    let mut p = p;
    let served = crate::forkserver::clone(
        &init,
        Some(&prepared.mounts),
        None,
        flags,
        cgroup.as_ref(),
        deadline,
    )
    .map(|r| r.map(|z| z.cloned));
    let cloned = clone_unless_served(served, &mut p, &init, |init| {
        spawner::clone_in(flags, cgroup.as_ref(), &|| child::init_main(init))
    })?
    .map_err(clone_error)?;
    // PID 1 has its own copies of these fds (it uses them before anything else).
    drop(netns);
    drop(tasks);
    let (pid, pidfd) = (cloned.pid, cloned.pidfd);
    p.child_owned.clear();
    let how = Handshake {
        cgroup: cgroup.as_ref(),
        attached: cloned.attached || !join_tasks.is_empty(),
        write_maps: is_root(),
        prepared: &prepared,
        argv0: &spec.argv[0],
        want_listener: spec.seccomp.is_some(),
        net: netprep.as_ref(),
        deadline,
        memory: spec.limits.memory,
    };
    let io = match handshake(pid, &pidfd, p, how) {
        Ok(io) => io,
        // A run that failed to start and also failed to clean up reports both.
        Err(e) => {
            let cleanup = cgroup.as_ref().and_then(|c| c.remove().err());
            return Err(e.with_cleanup(cleanup.map(|c| c.to_string())));
        }
    };
    Ok(Started {
        pid,
        pidfd,
        io,
        cgroup,
        enforcement,
        started_at,
        reaper: None,
    })
}

/// A started session holder: PID 1 of a sandbox that runs nothing until asked.
#[derive(Debug)]
pub struct Holder {
    /// Host pid of the holder.
    pub pid: libc::pid_t,
    /// pidfd of the holder.
    pub pidfd: OwnedFd,
    /// Write end of the lifeline; dropping it ends the session.
    pub lifeline: OwnedFd,
    /// The session's reaper (see [`crate::reaper`]), when the session has a cgroup.
    pub reaper: Option<OwnedFd>,
    /// The session's cgroup.
    pub cgroup: Option<RunCgroup>,
    /// What enforces each session-wide limit.
    pub enforcement: BTreeMap<String, Option<Enforcer>>,
    /// rlimits applied to every call (when no cgroup enforces a limit).
    pub rlimits: Vec<Rlimit>,
    /// Whether the session was built by root.
    pub root: bool,
    /// The session's egress proxy (allowlist given).
    pub egress: Option<net::Egress>,
}

/// Builds a sandbox whose PID 1 holds the namespaces open for later calls (a session).
pub fn start_holder(spec: &RunSpec) -> Result<Holder> {
    let mut probe = spec.clone();
    if probe.argv.is_empty() {
        probe.argv = vec!["session".into()];
    }
    validate(&probe)?;
    let netprep = prepare_net(spec)?;
    let cgroup = RunCgroup::create(&spec.limits, true);
    let (rlimits, enforcement) = plan_limits(&probe, cgroup.as_ref());
    let ca = netprep.as_ref().and_then(NetPrep::ca_pem);
    let prepared = prepare(
        &probe,
        rlimits.clone(),
        resolv_conf_for(spec),
        ca.as_deref(),
    )?;
    let (life_r, life_w) = pipe()?;
    let reaper_plan = match &cgroup {
        Some(cg) => Some(ReaperPlan::new(&cg.thaw_files(), &cg.dir_paths())?),
        None => None,
    };
    let p = Pipes::new()?;
    let init = InitPlan {
        mounts: Some(&*prepared.mounts),
        identity: &prepared.identity,
        hostname: fs::HOSTNAME.as_bytes(),
        target: None,
        fds: p.child,
        pdeathsig: false,
        lifeline: life_r.as_raw_fd(),
        wipe: wipe_ranges(),
        net: netprep.as_ref().map(|n| &n.plan),
        serve: None,
        netns: -1,
        join_tasks: &[],
    };
    let deadline = setup_deadline(spec);
    let (pid, pidfd) =
        clone_with(sandbox_clone_flags(), || child::init_main(&init)).map_err(clone_error)?;
    // Only a cgroup needs the reaper: without one, the holder's own exit ends everything.
    let reaper = match reaper_plan
        .as_ref()
        .map(|r| reaper::start(r, &life_r, &pidfd))
    {
        Some(Err(e)) => {
            kill_and_reap(&pidfd);
            return Err(e);
        }
        Some(Ok(fd)) => Some(fd),
        None => None,
    };
    drop(life_r);
    let mut p = p;
    p.child_owned.clear();
    let how = Handshake {
        // The holder stays out of the session's cgroup: only calls run there, so the
        // OOM killer (which sees the holder as big as the caller) can never pick it.
        cgroup: None,
        attached: false,
        write_maps: is_root(),
        prepared: &prepared,
        argv0: "session",
        want_listener: false,
        net: netprep.as_ref(),
        deadline,
        memory: None,
    };
    let egress = match handshake(pid, &pidfd, p, how) {
        Ok(io) => io.egress,
        Err(e) => {
            if let Some(r) = &reaper {
                kill_and_reap(r);
            }
            return Err(e);
        }
    };
    Ok(Holder {
        pid,
        pidfd,
        lifeline: life_w,
        reaper,
        cgroup,
        enforcement,
        rlimits,
        root: is_root(),
        egress,
    })
}

/// Starts one call inside a session: a fresh pid namespace nested in the session's, sharing its
/// filesystem, network and cgroup.
pub fn start_call(holder: &Holder, spec: &RunSpec) -> Result<Started> {
    validate(spec)?;
    reap_buried();
    // Session-wide limits come from the session; per-call CPU time is a per-process rlimit.
    let mut rlimits = holder.rlimits.clone();
    let mut enforcement = holder.enforcement.clone();
    if let Some(t) = spec.limits.cpu_time {
        rlimits.retain(|(r, _)| *r != libc::RLIMIT_CPU);
        rlimits.push((libc::RLIMIT_CPU, cpu_rlimit(t)));
        enforcement.insert("cpu_time".into(), Some(Enforcer::Rlimit));
    }
    if spec.limits.timeout.is_some() {
        enforcement.insert("timeout".into(), Some(Enforcer::Supervisor));
    }
    if spec.limits.max_output.is_some() {
        enforcement.insert("max_output".into(), Some(Enforcer::Supervisor));
    }
    let prepared = prepare(spec, rlimits, "", None)?;
    let identity = Identity::Joined { root: holder.root };
    let p = Pipes::new()?;
    // cgroup v1: the call's init moves itself into the session's cgroup (no write of a pid to
    // `cgroup.procs`, whose first writer after a quiet spell waits for an RCU grace period);
    // else the supervisor attaches it below.
    let tasks = holder
        .cgroup
        .as_ref()
        .and_then(|c| c.open_tasks().ok())
        .unwrap_or_default();
    let join_tasks: Vec<libc::c_int> = tasks.iter().map(AsRawFd::as_raw_fd).collect();
    let init = InitPlan {
        mounts: None,
        identity: &identity,
        hostname: fs::HOSTNAME.as_bytes(),
        target: Some(&prepared.target),
        fds: p.child,
        pdeathsig: false,
        lifeline: -1,
        wipe: wipe_ranges(),
        net: None,
        serve: None,
        netns: -1,
        join_tasks: &join_tasks,
    };
    let join = JoinPlan {
        pidfd: holder.pidfd.as_raw_fd(),
        root: holder.root,
    };
    let started_at = std::time::Instant::now();
    let deadline = setup_deadline(spec);
    let setup = |e: std::io::Error| Error::Setup {
        stage: "clone",
        source: e,
    };
    let mut p = p;
    // The joiner comes from the fork server when one runs (see `start`).
    let served = crate::forkserver::clone(&init, None, Some(&join), 0, None, deadline)
        .map(|r| r.map(|z| z.cloned.pidfd));
    let joiner_fd = clone_unless_served(served, &mut p, &init, |init| {
        clone_with(0, || child::join_main(&join, init)).map(|(_, fd)| fd)
    })?
    .map_err(setup)?;
    p.child_owned.clear();
    drop(tasks);
    // The joiner hands over the call init's pidfd (or reports why it could not).
    if !wait_readable(&p.sock, deadline) {
        kill_and_reap_within(&joiner_fd, REAP_GRACE);
        return Err(Error::Deadline {
            stage: "join the session",
            seconds: deadline.duration_since(started_at).as_secs_f64(),
        });
    }
    let pidfd = match fdpass::recv_fd(std::os::fd::AsFd::as_fd(&p.sock)) {
        Ok(fd) => fd,
        Err(_) => {
            kill_and_reap(&joiner_fd);
            let e = read_error(
                &p.err,
                Some(&*prepared.mounts),
                Some(&prepared.target.cwd),
                &spec.argv[0],
            )
            .unwrap_or_else(|| Error::SessionClosed("the session's sandbox is gone".into()));
            return Err(e);
        }
    };
    let pid = pidfd_pid(&pidfd).ok_or_else(|| Error::setup("find the call's pid"))?;
    // The joiner is a child of the caller, outside the session's cgroup: the call's init is in
    // it before it is released (it moved itself in, or is attached now), so the call and all
    // it starts count against the session.
    let how = Handshake {
        cgroup: holder.cgroup.as_ref(),
        attached: !join_tasks.is_empty(),
        write_maps: false,
        prepared: &prepared,
        argv0: &spec.argv[0],
        want_listener: spec.seccomp.is_some(),
        net: None,
        deadline,
        memory: None,
    };
    let io = match handshake(pid, &pidfd, p, how) {
        Ok(io) => io,
        Err(e) => {
            kill_and_reap_within(&joiner_fd, REAP_GRACE);
            return Err(e);
        }
    };
    Ok(Started {
        pid,
        pidfd,
        io,
        cgroup: None,
        enforcement,
        started_at,
        reaper: Some(joiner_fd),
    })
}

/// Sends SIGKILL to PID 1 (and so to every process of the sandbox).
pub fn kill(pidfd: &OwnedFd) {
    // SAFETY: signalling our own child through its pidfd.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_candidates_follow_path() {
        assert_eq!(exec_candidates("ls", "/a:/b/"), vec!["/a/ls", "/b/ls"]);
        assert_eq!(exec_candidates("./x", "/a"), vec!["./x"]);
        assert_eq!(exec_candidates("/bin/sh", "/a"), vec!["/bin/sh"]);
    }

    #[test]
    fn limits_fall_back_to_rlimits_without_cgroup() {
        let mut spec = RunSpec {
            argv: vec!["true".into()],
            ..Default::default()
        };
        spec.limits.memory = Some(1 << 20);
        spec.limits.pids = Some(10);
        spec.limits.cpus = Some(0.5);
        spec.limits.disk = Some(1 << 20);
        let (rl, enf) = plan_limits(&spec, None);
        assert!(rl
            .iter()
            .any(|(r, v)| *r == libc::RLIMIT_DATA && *v == 1 << 20));
        assert!(rl.iter().any(|(r, v)| *r == libc::RLIMIT_NPROC && *v == 10));
        assert_eq!(enf["memory"], Some(Enforcer::Rlimit));
        assert_eq!(
            enf["cpus"], None,
            "cpu quota has no rlimit: reported as not enforced"
        );
        assert_eq!(enf["disk"], Some(Enforcer::Tmpfs));
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut spec = RunSpec::default();
        assert!(matches!(validate(&spec), Err(Error::InvalidSpec(_))));
        spec.argv = vec!["x".into()];
        spec.limits.timeout = Some(-1.0);
        assert!(matches!(validate(&spec), Err(Error::InvalidSpec(_))));
    }
}
