//! `cellblock._native.Session`: a persistent sandbox serving many calls.

use crate::errors::to_pyerr;
use cellblock_core::{Hooks, RunSpec, Stream};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

/// Parses a spec from JSON, attaching the byte buffers.
pub fn parse_spec(
    spec_json: &str,
    stdin: Option<Vec<u8>>,
    bpf: Option<Vec<u8>>,
) -> PyResult<RunSpec> {
    let mut spec: RunSpec = serde_json::from_str(spec_json)
        .map_err(|e| to_pyerr(cellblock_core::Error::InvalidSpec(e.to_string())))?;
    spec.stdin = stdin.unwrap_or_default();
    if let (Some(s), Some(b)) = (spec.seccomp.as_mut(), bpf) {
        s.bpf = b;
    }
    Ok(spec)
}

/// Runs `f` (with the GIL released) with hooks that stream output to an optional Python
/// callable and stop the run when a Python signal handler raises (Ctrl-C, SIGTERM). The
/// handler's exception is re-raised once the sandbox is gone.
pub fn watched<T>(
    py: Python<'_>,
    on_output: Option<PyObject>,
    f: impl FnOnce(Hooks<'_>) -> cellblock_core::Result<T> + Send,
) -> PyResult<T>
where
    T: Send,
{
    let pending: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
    let interrupted = || {
        Python::with_gil(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                if let Ok(mut p) = pending.lock() {
                    *p = Some(e);
                }
                true
            }
        })
    };
    let result = py.allow_threads(|| match on_output {
        None => f(Hooks {
            sink: None,
            interrupted: Some(&interrupted),
        }),
        Some(cb) => {
            let mut sink = |stream: Stream, data: &[u8]| {
                Python::with_gil(|py| {
                    let n = if stream == Stream::Stdout { 1 } else { 2 };
                    if let Err(e) = cb.call1(py, (n, PyBytes::new(py, data))) {
                        e.print(py);
                    }
                });
            };
            f(Hooks {
                sink: Some(&mut sink),
                interrupted: Some(&interrupted),
            })
        }
    });
    if let Some(e) = pending.lock().ok().and_then(|mut p| p.take()) {
        return Err(e);
    }
    result.map_err(to_pyerr)
}

/// A session sandbox. Every method releases the GIL while it works.
#[pyclass(module = "cellblock._native", frozen)]
pub struct Session {
    inner: cellblock_core::Session,
}

#[pymethods]
impl Session {
    /// Opens a session from a RunSpec JSON (argv ignored; limits are session-wide).
    #[new]
    fn new(py: Python<'_>, spec_json: &str) -> PyResult<Self> {
        let spec = parse_spec(spec_json, None, None)?;
        let inner = py
            .allow_threads(|| cellblock_core::Session::open(&spec))
            .map_err(to_pyerr)?;
        Ok(Session { inner })
    }

    /// Runs one call; returns the report dict (same shape as `cellblock._native.run`).
    #[pyo3(signature = (spec_json, stdin=None, bpf=None, on_output=None))]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        spec_json: &str,
        stdin: Option<Vec<u8>>,
        bpf: Option<Vec<u8>>,
        on_output: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let spec = parse_spec(spec_json, stdin, bpf)?;
        let report = watched(py, on_output, |hooks| self.inner.exec(&spec, hooks))?;
        crate::report_to_dict(py, &report)
    }

    /// Supervises one warm call through the connected relay socket `sock_fd` (borrowed, not
    /// closed): sends `request`, takes the worker's descriptors, and returns None when the
    /// worker was gone before the code began, else `{"report": <report dict>, "result":
    /// <the worker's result frame, bytes or None>, "alive": <the worker lives on>}`.
    #[pyo3(signature = (sock_fd, request, spec_json, stateful, on_output=None))]
    fn warm_call<'py>(
        &self,
        py: Python<'py>,
        sock_fd: i32,
        request: Vec<u8>,
        spec_json: &str,
        stateful: bool,
        on_output: Option<PyObject>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let spec = parse_spec(spec_json, None, None)?;
        if sock_fd < 0 {
            return Err(to_pyerr(cellblock_core::Error::InvalidSpec(
                "sock_fd must be an open descriptor".into(),
            )));
        }
        // SAFETY: the caller keeps the socket open for the duration of the call.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock_fd) };
        let outcome = watched(py, on_output, |hooks| {
            let req = cellblock_core::warm::WarmRequest {
                sock,
                request: &request,
                stateful,
            };
            self.inner.warm_call(&spec, req, hooks)
        })?;
        let Some(o) = outcome else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item("report", crate::report_to_dict(py, &o.report)?)?;
        d.set_item("result", o.result.as_deref().map(|r| PyBytes::new(py, r)))?;
        d.set_item("alive", o.worker_alive)?;
        Ok(Some(d))
    }

    /// Freezes every process of the session.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.pause()).map_err(to_pyerr)
    }

    /// Thaws the session.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.resume()).map_err(to_pyerr)
    }

    /// Kills everything and removes the session's cgroup (idempotent).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.inner.close()).map_err(to_pyerr)
    }

    /// Whether the session is open and its sandbox alive.
    #[getter]
    fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    /// Session-wide enforcement: limit name -> enforcer (or None).
    fn enforcement<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let e = self.inner.enforcement().map_err(to_pyerr)?;
        let d = PyDict::new(py);
        for (k, v) in e {
            let v = v.map(|x| {
                serde_json::to_value(x)
                    .ok()
                    .and_then(|j| j.as_str().map(str::to_string))
            });
            d.set_item(k, v.flatten())?;
        }
        Ok(d)
    }

    /// Reads a file of the sandbox.
    fn read_file<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .allow_threads(|| self.inner.read_file(path))
            .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &data))
    }

    /// Connects to a unix stream socket inside the sandbox (resolved like the files API);
    /// returns the connected socket's fd, owned by the caller (`socket.socket(fileno=fd)`).
    fn connect_unix(&self, py: Python<'_>, path: &str) -> PyResult<i32> {
        let fd = py
            .allow_threads(|| self.inner.connect_unix(path))
            .map_err(to_pyerr)?;
        Ok(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }

    /// Writes a file of the sandbox (parents created).
    fn write_file(&self, py: Python<'_>, path: &str, data: Vec<u8>) -> PyResult<()> {
        py.allow_threads(|| self.inner.write_file(path, &data))
            .map_err(to_pyerr)
    }

    /// Creates a directory and its parents.
    fn make_dirs(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.allow_threads(|| self.inner.make_dirs(path))
            .map_err(to_pyerr)
    }

    /// Lists a directory: [{"name", "kind", "size"}].
    fn list_dir<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyList>> {
        let entries = py
            .allow_threads(|| self.inner.list_dir(path))
            .map_err(to_pyerr)?;
        let list = PyList::empty(py);
        for e in entries {
            let d = PyDict::new(py);
            d.set_item("name", e.name)?;
            d.set_item("kind", e.kind)?;
            d.set_item("size", e.size)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// Removes a file, symlink or empty directory.
    fn remove(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.allow_threads(|| self.inner.remove(path))
            .map_err(to_pyerr)
    }
}

/// Adds the class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Session>()
}
