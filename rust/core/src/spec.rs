//! The run spec: plain data describing one sandboxed run.
//!
//! Python builds it (sizes parsed, profile resolved, seccomp BPF compiled) and hands it over as
//! JSON plus raw byte buffers; the core never sees Python objects. The same JSON drives the
//! `cellblock-spawn` binary, so the core can be tested without Python.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    pub names: BTreeMap<u32, String>,
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
