//! Python exception classes, one per `cellblock_core::Error` variant, under `CellblockError`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    cellblock._native,
    CellblockError,
    PyException,
    "Base class of every cellblock error."
);
create_exception!(
    cellblock._native,
    InvalidSpec,
    CellblockError,
    "Bad input: a malformed size, count, option or pattern."
);
create_exception!(
    cellblock._native,
    CommandNotFound,
    CellblockError,
    "The command does not exist (or is not executable) inside the sandbox."
);
create_exception!(
    cellblock._native,
    NamespaceUnavailable,
    CellblockError,
    "The kernel refused to create namespaces (user namespaces disabled?)."
);
create_exception!(
    cellblock._native,
    SetupError,
    CellblockError,
    "A step of building the sandbox failed."
);
create_exception!(
    cellblock._native,
    SeccompError,
    CellblockError,
    "Unknown profile or syscall, or a filter that cannot be installed."
);
create_exception!(
    cellblock._native,
    SecretError,
    CellblockError,
    "An unusable secret (too short to redact safely, bad name)."
);
create_exception!(
    cellblock._native,
    NetworkPolicyError,
    CellblockError,
    "A bad egress pattern or a proxy failure."
);
create_exception!(
    cellblock._native,
    SessionClosed,
    CellblockError,
    "The session was closed and cannot be used."
);
create_exception!(
    cellblock._native,
    PathEscape,
    CellblockError,
    "A path given to the files API leaves the sandbox."
);
create_exception!(
    cellblock._native,
    SandboxIOError,
    CellblockError,
    "I/O with a running sandbox failed."
);

/// Maps a core error to its Python exception.
pub fn to_pyerr(e: cellblock_core::Error) -> PyErr {
    use cellblock_core::Error as E;
    let msg = e.to_string();
    match e {
        E::InvalidSpec(_) => InvalidSpec::new_err(msg),
        E::CommandNotFound(_) => CommandNotFound::new_err(msg),
        E::NamespaceUnavailable(_) => NamespaceUnavailable::new_err(msg),
        E::Setup { .. } => SetupError::new_err(msg),
        E::Seccomp(_) => SeccompError::new_err(msg),
        E::Secret(_) => SecretError::new_err(msg),
        E::Network(_) => NetworkPolicyError::new_err(msg),
        E::SessionClosed(_) => SessionClosed::new_err(msg),
        E::PathEscape(_) => PathEscape::new_err(msg),
        E::Io(_) => SandboxIOError::new_err(msg),
    }
}

/// An internal failure converting data (should not happen): reported as SandboxIOError.
pub fn internal(e: impl std::fmt::Display) -> PyErr {
    SandboxIOError::new_err(e.to_string())
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CellblockError", py.get_type::<CellblockError>())?;
    m.add("InvalidSpec", py.get_type::<InvalidSpec>())?;
    m.add("CommandNotFound", py.get_type::<CommandNotFound>())?;
    m.add(
        "NamespaceUnavailable",
        py.get_type::<NamespaceUnavailable>(),
    )?;
    m.add("SetupError", py.get_type::<SetupError>())?;
    m.add("SeccompError", py.get_type::<SeccompError>())?;
    m.add("SecretError", py.get_type::<SecretError>())?;
    m.add("NetworkPolicyError", py.get_type::<NetworkPolicyError>())?;
    m.add("SessionClosed", py.get_type::<SessionClosed>())?;
    m.add("PathEscape", py.get_type::<PathEscape>())?;
    m.add("SandboxIOError", py.get_type::<SandboxIOError>())?;
    Ok(())
}
