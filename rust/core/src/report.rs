//! The run report: exactly what happened and what enforced each limit.

use serde::Serialize;
use std::collections::BTreeMap;

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command exited on its own.
    Exited,
    /// The command was killed by a signal it did not get from cellblock.
    Signaled,
    /// The wall-clock timeout expired.
    Timeout,
    /// The memory limit was hit (the kernel's OOM killer acted).
    Memory,
    /// The CPU-time budget was used up.
    CpuTime,
    /// An output stream went past `max_output`.
    OutputLimit,
    /// A refused syscall with `on_violation = kill`.
    Seccomp,
}

/// What enforced a limit. `None` in the map means the limit was requested but not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Enforcer {
    /// A cgroup v2 controller.
    #[serde(rename = "cgroup-v2")]
    CgroupV2,
    /// A cgroup v1 controller.
    #[serde(rename = "cgroup-v1")]
    CgroupV1,
    /// A setrlimit fallback.
    #[serde(rename = "rlimit")]
    Rlimit,
    /// The size of the scratch tmpfs.
    #[serde(rename = "tmpfs")]
    Tmpfs,
    /// The supervisor process (timers, output pumps).
    #[serde(rename = "supervisor")]
    Supervisor,
}

/// Something the sandbox refused, reported rather than hidden.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Violation {
    /// A syscall refused by the seccomp filter, with how many times it was tried.
    Seccomp {
        /// Syscall name (or `syscall_<nr>` when unknown).
        syscall: String,
        /// Number of refused attempts.
        count: u64,
    },
    /// A network connection or lookup refused by the egress allowlist.
    Network {
        /// Host name or address asked for.
        host: String,
        /// Port asked for (0 for DNS lookups).
        port: u16,
        /// Why it was refused.
        reason: String,
    },
}

/// Counters of allowed network traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetworkStats {
    /// Connections allowed through the proxy.
    pub connections: u64,
    /// Bytes sent from the sandbox to the outside.
    pub bytes_out: u64,
    /// Bytes received by the sandbox from the outside.
    pub bytes_in: u64,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Exit status when the command exited, else `None`.
    pub exit_code: Option<i32>,
    /// Terminating signal when the command was killed, else `None`.
    pub signal: Option<i32>,
    /// Why the run ended.
    pub reason: Reason,
    /// Captured (and redacted) stdout, at most `max_output` bytes.
    #[serde(skip)]
    pub stdout: Vec<u8>,
    /// Captured (and redacted) stderr, at most `max_output` bytes.
    #[serde(skip)]
    pub stderr: Vec<u8>,
    /// Whether stdout went past `max_output`.
    pub stdout_truncated: bool,
    /// Whether stderr went past `max_output`.
    pub stderr_truncated: bool,
    /// Wall-clock time from spawn to the end of the run, in seconds.
    pub wall_time_s: f64,
    /// CPU time (user + system) of every process of the run, in seconds.
    pub cpu_time_s: f64,
    /// Peak memory of the run, in bytes.
    pub peak_memory_bytes: u64,
    /// Refused syscalls and connections.
    pub violations: Vec<Violation>,
    /// Limit name -> what enforced it (`None`: requested but not enforced).
    pub enforcement: BTreeMap<String, Option<Enforcer>>,
    /// Redactions made per secret name.
    pub redactions: BTreeMap<String, u64>,
    /// Seccomp profile in force, if any.
    pub seccomp_profile: Option<String>,
    /// Allowed network traffic, when an allowlist was given.
    pub network: Option<NetworkStats>,
    /// What could not be cleaned up after the run (e.g. a cgroup left behind), with why.
    pub cleanup_errors: Vec<String>,
}
