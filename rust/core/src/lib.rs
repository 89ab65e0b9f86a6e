//! cellblock-core: runs one command in fresh Linux namespaces with limits, seccomp, an egress
//! allowlist and secret redaction, and reports exactly what happened.
//!
//! One module per kernel mechanism; decisions (mount plans, cgroup paths, limit enforcement)
//! are pure functions, and only the child-side code performs the namespace syscalls.

#[cfg(not(target_os = "linux"))]
compile_error!("cellblock-core needs Linux namespaces, cgroups and seccomp");

pub mod cell;
pub mod cgroup;
pub mod child;
pub mod error;
pub mod fdpass;
pub mod files;
pub mod forkserver;
pub mod fs;
pub mod net;
pub mod observe;
pub mod reaper;
pub mod redact;
pub mod report;
pub mod seccomp;
pub mod session;
pub mod spawn;
mod spawner;
pub mod spec;
pub mod supervise;
pub mod timens;
pub mod tty;
pub mod warm;

pub use error::{Error, Result};
pub use files::{DirEntry, FileReader, FileWriter};
pub use redact::Redactor;
pub use report::{Enforcer, NetworkStats, Reason, RunReport, Violation};
pub use session::Session;
pub use spec::{Limits, NetSpec, OnViolation, RunSpec, SeccompSpec, Secret, TtySize};
pub use supervise::{Hooks, Sink, Stream};

/// Builds the redactor for a spec's secrets.
pub fn redactor_for(spec: &RunSpec) -> Result<Redactor> {
    if spec.secrets.is_empty() {
        // The passthrough redactor is the same for every run without secrets (and immutable:
        // per-stream state lives in its streams); making its tables cost ~60 us per run.
        static NONE: std::sync::OnceLock<Redactor> = std::sync::OnceLock::new();
        if let Some(r) = NONE.get() {
            return Ok(r.clone());
        }
        let r = Redactor::new(&[])?;
        return Ok(NONE.get_or_init(|| r).clone());
    }
    let secrets: Vec<(String, Vec<u8>)> = spec
        .secrets
        .iter()
        .map(|s| (s.name.clone(), s.value.as_bytes().to_vec()))
        .collect();
    Redactor::new(&secrets)
}

/// Runs `spec` in a fresh sandbox and reports what happened. `hooks` can receive the redacted
/// output live and interrupt the run. A pre-created cell serves the run when one of its shape is
/// ready (see [`cell`]; `CELLBLOCK_CELLS=0` or [`cell::configure`] turns that off).
pub fn run(spec: &RunSpec, hooks: Hooks<'_>) -> Result<RunReport> {
    cell::run(spec, hooks, true)
}

/// [`run`], choosing whether a pre-created cell may serve it (`false`: always built now).
pub fn run_with(spec: &RunSpec, hooks: Hooks<'_>, use_cells: bool) -> Result<RunReport> {
    cell::run(spec, hooks, use_cells)
}
