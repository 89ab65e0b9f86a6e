//! cellblock-core: runs one command in fresh Linux namespaces with limits, seccomp, an egress
//! allowlist and secret redaction, and reports exactly what happened.
//!
//! One module per kernel mechanism; decisions (mount plans, cgroup paths, uid maps) are pure
//! functions, and only the `sys`-facing parts perform syscalls.

pub mod error;
pub mod redact;
pub mod report;
pub mod spec;

pub use error::{Error, Result};
pub use report::{Enforcer, NetworkStats, Reason, RunReport, Violation};
pub use spec::{Limits, NetSpec, OnViolation, RunSpec, SeccompSpec, Secret};
