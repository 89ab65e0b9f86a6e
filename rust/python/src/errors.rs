//! Python exception classes, one per `cellblock_core::Error` variant, under `CellblockError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple, PyType};

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
    CredentialError,
    CellblockError,
    "An unusable credential (bad name, no hosts)."
);
create_exception!(
    cellblock._native,
    VaultError,
    CellblockError,
    "The credential vault cannot be used (no key, wrong key, corrupt file, unknown name)."
);
create_exception!(
    cellblock._native,
    UnsafeLayer,
    CellblockError,
    "A root filesystem or image layer that is unsafe or unusable (an entry escaping its \
     destination, a corrupt layer, a bad digest, a rootfs that is not a directory)."
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
    ForkError,
    CellblockError,
    "A session could not be forked (the fork's disk limit, a state that cannot be carried)."
);
create_exception!(
    cellblock._native,
    SetupTimeout,
    SetupError,
    "Building the sandbox took longer than its deadline (a hung set-up): it was killed."
);

/// `SandboxIOError(CellblockError, OSError)`: made with `type()` because an exception class made
/// by `create_exception!` has a single base.
static SANDBOX_IO_ERROR: GILOnceCell<Py<PyType>> = GILOnceCell::new();

/// The `SandboxIOError` class.
fn sandbox_io_error(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    SANDBOX_IO_ERROR
        .get_or_try_init(py, || {
            let bases = PyTuple::new(
                py,
                [
                    py.get_type::<CellblockError>().into_any(),
                    py.get_type::<PyOSError>().into_any(),
                ],
            )?;
            let dict = PyDict::new(py);
            dict.set_item("__module__", "cellblock._native")?;
            dict.set_item(
                "__doc__",
                "I/O with a running sandbox failed; an OSError with `errno` and `filename`.",
            )?;
            let class = py
                .get_type::<PyType>()
                .call1(("SandboxIOError", bases, dict))?;
            Ok(class.downcast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

/// `FileTooLarge(SandboxIOError)`: a file (or listing) of the sandbox over the files API's cap.
static FILE_TOO_LARGE: GILOnceCell<Py<PyType>> = GILOnceCell::new();

/// The `FileTooLarge` class.
fn file_too_large(py: Python<'_>) -> PyResult<&Bound<'_, PyType>> {
    FILE_TOO_LARGE
        .get_or_try_init(py, || {
            let bases = PyTuple::new(py, [sandbox_io_error(py)?.clone().into_any()])?;
            let dict = PyDict::new(py);
            dict.set_item("__module__", "cellblock._native")?;
            dict.set_item(
                "__doc__",
                "A file (or directory listing) of the sandbox is larger than the files API's cap.",
            )?;
            let class = py
                .get_type::<PyType>()
                .call1(("FileTooLarge", bases, dict))?;
            Ok(class.downcast_into::<PyType>()?.unbind())
        })
        .map(|t| t.bind(py))
}

/// Maps a core error to its Python exception. Errors of the OS keep their errno (attribute
/// `errno`) and the path they were about (`filename`).
pub fn to_pyerr(e: cellblock_core::Error) -> PyErr {
    let msg = e.to_string();
    let (kind, errno, path) = (e.kind(), e.errno(), e.path().map(str::to_string));
    if kind == "SandboxIOError" {
        let too_large = cellblock_core::files::is_too_large(&e);
        return Python::with_gil(|py| {
            match if too_large {
                file_too_large(py)
            } else {
                sandbox_io_error(py)
            } {
                Ok(class) => match errno {
                    Some(n) => PyErr::from_type(class.clone(), (n, msg, path)),
                    None => PyErr::from_type(class.clone(), (msg,)),
                },
                Err(err) => err,
            }
        });
    }
    let err = match kind {
        "InvalidSpec" => InvalidSpec::new_err(msg),
        "CommandNotFound" => CommandNotFound::new_err(msg),
        "NamespaceUnavailable" => NamespaceUnavailable::new_err(msg),
        "SetupTimeout" => SetupTimeout::new_err(msg),
        "SeccompError" => SeccompError::new_err(msg),
        "SecretError" => SecretError::new_err(msg),
        "CredentialError" => CredentialError::new_err(msg),
        "VaultError" => VaultError::new_err(msg),
        "UnsafeLayer" => UnsafeLayer::new_err(msg),
        "NetworkPolicyError" => NetworkPolicyError::new_err(msg),
        "SessionClosed" => SessionClosed::new_err(msg),
        "PathEscape" => PathEscape::new_err(msg),
        "ForkError" => ForkError::new_err(msg),
        _ => SetupError::new_err(msg),
    };
    Python::with_gil(|py| {
        let value = err.value(py);
        if let Some(n) = errno {
            let _ = value.setattr("errno", n);
        }
        // As on OSError: the path the error is about (a command, a cwd, a sandbox path).
        if let Some(p) = &path {
            let _ = value.setattr("filename", p);
        }
    });
    err
}

/// An internal failure converting data (should not happen): reported as SandboxIOError.
pub fn internal(e: impl std::fmt::Display) -> PyErr {
    to_pyerr(cellblock_core::Error::Io(std::io::Error::other(
        e.to_string(),
    )))
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
    m.add("CredentialError", py.get_type::<CredentialError>())?;
    m.add("VaultError", py.get_type::<VaultError>())?;
    m.add("UnsafeLayer", py.get_type::<UnsafeLayer>())?;
    m.add("NetworkPolicyError", py.get_type::<NetworkPolicyError>())?;
    m.add("SessionClosed", py.get_type::<SessionClosed>())?;
    m.add("PathEscape", py.get_type::<PathEscape>())?;
    m.add("ForkError", py.get_type::<ForkError>())?;
    m.add("SetupTimeout", py.get_type::<SetupTimeout>())?;
    m.add("SandboxIOError", sandbox_io_error(py)?)?;
    m.add("FileTooLarge", file_too_large(py)?)?;
    Ok(())
}
