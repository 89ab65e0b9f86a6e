//! Errors of the core. Each variant maps to a Python exception class of the same name.

use thiserror::Error;

/// Everything that can stop a run from starting (a run that starts always yields a report).
#[derive(Debug, Error)]
pub enum Error {
    /// The spec is malformed: bad limit, empty argv, unknown field, bad pattern.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// `argv[0]` was not found (or is not executable) inside the sandbox.
    #[error("command not found in the sandbox: {0}")]
    CommandNotFound(String),
    /// The kernel refused to create namespaces (user namespaces disabled?).
    #[error("cannot create namespaces: {0}")]
    NamespaceUnavailable(String),
    /// A step of building the sandbox failed (mount, cgroup, pipe, fork).
    #[error("sandbox setup failed at {stage}: {source}")]
    Setup {
        /// What was being done.
        stage: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The seccomp filter could not be installed or is malformed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A secret is unusable (too short, bad name).
    #[error("secret: {0}")]
    Secret(String),
    /// A network policy or proxy problem.
    #[error("network: {0}")]
    Network(String),
    /// The session was closed (or died) and can no longer be used.
    #[error("session closed: {0}")]
    SessionClosed(String),
    /// A path given to the files API leaves the sandbox.
    #[error("path escapes the sandbox: {0}")]
    PathEscape(String),
    /// An I/O error talking to the sandbox after it started.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The exception class name this error maps to (also printed by the CLI).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::CommandNotFound(_) => "CommandNotFound",
            Error::NamespaceUnavailable(_) => "NamespaceUnavailable",
            Error::Setup { .. } => "SetupError",
            Error::Seccomp(_) => "SeccompError",
            Error::Secret(_) => "SecretError",
            Error::Network(_) => "NetworkPolicyError",
            Error::SessionClosed(_) => "SessionClosed",
            Error::PathEscape(_) => "PathEscape",
            Error::Io(_) => "SandboxIOError",
        }
    }

    /// Shorthand for a [`Error::Setup`] from the current `errno`.
    pub fn setup(stage: &'static str) -> Self {
        Error::Setup {
            stage,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Result alias of the core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// This thread's errno after a failed raw syscall (EIO if none is set). Allocation-free, so
/// forked children may call it.
pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}
