//! Network egress: a sandbox reaches exactly the allowlisted hosts, through the supervisor.
//!
//! The sandbox's network namespace has only `lo`. With an allowlist, PID 1 calls
//! [`setup_in_child`], which creates inside that namespace an HTTP proxy listener, a transparent
//! listener fed by nftables redirects of every other TCP connection, a DNS stub, and an NFLOG
//! socket reporting the UDP and other packets the rules drop. The fds go to the supervisor,
//! which serves them with [`Egress`] from the host's namespace: every connection passes
//! [`Allowlist`] and the address policy (`resolve.rs`), every refusal becomes a
//! [`Violation::Network`], allowed traffic is counted in [`NetworkStats`].
//!
//! Decisions:
//! - DNS answers are synthetic addresses (198.18.0.0/15), one per allowed name, so the
//!   transparent path knows the name of any connection whatever its protocol; the supervisor
//!   dials the address it resolved and vetted itself (see `dns.rs`).
//! - Listed loopback addresses (`127.0.0.1:9000`, `localhost:9000`) mean the *host's*
//!   loopback: the sandbox's connections to them are redirected to the supervisor (the
//!   sandbox's own services on those ports are shadowed; 3128 and 3129 never are).
//! - A name never vouches for a non-public address; only listing the address (and port) does.
//! - Violations are de-duplicated by (host, port, reason) and capped at [`MAX_VIOLATIONS`].

mod allow;
mod child;
mod creds;
mod dns;
mod expose;
mod live;
mod mitm;
mod nflog;
mod proxy;
mod pump;
mod resolve;
mod sys;
mod transparent;

pub use allow::{Allowlist, Host};
pub use child::{ruleset, send_child_fds, setup_in_child, ChildPlan, CHILD_FDS};
pub use creds::{Broker, MAX_BODY};
pub use expose::Exposed;
pub use live::reload_rules;

use crate::report::{NetworkStats, Violation};
use crate::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Shutdown, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

/// Port of the HTTP proxy inside the sandbox (127.0.0.1).
pub const PROXY_PORT: u16 = 3128;
/// Port of the transparent listener inside the sandbox (127.0.0.1 and ::1).
pub const TRANSPARENT_PORT: u16 = 3129;
/// Port of the DNS stub inside the sandbox (127.0.0.1, UDP).
pub const DNS_PORT: u16 = 53;
/// Default cap on concurrent connections of one run.
pub const MAX_CONNECTIONS: usize = 256;
/// At most this many distinct violations are kept per run.
pub const MAX_VIOLATIONS: usize = 1000;
/// Stack of the supervisor's per-connection threads (they only shuffle fds).
const THREAD_STACK: usize = 128 * 1024;

/// Text of `/etc/resolv.conf` inside the sandbox: the DNS stub.
pub fn resolv_conf() -> &'static str {
    "nameserver 127.0.0.1\noptions attempts:2 timeout:2\n"
}

/// Environment variables that point HTTP clients at the proxy (add them to the run's env).
pub fn proxy_env() -> Vec<(String, String)> {
    let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
    let mut env = Vec::new();
    for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        env.push((name.to_string(), proxy.clone()));
        env.push((name.to_ascii_lowercase(), proxy.clone()));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        env.push((name.to_string(), "localhost,127.0.0.1,::1".to_string()));
    }
    env
}

/// Options of [`Egress::start_with`].
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Cap on concurrent connections; more are refused ("too many connections").
    pub max_connections: usize,
    /// Static `name -> address` entries the supervisor uses before the system resolver.
    pub hosts: Vec<(String, IpAddr)>,
    /// Credentials substituted into the sandbox's requests (TLS is then terminated).
    pub broker: Option<Arc<Broker>>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            max_connections: MAX_CONNECTIONS,
            hosts: Vec::new(),
            broker: None,
        }
    }
}

/// The supervisor's egress service for one run.
pub struct Egress {
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").finish_non_exhaustive()
    }
}

impl Egress {
    /// Serves the sandbox's egress on the fds [`setup_in_child`] created, in any order.
    pub fn start(allow: Allowlist, fds: Vec<OwnedFd>) -> Result<Egress> {
        Egress::start_with(allow, fds, EgressConfig::default())
    }

    /// [`Egress::start`] with options.
    pub fn start_with(allow: Allowlist, fds: Vec<OwnedFd>, config: EgressConfig) -> Result<Egress> {
        let sockets = Sockets::classify(fds)?;
        let stop = sys::Stop::new().map_err(|_| Error::setup("egress stop pipe"))?;
        let shared = Arc::new(Shared {
            allow: RwLock::new(Arc::new(allow)),
            stop,
            resolver: resolve::Resolver::new(&config.hosts),
            synthetic: Mutex::new(resolve::Synthetic::default()),
            max_connections: config.max_connections,
            connections: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            dns_pending: AtomicUsize::new(0),
            violations: Mutex::new(Violations::default()),
            streams: Mutex::new(Streams::default()),
            live: Mutex::new(0),
            live_cv: Condvar::new(),
            broker: config.broker,
            kill_target: Mutex::new(None),
            credential_kill: std::sync::atomic::AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        let listener = std::thread::Builder::new()
            .name("cb-net".into())
            .spawn(move || serve(&s, &sockets))
            .map_err(|e| Error::Setup {
                stage: "egress thread",
                source: e,
            })?;
        Ok(Egress {
            shared,
            listener: Some(listener),
        })
    }

    /// Counters so far and how many refusals were recorded (for per-call reports of a session,
    /// whose egress outlives each call).
    pub fn snapshot(&self) -> (NetworkStats, usize) {
        let s = &self.shared;
        let stats = NetworkStats {
            connections: s.connections.load(Ordering::SeqCst),
            bytes_out: s.bytes_out.load(Ordering::SeqCst),
            bytes_in: s.bytes_in.load(Ordering::SeqCst),
        };
        (stats, lock(&s.violations).list.len())
    }

    /// [`Egress::snapshot`] at the start of a session call: the same refusal is listed again
    /// in this call's report even if an earlier call of the session had it.
    pub fn begin_call(&self) -> (NetworkStats, usize) {
        {
            let mut v = lock(&self.shared.violations);
            v.seen.clear();
            v.mark = v.list.len();
        }
        self.snapshot()
    }

    /// The sandbox `on_leak = kill` ends (a pidfd of its PID 1).
    pub fn set_kill_target(&self, pidfd: OwnedFd) {
        *lock(&self.shared.kill_target) = Some(pidfd);
    }

    /// Whether a credential leak killed the sandbox.
    pub fn killed_for_credential(&self) -> bool {
        self.shared.credential_kill.load(Ordering::SeqCst)
    }

    /// Refusals recorded after the first `n` (see [`Egress::snapshot`]).
    pub fn violations_since(&self, n: usize) -> Vec<Violation> {
        lock(&self.shared.violations)
            .list
            .iter()
            .skip(n)
            .cloned()
            .collect()
    }

    /// Stops serving, cuts every connection, joins every thread; returns the counters and the
    /// refusals of the run.
    pub fn finish(mut self) -> (NetworkStats, Vec<Violation>) {
        self.teardown();
        let s = &self.shared;
        let stats = NetworkStats {
            connections: s.connections.load(Ordering::SeqCst),
            bytes_out: s.bytes_out.load(Ordering::SeqCst),
            bytes_in: s.bytes_in.load(Ordering::SeqCst),
        };
        let violations = std::mem::take(&mut lock(&s.violations).list);
        (stats, violations)
    }

    fn teardown(&mut self) {
        let s = &self.shared;
        // Listeners first (the thread shuts them down on its way out), so the sandbox can
        // connect nowhere once its connections are cut.
        s.stop.set();
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        {
            // Under the lock: `register` sees the stop and refuses after this point.
            let streams = lock(&s.streams);
            for stream in streams.by_id.values().flatten() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        let mut live = lock(&s.live);
        while *live > 0 {
            live = s.live_cv.wait(live).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Egress {
    /// Replaces the allowlist: new connections and DNS queries are decided by `allow` from now
    /// on, and every open connection it no longer allows is cut (both sides) and reported as a
    /// [`Violation::Network`] with reason [`POLICY_CHANGED`]. Returns those violations.
    /// The sandbox's firewall rules are not touched: see [`reload_rules`].
    pub fn set_allow(&self, allow: Allowlist) -> Vec<Violation> {
        let s = &self.shared;
        let allow = Arc::new(allow);
        let mut cut = Vec::new();
        {
            let streams = lock(&s.streams);
            *s.allow.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&allow);
            for (id, (host, port)) in &streams.targets {
                let Some(socks) = streams.by_id.get(id) else {
                    continue;
                };
                let allowed = socks
                    .get(1)
                    .is_some_and(|up| still_allowed(&allow, host, *port, up));
                if !allowed {
                    for sock in socks {
                        let _ = sock.shutdown(Shutdown::Both);
                    }
                    cut.push((host.to_string(), *port));
                }
            }
        }
        cut.sort();
        cut.dedup();
        cut.into_iter()
            .map(|(host, port)| {
                s.refuse(&host, port, POLICY_CHANGED);
                Violation::Network {
                    host,
                    port,
                    reason: POLICY_CHANGED.to_string(),
                }
            })
            .collect()
    }
}

/// Reason of the violation reported for a connection cut by a policy change.
pub const POLICY_CHANGED: &str = "policy changed";

/// Whether `allow` still lets a connection to `host:port` (dialled at `upstream`'s peer) go on:
/// the host is listed and the address it reached passes the address policy.
fn still_allowed(allow: &Allowlist, host: &Host, port: u16, upstream: &TcpStream) -> bool {
    if !allow.allows_host(host, port) {
        return false;
    }
    match upstream.peer_addr() {
        Ok(peer) => resolve::vet(&[allow::canonical_ip(peer.ip())], Some(port), allow).is_ok(),
        // Already closed: nothing left to cut.
        Err(_) => true,
    }
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Locks a mutex, going on with the data if a thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the supervisor's egress threads.
pub(crate) struct Shared {
    /// The allowlist in force, swapped whole by [`Egress::set_allow`]; every connection and
    /// query reads it once, when it is decided.
    allow: RwLock<Arc<Allowlist>>,
    pub(crate) stop: sys::Stop,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) synthetic: Mutex<resolve::Synthetic>,
    max_connections: usize,
    pub(crate) connections: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    active: AtomicUsize,
    pub(crate) dns_pending: AtomicUsize,
    violations: Mutex<Violations>,
    streams: Mutex<Streams>,
    live: Mutex<usize>,
    live_cv: Condvar,
    /// Credentials to substitute, when the run has some.
    pub(crate) broker: Option<Arc<Broker>>,
    /// PID 1's pidfd, for `on_leak = kill`.
    kill_target: Mutex<Option<OwnedFd>>,
    /// Set when a leak killed the sandbox.
    credential_kill: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Violations {
    /// Keys recorded since `mark`: each distinct refusal is listed once per run or call.
    seen: HashSet<(String, u16, String)>,
    list: Vec<Violation>,
    /// Where the current call's refusals start (a session's egress outlives its calls).
    mark: usize,
}

/// Sockets of live connections, so teardown (and a policy change) can cut them.
#[derive(Default)]
struct Streams {
    next: u64,
    by_id: HashMap<u64, Vec<TcpStream>>,
    /// What each live connection reaches (host as decided, port), by id.
    targets: HashMap<u64, (Host, u16)>,
    /// Targets of upstream sockets `pump::open` dialled that `register` has not taken yet, by
    /// the upstream's fd (unique while it is open).
    dialled: HashMap<RawFd, (Host, u16)>,
}

/// A connection's place in the per-run cap, released on drop.
pub(crate) struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Records a refusal (once per host, port and reason).
    pub(crate) fn refuse(&self, host: &str, port: u16, reason: &str) {
        self.record(
            (host.to_string(), port, reason.to_string()),
            Violation::Network {
                host: host.to_string(),
                port,
                reason: reason.to_string(),
            },
        );
    }

    /// Records a violation once per `key`, up to [`MAX_VIOLATIONS`].
    pub(crate) fn record(&self, key: (String, u16, String), violation: Violation) {
        let mut v = lock(&self.violations);
        if v.list.len() - v.mark >= MAX_VIOLATIONS {
            return;
        }
        if v.seen.insert(key) {
            v.list.push(violation);
        }
    }

    /// Registers a lone client socket (no upstream yet) so teardown can cut it.
    pub(crate) fn register_one(&self, client: &TcpStream) -> Option<u64> {
        let clone = client.try_clone().ok()?;
        let mut streams = lock(&self.streams);
        if self.stop.is_set() {
            return None;
        }
        streams.next += 1;
        let id = streams.next;
        streams.by_id.insert(id, vec![clone]);
        Some(id)
    }

    /// Takes a place in the connection cap, or `None` when the run has too many connections.
    fn slot(self: &Arc<Self>) -> Option<Slot> {
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Slot(Arc::clone(self)))
    }

    /// Runs `f` on a new thread that `finish` waits for. False if no thread could be made.
    pub(crate) fn spawn(self: &Arc<Self>, name: &str, f: impl FnOnce() + Send + 'static) -> bool {
        *lock(&self.live) += 1;
        let s = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _done = LiveGuard(&s);
                f();
            });
        if spawned.is_err() {
            drop(LiveGuard(self));
        }
        spawned.is_ok()
    }

    /// The allowlist in force now.
    pub(crate) fn allow(&self) -> Arc<Allowlist> {
        Arc::clone(&self.allow.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Notes what an upstream socket just dialled reaches, for [`Shared::register`].
    pub(crate) fn dialled(&self, upstream: &TcpStream, host: &Host, port: u16) {
        lock(&self.streams)
            .dialled
            .insert(upstream.as_raw_fd(), (host.clone(), port));
    }

    /// Registers a connection's two sockets; `None` once teardown began, or when the policy
    /// changed since its upstream was dialled and no longer allows it (reported).
    pub(crate) fn register(&self, client: &TcpStream, upstream: &TcpStream) -> Option<u64> {
        let clones = [client.try_clone().ok()?, upstream.try_clone().ok()?];
        let mut streams = lock(&self.streams);
        let target = streams.dialled.remove(&upstream.as_raw_fd());
        if self.stop.is_set() {
            return None;
        }
        // Checked under the streams lock, which `set_allow` holds while it cuts: a connection
        // is either cut there or sees the new list here.
        if let Some((host, port)) = &target {
            if !still_allowed(&self.allow(), host, *port, upstream) {
                drop(streams);
                self.refuse(&host.to_string(), *port, POLICY_CHANGED);
                return None;
            }
        }
        streams.next += 1;
        let id = streams.next;
        streams.by_id.insert(id, clones.into());
        if let Some(t) = target {
            streams.targets.insert(id, t);
        }
        Some(id)
    }

    /// Forgets a finished connection.
    pub(crate) fn unregister(&self, id: u64) {
        let mut streams = lock(&self.streams);
        streams.by_id.remove(&id);
        streams.targets.remove(&id);
    }
}

/// Decrements the live-thread count when a tracked thread ends (even by panic).
struct LiveGuard<'a>(&'a Shared);

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        let mut live = lock(&self.0.live);
        *live -= 1;
        if *live == 0 {
            self.0.live_cv.notify_all();
        }
    }
}

/// The fds from the child, recognised by what they are.
#[derive(Default)]
struct Sockets {
    proxy: Vec<TcpListener>,
    transparent: Vec<TcpListener>,
    dns: Vec<Arc<UdpSocket>>,
    nflog: Vec<OwnedFd>,
}

impl Sockets {
    fn classify(fds: Vec<OwnedFd>) -> Result<Sockets> {
        let mut s = Sockets::default();
        for fd in fds {
            let raw = fd.as_raw_fd();
            let opt = |name| sys::sockopt_int(raw, libc::SOL_SOCKET, name);
            let bad = || {
                Error::Network(format!(
                    "egress: fd {raw} is not one of setup_in_child's sockets"
                ))
            };
            let domain = opt(libc::SO_DOMAIN).map_err(|_| bad())?;
            let kind = opt(libc::SO_TYPE).map_err(|_| bad())?;
            if domain == libc::AF_NETLINK {
                s.nflog.push(fd);
                continue;
            }
            let nonblocking = |l: &TcpListener| l.set_nonblocking(true).map_err(Error::Io);
            match kind {
                libc::SOCK_STREAM => {
                    let l = TcpListener::from(fd);
                    let port = l.local_addr()?.port();
                    nonblocking(&l)?;
                    match port {
                        PROXY_PORT => s.proxy.push(l),
                        TRANSPARENT_PORT => s.transparent.push(l),
                        _ => return Err(bad()),
                    }
                }
                libc::SOCK_DGRAM => {
                    let u = UdpSocket::from(fd);
                    u.set_nonblocking(true)?;
                    s.dns.push(Arc::new(u));
                }
                _ => return Err(bad()),
            }
        }
        if s.proxy.is_empty() && s.transparent.is_empty() {
            return Err(Error::Network("egress: no listener among the fds".into()));
        }
        Ok(s)
    }

    fn fds(&self) -> Vec<RawFd> {
        let tcp = self
            .proxy
            .iter()
            .chain(&self.transparent)
            .map(|l| l.as_raw_fd());
        tcp.chain(self.dns.iter().map(|u| u.as_raw_fd()))
            .chain(self.nflog.iter().map(|f| f.as_raw_fd()))
            .collect()
    }
}

/// The listener thread: accepts connections, answers DNS, reads dropped-packet logs.
fn serve(shared: &Arc<Shared>, sockets: &Sockets) {
    let fds = sockets.fds();
    let (np, nt, nd) = (
        sockets.proxy.len(),
        sockets.transparent.len(),
        sockets.dns.len(),
    );
    loop {
        let ready = match sys::poll_all(&fds, &shared.stop) {
            Ok(Some(r)) => r,
            _ => {
                // Packets dropped just before the end are reported too.
                for fd in &sockets.nflog {
                    drain_nflog(shared, fd.as_raw_fd());
                }
                // Stop listening even where a copy of the fd survives (inherited by a process
                // forked meanwhile): the sandbox then gets "connection refused".
                for l in sockets.proxy.iter().chain(&sockets.transparent) {
                    // SAFETY: shutdown on a listener we own.
                    unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
                }
                return;
            }
        };
        for (i, revents) in ready.into_iter().enumerate() {
            if revents == 0 {
                continue;
            }
            if i < np {
                accept_all(shared, &sockets.proxy[i], true);
            } else if i < np + nt {
                accept_all(shared, &sockets.transparent[i - np], false);
            } else if i < np + nt + nd {
                dns::serve_pending(shared, &sockets.dns[i - np - nt]);
            } else {
                drain_nflog(shared, fds[i]);
            }
        }
    }
}

/// Accepts every pending connection of a listener and hands each to its own thread.
fn accept_all(shared: &Arc<Shared>, listener: &TcpListener, is_proxy: bool) {
    loop {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                // Out of fds or memory: let the backlog wait rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(10));
                return;
            }
        };
        if client.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = client.set_nodelay(true);
        let Some(slot) = shared.slot() else {
            refuse_over_cap(shared, client, is_proxy);
            continue;
        };
        let s = Arc::clone(shared);
        shared.spawn("cb-net-conn", move || {
            if is_proxy {
                proxy::handle(&s, client, slot);
            } else {
                transparent::handle(&s, client, slot);
            }
        });
    }
}

fn refuse_over_cap(shared: &Shared, mut client: TcpStream, is_proxy: bool) {
    let target = match sys::original_dst(client.as_raw_fd()) {
        Ok(dst) if !is_proxy => (dst.ip().to_string(), dst.port()),
        _ => ("127.0.0.1".to_string(), PROXY_PORT),
    };
    shared.refuse(&target.0, target.1, "too many connections");
    if is_proxy {
        proxy::respond(
            &mut client,
            503,
            "Service Unavailable",
            "cellblock: too many connections",
        );
    } else {
        sys::set_reset_on_close(client.as_raw_fd());
    }
}

/// Reports every packet logged by the sandbox's drop rule.
fn drain_nflog(shared: &Shared, fd: RawFd) {
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: receives into a local buffer of the size we pass, without blocking.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The socket overflowed under a flood: some reports were lost, keep reading.
                Some(libc::ENOBUFS) | Some(libc::EINTR) => continue,
                _ => return,
            }
        }
        if n == 0 {
            return;
        }
        for d in nflog::parse(&buf[..n as usize]) {
            shared.refuse(&d.ip.to_string(), d.port, &d.reason());
        }
    }
}
