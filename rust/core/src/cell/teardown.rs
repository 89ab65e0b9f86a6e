//! Teardown off the caller's path: once a run's report is known, killing its PID 1, reaping it
//! (which waits for the kernel to destroy the mount and network namespaces) and removing its
//! cgroup happen on one background thread. [`flush`] waits for all of it; it runs at process
//! exit too, so nothing is left behind when the process ends normally (SIGKILL of the owner:
//! PID 1 dies by its parent-death signal, and stale cgroups are swept by the next process).

use crate::cgroup::RunCgroup;
use crate::spawn;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What is left of a sandbox once its report is out.
#[derive(Debug)]
pub struct Remains {
    /// pidfd of the sandbox's PID 1 (our child).
    pub pidfd: OwnedFd,
    /// The sandbox's cgroup.
    pub cgroup: Option<RunCgroup>,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Remains>,
    /// Items queued or being torn down.
    pending: usize,
}

struct Worker {
    queue: Mutex<Queue>,
    wake: Condvar,
    done: Condvar,
    /// The process whose thread serves the queue (a forked child has no such thread).
    owner: u32,
}

/// The background worker, started on first use (None: no thread could be started, or this is
/// a forked child of its process, which has no such thread: teardown then happens inline).
fn worker() -> Option<&'static Worker> {
    static W: OnceLock<Option<&'static Worker>> = OnceLock::new();
    let w = *W.get_or_init(|| {
        let w: &'static Worker = Box::leak(Box::new(Worker {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            owner: std::process::id(),
        }));
        std::thread::Builder::new()
            .name("cellblock-teardown".into())
            .spawn(move || serve(w))
            .ok()?;
        super::register_exit_flush();
        Some(w)
    });
    w.filter(|w| w.owner == std::process::id())
}

fn serve(w: &'static Worker) {
    loop {
        let item = {
            let Ok(mut q) = w.queue.lock() else { return };
            loop {
                if let Some(i) = q.items.pop_front() {
                    break i;
                }
                q = match w.wake.wait(q) {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
        };
        super::defer_to_runs();
        tear_down(item);
        if let Ok(mut q) = w.queue.lock() {
            q.pending -= 1;
            w.done.notify_all();
        }
    }
}

/// Teardowns whose cgroup could not be removed (the report had already gone out).
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// How many teardown errors are kept (the most recent ones; the count has them all).
pub const ERRORS_KEPT: usize = 32;

/// The most recent teardown errors, each naming the path and the errno.
static ERRORS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Records a teardown that failed after its run's report went out: counted, and kept (bounded)
/// for [`errors`] and the cell pool's stats.
pub fn record_failure(what: String) {
    FAILURES.fetch_add(1, Ordering::Relaxed);
    record_error(what);
}

/// Keeps (bounded) a cleanup error no report can carry, e.g. of the stale-cgroup sweep.
pub fn record_error(what: String) {
    if let Ok(mut e) = ERRORS.lock() {
        if e.len() >= ERRORS_KEPT {
            e.pop_front();
        }
        e.push_back(what);
    }
}

/// Thaws, kills, reaps (bounded) and removes, now; what fails is recorded.
pub fn tear_down(mut r: Remains) {
    if let Some(cg) = r.cgroup.as_ref() {
        // A frozen task ignores SIGKILL on cgroup v1.
        for (file, value) in cg.thaw_files() {
            if let Err(e) = std::fs::write(&file, value) {
                record_failure(format!("{}: thaw: {e}", file.display()));
            }
        }
    }
    if !spawn::kill_and_reap(&r.pidfd) {
        record_failure(format!(
            "a sandbox's PID 1 did not end within {} s of SIGKILL",
            spawn::KILL_GRACE.as_secs()
        ));
    }
    if let Some(cg) = r.cgroup.as_mut() {
        if let Err(e) = cg.remove() {
            record_failure(e.to_string());
        }
    }
}

/// How many teardowns failed to remove their cgroup so far.
pub fn failures() -> u64 {
    FAILURES.load(Ordering::Relaxed)
}

/// The most recent teardown errors (at most [`ERRORS_KEPT`]), oldest first.
pub fn errors() -> Vec<String> {
    ERRORS
        .lock()
        .map(|e| e.iter().cloned().collect())
        .unwrap_or_default()
}

/// Queues a sandbox for teardown on the background thread.
pub fn later(r: Remains) {
    let Some(w) = worker() else {
        return tear_down(r);
    };
    match w.queue.lock() {
        Ok(mut q) => {
            q.items.push_back(r);
            q.pending += 1;
            w.wake.notify_one();
        }
        Err(_) => tear_down(r),
    }
}

/// Waits (at most `limit`) until every queued teardown is complete; true when it is.
pub fn flush(limit: Duration) -> bool {
    let Some(w) = worker() else {
        return true;
    };
    let deadline = Instant::now() + limit;
    let Ok(mut q) = w.queue.lock() else {
        return false;
    };
    while q.pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        q = match w.done.wait_timeout(q, left) {
            Ok((q, _)) => q,
            Err(_) => return false,
        };
    }
    true
}

/// Teardowns queued and not finished.
pub fn pending() -> usize {
    worker()
        .and_then(|w| w.queue.lock().ok().map(|q| q.pending))
        .unwrap_or(0)
}
