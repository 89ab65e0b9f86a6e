//! Pre-created cells: one-shot runs without building a sandbox on the caller's path.
//!
//! A cell is a complete sandbox (namespaces, cgroup with PID 1 already in it, tmpfs root and
//! mounts, `lo` up) whose PID 1 waits on its control socket. A run sends its argv, environment,
//! cwd, rlimits and seccomp filter there ([`wire`]); PID 1 starts the command exactly as a
//! cold run's PID 1 does (capabilities dropped and the filter installed in the command's
//! process). Each cell serves one run. [`pool`] keeps a few ready per policy shape, sized from
//! demand; [`teardown`] removes used sandboxes after their report is returned.

pub mod init;
pub mod parts;
pub mod pool;
pub mod teardown;
pub mod wire;

use crate::error::{Error, Result};
use crate::fdpass;
use crate::report::RunReport;
use crate::spawn::{self, Endpoints, Started};
use crate::spec::RunSpec;
use crate::supervise::{self, Hooks};
use pool::Cell;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;
use teardown::Remains;

pub use pool::{configure, drain, stats, Prepared, Stats};

/// Runs of this process in progress (cold or pooled): background work waits for none.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Longest that background work (building a cell, tearing a sandbox down) defers to runs in
/// progress, so that it does not compete with them for the CPU on small machines.
const DEFER_LIMIT: Duration = Duration::from_millis(20);

/// Counts a run in progress until dropped.
struct InFlight;

impl InFlight {
    fn new() -> InFlight {
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (at most [`DEFER_LIMIT`]) until no run of this process is in progress.
pub(crate) fn defer_to_runs() {
    let deadline = std::time::Instant::now() + DEFER_LIMIT;
    while IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Runs `spec` in a pre-created cell when one with its shape is ready (and `use_cells`), else
/// in a sandbox built now; either way the same isolation and the same report.
pub fn run(spec: &RunSpec, hooks: Hooks<'_>, use_cells: bool) -> Result<RunReport> {
    let _in_flight = InFlight::new();
    spawn::validate(spec)?;
    let redactor = crate::redactor_for(spec)?;
    let cell = if use_cells {
        pool::Shape::of(spec).and_then(|s| pool::take(&s))
    } else {
        None
    };
    let started = match cell {
        Some(cell) => match start_in(cell, spec)? {
            Some(started) => started,
            None => {
                pool::fell_back();
                spawn::start(spec)?
            }
        },
        None => spawn::start(spec)?,
    };
    Ok(supervise::supervise_spec(started, spec, &redactor, hooks))
}

/// Whether a run of `spec` can be served by a cell: `Ok(None)` when its shape never is (an
/// egress allowlist or a terminal needs a sandbox made for the run); the errors a run of it
/// would raise before choosing its path.
pub fn shape_for(spec: &RunSpec) -> Result<Option<pool::Shape>> {
    spawn::validate(spec)?;
    crate::redactor_for(spec)?;
    Ok(pool::Shape::of(spec))
}

/// Makes cells ready (within `limit`) for one run of each of `specs`; see [`pool::prepare`].
/// Also returns, per spec, whether cells serve its shape at all (see [`shape_for`]): those
/// that are never served are left out.
pub fn prepare(specs: &[RunSpec], limit: Duration) -> Result<(Vec<bool>, Prepared)> {
    let mut shapes = Vec::with_capacity(specs.len());
    let mut served = Vec::with_capacity(specs.len());
    for spec in specs {
        let shape = shape_for(spec)?;
        served.push(shape.is_some());
        shapes.extend(shape);
    }
    Ok((served, pool::prepare(&shapes, limit)))
}

/// Sends the run to `cell`. `None`: the cell cannot take it (request too large for its buffer,
/// or the cell is gone) and the run takes the cold path.
fn start_in(mut cell: Cell, spec: &RunSpec) -> Result<Option<Started>> {
    let (rlimits, enforcement) = spawn::plan_limits(spec, cell.cgroup.as_ref());
    // The cell's PID 1 has its own stack for the command, made before it was cloned.
    let target = spawn::prepare_target(spec, rlimits, false)?;
    let Some(msg) = wire::encode(cell.buf, &target) else {
        return Ok(None);
    };
    let (Some(io), Some(pidfd)) = (cell.io.take(), cell.pidfd.take()) else {
        return Ok(None);
    };
    let remains = |pidfd, cgroup| Remains { pidfd, cgroup };
    let cgroup = cell.cgroup.take();
    let started_at = std::time::Instant::now();
    // SAFETY: sending our own buffer on our end of the control socket.
    let sent = unsafe {
        libc::send(
            io.sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent != msg.len() as isize {
        teardown::later(remains(pidfd, cgroup));
        return Ok(None);
    }
    // EOF on the error pipe: the command was exec'd (its copy is close-on-exec).
    let cwd = std::ffi::CString::new(spec.cwd.as_deref().unwrap_or(crate::fs::WORKSPACE)).ok();
    if let Some(e) = spawn::read_error(&io.err, None, cwd.as_deref(), &spec.argv[0]) {
        teardown::later(remains(pidfd, cgroup));
        return Err(e);
    }
    let listener = match spec.seccomp {
        Some(_) => match fdpass::recv_fd(io.sock.as_fd()) {
            Ok(fd) => Some(fd),
            Err(e) => {
                teardown::later(remains(pidfd, cgroup));
                return Err(Error::Seccomp(format!("no listener from the sandbox: {e}")));
            }
        },
        None => None,
    };
    Ok(Some(Started {
        pid: cell.pid,
        pidfd,
        io: Endpoints {
            stdin: io.stdin,
            stdout: io.stdout,
            stderr: io.stderr,
            status: io.status,
            listener,
            egress: None,
            terminal: None,
        },
        cgroup,
        enforcement,
        started_at,
        reaper: None,
    }))
}

/// How long process exit waits for cells and teardowns to finish.
const EXIT_FLUSH: Duration = Duration::from_secs(5);

/// Registers (once) the process-exit hook that drops ready cells and finishes teardowns.
pub(crate) fn register_exit_flush() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    static OWNER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    extern "C" fn at_exit() {
        // A forked child inherits the hook (and our pidfds): only the owner cleans up.
        if std::process::id() == OWNER.load(std::sync::atomic::Ordering::Relaxed) {
            drain(EXIT_FLUSH);
        }
    }
    ONCE.call_once(|| {
        OWNER.store(std::process::id(), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe { libc::atexit(at_exit) };
    });
}
