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
use crate::supervise::{Hooks, Pump, Stream, DRAIN_GRACE, INTERRUPT_POLL};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

mod conn;
mod proc;
pub(crate) use proc::parent_of;

use conn::{Body, Conn};
use proc::{limit_cpu, pidfd_pid, proc_stat, reaped_status, signal_pidfd, vm_hwm, zombie_exit};

/// How long the relay may take to hand a worker over, or to confirm a sweep.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// The size of a result frame over the cap (conn::MAX_FRAME): discarded unread, so
    /// `result` is empty. A fact measured here.
    pub result_dropped: Option<usize>,
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

/// What the worker and the relay have done so far.
#[derive(Default)]
struct Progress {
    /// The worker's wait status (None: unknown) once it ended, with its CPU time.
    exited: Option<Option<(i32, Duration)>>,
    /// The worker's result frame.
    result: Option<Vec<u8>>,
    /// The announced size of a result frame that was over the cap.
    result_dropped: Option<usize>,
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
    let (base_own, base_cpu) =
        proc_stat(pid).map_or((Duration::ZERO, Duration::ZERO), |s| (s.own, s.total));
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
        Some(s) => (s.on_violation, std::sync::Arc::clone(&s.names)),
        None => (OnViolation::Errno, Default::default()),
    };
    let mut listener = listener_fd.map(|fd| Listener::new(fd, names).on_violation(on_violation));
    conn.send(b'g', b"", handover)?;

    let Hooks {
        mut sink,
        interrupted,
        ..
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
        let ended = p.exited.is_some() && (p.swept || p.sweep_deadline.is_some_and(|d| now >= d));
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
                    while let Ok(Some((kind, body))) = conn.frame() {
                        match kind {
                            b'd' if p.result.is_none() => {
                                // The code is done but the worker still lives: its
                                // high-water mark is complete now.
                                if !cg_mem {
                                    peak_sample = peak_sample.max(vm_hwm(pid).unwrap_or(0));
                                }
                                p.result = Some(match body {
                                    Body::Data(payload) => payload,
                                    Body::Dropped(size) => {
                                        p.result_dropped = Some(size);
                                        Vec::new()
                                    }
                                });
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
        // A stateful cell whose answer was too large to read: failed, as far as we know.
        None if p.result_dropped.is_some() => (Some(1), None),
        // A stateful cell that finished: its exit code is the cell's own (sys.exit).
        None => (cell_exit_code(p.result.as_deref()), None),
    };
    let cpu = if cg_cpu {
        cgroup
            .as_ref()
            .and_then(|c| c.cpu_time())
            .unwrap_or_default()
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
    let limit_events = cgroup.as_ref().map(|c| c.limit_events());
    let mut cleanup_errors = Vec::new();
    if let Some(cg) = cgroup.as_mut() {
        if alive {
            if let Err(e) = cg.release_to_parent() {
                cleanup_errors.push(format!("move the kernel out of the call's cgroup: {e}"));
            }
        }
        // A leftover cgroup is a host-side leak the caller must hear about.
        if let Err(e) = cg.remove() {
            cleanup_errors.push(e.to_string());
        }
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
        violations: listener.map(|l| l.violations()).unwrap_or_default(),
        enforcement,
        redactions,
        seccomp_profile: spec.seccomp.as_ref().map(|s| s.profile.clone()),
        network: None,
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
    report.redact_fields(redactor);
    Ok(Some(WarmOutcome {
        report,
        result: p.result,
        result_dropped: p.result_dropped,
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
    fn cell_exit_codes() {
        assert_eq!(cell_exit_code(Some(br#"{"exit_code": 3}"#)), Some(3));
        assert_eq!(cell_exit_code(Some(b"{}")), Some(0));
        assert_eq!(cell_exit_code(Some(b"nonsense")), None);
        assert_eq!(cell_exit_code(None), None);
    }
}
