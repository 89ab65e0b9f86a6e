//! The run report: exactly what happened and what enforced each limit.
//!
//! Every text field of a report is redacted where the report is built: the output streams by
//! the pumps as they run, every other field ([`RunReport::redact_fields`], [`Violation::redact`])
//! once the run is over. Code that adds a field or a violation to a finished report (session
//! calls, warm calls, file operations) redacts it with the same functions.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::redact::Redactor;

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
    /// The session was closed while the call ran (its processes were ended with it).
    SessionClosed,
    /// A credential placeholder was sent where it is not bound, with `on_leak = kill`.
    Credential,
}

impl Reason {
    /// Every reason, in declaration order.
    pub const ALL: [Reason; 9] = [
        Reason::Exited,
        Reason::Signaled,
        Reason::Timeout,
        Reason::Memory,
        Reason::CpuTime,
        Reason::OutputLimit,
        Reason::Seccomp,
        Reason::SessionClosed,
        Reason::Credential,
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
            Reason::SessionClosed => "session_closed",
            Reason::Credential => "credential",
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
    /// A request carrying a credential's placeholder toward a host (or with a method) the
    /// credential is not bound to: never forwarded.
    Credential {
        /// The credential's name.
        name: String,
        /// Host the request was for.
        host: String,
        /// Its port.
        port: u16,
        /// What was refused.
        reason: String,
    },
}

impl Violation {
    /// Redacts every text field (a refused host name can carry a secret: exfiltration through
    /// DNS or CONNECT), adding what was found to `counts`.
    pub fn redact(&mut self, redactor: &Redactor, counts: &mut BTreeMap<String, u64>) {
        match self {
            Violation::Seccomp { syscall, .. } => redact_string(syscall, redactor, counts),
            Violation::Network { host, reason, .. } => {
                // Recorded lower-cased (and DNS-escaped): matched in those forms too.
                let (out, found) = redactor.redact_name(host.as_bytes());
                if !found.is_empty() {
                    for (name, n) in found {
                        *counts.entry(name).or_insert(0) += n;
                    }
                    *host = String::from_utf8_lossy(&out).into_owned();
                }
                redact_string(host, redactor, counts);
                redact_string(reason, redactor, counts);
            }
            Violation::Credential { host, reason, .. } => {
                redact_string(host, redactor, counts);
                redact_string(reason, redactor, counts);
            }
        }
    }
}

/// Replaces `text` by its redacted form, adding what was found to `counts`. Text that is no
/// longer UTF-8 after redaction (a binary secret matched inside a character) is made lossy.
pub fn redact_string(text: &mut String, redactor: &Redactor, counts: &mut BTreeMap<String, u64>) {
    if redactor.is_empty() {
        return;
    }
    let (out, found) = redactor.redact(text.as_bytes());
    if found.is_empty() {
        return;
    }
    for (name, n) in found {
        *counts.entry(name).or_insert(0) += n;
    }
    *text = String::from_utf8(out)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
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
    /// Limits the supervisor saw reached during the run (kernel counters of the run's cgroup,
    /// its own timers and caps, or its samples of the sandbox's processes in host /proc).
    pub limits_hit: Vec<String>,
    /// Enforced limits whose reaching could not be observed (e.g. `memory` under RLIMIT_DATA:
    /// the kernel keeps no count of refused allocations): not being in `limits_hit` says
    /// nothing about them.
    pub limits_unverified: Vec<String>,
    /// Whether the command ran in a time namespace of its own (monotonic and boot-time clocks,
    /// /proc/uptime and /proc/stat's `btime` starting when the sandbox was built; see
    /// [`crate::timens`]). False on a kernel without time namespaces: the command saw the
    /// host's uptime and boot time.
    pub time_namespace: bool,
}

impl RunReport {
    /// Redacts every text field other than stdout and stderr (redacted as they were pumped):
    /// violations and the seccomp profile name; the redactions are counted in `redactions`.
    /// Idempotent: redacting twice finds nothing new.
    pub fn redact_fields(&mut self, redactor: &Redactor) {
        let mut counts = std::mem::take(&mut self.redactions);
        for v in &mut self.violations {
            v.redact(redactor, &mut counts);
        }
        if let Some(profile) = &mut self.seccomp_profile {
            redact_string(profile, redactor, &mut counts);
        }
        for e in &mut self.cleanup_errors {
            redact_string(e, redactor, &mut counts);
        }
        self.redactions = counts;
    }

    /// Starts the limit accounting: every enforced limit is unverified until
    /// [`RunReport::observe_limit`] says what was seen of it.
    pub fn start_limits(&mut self) {
        self.limits_hit.clear();
        self.limits_unverified = self
            .enforcement
            .iter()
            .filter(|(_, e)| e.is_some())
            .map(|(n, _)| n.clone())
            .collect();
    }

    /// Records what the supervisor observed of `limit`: reached or not (either way it is no
    /// longer unverified). A limit seen reached stays reached.
    pub fn observe_limit(&mut self, limit: &str, reached: bool) {
        self.limits_unverified.retain(|n| n != limit);
        if reached && !self.limits_hit.iter().any(|n| n == limit) {
            self.limits_hit.push(limit.to_string());
        }
    }

    /// Observes the limits the supervisor itself enforces (timeout, output cap, CPU time it
    /// measures) and the rlimit CPU budget when its signal ended the command.
    pub fn observe_supervised_limits(&mut self) {
        let enforcer = |r: &RunReport, n: &str| r.enforcement.get(n).copied().flatten();
        if enforcer(self, "timeout").is_some() {
            self.observe_limit("timeout", self.reason == Reason::Timeout);
        }
        if enforcer(self, "max_output").is_some() {
            let cut = self.stdout_truncated || self.stderr_truncated;
            self.observe_limit("max_output", cut);
        }
        match enforcer(self, "cpu_time") {
            // An rlimit ends only the process over budget: a CPU-time end is a hit, anything
            // else proves nothing (another process may have been ended for it).
            Some(Enforcer::Rlimit) if self.reason == Reason::CpuTime => {
                self.observe_limit("cpu_time", true)
            }
            Some(Enforcer::Rlimit) | None => {}
            // Measured on the whole cgroup by the supervisor, which ends the run on reaching it.
            Some(_) => self.observe_limit("cpu_time", self.reason == Reason::CpuTime),
        }
        if self.reason == Reason::Memory {
            self.observe_limit("memory", true);
        }
    }

    /// Observes the limits a cgroup counts (see [`crate::cgroup::LimitEvents`]), for those it
    /// enforces; unreadable counters leave the limit unverified.
    pub fn observe_cgroup_events(&mut self, events: crate::cgroup::LimitEvents) {
        for (name, count) in events.by_limit() {
            let by_cgroup = matches!(
                self.enforcement.get(name),
                Some(Some(Enforcer::CgroupV1 | Enforcer::CgroupV2))
            );
            if let (true, Some(n)) = (by_cgroup, count) {
                self.observe_limit(name, n > 0);
            }
        }
    }

    /// Appends violations found after the report was built (e.g. a session's shared egress),
    /// redacted and counted like the others.
    pub fn add_violations(
        &mut self,
        found: impl IntoIterator<Item = Violation>,
        redactor: &Redactor,
    ) {
        for mut v in found {
            v.redact(redactor, &mut self.redactions);
            self.violations.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(violations: Vec<Violation>) -> RunReport {
        RunReport {
            exit_code: Some(0),
            signal: None,
            reason: Reason::Exited,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_s: 0.0,
            cpu_time_s: 0.0,
            peak_memory_bytes: 0,
            violations,
            enforcement: BTreeMap::new(),
            redactions: BTreeMap::from([("TOKEN".to_string(), 1)]),
            seccomp_profile: Some("python".into()),
            network: None,
            cleanup_errors: Vec::new(),
            limits_hit: Vec::new(),
            limits_unverified: Vec::new(),
            time_namespace: false,
        }
    }

    #[test]
    fn violations_are_redacted_and_counted() {
        let secret = "s3cr3t-T0ken-42";
        let r = Redactor::new(&[("TOKEN".into(), secret.as_bytes().to_vec())]).expect("valid");
        let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
        let mut rep = report(vec![
            Violation::Network {
                host: format!("{secret}.example.test"),
                port: 443,
                reason: format!("{hex}.example.test is not allowed"),
            },
            Violation::Seccomp {
                syscall: "ptrace".into(),
                count: 2,
            },
        ]);
        rep.redact_fields(&r);
        rep.add_violations(
            [Violation::Network {
                host: secret.into(),
                port: 0,
                reason: "refused".into(),
            }],
            &r,
        );
        let json = serde_json::to_string(&rep).expect("json");
        assert!(!json.contains(secret) && !json.contains(&hex), "{json}");
        assert_eq!(
            rep.violations[0],
            Violation::Network {
                host: "[REDACTED:TOKEN].example.test".into(),
                port: 443,
                reason: "[REDACTED:TOKEN].example.test is not allowed".into(),
            }
        );
        assert_eq!(rep.redactions.get("TOKEN"), Some(&4));
        // Nothing new the second time.
        rep.redact_fields(&r);
        assert_eq!(rep.redactions.get("TOKEN"), Some(&4));
    }

    #[test]
    fn limits_are_hit_only_on_evidence_and_unverified_otherwise() {
        use crate::cgroup::LimitEvents;
        let mut rep = report(Vec::new());
        rep.enforcement = BTreeMap::from([
            ("memory".to_string(), Some(Enforcer::CgroupV1)),
            ("pids".to_string(), Some(Enforcer::CgroupV1)),
            ("cpus".to_string(), None),
            ("timeout".to_string(), Some(Enforcer::Supervisor)),
            ("disk".to_string(), Some(Enforcer::Tmpfs)),
        ]);
        rep.start_limits();
        // Not enforced: neither hit nor unverified.
        assert_eq!(rep.limits_unverified, ["disk", "memory", "pids", "timeout"]);
        rep.observe_supervised_limits();
        // Unreadable counters prove nothing; a count of 0 proves the limit was not reached.
        rep.observe_cgroup_events(LimitEvents {
            memory: None,
            pids: Some(3),
            cpus: Some(7),
        });
        assert_eq!(rep.limits_hit, ["pids"]);
        assert_eq!(rep.limits_unverified, ["disk", "memory"]);
        // An rlimit-enforced limit is never settled by cgroup counters.
        rep.enforcement
            .insert("memory".into(), Some(Enforcer::Rlimit));
        rep.observe_cgroup_events(LimitEvents {
            memory: Some(0),
            ..LimitEvents::default()
        });
        assert_eq!(rep.limits_unverified, ["disk", "memory"]);
        // Seen reached stays reached.
        rep.observe_limit("pids", false);
        assert_eq!(rep.limits_hit, ["pids"]);
    }

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
