//! The supervisor: pumps output through the redactor, enforces the wall clock, CPU time and
//! output caps, answers seccomp notifications, and turns the end of a run into a report.

use crate::cgroup::RunCgroup;
use crate::child::StatusRecord;
use crate::redact::{Redactor, StreamRedactor};
use crate::report::{Reason, RunReport, Violation};
use crate::seccomp;
use crate::spawn::{self, Endpoints, Started};
use crate::spec::{Limits, OnViolation};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The command's stdout.
    Stdout,
    /// The command's stderr.
    Stderr,
}

/// Receives redacted output as it is produced (live streaming, e.g. the CLI).
pub type Sink<'a> = &'a mut dyn FnMut(Stream, &[u8]);

/// Ways the caller watches a run while it goes on.
#[derive(Default)]
pub struct Hooks<'a> {
    /// Receives redacted output live.
    pub sink: Option<Sink<'a>>,
    /// Asked about every [`INTERRUPT_POLL`]; `true` kills the run (e.g. Ctrl-C in the caller).
    pub interrupted: Option<&'a dyn Fn() -> bool>,
    /// Asked about every [`INTERRUPT_POLL`] in tty runs: `Some((rows, cols))` resizes the
    /// command's terminal (the kernel sends SIGWINCH to its foreground process group when the
    /// size changes), e.g. following the caller's own terminal.
    pub window: Option<&'a dyn Fn() -> Option<(u16, u16)>>,
    /// Called once, as a tty run starts, with its terminal's master (borrowed for the call:
    /// keep a dup): an interactive caller writes its keystrokes there as they come.
    pub on_terminal: Option<&'a dyn Fn(BorrowedFd<'_>)>,
}

impl<'a> Hooks<'a> {
    /// Hooks with only a sink.
    pub fn with_sink(sink: Option<Sink<'a>>) -> Hooks<'a> {
        Hooks {
            sink,
            interrupted: None,
            window: None,
            on_terminal: None,
        }
    }
}

/// How often the `interrupted` hook is asked.
pub const INTERRUPT_POLL: Duration = Duration::from_millis(100);

/// How often CPU time is sampled when a CPU-time budget is enforced through a cgroup.
const CPU_POLL: Duration = Duration::from_millis(10);

/// How long to wait for the pipes to close once PID 1 is gone (every process is dead by then;
/// this only bounds a kernel that is slow to tear the namespace down).
pub(crate) const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// One output stream of a run: read, redacted, capped, streamed to the sink.
pub(crate) struct Pump {
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) redactor: StreamRedactor,
    pub(crate) stored: Vec<u8>,
    raw_len: u64,
    pub(crate) truncated: bool,
    stream: Stream,
}

impl Pump {
    pub(crate) fn new(fd: OwnedFd, redactor: &Redactor, stream: Stream) -> Pump {
        set_nonblocking(&fd);
        Pump {
            fd: Some(fd),
            redactor: redactor.stream(),
            stored: Vec::new(),
            raw_len: 0,
            truncated: false,
            stream,
        }
    }

    fn store(&mut self, data: &[u8], cap: u64, sink: &mut Option<Sink<'_>>) {
        if data.is_empty() {
            return;
        }
        // Live output is capped like the report: the sink gets exactly what is stored.
        let room = (cap as usize).saturating_sub(self.stored.len());
        let kept = &data[..data.len().min(room)];
        if kept.is_empty() {
            return;
        }
        if let Some(s) = sink.as_mut() {
            s(self.stream, kept);
        }
        self.stored.extend_from_slice(kept);
    }

    /// Reads what is available. Returns false at EOF.
    pub(crate) fn read(
        &mut self,
        buf: &mut [u8],
        cap: u64,
        out: &mut Vec<u8>,
        sink: &mut Option<Sink<'_>>,
    ) -> bool {
        let Some(raw) = self.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return false;
        };
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                let n = n as usize;
                self.raw_len += n as u64;
                if self.raw_len > cap {
                    self.truncated = true;
                }
                out.clear();
                self.redactor.feed(&buf[..n], out);
                let data = std::mem::take(out);
                self.store(&data, cap, sink);
                *out = data;
                if self.truncated {
                    return true;
                }
                continue;
            }
            if n == 0 {
                self.fd = None;
                return false;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return true,
                _ => {
                    self.fd = None;
                    return false;
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, cap: u64, sink: &mut Option<Sink<'_>>) {
        let mut out = Vec::new();
        self.redactor.finish(&mut out);
        self.store(&out, cap, sink);
    }
}

pub(crate) fn set_nonblocking(fd: &impl AsRawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

/// Bytes read per output pump wake-up.
const READ_BUF: usize = 64 * 1024;

thread_local! {
    /// The read buffer of this thread's last run, kept for its next: zeroing a fresh one
    /// writes 16 pages, each a copy-on-write fault while a cell forked from this process still
    /// shares them (~20 us per run).
    static READ_BUFS: std::cell::Cell<Option<Box<[u8]>>> = const { std::cell::Cell::new(None) };
}

/// A run's read buffer, returned to its thread when dropped (a run nested in an output
/// callback finds none and makes its own).
struct ReadBuf(Option<Box<[u8]>>);

impl ReadBuf {
    fn take() -> ReadBuf {
        let kept = READ_BUFS.try_with(std::cell::Cell::take).ok().flatten();
        ReadBuf(Some(
            kept.unwrap_or_else(|| vec![0u8; READ_BUF].into_boxed_slice()),
        ))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let _ = READ_BUFS.try_with(|c| c.set(Some(b)));
        }
    }
}

/// [`supervise`] with the limits, stdin and seccomp settings taken from the run's spec; the
/// report names the seccomp profile in force.
pub fn supervise_spec(
    started: Started,
    spec: &crate::RunSpec,
    redactor: &Redactor,
    hooks: Hooks<'_>,
) -> RunReport {
    let (on_violation, names) = match &spec.seccomp {
        Some(s) => (s.on_violation, std::sync::Arc::clone(&s.names)),
        None => (OnViolation::Errno, Default::default()),
    };
    let mut report = supervise(
        started,
        &spec.limits,
        &spec.stdin,
        redactor,
        on_violation,
        &names,
        hooks,
    );
    report.seccomp_profile = spec.seccomp.as_ref().map(|s| s.profile.clone());
    report.redact_fields(redactor);
    report
}

/// Watches a started sandbox until it ends and returns its report, every field redacted.
pub fn supervise(
    started: Started,
    limits: &Limits,
    stdin: &[u8],
    redactor: &Redactor,
    on_violation: OnViolation,
    syscall_names: &crate::spec::SyscallNames,
    hooks: Hooks<'_>,
) -> RunReport {
    let Hooks {
        mut sink,
        interrupted,
        window,
        on_terminal,
    } = hooks;
    let Started {
        pid,
        pidfd,
        io,
        mut cgroup,
        enforcement,
        started_at,
        reaper,
        ..
    } = started;
    let Endpoints {
        stdin: stdin_fd,
        stdout,
        stderr,
        status,
        listener,
        egress,
        terminal,
    } = io;
    // Only a tty run has a window to follow.
    let window = window.filter(|_| terminal.is_some());
    if let (Some(f), Some(t)) = (on_terminal, terminal.as_ref()) {
        f(t.as_fd());
    }
    let cap = limits.max_output.unwrap_or(u64::MAX);
    let deadline = limits
        .timeout
        .map(|t| started_at + Duration::from_secs_f64(t));
    let cpu_budget = limits
        .cpu_time
        .map(Duration::from_secs_f64)
        .filter(|_| cgroup.as_ref().is_some_and(|c| c.enforces("cpu_time")));
    let mut pumps = [
        Pump::new(stdout, redactor, Stream::Stdout),
        Pump::new(stderr, redactor, Stream::Stderr),
    ];
    // Without a pids cgroup, the supervisor counts the sandbox's processes itself.
    let mut pids_watch = crate::observe::PidsWatch::new(pid, limits, &enforcement);
    let mut listener = listener.map(|fd| {
        seccomp::Listener::new(fd, std::sync::Arc::clone(syscall_names)).on_violation(on_violation)
    });
    // Without input the command must see EOF at once, not a pipe held open by us.
    let mut stdin_fd = if stdin.is_empty() {
        drop(stdin_fd);
        None
    } else {
        Some(stdin_fd)
    };
    if let Some(fd) = &stdin_fd {
        set_nonblocking(fd);
    }
    let mut stdin_off = 0usize;
    let mut killed_for: Option<Reason> = None;
    let mut listener_live = true;
    let mut init_done = false;
    let mut drain_deadline: Option<Instant> = None;
    // PID 1's status record arrives before PID 1 exits: with nothing else left in the sandbox
    // the run is over then, without waiting for the namespaces to be torn down.
    let mut status = Some(status);
    let mut record: Option<StatusRecord> = None;
    let mut buf = ReadBuf::take();
    let mut scratch = Vec::with_capacity(64 * 1024);

    let kill = |reason: Reason, killed_for: &mut Option<Reason>| {
        if killed_for.is_none() {
            *killed_for = Some(reason);
            spawn::kill(&pidfd);
        }
    };

    loop {
        let open_pumps = pumps.iter().any(|p| p.fd.is_some());
        if init_done && !open_pumps {
            break;
        }
        let now = Instant::now();
        if let Some(d) = drain_deadline {
            if now >= d {
                break;
            }
        }
        // Poll set: pumps, stdin, pidfd, seccomp listener.
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(5);
        let mut tags: Vec<u8> = Vec::with_capacity(5);
        for (i, p) in pumps.iter().enumerate() {
            if let Some(fd) = &p.fd {
                pfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                tags.push(i as u8);
            }
        }
        if let Some(fd) = &stdin_fd {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
            tags.push(2);
        }
        if !init_done {
            pfds.push(libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            tags.push(3);
        }
        if let (Some(l), true) = (&listener, listener_live) {
            pfds.push(libc::pollfd {
                fd: l.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            tags.push(4);
        }
        if let (Some(fd), false) = (&status, init_done) {
            pfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            tags.push(5);
        }
        let mut wait = Duration::from_secs(3600);
        if let (Some(d), None) = (deadline, killed_for) {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if cpu_budget.is_some() && killed_for.is_none() {
            wait = wait.min(CPU_POLL);
        }
        if let Some(d) = drain_deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if (interrupted.is_some() || window.is_some()) && killed_for.is_none() {
            wait = wait.min(INTERRUPT_POLL);
        }
        if let (Some(w), false) = (pids_watch.as_ref().and_then(|w| w.wait(now)), init_done) {
            wait = wait.min(w);
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
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
        if let (Some(w), false) = (pids_watch.as_mut(), init_done) {
            w.tick(Instant::now());
        }
        for (pfd, tag) in pfds.iter().zip(&tags) {
            if pfd.revents == 0 {
                continue;
            }
            match tag {
                0 | 1 => {
                    let p = &mut pumps[*tag as usize];
                    p.read(buf.bytes(), cap, &mut scratch, &mut sink);
                    if p.truncated {
                        kill(Reason::OutputLimit, &mut killed_for);
                    }
                }
                2 => {
                    if let Some(fd) = &stdin_fd {
                        // SAFETY: writing from our own buffer.
                        let w = unsafe {
                            libc::write(
                                fd.as_raw_fd(),
                                stdin[stdin_off..].as_ptr().cast(),
                                stdin.len() - stdin_off,
                            )
                        };
                        if w > 0 {
                            stdin_off += w as usize;
                        }
                        let err = std::io::Error::last_os_error().raw_os_error();
                        if stdin_off >= stdin.len()
                            || (w < 0 && err != Some(libc::EAGAIN) && err != Some(libc::EINTR))
                        {
                            stdin_fd = None;
                        }
                    }
                }
                3 => {
                    init_done = true;
                    drain_deadline = Some(Instant::now() + DRAIN_GRACE);
                }
                4 => {
                    // POLLHUP: every filtered process is gone; stop polling (no busy loop).
                    if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                        listener_live = false;
                    }
                    if let Some(l) = listener.as_mut() {
                        if let Ok(n) = l.drain() {
                            if n > 0 && on_violation == OnViolation::Kill {
                                kill(Reason::Seccomp, &mut killed_for);
                            }
                        }
                    }
                }
                5 => {
                    record = status.take().and_then(read_status);
                    match record {
                        Some(r) if r.alone => {
                            init_done = true;
                            drain_deadline = Some(Instant::now() + DRAIN_GRACE);
                        }
                        // Processes outlive the command: end them; PID 1's exit says when.
                        Some(_) => spawn::kill(&pidfd),
                        None => {}
                    }
                }
                _ => {}
            }
        }
        if let (Some(size), Some(t)) = (window.and_then(|f| f()), terminal.as_ref()) {
            // A failed resize leaves the old size: nothing the run depends on.
            let _ = crate::tty::set_window(t.as_fd(), size.0, size.1);
        }
        if killed_for.is_none() {
            if interrupted.is_some_and(|f| f()) {
                kill(Reason::Signaled, &mut killed_for);
            }
            if let Some(d) = deadline {
                if Instant::now() >= d {
                    kill(Reason::Timeout, &mut killed_for);
                }
            }
            if let (Some(budget), Some(cg)) = (cpu_budget, cgroup.as_ref()) {
                if cg.cpu_time().is_some_and(|used| used >= budget) {
                    kill(Reason::CpuTime, &mut killed_for);
                }
            }
        }
    }
    // Make sure nothing survives, whatever ended the loop.
    spawn::kill(&pidfd);
    drop(stdin_fd);
    drop(terminal);
    for p in pumps.iter_mut() {
        p.fd = None;
        p.finish(cap, &mut sink);
    }
    let record = record.or_else(|| status.and_then(read_status));
    let target_status = record.map(|r| r.status);
    let (cpu, peak, ooms) = usage(cgroup.as_ref(), record.as_ref());
    let limit_events = cgroup.as_ref().map(|c| c.limit_events());
    let wall_time_s = started_at.elapsed().as_secs_f64();
    let mut cleanup_errors = Vec::new();
    if reaper.is_none() {
        // A run's own PID 1: reaping it and removing its cgroup happen after the report (a
        // failure there is counted in the cell pool's `teardown_failures`).
        crate::cell::teardown::later(crate::cell::teardown::Remains { pidfd, cgroup });
    } else {
        // Every wait is bounded; a process that does not end is reported, not waited for.
        if !spawn::kill_and_reap(&pidfd) {
            cleanup_errors.push(format!(
                "the sandbox's PID 1 did not end within {} s of SIGKILL",
                spawn::KILL_GRACE.as_secs()
            ));
        }
        if let Some(r) = &reaper {
            if !spawn::kill_and_reap(r) {
                cleanup_errors.push(format!(
                    "the call's joiner did not end within {} s of SIGKILL",
                    spawn::KILL_GRACE.as_secs()
                ));
            }
        }
        if let Some(cg) = cgroup.as_mut() {
            // A leftover cgroup is a host-side leak the caller must hear about, not a result.
            if let Err(e) = cg.remove() {
                cleanup_errors.push(e.to_string());
            }
        }
    }
    let mut violations: Vec<Violation> = Vec::new();
    let mut credential_kill = false;
    let network = egress.map(|e| {
        credential_kill = e.killed_for_credential();
        let (stats, v) = e.finish();
        violations.extend(v);
        stats
    });
    if let Some(l) = listener.as_mut() {
        let _ = l.drain();
        violations.extend(l.violations());
    }

    let (mut exit_code, mut signal) = (None, None);
    if let Some(st) = target_status {
        if libc::WIFEXITED(st) {
            exit_code = Some(libc::WEXITSTATUS(st));
        } else if libc::WIFSIGNALED(st) {
            signal = Some(libc::WTERMSIG(st));
        }
    } else {
        signal = Some(libc::SIGKILL);
    }
    let reason = match killed_for {
        Some(r) => r,
        None if credential_kill => Reason::Credential,
        None if ooms > 0 => Reason::Memory,
        None if signal == Some(libc::SIGXCPU) => Reason::CpuTime,
        None if exit_code.is_some() => Reason::Exited,
        None => Reason::Signaled,
    };
    let mut redactions = BTreeMap::new();
    for p in &pumps {
        for (k, v) in p.redactor.counts() {
            *redactions.entry(k.clone()).or_insert(0) += v;
        }
    }
    let [out, err] = pumps;
    let mut report = RunReport {
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
        violations,
        enforcement,
        redactions,
        seccomp_profile: None,
        network,
        cleanup_errors,
        limits_hit: Vec::new(),
        limits_unverified: Vec::new(),
        time_namespace: crate::timens::supported(),
    };
    report.start_limits();
    report.observe_supervised_limits();
    if let Some(events) = limit_events {
        report.observe_cgroup_events(events);
    }
    if pids_watch.is_some_and(|w| w.reached) {
        report.observe_limit("pids", true);
    }
    report.redact_fields(redactor);
    report
}

fn read_status(status: OwnedFd) -> Option<StatusRecord> {
    let mut b = [0u8; StatusRecord::LEN];
    // SAFETY: reading the record into our buffer; PID 1 wrote it before exiting, or nothing.
    let n = unsafe { libc::read(status.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
    (n == b.len() as isize).then(|| StatusRecord::from_bytes(&b))
}

fn usage(cgroup: Option<&RunCgroup>, rec: Option<&StatusRecord>) -> (Duration, u64, u64) {
    let rusage_cpu = rec.map_or(Duration::ZERO, |r| {
        Duration::from_micros(r.utime_us + r.stime_us)
    });
    let rusage_peak = rec.map_or(0, |r| r.maxrss_kb * 1024);
    match cgroup {
        Some(cg) => (
            cg.cpu_time().unwrap_or(rusage_cpu),
            cg.peak_memory().unwrap_or(rusage_peak),
            cg.oom_kills(),
        ),
        None => (rusage_cpu, rusage_peak, 0),
    }
}
