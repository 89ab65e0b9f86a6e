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

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 7] = [
        Reason::Exited,
        Reason::Signaled,
        Reason::Timeout,
        Reason::Memory,
        Reason::CpuTime,
        Reason::OutputLimit,
        Reason::Seccomp,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Exited => "exited",
            Reason::Signaled => "signaled",
            Reason::Timeout => "timeout",
            Reason::Memory => "memory",
            Reason::CpuTime => "cpu_time",
            Reason::OutputLimit => "output_limit",
            Reason::Seccomp => "seccomp",
        }
    }
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

impl Enforcer {
    /// Every enforcer, in declaration order.
    pub const ALL: [Enforcer; 5] = [
        Enforcer::CgroupV2,
        Enforcer::CgroupV1,
        Enforcer::Rlimit,
        Enforcer::Tmpfs,
        Enforcer::Supervisor,
    ];

    /// The name reports use.
    pub fn name(self) -> &'static str {
        match self {
            Enforcer::CgroupV2 => "cgroup-v2",
            Enforcer::CgroupV1 => "cgroup-v1",
            Enforcer::Rlimit => "rlimit",
            Enforcer::Tmpfs => "tmpfs",
            Enforcer::Supervisor => "supervisor",
        }
    }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_serialized_forms() {
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).ok(), Some(r.name().into()));
        }
        for e in Enforcer::ALL {
            assert_eq!(serde_json::to_value(e).ok(), Some(e.name().into()));
        }
    }
}
