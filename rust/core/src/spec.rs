//! The run spec: plain data describing one sandboxed run.
//!
//! Python builds it (sizes parsed, profile resolved, seccomp BPF compiled) and hands it over as
//! JSON plus raw byte buffers; the core never sees Python objects. The same JSON drives the
//! `cellblock-spawn` binary, so the core can be tested without Python.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Syscall number -> name, shared: the same few maps (one per seccomp policy, ~350 names) come
/// with every run, so they are parsed once (see [`cached_names`]) and never copied.
pub type SyscallNames = Arc<BTreeMap<u32, String>>;

/// Distinct names maps kept parsed (one per seccomp policy in use).
const NAMES_CACHE: usize = 8;

/// Deserializes a names map, reusing the parsed map when the same JSON text was seen before:
/// parsing it cost ~40 us per run, more than the rest of the spec.
fn cached_names<'de, D: Deserializer<'de>>(d: D) -> Result<SyscallNames, D::Error> {
    static CACHE: Mutex<Vec<(Box<str>, SyscallNames)>> = Mutex::new(Vec::new());
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    let text = raw.get();
    if let Ok(cache) = CACHE.lock() {
        if let Some((_, names)) = cache.iter().find(|(t, _)| &**t == text) {
            return Ok(Arc::clone(names));
        }
    }
    let names: SyscallNames =
        Arc::new(serde_json::from_str(text).map_err(serde::de::Error::custom)?);
    if let Ok(mut cache) = CACHE.lock() {
        if cache.len() >= NAMES_CACHE {
            cache.remove(0);
        }
        cache.push((text.into(), Arc::clone(&names)));
    }
    Ok(names)
}

/// Resource limits of a run. `None` means "no limit".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Memory cap in bytes (cgroup memory limit, or RLIMIT_AS as a fallback).
    pub memory: Option<u64>,
    /// Maximum number of processes/threads alive at once.
    pub pids: Option<u64>,
    /// CPU bandwidth in CPUs (e.g. 0.5 = half a core).
    pub cpus: Option<f64>,
    /// Wall-clock timeout in seconds.
    pub timeout: Option<f64>,
    /// CPU time budget in seconds, summed over every process of the run.
    pub cpu_time: Option<f64>,
    /// Bytes kept per output stream; going past it ends the run (reason `output_limit`).
    pub max_output: Option<u64>,
    /// Size of the writable scratch space (/tmp, /workspace, /dev/shm together), in bytes.
    pub disk: Option<u64>,
}

/// What to do when the seccomp filter refuses a call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnViolation {
    /// Fail the call with EPERM, report it, keep running.
    #[default]
    Errno,
    /// Report it and kill the run (reason `seccomp`).
    Kill,
}

/// A compiled seccomp filter, ready to install.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeccompSpec {
    /// Profile name, echoed in the report.
    pub profile: String,
    /// Classic BPF program (array of `struct sock_filter`, 8 bytes each) for this architecture.
    /// Refused calls must return `SECCOMP_RET_USER_NOTIF` so the supervisor sees them.
    #[serde(skip)]
    pub bpf: Vec<u8>,
    /// Syscall number -> name, used to name violations.
    #[serde(deserialize_with = "cached_names")]
    pub names: SyscallNames,
    /// Errno or kill on a refused call.
    pub on_violation: OnViolation,
}

/// A secret: injected as an environment variable and redacted from every output stream.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// Environment variable name, also used in `[REDACTED:NAME]`.
    pub name: String,
    /// The secret value (never logged, never in Debug output).
    pub value: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({}, <hidden>)", self.name)
    }
}

/// Network policy of a run: `None` in [`RunSpec::net`] means no network at all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetSpec {
    /// Allowlist patterns: `host`, `host:port`, `*.domain`, `ip`, `ip:port`.
    pub allow: Vec<String>,
}

/// What the egress proxy does with a request carrying a credential's placeholder toward a host
/// (or with a method) the credential is not bound to. The request is never forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCredentialLeak {
    /// Answer 403 to the sandbox, report it, keep running.
    #[default]
    Block,
    /// Report it and kill the sandbox (reason `credential`).
    Kill,
    /// Report it and drop the request silently (the connection is closed, no answer).
    Log,
}

/// A credential the egress proxy puts into requests for its hosts; the sandbox only ever sees
/// `placeholder`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// Environment variable holding the placeholder in the sandbox.
    pub name: String,
    /// The real value (never logged, never in Debug output, never inside the sandbox).
    pub value: String,
    /// The placeholder the sandbox sees (unique per sandbox).
    pub placeholder: String,
    /// Allowlist patterns of the hosts the value may be sent to.
    pub hosts: Vec<String>,
    /// Methods substitution is limited to (upper case); `None` = every method.
    #[serde(default)]
    pub methods: Option<Vec<String>>,
    /// The only request header substituted in; `None` = every header.
    #[serde(default)]
    pub header: Option<String>,
    /// Substitute in the URL query too.
    #[serde(default)]
    pub in_query: bool,
    /// Substitute in the request body too.
    #[serde(default)]
    pub in_body: bool,
}

impl std::fmt::Debug for CredentialSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({}, <hidden>, {:?})", self.name, self.hosts)
    }
}

/// Credentials of a run: substituted by the egress proxy, which then terminates TLS.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsSpec {
    /// The credentials.
    pub list: Vec<CredentialSpec>,
    /// What a placeholder sent where it is not bound does.
    pub on_leak: OnCredentialLeak,
    /// PEM file of the CAs upstream servers are verified against (instead of the host's
    /// trust store).
    pub tls_ca_bundle: Option<String>,
}

/// A pseudo-terminal for the command (see [`crate::tty`]): its window size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    /// Rows of the window (at least 1).
    pub rows: u16,
    /// Columns of the window (at least 1).
    pub cols: u16,
}

/// Everything the core needs to run one command in a fresh sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSpec {
    /// Command and arguments; `argv[0]` is looked up in `PATH` of `env` when it has no `/`.
    pub argv: Vec<String>,
    /// The complete environment of the run (nothing is inherited from the caller).
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox.
    pub cwd: Option<String>,
    /// Resource limits.
    pub limits: Limits,
    /// Extra host directories bound read-only at the same path (e.g. an interpreter prefix).
    pub ro_binds: Vec<String>,
    /// A root filesystem (an absolute host directory) mounted read-only as the sandbox's root
    /// instead of the host's system directories; `None` = the host's runtimes.
    pub rootfs: Option<String>,
    /// Seccomp filter to install last before execve.
    pub seccomp: Option<SeccompSpec>,
    /// Secrets to inject into `env` and redact from output.
    pub secrets: Vec<Secret>,
    /// Network egress allowlist; `None` = loopback only.
    pub net: Option<NetSpec>,
    /// Credentials substituted at the egress proxy (needs `net`); `None` = none.
    pub credentials: Option<CredentialsSpec>,
    /// A pseudo-terminal of the sandbox's own as stdin, stdout and stderr (output merged into
    /// stdout); `None` = pipes.
    pub tty: Option<TtySize>,
    /// Bytes written to the command's stdin (then closed). Not part of the JSON form.
    #[serde(skip)]
    pub stdin: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(names: &str) -> std::result::Result<RunSpec, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"argv": ["true"], "seccomp": {{"profile": "p", "names": {names}}}}}"#
        ))
    }

    fn names(s: &RunSpec) -> SyscallNames {
        Arc::clone(&s.seccomp.as_ref().expect("a seccomp section").names)
    }

    #[test]
    fn a_names_map_seen_before_is_shared_not_parsed_again() {
        let a = spec(r#"{"0": "read", "1": "write"}"#).expect("valid");
        let b = spec(r#"{"0": "read", "1": "write"}"#).expect("valid");
        let c = spec(r#"{"0": "read", "2": "open"}"#).expect("valid");
        assert!(Arc::ptr_eq(&names(&a), &names(&b)));
        assert_eq!(names(&a).get(&1).map(String::as_str), Some("write"));
        assert_eq!(names(&c).get(&2).map(String::as_str), Some("open"));
        assert_eq!(names(&c).get(&1), None);
    }

    #[test]
    fn a_bad_names_map_is_refused_every_time() {
        for _ in 0..2 {
            let e = spec(r#"{"read": 0}"#).expect_err("keys must be numbers");
            assert!(e.to_string().contains("invalid"), "{e}");
        }
        spec(r#"{"0": 1}"#).expect_err("values must be strings");
    }
}
