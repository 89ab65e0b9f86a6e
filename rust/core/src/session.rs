//! Sessions: one sandbox (namespaces, cgroup, workspace) serving many calls until closed.
//!
//! The session's PID 1 only holds the namespaces open. Each call joins them and gets a pid
//! namespace of its own nested in the session's, so a call's timeout kills exactly that call's
//! processes while files, network and the cgroup are shared. The files API (read_file,
//! write_file, ...) is in [`crate::files`].

use crate::error::{Error, Result};
use crate::files::{cstring, sandbox_path, FilesTarget};
use crate::redact::Redactor;
use crate::report::{Enforcer, RunReport};
use crate::spawn::{self, Holder};
use crate::spec::RunSpec;
use crate::supervise::{self, Hooks};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A live session. Methods take `&self`: calls from several threads run concurrently.
#[derive(Debug)]
pub struct Session {
    /// None once closed. The lock is only held to take a reference: nothing waits under it.
    holder: Mutex<Option<Arc<Holder>>>,
    /// Whether the session is paused; calls wait (bounded) on the condvar until it is not.
    paused: (Mutex<bool>, Condvar),
    /// Environment and secrets every call gets (the session's spec).
    base: RunSpec,
    /// The session's secrets, redacted from what the files API reads.
    redactor: Redactor,
    /// Set by [`Session::close`] before it kills the sandbox: calls ended so report
    /// [`crate::Reason::SessionClosed`].
    closing: Arc<AtomicBool>,
    /// Ports forwarded into the sandbox ([`Session::expose`]), stopped at close.
    exposed: Mutex<Vec<crate::net::Exposed>>,
    /// The egress allowlist in force (`None`: the session has no network). Held while
    /// [`Session::set_network`] changes it, so changes apply one at a time.
    allow_net: Mutex<Option<Vec<String>>>,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

impl Session {
    /// Opens a session: builds the sandbox with the spec's session-wide limits (memory, pids,
    /// cpus, disk), filesystem, environment and secrets. `spec.argv` is ignored.
    pub fn open(spec: &RunSpec) -> Result<Session> {
        let redactor = crate::redactor_for(spec)?;
        let holder = spawn::start_holder(spec)?;
        Ok(Session {
            holder: Mutex::new(Some(Arc::new(holder))),
            paused: (Mutex::new(false), Condvar::new()),
            base: spec.clone(),
            redactor,
            closing: Arc::new(AtomicBool::new(false)),
            exposed: Mutex::new(Vec::new()),
            allow_net: Mutex::new(spec.net.as_ref().map(|n| n.allow.clone())),
        })
    }

    /// The live holder. The lock is released before returning: calls, pause, resume and close
    /// never wait on each other.
    fn holder(&self) -> Result<Arc<Holder>> {
        let holder = self
            .holder
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?
            .clone()
            .ok_or_else(|| Error::SessionClosed("the session is closed".into()))?;
        if !alive(&holder) {
            return Err(Error::SessionClosed(
                "the session's sandbox has exited".into(),
            ));
        }
        Ok(holder)
    }

    /// Runs `f` with the live holder (no lock held meanwhile).
    fn with_holder<T>(&self, f: impl FnOnce(&Holder) -> Result<T>) -> Result<T> {
        let holder = self.holder()?;
        f(&holder)
    }

    /// Waits until the session is not paused, at most until `deadline`; false on the deadline.
    fn wait_unpaused(&self, deadline: Instant) -> Result<bool> {
        let (lock, cv) = &self.paused;
        let mut paused = lock
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?;
        while *paused {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            paused = cv
                .wait_timeout(paused, left)
                .map_err(|_| Error::SessionClosed("poisoned".into()))?
                .0;
            self.holder()?;
        }
        Ok(true)
    }

    fn set_paused(&self, on: bool) {
        if let Ok(mut p) = self.paused.0.lock() {
            *p = on;
        }
        self.paused.1.notify_all();
    }

    /// Where the files API acts: the sandbox's root, opened under the lock, so that no file
    /// operation holds the lock while it works.
    pub(crate) fn files_target(&self) -> Result<FilesTarget> {
        self.with_holder(FilesTarget::of)
    }

    /// The session's redactor (its secrets).
    pub(crate) fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// Session-wide enforcement (memory, pids, cpus, disk).
    pub fn enforcement(&self) -> Result<BTreeMap<String, Option<Enforcer>>> {
        self.with_holder(|h| Ok(h.enforcement.clone()))
    }

    /// Runs one command in the session. The call's `env` and `secrets` are added to the
    /// session's; its `limits.timeout`, `cpu_time` and `max_output` apply to this call only.
    pub fn exec(&self, call: &RunSpec, hooks: Hooks<'_>) -> Result<RunReport> {
        self.exec_observed(call, hooks, &|_| {})
    }

    /// [`Session::exec`], telling `on_start` the host pid of the call's PID 1 once the call
    /// runs: the caller can then prove that a socket's listener is this call's command
    /// ([`Session::connect_unix_child_of`]).
    pub fn exec_observed(
        &self,
        call: &RunSpec,
        hooks: Hooks<'_>,
        on_start: &dyn Fn(libc::pid_t),
    ) -> Result<RunReport> {
        let call = self.start(call, false)?;
        if call.pid() > 0 {
            on_start(call.pid());
        }
        Ok(call.supervise(hooks))
    }

    /// Starts one command in the session and returns at once (a background process): the
    /// [`Call`] is supervised, exactly like [`Session::exec`]'s, by [`Call::supervise`]. With
    /// `stream_stdin` the call's stdin stays open and [`Call::take_stdin`] hands its write end
    /// to the caller (the spec's `stdin` bytes must then be empty); otherwise the supervisor
    /// writes the spec's `stdin` and closes it.
    pub fn start(&self, call: &RunSpec, stream_stdin: bool) -> Result<Call> {
        let mut spec = call.clone();
        let mut env = self.base.env.clone();
        env.extend(call.env.clone());
        spec.env = env;
        let mut secrets = self.base.secrets.clone();
        secrets.extend(call.secrets.iter().cloned());
        spec.secrets = secrets;
        // The session's placeholders (and CA variables) are every call's.
        spec.credentials = self.base.credentials.clone();
        // Calls share the session's network namespace: its policy (live, see set_network)
        // is theirs, whatever the call's spec says (it decides the proxy environment).
        spec.net = self
            .allow_net
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?
            .clone()
            .map(|allow| crate::spec::NetSpec { allow });
        if stream_stdin && !spec.stdin.is_empty() {
            return Err(Error::InvalidSpec(
                "stdin: give initial bytes or stream stdin, not both".into(),
            ));
        }
        let redactor = crate::redactor_for(&spec)?;
        // A paused session starts no call: the call waits for resume() within its timeout and
        // otherwise ends as a timeout without having run.
        let waited = Instant::now();
        let timeout = spec.limits.timeout.map_or(spawn::SETUP_DEADLINE, |t| {
            Duration::from_secs_f64(t.min(1e9))
        });
        if !self.wait_unpaused(waited + timeout)? {
            let report = self.timed_out_while_paused(&spec, waited.elapsed())?;
            return Ok(Call {
                state: CallState::Done(Box::new(report)),
                stdin: None,
                signals: None,
                pid: 0,
            });
        }
        let holder = self.holder()?;
        let oom_before = holder.cgroup.as_ref().map_or(0, |c| c.oom_kills());
        let events_before = holder.cgroup.as_ref().map(|c| c.limit_events());
        let net_before = holder.egress.as_ref().map(|e| e.begin_call());
        let started = spawn::start_call(&holder, &spec)?;
        // The supervisor closes its copy of the pipe at once (no stdin bytes); this one keeps
        // it open for the caller.
        let stdin = if stream_stdin {
            Some(started.io.stdin.try_clone()?)
        } else {
            None
        };
        let signals = Some(started.pidfd.try_clone()?);
        let pid = started.pid;
        Ok(Call {
            state: CallState::Running(Box::new(Running {
                started,
                spec,
                redactor,
                holder,
                oom_before,
                events_before,
                net_before,
                closing: Arc::clone(&self.closing),
            })),
            stdin,
            signals,
            pid,
        })
    }

    /// Supervises one warm call of the session's warm runtime (see [`crate::warm`]): the
    /// call's `env`/`secrets` are added to the session's as in [`Session::exec`], its
    /// timeout, CPU time and output cap apply, and it is accounted in its own child of the
    /// session's cgroup. `Ok(None)`: the worker was gone before the code began.
    pub fn warm_call(
        &self,
        call: &RunSpec,
        req: crate::warm::WarmRequest<'_>,
        hooks: Hooks<'_>,
    ) -> Result<Option<crate::warm::WarmOutcome>> {
        let mut spec = call.clone();
        let mut secrets = self.base.secrets.clone();
        secrets.extend(call.secrets.iter().cloned());
        spec.secrets = secrets;
        // The session's placeholders (and CA variables) are every call's.
        spec.credentials = self.base.credentials.clone();
        let redactor = crate::redactor_for(&spec)?;
        let ctx = self.with_holder(|h| {
            Ok(crate::warm::CallContext {
                enforcement: h.enforcement.clone(),
                cgroup: h.cgroup.as_ref().and_then(|c| c.child()),
            })
        })?;
        let holder = self.holder()?;
        let events_before = holder.cgroup.as_ref().map(|c| c.limit_events());
        let mut outcome = crate::warm::supervise_call(&spec, req, ctx, &redactor, hooks)?;
        // The limits are the session's (the call's child cgroup only accounts): one reached
        // during this call is reported, as for one-shot calls.
        if let (Some(o), Some(cg), Some(before)) =
            (outcome.as_mut(), holder.cgroup.as_ref(), events_before)
        {
            o.report
                .observe_cgroup_events(cg.limit_events().since(before));
        }
        Ok(outcome)
    }

    /// The report of a call that could not start before its timeout because the session was
    /// paused: nothing ran.
    fn timed_out_while_paused(&self, spec: &RunSpec, waited: Duration) -> Result<RunReport> {
        let mut enforcement = self.holder()?.enforcement.clone();
        enforcement.insert("timeout".into(), Some(Enforcer::Supervisor));
        Ok(RunReport {
            exit_code: None,
            signal: None,
            reason: crate::Reason::Timeout,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_s: waited.as_secs_f64(),
            cpu_time_s: 0.0,
            peak_memory_bytes: 0,
            violations: Vec::new(),
            enforcement,
            redactions: BTreeMap::new(),
            seccomp_profile: spec.seccomp.as_ref().map(|s| s.profile.clone()),
            network: None,
            cleanup_errors: Vec::new(),
            limits_hit: vec!["timeout".into()],
            limits_unverified: Vec::new(),
            time_namespace: crate::timens::supported(),
        })
    }

    /// Freezes every process of the session (cgroup freezer); state is kept. Calls made while
    /// paused wait for [`Session::resume`] within their timeout.
    pub fn pause(&self) -> Result<()> {
        self.set_paused(true);
        let r = self.freeze(true);
        if r.is_err() {
            self.set_paused(false);
        }
        r
    }

    /// Thaws a paused session.
    pub fn resume(&self) -> Result<()> {
        let r = self.freeze(false);
        if r.is_ok() {
            self.set_paused(false);
        }
        r
    }

    fn freeze(&self, on: bool) -> Result<()> {
        self.with_holder(|h| {
            let cg = h
                .cgroup
                .as_ref()
                .filter(|c| c.can_freeze())
                .ok_or_else(|| Error::Setup {
                    stage: "pause/resume",
                    source: std::io::Error::new(
                        std::io::ErrorKind::Unsupported,
                        "no freezer cgroup (unprivileged?)",
                    ),
                })?;
            cg.freeze(on).map_err(|e| Error::Setup {
                stage: "pause/resume",
                source: e,
            })
        })
    }

    /// Whether the session is open and its sandbox alive.
    pub fn is_open(&self) -> bool {
        self.holder().is_ok()
    }

    /// Kills every process of the session and removes its cgroup. Idempotent. A paused session
    /// is thawed first (a frozen task cannot die on cgroup v1); every wait is bounded.
    pub fn close(&self) -> Result<()> {
        let holder = self
            .holder
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?
            .take();
        if holder.is_some() {
            self.closing.store(true, Ordering::SeqCst);
        }
        // Calls waiting for resume() see the session gone.
        self.paused.1.notify_all();
        // Forwarded ports stop before the sandbox goes: no connection reaches a dying one.
        let exposed = self
            .exposed
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default();
        drop(exposed);
        match holder {
            Some(h) => end_holder(&h),
            None => Ok(()),
        }
    }

    /// Opens `path` inside the sandbox (relative paths are relative to /workspace).
    fn open_in(&self, path: &str, flags: i32, mode: u32) -> Result<OwnedFd> {
        self.with_holder(|h| {
            let root = open_root(h)?;
            open_beneath(&root, path, flags, mode)
        })
    }

    /// Connects to a unix stream socket inside the sandbox (path resolved like the files API, the
    /// socket itself never followed as a symlink) and returns the connected socket.
    ///
    /// The address handed to connect(2) is `/proc/self/fd/N` of an `O_PATH` descriptor of the
    /// socket inode, so nothing is resolved again outside the sandbox's root.
    pub fn connect_unix(&self, path: &str) -> Result<OwnedFd> {
        let target = self.open_in(path, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        // SAFETY: socket(2) with constant arguments; the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = format!("/proc/self/fd/{}", target.as_raw_fd());
        // SAFETY: an all-zero sockaddr_un is valid; the name (< 30 bytes) fits sun_path.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (dst, src) in addr.sun_path.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        let len = (std::mem::size_of::<libc::sa_family_t>() + name.len() + 1) as libc::socklen_t;
        // SAFETY: connect with a sockaddr_un we own and its length.
        let r = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::Io(std::io::Error::new(
                e.kind(),
                format!("{path}: {e}"),
            )));
        }
        Ok(sock)
    }

    /// [`Session::connect_unix`], then proves who answers: the process that listens on the
    /// socket must be a child of `parent` (host pid of a call's PID 1, from
    /// [`Session::exec_observed`]): that call's command, which makes itself the subreaper of
    /// everything it starts so that nothing else ever becomes PID 1's child. Anything else
    /// of the sandbox that bound a socket at `path` is refused (`SandboxIOError`) before a
    /// byte is sent to it.
    pub fn connect_unix_child_of(&self, path: &str, parent: libc::pid_t) -> Result<OwnedFd> {
        let sock = self.connect_unix(path)?;
        match listener_parent(&sock) {
            Some(ppid) if ppid == parent && parent > 0 => Ok(sock),
            _ => Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("{path}: the listening process is not the expected one"),
            ))),
        }
    }
}

/// Host pid of the parent of the process that listens on the socket `sock` is connected to
/// (its credentials are the listener's at listen(2)). None: that process has exited, or it
/// cannot be told.
///
/// The kernel translates both pids into our pid namespace: SO_PEERPIDFD, then the pidfd's
/// PIDFD_GET_INFO (Linux 6.13+); before that SO_PEERCRED and the pid's /proc entry (our
/// /proc is our pid namespace's).
fn listener_parent(sock: &OwnedFd) -> Option<libc::pid_t> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut pidfd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into an int we own, with its size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            &mut pidfd as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r == 0 && pidfd >= 0 {
        // SAFETY: a fresh pidfd the kernel just gave us.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        if let Some(ppid) = crate::warm::parent_of(&pidfd) {
            return Some(ppid);
        }
    }
    // SAFETY: an all-zero ucred is valid; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred we own, with its size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    // A listener that has exited shows as pid 0.
    if r != 0 || cred.pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", cred.pid)).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Session {
    /// Forwards `bind` (a host address; port 0 picks a free one) to `127.0.0.1:port` inside
    /// the sandbox's network namespace, until the session closes; returns the bound address.
    pub fn expose(&self, port: u16, bind: std::net::SocketAddr) -> Result<std::net::SocketAddr> {
        if port == 0 {
            return Err(Error::InvalidSpec("expose: port must be 1-65535".into()));
        }
        // A listed loopback target redirects the sandbox's connections to that port to the
        // host's loopback: forwarding it would reach the host, not the sandbox.
        let allow = self.allow_net.lock().ok().and_then(|a| a.clone());
        if let Some(allow) = allow {
            if shadows(&crate::net::Allowlist::parse(&allow)?, port) {
                return Err(Error::InvalidSpec(format!(
                    "expose: port {port} inside the sandbox is the host's (the allowlist lists \
                     the host's loopback for it), so it cannot be exposed"
                )));
            }
        }
        let exposed = self.with_holder(|h| crate::net::Exposed::start(h, port, bind))?;
        let addr = exposed.addr();
        let mut list = self
            .exposed
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?;
        // A close() that ran meanwhile has already emptied the list: stop this one too.
        if self.holder().is_err() {
            return Err(Error::SessionClosed("the session is closed".into()));
        }
        list.push(exposed);
        Ok(addr)
    }

    /// Replaces the egress allowlist of the running session (patterns as for
    /// [`crate::spec::NetSpec`]): new connections and DNS answers follow `allow` at once, the
    /// sandbox's firewall rules are reloaded, and open connections the new list does not allow
    /// are cut and returned (also reported in the calls' reports) as network violations with
    /// reason [`crate::net::POLICY_CHANGED`].
    ///
    /// A bad pattern is [`Error::Network`] and leaves the old list in force. A session opened
    /// without network (no `net` in its spec) has no egress plumbing and cannot gain it: a
    /// non-empty list is [`Error::InvalidSpec`] (open the session with an empty allowlist to
    /// change it later); an empty one changes nothing. A list that would shadow an exposed
    /// port (a listed loopback target on it) is [`Error::InvalidSpec`].
    pub fn set_network(&self, allow: &[String]) -> Result<Vec<crate::report::Violation>> {
        let parsed = crate::net::Allowlist::parse(allow)?;
        let mut current = self
            .allow_net
            .lock()
            .map_err(|_| Error::SessionClosed("poisoned".into()))?;
        if let Some((port, _)) = self
            .exposed()
            .into_iter()
            .find(|(p, _)| shadows(&parsed, *p))
        {
            return Err(Error::InvalidSpec(format!(
                "set_network: the list names the host's loopback on port {port}, which this \
                 session exposes"
            )));
        }
        let holder = self.holder()?;
        let Some(egress) = holder.egress.as_ref() else {
            if parsed.is_empty() {
                return Ok(Vec::new());
            }
            return Err(Error::InvalidSpec(
                "set_network: this session was opened without network, so it has no egress \
                 to change; open it with allow_net=[] (nothing allowed) to enable it later"
                    .into(),
            ));
        };
        // Rules first: if they cannot be loaded, the old policy stays whole.
        crate::net::reload_rules(&holder, &parsed)?;
        let cut = egress.set_allow(parsed);
        *current = Some(allow.to_vec());
        Ok(cut)
    }

    /// The ports currently forwarded: (port inside, host address).
    pub fn exposed(&self) -> Vec<(u16, std::net::SocketAddr)> {
        self.exposed
            .lock()
            .map(|e| e.iter().map(|x| (x.port(), x.addr())).collect())
            .unwrap_or_default()
    }
}

/// Whether `allow` sends the sandbox's connections to its own `127.0.0.1:port` to the host.
fn shadows(allow: &crate::net::Allowlist, port: u16) -> bool {
    allow
        .loopback_targets()
        .into_iter()
        .any(|(ip, p)| ip.is_ipv4() && p.is_none_or(|p| p == port))
}

/// A call started by [`Session::start`]: supervised once by [`Call::supervise`], signalled and
/// fed meanwhile through the descriptors it hands out.
#[derive(Debug)]
pub struct Call {
    state: CallState,
    stdin: Option<OwnedFd>,
    signals: Option<OwnedFd>,
    pid: libc::pid_t,
}

#[derive(Debug)]
enum CallState {
    Running(Box<Running>),
    /// Ended before it started (a paused session's timeout).
    Done(Box<RunReport>),
    /// Supervised (or being supervised).
    Taken,
}

#[derive(Debug)]
struct Running {
    started: spawn::Started,
    spec: RunSpec,
    redactor: Redactor,
    holder: Arc<Holder>,
    oom_before: u64,
    /// The session cgroup's limit counters when the call started.
    events_before: Option<crate::cgroup::LimitEvents>,
    net_before: Option<(crate::NetworkStats, usize)>,
    closing: Arc<AtomicBool>,
}

/// Signals a call's init forwards to the command (see `child::start_and_wait`); SIGKILL ends
/// the call's whole pid namespace.
pub const FORWARDED_SIGNALS: [libc::c_int; 7] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGKILL,
];

impl Call {
    /// Host pid of the call's init (0 when the call never started).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The write end of the call's stdin, once (with `stream_stdin`); dropping it is EOF.
    pub fn take_stdin(&mut self) -> Option<OwnedFd> {
        self.stdin.take()
    }

    /// A pidfd of the call's init, for [`signal_call`] while another thread supervises.
    pub fn signaller(&self) -> Option<OwnedFd> {
        self.signals.as_ref().and_then(|s| s.try_clone().ok())
    }

    /// Supervises the call to its end (same pumps, caps, redaction, seccomp answers and report
    /// as [`Session::exec`]).
    pub fn supervise(mut self, hooks: Hooks<'_>) -> RunReport {
        self.stdin = None;
        let r = match std::mem::replace(&mut self.state, CallState::Taken) {
            CallState::Running(r) => *r,
            CallState::Done(report) => return *report,
            CallState::Taken => unreachable_taken(),
        };
        let Running {
            started,
            spec,
            redactor,
            holder,
            oom_before,
            events_before,
            net_before,
            closing,
        } = r;
        let mut report = supervise::supervise_spec(started, &spec, &redactor, hooks);
        // An OOM kill in the session's cgroup during this call ended it for lack of memory.
        // The session's egress outlives the call: report what changed during it (concurrent
        // calls of one session share these counters).
        if let (Some(e), Some((before, seen))) = (holder.egress.as_ref(), net_before) {
            let (now, _) = e.snapshot();
            report.network = Some(crate::NetworkStats {
                connections: now.connections - before.connections,
                bytes_out: now.bytes_out - before.bytes_out,
                bytes_in: now.bytes_in - before.bytes_in,
            });
            report.add_violations(e.violations_since(seen), &redactor);
        }
        if let Some(cg) = holder.cgroup.as_ref() {
            if cg.oom_kills() > oom_before && report.reason != crate::Reason::Timeout {
                report.reason = crate::Reason::Memory;
            }
            // The session's limits are shared: one reached during this call is reported.
            if let Some(before) = events_before {
                report.observe_cgroup_events(cg.limit_events().since(before));
            }
        }
        // Killed with the sandbox (no status from the call's init) while the session closed.
        if closing.load(Ordering::SeqCst)
            && report.reason == crate::Reason::Signaled
            && report.signal == Some(libc::SIGKILL)
        {
            report.reason = crate::Reason::SessionClosed;
        }
        report
    }
}

impl Drop for Call {
    /// A call nobody supervises is killed and reaped (its output would have no reader).
    fn drop(&mut self) {
        if let CallState::Running(r) = std::mem::replace(&mut self.state, CallState::Taken) {
            spawn::kill(&r.started.pidfd);
            if let Some(j) = &r.started.reaper {
                spawn::kill_and_reap_within(j, CLOSE_GRACE);
            }
        }
    }
}

/// `supervise` consumes the call: a second one cannot exist.
fn unreachable_taken() -> ! {
    unreachable!("a call is supervised once")
}

/// Sends `sig` to a call through its init's pidfd (from [`Call::signaller`]): the init forwards
/// [`FORWARDED_SIGNALS`] to the command, SIGKILL ends the call. Ok(false): it had ended.
pub fn signal_call(pidfd: &OwnedFd, sig: libc::c_int) -> Result<bool> {
    if !FORWARDED_SIGNALS.contains(&sig) {
        return Err(Error::InvalidSpec(format!(
            "signal {sig}: only SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGKILL \
             can be sent to a process of a session"
        )));
    }
    // An ended init may linger as a zombie that still "accepts" signals: ask its pidfd first.
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling our own pidfd without waiting.
    if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 {
        return Ok(false);
    }
    // SAFETY: signalling our own call's init through its pidfd.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(false),
        _ => Err(Error::Io(e)),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// How long a killed session's PID 1 and reaper may take to exit.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Thaws, kills and reaps a session's processes, then removes its cgroup. A failed thaw is
/// reported (its processes may then survive the kill on cgroup v1), with a failed removal
/// beside it.
fn end_holder(h: &Holder) -> Result<()> {
    let mut thawed = Ok(());
    if let Some(cg) = &h.cgroup {
        for (file, value) in cg.thaw_files() {
            if let Err(e) = std::fs::write(&file, value) {
                thawed = Err(crate::Error::io_at(file.display().to_string(), e));
            }
        }
    }
    spawn::kill_and_reap_within(&h.pidfd, CLOSE_GRACE);
    if let Some(r) = &h.reaper {
        spawn::kill_and_reap_within(r, CLOSE_GRACE);
    }
    let removed = match &h.cgroup {
        Some(cg) => cg.remove(),
        None => Ok(()),
    };
    match (thawed, removed) {
        (Ok(()), r) => r,
        (Err(e), r) => Err(e.with_cleanup(r.err().map(|c| c.to_string()))),
    }
}

fn alive(h: &Holder) -> bool {
    let mut pfd = libc::pollfd {
        fd: h.pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polling our own pidfd without waiting.
    unsafe { libc::poll(&mut pfd, 1, 0) == 0 }
}

/// A directory fd of the sandbox's root, through the holder's /proc entry (the files API's).
fn open_root(h: &Holder) -> Result<OwnedFd> {
    Ok(FilesTarget::of(h)?.root)
}

/// openat2 inside `root`: `..` stops at the root, absolute symlinks are re-rooted, and magic
/// links (/proc/*/root, /proc/*/fd/*) are refused.
fn open_beneath(root: &OwnedFd, path: &str, flags: i32, mode: u32) -> Result<OwnedFd> {
    let full = sandbox_path(path)?;
    let c = cstring(&full)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 {
            mode as u64
        } else {
            0
        },
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid open_how of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) => {
                Error::PathEscape(format!("{path}: {e}")).at(path)
            }
            _ => Error::Io(std::io::Error::new(e.kind(), format!("{path}: {e}"))),
        });
    }
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}
