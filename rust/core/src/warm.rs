//! Supervised warm calls: code run by a session's warm runtime (a fork of the zygote, or a
//! stateful kernel) is watched by the same supervisor as any other run.
//!
//! The relay inside the sandbox (`python/cellblock/runtimes/zygote_py.py`) only starts workers
//! and passes descriptors out. For each call it hands over, attached to an `f` frame, the
//! worker's pidfd, the read ends of its stdout/stderr and the listener of a seccomp filter the
//! worker installed for itself before any code ran. Everything in the report is measured here:
//!
//! - exit status and CPU time of a worker that ended: read from the kernel: the CPU time from
//!   its zombie entry in `/proc` (checked against the pidfd; the relay reaps it only when told,
//!   `x`), the wait status from the pidfd once reaped (`PIDFD_INFO_EXIT`);
//! - CPU time, peak memory and OOM kills of the call: a child of the session's cgroup holding
//!   only the call's processes (or, without cgroups, `/proc` samples of the worker);
//! - refused syscalls: the worker's own listener, so they belong to this call alone;
//! - output: the same pumps, redactor, caps, deadline and kill as a one-shot run.
//!
//! The relay's `d` frame (value, error, a stateful cell's exit code) is content produced by the
//! code, like its stdout: it never decides the reason, the signal, or any usage figure.
//!
//! Frames both ways: 1 kind byte, 4-byte big-endian length, payload. Host to relay: `r`
//! request, `g` go (descriptors received, limits in place), `e` a cell's call is over (its
//! output read), `x` reap and sweep (the worker has ended). Relay to host: `f` descriptors,
//! `d` the worker's result, `z` swept.

use crate::cgroup::RunCgroup;
use crate::error::{errno, Error, Result};
use crate::redact::Redactor;
use crate::report::{Enforcer, Reason, RunReport};
use crate::seccomp::Listener;
use crate::spec::{OnViolation, RunSpec};
use crate::supervise::{self, Hooks, Pump, Stream, DRAIN_GRACE, INTERRUPT_POLL};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long the relay may take to hand a worker over, or to confirm a sweep.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame accepted from the relay (results hold a capped repr).
const MAX_FRAME: usize = 4 << 20;
/// How often the worker's memory is sampled from /proc when no cgroup measures it.
const SAMPLE_POLL: Duration = Duration::from_millis(10);

/// One warm call to supervise.
pub struct WarmRequest<'a> {
    /// The connection to the relay that owns the worker (after the hello).
    pub sock: BorrowedFd<'a>,
    /// The request the worker runs (JSON), forwarded as is.
    pub request: &'a [u8],
    /// A stateful kernel: the call ends with its result and the worker lives on.
    pub stateful: bool,
}

/// The end of a supervised warm call.
#[derive(Debug)]
pub struct WarmOutcome {
    /// The report, every fact of it measured by the supervisor.
    pub report: RunReport,
    /// The worker's own result (JSON: value, error, exit_code): content, not facts.
    pub result: Option<Vec<u8>>,
    /// Whether the worker lives on (a stateful kernel that survived the call).
    pub worker_alive: bool,
}

/// The session side of a call: what enforces the session's limits, and a fresh accounting
/// child of its cgroup (if any).
pub struct CallContext {
    /// Session-wide enforcement.
    pub enforcement: BTreeMap<String, Option<Enforcer>>,
    /// The call's own child of the session's cgroup.
    pub cgroup: Option<RunCgroup>,
}

/// A frame reader/writer over the relay's socket that also collects passed descriptors.
struct Conn<'a> {
    fd: BorrowedFd<'a>,
    buf: Vec<u8>,
    fds: Vec<OwnedFd>,
    eof: bool,
}

impl<'a> Conn<'a> {
    fn new(fd: BorrowedFd<'a>) -> Conn<'a> {
        supervise::set_nonblocking(&fd);
        Conn {
            fd,
            buf: Vec::new(),
            fds: Vec::new(),
            eof: false,
        }
    }

    /// Reads what is available (data and any descriptors). Ok(false): nothing now.
    fn fill(&mut self) -> Result<bool> {
        let mut data = [0u8; 65536];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        #[repr(C, align(8))]
        struct Cmsg([u8; 256]);
        let mut cbuf = Cmsg([0; 256]);
        // SAFETY: msghdr built over our stack buffers; every received fd is owned below.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.0.as_mut_ptr().cast();
            msg.msg_controllen = cbuf.0.len();
            let n = libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n < 0 {
                return match errno() {
                    libc::EAGAIN | libc::EINTR => Ok(false),
                    e => {
                        self.eof = true;
                        Err(Error::Io(std::io::Error::from_raw_os_error(e)))
                    }
                };
            }
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(c) as *const libc::c_int;
                    for i in 0..len / std::mem::size_of::<libc::c_int>() {
                        self.fds.push(OwnedFd::from_raw_fd(*data.add(i)));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            if n == 0 {
                self.eof = true;
                return Ok(false);
            }
            self.buf.extend_from_slice(&data[..n as usize]);
        }
        Ok(true)
    }

    /// A complete frame from the buffer, if one is there.
    fn frame(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        let size = size as usize;
        if size > MAX_FRAME {
            return Err(Error::Io(std::io::Error::other(
                "the warm runtime sent an oversized frame",
            )));
        }
        if self.buf.len() < 5 + size {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload = self.buf[5..5 + size].to_vec();
        self.buf.drain(..5 + size);
        Ok(Some((kind, payload)))
    }

    /// The next frame, waiting until `deadline`. None: EOF or deadline.
    fn next(&mut self, deadline: Instant) -> Result<Option<(u8, Vec<u8>)>> {
        loop {
            if let Some(f) = self.frame()? {
                return Ok(Some(f));
            }
            if self.eof {
                return Ok(None);
            }
            if !self.fill()? {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                poll_one(self.fd.as_raw_fd(), libc::POLLIN, left);
            }
        }
    }

    fn send(&self, kind: u8, payload: &[u8], deadline: Instant) -> Result<()> {
        let mut data = Vec::with_capacity(5 + payload.len());
        data.push(kind);
        data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        data.extend_from_slice(payload);
        let mut off = 0;
        while off < data.len() {
            // SAFETY: sending from our own buffer.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    data[off..].as_ptr().cast(),
                    data.len() - off,
                    libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                off += n as usize;
                continue;
            }
            match errno() {
                libc::EINTR => {}
                libc::EAGAIN => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Io(std::io::ErrorKind::TimedOut.into()));
                    }
                    poll_one(self.fd.as_raw_fd(), libc::POLLOUT, left);
                }
                e => return Err(Error::Io(std::io::Error::from_raw_os_error(e))),
            }
        }
        Ok(())
    }
}

fn poll_one(fd: libc::c_int, events: libc::c_short, wait: Duration) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = wait.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: polling one fd we hold.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// The host pid behind a pidfd (from /proc/self/fdinfo).
fn pidfd_pid(pidfd: &OwnedFd) -> Option<libc::pid_t> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|p: &libc::pid_t| *p > 0)
}

fn signal_pidfd(pidfd: &OwnedFd, sig: libc::c_int) -> bool {
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
struct ProcStat {
    state: char,
    /// CPU time of the process itself (what RLIMIT_CPU counts).
    own: Duration,
    /// CPU time of the process and of the children it reaped.
    total: Duration,
    /// Raw wait status (meaningful for a zombie).
    status: i32,
}

fn proc_stat(pid: libc::pid_t) -> Option<ProcStat> {
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
fn zombie_exit(pid: libc::pid_t, pidfd: &OwnedFd) -> Option<(i32, Duration)> {
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
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PidfdInfo>() as libc::c_ulong) << 16)
    | (0xFF << 8)
    | 11;

/// The worker's wait status as the kernel recorded it when it was reaped (by its relay, or
/// by the call's init if the relay is gone): no privilege needed, nothing to race. Waits a
/// little for the reaping. `Err(())`: this kernel cannot tell (before 6.15).
fn reaped_status(pidfd: &OwnedFd) -> Result<Option<i32>, ()> {
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

fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Sets the worker's RLIMIT_CPU to `used + budget` seconds (SIGXCPU there, SIGKILL a second
/// later), or lifts it (`None`).
fn limit_cpu(pid: libc::pid_t, used: Duration, budget: Option<f64>) -> Result<()> {
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

/// What the worker and the relay have done so far.
#[derive(Default)]
struct Progress {
    /// The worker's wait status (None: unknown) once it ended, with its CPU time.
    exited: Option<Option<(i32, Duration)>>,
    /// The worker's result frame.
    result: Option<Vec<u8>>,
    /// The relay confirmed the sweep, or went away.
    swept: bool,
    /// When the relay must have swept by.
    sweep_deadline: Option<Instant>,
}

/// Supervises one warm call through its relay connection. `Ok(None)`: the worker was gone
/// before the code began (the caller may retry on a fresh one).
pub fn supervise_call(
    spec: &RunSpec,
    req: WarmRequest<'_>,
    ctx: CallContext,
    redactor: &Redactor,
    hooks: Hooks<'_>,
) -> Result<Option<WarmOutcome>> {
    let started_at = Instant::now();
    let limits = &spec.limits;
    let deadline = limits
        .timeout
        .map(|t| started_at + Duration::from_secs_f64(t));
    let handover = deadline.unwrap_or(started_at + HANDOVER_TIMEOUT);
    let mut conn = Conn::new(req.sock);
    conn.send(b'r', req.request, handover)?;
    let Some((kind, _)) = conn.next(handover)? else {
        return Ok(None);
    };
    if kind != b'f' || conn.fds.len() < 3 {
        return Err(Error::Io(std::io::Error::other(
            "the warm runtime did not hand its worker over",
        )));
    }
    let mut fds = std::mem::take(&mut conn.fds).into_iter();
    let (Some(pidfd), Some(out), Some(err)) = (fds.next(), fds.next(), fds.next()) else {
        return Ok(None);
    };
    let listener_fd = fds.next();
    let pid = pidfd_pid(&pidfd).ok_or_else(|| Error::setup("find the warm worker's pid"))?;
    let CallContext {
        mut enforcement,
        mut cgroup,
    } = ctx;
    if let Some(cg) = &cgroup {
        if cg.add(pid).is_err() {
            // The worker is already gone, or the cgroup cannot take it: measure from /proc.
            cgroup = None;
        }
    }
    let cg_cpu = cgroup.as_ref().is_some_and(|c| c.cpu_time().is_some());
    let cg_mem = cgroup.as_ref().is_some_and(|c| c.measures_memory());
    let (base_own, base_cpu) = proc_stat(pid).map_or((Duration::ZERO, Duration::ZERO), |s| {
        (s.own, s.total)
    });
    if limits.cpu_time.is_some() {
        // As for a session's one-shot calls: a per-process budget (the session's cgroup is
        // shared); the kernel ends the worker with SIGXCPU.
        limit_cpu(pid, base_own, limits.cpu_time)?;
        enforcement.insert("cpu_time".into(), Some(Enforcer::Rlimit));
    }
    if limits.timeout.is_some() {
        enforcement.insert("timeout".into(), Some(Enforcer::Supervisor));
    }
    if limits.max_output.is_some() {
        enforcement.insert("max_output".into(), Some(Enforcer::Supervisor));
    }
    if req.stateful && !cg_mem {
        // Peak memory of this cell alone: reset the kernel's high-water mark.
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    let (on_violation, names) = match &spec.seccomp {
        Some(s) => (s.on_violation, s.names.clone()),
        None => (OnViolation::Errno, BTreeMap::new()),
    };
    let mut listener = listener_fd.map(|fd| Listener::new(fd, names).on_violation(on_violation));
    conn.send(b'g', b"", handover)?;

    let Hooks {
        mut sink,
        interrupted,
    } = hooks;
    let cap = limits.max_output.unwrap_or(u64::MAX);
    let mut pumps = [
        Pump::new(out, redactor, Stream::Stdout),
        Pump::new(err, redactor, Stream::Stderr),
    ];
    let mut buf = vec![0u8; 64 * 1024];
    let mut scratch = Vec::with_capacity(64 * 1024);
    let mut killed_for: Option<Reason> = None;
    let mut listener_live = true;
    let mut p = Progress::default();
    let mut peak_sample = 0u64;
    let mut drain_deadline: Option<Instant> = None;
    let kill = |reason: Reason, killed_for: &mut Option<Reason>, cg: &Option<RunCgroup>| {
        if killed_for.is_none() {
            *killed_for = Some(reason);
        }
        signal_pidfd(&pidfd, libc::SIGKILL);
        if let Some(cg) = cg {
            for pid in cg.procs() {
                // SAFETY: SIGKILL to a process of the call's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    };

    loop {
        let now = Instant::now();
        let cell_done =
            req.stateful && killed_for.is_none() && p.exited.is_none() && p.result.is_some();
        let ended = p.exited.is_some()
            && (p.swept || p.sweep_deadline.is_some_and(|d| now >= d));
        if cell_done {
            // The cell finished and flushed before answering: what it printed is in the pipes.
            for pump in pumps.iter_mut() {
                pump.read(&mut buf, cap, &mut scratch, &mut sink);
            }
            // Only now may the relay drop what the kernel prints between calls.
            let _ = conn.send(b'e', b"", now + DRAIN_GRACE);
            break;
        }
        if ended {
            let d = *drain_deadline.get_or_insert(now + DRAIN_GRACE);
            if pumps.iter().all(|p| p.fd.is_none()) || now >= d {
                break;
            }
        }
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(6);
        let mut tags: Vec<u8> = Vec::with_capacity(6);
        let mut watch = |fd: libc::c_int, tag: u8| {
            pfds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            tags.push(tag);
        };
        for (i, pump) in pumps.iter().enumerate() {
            if let Some(fd) = &pump.fd {
                watch(fd.as_raw_fd(), i as u8);
            }
        }
        if p.exited.is_none() {
            watch(pidfd.as_raw_fd(), 2);
        }
        if let (Some(l), true) = (&listener, listener_live) {
            watch(l.fd().as_raw_fd(), 3);
        }
        if !conn.eof {
            watch(conn.fd.as_raw_fd(), 4);
        }
        let mut wait = Duration::from_secs(3600);
        if let (Some(d), None) = (deadline, killed_for) {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if killed_for.is_none() && !cg_mem {
            wait = wait.min(SAMPLE_POLL);
        }
        if interrupted.is_some() && killed_for.is_none() {
            wait = wait.min(INTERRUPT_POLL);
        }
        for d in [p.sweep_deadline, drain_deadline].into_iter().flatten() {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfds is a valid array of pollfd.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                pfds.len() as libc::nfds_t,
                ms.max(if wait.is_zero() { 0 } else { 1 }),
            )
        };
        if n < 0 && errno() != libc::EINTR {
            break;
        }
        if !cg_mem && p.exited.is_none() {
            peak_sample = peak_sample.max(vm_hwm(pid).unwrap_or(0));
        }
        for (pfd, tag) in pfds.iter().zip(&tags) {
            if pfd.revents == 0 {
                continue;
            }
            match tag {
                0 | 1 => {
                    let pump = &mut pumps[*tag as usize];
                    pump.read(&mut buf, cap, &mut scratch, &mut sink);
                    if pump.truncated {
                        kill(Reason::OutputLimit, &mut killed_for, &cgroup);
                    }
                }
                2 => {
                    // The worker ended: read its status before anyone may reap it.
                    p.exited = Some(zombie_exit(pid, &pidfd));
                    if let Some(cg) = &cgroup {
                        // What it left running dies with it (the relay sweeps too).
                        for pid in cg.procs() {
                            // SAFETY: SIGKILL to a process of the call's own cgroup.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                    let sweep = Instant::now() + DRAIN_GRACE;
                    p.sweep_deadline = Some(sweep);
                    if conn.send(b'x', b"", sweep).is_err() {
                        p.swept = true;
                    }
                }
                3 => {
                    if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                        listener_live = false;
                    }
                    if let Some(l) = listener.as_mut() {
                        if let Ok(n) = l.drain() {
                            if n > 0 && on_violation == OnViolation::Kill {
                                kill(Reason::Seccomp, &mut killed_for, &cgroup);
                            }
                        }
                    }
                }
                _ => {
                    let _ = conn.fill();
                    while let Ok(Some((kind, payload))) = conn.frame() {
                        match kind {
                            b'd' if p.result.is_none() => {
                                // The code is done but the worker still lives: its
                                // high-water mark is complete now.
                                if !cg_mem {
                                    peak_sample = peak_sample.max(vm_hwm(pid).unwrap_or(0));
                                }
                                p.result = Some(payload);
                            }
                            b'z' => p.swept = true,
                            _ => {}
                        }
                    }
                    if conn.eof {
                        // The relay is gone (killed from inside): a one-call worker is still
                        // ours to watch through its pidfd (the call's init reaps it); a
                        // kernel can never answer again.
                        p.swept = true;
                        if req.stateful && p.exited.is_none() && p.result.is_none() {
                            kill(Reason::Signaled, &mut killed_for, &cgroup);
                        }
                    }
                }
            }
        }
        if killed_for.is_none() && p.exited.is_none() {
            if interrupted.is_some_and(|f| f()) {
                kill(Reason::Signaled, &mut killed_for, &cgroup);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                kill(Reason::Timeout, &mut killed_for, &cgroup);
            }
        }
    }
    for pump in pumps.iter_mut() {
        pump.fd = None;
        pump.finish(cap, &mut sink);
    }
    if let Some(l) = listener.as_mut() {
        let _ = l.drain();
    }
    // The exit status: recorded by the kernel at reaping; else (older kernels) the zombie's,
    // which /proc shows only to a privileged reader.
    if let Some(zombie) = p.exited {
        p.exited = Some(match reaped_status(&pidfd) {
            Ok(st) => st.map(|st| (st, zombie.map_or(Duration::ZERO, |z| z.1))),
            Err(()) => zombie.filter(|_| crate::spawn::is_root()),
        });
    }
    let alive = p.exited.is_none() && killed_for.is_none();
    let wall_time_s = started_at.elapsed().as_secs_f64();
    let (exit_code, signal) = match p.exited {
        Some(Some((st, _))) if libc::WIFEXITED(st) => (Some(libc::WEXITSTATUS(st)), None),
        Some(Some((st, _))) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
        // The status was lost (the relay was killed and someone else reaped the worker).
        Some(_) => (None, Some(libc::SIGKILL)),
        // A stateful cell that finished: its exit code is the cell's own (sys.exit).
        None => (cell_exit_code(p.result.as_deref()), None),
    };
    let cpu = if cg_cpu {
        cgroup.as_ref().and_then(|c| c.cpu_time()).unwrap_or_default()
    } else {
        let end = match p.exited {
            Some(Some((_, cpu))) => Some(cpu),
            _ => proc_stat(pid).map(|s| s.total),
        };
        end.map_or(Duration::ZERO, |e| e.saturating_sub(base_cpu))
    };
    let peak = if cg_mem {
        cgroup.as_ref().and_then(|c| c.peak_memory()).unwrap_or(0)
    } else {
        peak_sample
    };
    let ooms = if cg_mem {
        cgroup.as_ref().map_or(0, |c| c.oom_kills())
    } else {
        0
    };
    if let Some(cg) = cgroup.as_mut() {
        if alive {
            let _ = cg.release_to_parent();
        }
        let _ = cg.remove();
    }
    if alive && limits.cpu_time.is_some() {
        let _ = limit_cpu(pid, Duration::ZERO, None);
    }
    let reason = match killed_for {
        Some(r) => r,
        None if ooms > 0 => Reason::Memory,
        None if signal == Some(libc::SIGXCPU) => Reason::CpuTime,
        None if exit_code.is_some() => Reason::Exited,
        None => Reason::Signaled,
    };
    let mut redactions = BTreeMap::new();
    for pump in &pumps {
        for (k, v) in pump.redactor.counts() {
            *redactions.entry(k.clone()).or_insert(0) += v;
        }
    }
    let [out, err] = pumps;
    let report = RunReport {
        exit_code,
        signal,
        reason,
        stdout: out.stored,
        stderr: err.stored,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        wall_time_s,
        cpu_time_s: cpu.as_secs_f64(),
        peak_memory_bytes: peak,
        violations: listener.map(|l| l.violations()).unwrap_or_default(),
        enforcement,
        redactions,
        seccomp_profile: spec.seccomp.as_ref().map(|s| s.profile.clone()),
        network: None,
    };
    Ok(Some(WarmOutcome {
        report,
        result: p.result,
        worker_alive: alive,
    }))
}

/// The exit code a finished stateful cell reports for itself (0 when it says nothing usable).
fn cell_exit_code(result: Option<&[u8]>) -> Option<i32> {
    let v: serde_json::Value = result.and_then(|r| serde_json::from_slice(r).ok())?;
    let code = v.get("exit_code").and_then(|c| c.as_i64()).unwrap_or(0);
    Some(i32::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        poll_one(raw, libc::POLLIN, Duration::from_secs(5));
        let (status, _) = zombie_exit(pid, &pidfd).expect("zombie readable");
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 7);
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        assert_eq!(zombie_exit(pid, &pidfd), None, "a reaped pid is never read as ours");
        assert_eq!(reaped_status(&pidfd), Ok(Some(st)), "the kernel kept the status");
    }

    #[test]
    fn cell_exit_codes() {
        assert_eq!(cell_exit_code(Some(br#"{"exit_code": 3}"#)), Some(3));
        assert_eq!(cell_exit_code(Some(b"{}")), Some(0));
        assert_eq!(cell_exit_code(Some(b"nonsense")), None);
        assert_eq!(cell_exit_code(None), None);
    }
}
