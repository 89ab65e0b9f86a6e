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
    /// An unusable credential (bad name, no hosts, a placeholder that cannot be made).
    #[error("credential: {0}")]
    Credential(String),
    /// The credential vault cannot be used (no key, wrong key, corrupt file, unknown name).
    #[error("vault: {0}")]
    Vault(String),
    /// A root filesystem or image layer that is unsafe or unusable (an entry escaping its
    /// destination, a corrupt layer, a bad digest, a rootfs that is not a directory).
    #[error("unsafe layer: {0}")]
    UnsafeLayer(String),
    /// A network policy or proxy problem.
    #[error("network: {0}")]
    Network(String),
    /// The session was closed (or died) and can no longer be used.
    #[error("session closed: {0}")]
    SessionClosed(String),
    /// A path given to the files API leaves the sandbox.
    #[error("path escapes the sandbox: {0}")]
    PathEscape(String),
    /// A session could not be forked as asked (the fork's disk limit, a state that cannot
    /// be carried over).
    #[error("fork: {0}")]
    Fork(String),
    /// An I/O error talking to the sandbox after it started.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// An I/O error on a named path (the errno is kept in `source`).
    #[error("{path}: {source}")]
    IoAt {
        /// The path the failed operation was on.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Building a sandbox took longer than its deadline (its set-up hangs): it was killed.
    #[error("sandbox set-up did not finish within {seconds:.1} s (at: {stage})")]
    Deadline {
        /// What was waited for.
        stage: &'static str,
        /// The deadline, in seconds.
        seconds: f64,
    },
    /// An error about a named path (a command, a cwd, a file of the files API), said as the
    /// error says it; the path is kept for callers (Python's `filename`).
    #[error("{error}")]
    At {
        /// The path the error is about.
        path: String,
        /// The error.
        error: Box<Error>,
    },
    /// A run or call failed and cleaning it up failed too: both are reported.
    #[error("{error}; cleaning up also failed: {cleanup}")]
    CleanupFailed {
        /// The error that stopped the run.
        error: Box<Error>,
        /// What could not be cleaned up, and why.
        cleanup: String,
    },
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
            Error::Credential(_) => "CredentialError",
            Error::Vault(_) => "VaultError",
            Error::UnsafeLayer(_) => "UnsafeLayer",
            Error::Network(_) => "NetworkPolicyError",
            Error::SessionClosed(_) => "SessionClosed",
            Error::PathEscape(_) => "PathEscape",
            Error::Fork(_) => "ForkError",
            Error::Io(_) | Error::IoAt { .. } => "SandboxIOError",
            Error::Deadline { .. } => "SetupTimeout",
            Error::CleanupFailed { error, .. } | Error::At { error, .. } => error.kind(),
        }
    }

    /// The errno behind this error, when an OS call failed.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Setup { source, .. } | Error::Io(source) | Error::IoAt { source, .. } => source
                .raw_os_error()
                .or_else(|| errno_of_kind(source.kind())),
            Error::Deadline { .. } => Some(libc::ETIMEDOUT),
            Error::CleanupFailed { error, .. } | Error::At { error, .. } => error.errno(),
            _ => None,
        }
    }

    /// The path the error is about, when it names one.
    pub fn path(&self) -> Option<&str> {
        match self {
            Error::IoAt { path, .. } | Error::At { path, .. } => Some(path),
            Error::CleanupFailed { error, .. } => error.path(),
            _ => None,
        }
    }

    /// An I/O error on `path`, keeping its errno.
    pub fn io_at(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::IoAt {
            path: path.into(),
            source,
        }
    }

    /// This error, naming the path it is about (kept by [`Error::path`]); an error that names
    /// one already is left as it is.
    pub fn at(self, path: impl Into<String>) -> Self {
        match self {
            Error::IoAt { .. } | Error::At { .. } => self,
            error => Error::At {
                path: path.into(),
                error: Box::new(error),
            },
        }
    }

    /// This error, with a cleanup failure (if any) reported beside it.
    pub fn with_cleanup(self, cleanup: Option<String>) -> Self {
        match cleanup {
            None => self,
            Some(cleanup) => Error::CleanupFailed {
                error: Box::new(self),
                cleanup,
            },
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

/// The errno of an I/O error made from a kind only (`io::Error::new(kind, message)`).
fn errno_of_kind(kind: std::io::ErrorKind) -> Option<i32> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::AlreadyExists => libc::EEXIST,
        K::IsADirectory => libc::EISDIR,
        K::NotADirectory => libc::ENOTDIR,
        K::InvalidInput => libc::EINVAL,
        K::TimedOut => libc::ETIMEDOUT,
        K::WouldBlock => libc::EAGAIN,
        K::FileTooLarge => libc::EFBIG,
        K::Unsupported => libc::EOPNOTSUPP,
        _ => return None,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_also_failed_to_clean_up_reports_both() {
        let busy = std::io::Error::from_raw_os_error(libc::EBUSY);
        let cleanup = Error::io_at("/sys/fs/cgroup/memory/cellblock-1-0", busy).to_string();
        let e = Error::InvalidSpec("bad".into()).with_cleanup(Some(cleanup));
        assert_eq!(e.kind(), "InvalidSpec");
        let text = e.to_string();
        assert!(
            text.starts_with("invalid spec: bad; cleaning up also failed: "),
            "{text}"
        );
        assert!(
            text.contains("cellblock-1-0") && text.contains("busy"),
            "{text}"
        );
        assert!(matches!(
            Error::Setup {
                stage: "x",
                source: std::io::Error::from_raw_os_error(libc::ENOENT)
            }
            .with_cleanup(None),
            Error::Setup { .. }
        ));
    }

    #[test]
    fn errors_keep_errno_and_path() {
        let e = Error::io_at(
            "/workspace/f",
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert_eq!(
            (e.errno(), e.path()),
            (Some(libc::EACCES), Some("/workspace/f"))
        );
        let kind_only = Error::Io(std::io::Error::new(std::io::ErrorKind::NotFound, "f: gone"));
        assert_eq!(kind_only.errno(), Some(libc::ENOENT));
        assert_eq!(
            Error::Deadline {
                stage: "s",
                seconds: 1.0
            }
            .errno(),
            Some(libc::ETIMEDOUT)
        );
    }
}
