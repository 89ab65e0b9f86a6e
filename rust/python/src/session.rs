//! `cellblock._native.Session`: a persistent sandbox serving many calls.

use crate::errors::to_pyerr;
use cellblock_core::{Hooks, RunSpec, Stream};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use std::sync::Mutex;

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

/// Whether `cancel` (an object with `is_set()`, e.g. `threading.Event`) asks to stop.
fn cancelled(py: Python<'_>, cancel: Option<&PyObject>) -> bool {
    cancel.is_some_and(|c| {
        c.bind(py)
            .call_method0("is_set")
            .and_then(|v| v.is_truthy())
            .unwrap_or(false)
    })
}

/// Runs `f` (with the GIL released) with hooks that stream output to an optional Python
/// callable and stop the run when a Python signal handler raises (Ctrl-C, SIGTERM), the
/// callable raises, or `cancel.is_set()` (another thread cancelled it: the run is killed and
/// reported as signaled). The exception is re-raised once the sandbox is gone. For tty runs,
/// `tty.window`, when given, is called as `window() -> (rows, cols) | None` while the run goes
/// on, and sizes its terminal; `tty.on_terminal(fd)` gets the terminal's master once (dup it).
pub fn watched<T>(
    py: Python<'_>,
    on_output: Option<PyObject>,
    cancel: Option<PyObject>,
    tty: TtyHooks,
    f: impl FnOnce(Hooks<'_>) -> cellblock_core::Result<T> + Send,
) -> PyResult<T>
where
    T: Send,
{
    watched_with(py, on_output, cancel, true, tty, f)
}

/// [`watched`]; without `signals` (and `cancel`) the GIL is taken only to deliver output: a
/// background call's supervisor thread does not wake the interpreter ten times a second.
pub fn watched_with<T>(
    py: Python<'_>,
    on_output: Option<PyObject>,
    cancel: Option<PyObject>,
    signals: bool,
    tty: TtyHooks,
    f: impl FnOnce(Hooks<'_>) -> cellblock_core::Result<T> + Send,
) -> PyResult<T>
where
    T: Send,
{
    let ask_python = signals || cancel.is_some();
    let pending: std::sync::Mutex<Option<PyErr>> = std::sync::Mutex::new(None);
    let failed = || pending.lock().map_or(true, |p| p.is_some());
    let keep = |e: PyErr| {
        if let Ok(mut p) = pending.lock() {
            p.get_or_insert(e);
        }
    };
    let interrupted = || {
        failed()
            || ask_python
                && Python::with_gil(|py| match py.check_signals() {
                    Ok(()) if cancelled(py, cancel.as_ref()) => true,
                    Ok(()) => false,
                    Err(e) => {
                        keep(e);
                        true
                    }
                })
    };
    let TtyHooks {
        window,
        on_terminal,
    } = tty;
    let size = || -> Option<(u16, u16)> {
        let w = window.as_ref()?;
        if failed() {
            return None;
        }
        Python::with_gil(|py| {
            match w
                .call0(py)
                .and_then(|v| v.extract::<Option<(u16, u16)>>(py))
            {
                Ok(v) => v,
                Err(e) => {
                    keep(e);
                    None
                }
            }
        })
    };
    let attach = |fd: std::os::fd::BorrowedFd<'_>| {
        use std::os::fd::AsRawFd;
        if let Some(cb) = on_terminal.as_ref() {
            Python::with_gil(|py| {
                if let Err(e) = cb.call1(py, (fd.as_raw_fd(),)) {
                    keep(e);
                }
            });
        }
    };
    let result = py.allow_threads(|| {
        let size_hook: Option<&dyn Fn() -> Option<(u16, u16)>> =
            window.as_ref().map(|_| &size as _);
        let attach_hook: Option<&dyn Fn(std::os::fd::BorrowedFd<'_>)> =
            on_terminal.as_ref().map(|_| &attach as _);
        match on_output {
            None => f(Hooks {
                sink: None,
                interrupted: Some(&interrupted),
                window: size_hook,
                on_terminal: attach_hook,
            }),
            Some(cb) => {
                let mut sink = |stream: Stream, data: &[u8]| {
                    // After the callable raised, the run is being stopped: nothing more is sent.
                    if failed() {
                        return;
                    }
                    Python::with_gil(|py| {
                        let n = if stream == Stream::Stdout { 1 } else { 2 };
                        if let Err(e) = cb.call1(py, (n, PyBytes::new(py, data))) {
                            keep(e);
                        }
                    });
                };
                f(Hooks {
                    sink: Some(&mut sink),
                    interrupted: Some(&interrupted),
                    window: size_hook,
                    on_terminal: attach_hook,
                })
            }
        }
    });
    if let Some(e) = pending.lock().ok().and_then(|mut p| p.take()) {
        return Err(e);
    }
    result.map_err(to_pyerr)
}

/// The Python callables of a tty run (see [`watched`]).
#[derive(Default)]
pub struct TtyHooks {
    /// `window() -> (rows, cols) | None`, polled while the run goes on.
    pub window: Option<PyObject>,
    /// `on_terminal(fd)`, called once with the terminal's master.
    pub on_terminal: Option<PyObject>,
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
    /// `cancel.is_set()` true kills the call (see `watched`). `on_start(pid)` is called once
    /// the call runs, with the host pid of its PID 1 (for `connect_unix(path, parent=pid)`).
    /// `window()` and `on_terminal(fd)`, when given, serve a tty call (see `watched`).
    #[pyo3(signature = (spec_json, stdin=None, bpf=None, on_output=None, cancel=None, on_start=None, window=None, on_terminal=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec<'py>(
        &self,
        py: Python<'py>,
        spec_json: &str,
        stdin: Option<Vec<u8>>,
        bpf: Option<Vec<u8>>,
        on_output: Option<PyObject>,
        cancel: Option<PyObject>,
        on_start: Option<PyObject>,
        window: Option<PyObject>,
        on_terminal: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let spec = parse_spec(spec_json, stdin, bpf)?;
        let tty = TtyHooks {
            window,
            on_terminal,
        };
        let report = watched(py, on_output, cancel, tty, |hooks| {
            let started = |pid: i32| {
                if let Some(cb) = on_start.as_ref() {
                    Python::with_gil(|py| {
                        if let Err(e) = cb.call1(py, (pid,)) {
                            e.write_unraisable(py, None);
                        }
                    });
                }
            };
            self.inner.exec_observed(&spec, hooks, &started)
        })?;
        crate::report_to_dict(py, &report)
    }

    /// Starts one call in the background and returns its handle at once (see
    /// `cellblock._native.Call`). `stream_stdin`: stdin stays open for `Call.take_stdin()`
    /// (then `stdin` must be None); otherwise `stdin` is written by the supervisor and closed.
    #[pyo3(signature = (spec_json, stdin=None, bpf=None, stream_stdin=false))]
    fn start(
        &self,
        py: Python<'_>,
        spec_json: &str,
        stdin: Option<Vec<u8>>,
        bpf: Option<Vec<u8>>,
        stream_stdin: bool,
    ) -> PyResult<crate::process::Call> {
        let spec = parse_spec(spec_json, stdin, bpf)?;
        let call = py
            .allow_threads(|| self.inner.start(&spec, stream_stdin))
            .map_err(to_pyerr)?;
        Ok(crate::process::Call::new(call))
    }

    /// Replaces the session's egress allowlist; returns the open connections it cut, as
    /// `(host, port, reason)` network violations.
    fn set_network(
        &self,
        py: Python<'_>,
        allow: Vec<String>,
    ) -> PyResult<Vec<(String, u16, String)>> {
        let cut = py
            .allow_threads(|| self.inner.set_network(&allow))
            .map_err(to_pyerr)?;
        Ok(cut
            .into_iter()
            .filter_map(|v| match v {
                cellblock_core::Violation::Network { host, port, reason } => {
                    Some((host, port, reason))
                }
                _ => None,
            })
            .collect())
    }

    /// Forwards `host:host_port` (host_port 0: a free one) to 127.0.0.1:`port` inside the
    /// sandbox until the session closes; returns the bound `(host, port)`.
    #[pyo3(signature = (port, host="127.0.0.1", host_port=0))]
    fn expose(
        &self,
        py: Python<'_>,
        port: u16,
        host: &str,
        host_port: u16,
    ) -> PyResult<(String, u16)> {
        let ip: std::net::IpAddr = host.parse().map_err(|_| {
            to_pyerr(cellblock_core::Error::InvalidSpec(format!(
                "expose: host must be an IP address, got {host:?}"
            )))
        })?;
        let bind = std::net::SocketAddr::new(ip, host_port);
        let addr = py
            .allow_threads(|| self.inner.expose(port, bind))
            .map_err(to_pyerr)?;
        Ok((addr.ip().to_string(), addr.port()))
    }

    /// The forwarded ports: `(port inside, host, host port)` each.
    fn exposed(&self) -> Vec<(u16, String, u16)> {
        self.inner
            .exposed()
            .into_iter()
            .map(|(p, a)| (p, a.ip().to_string(), a.port()))
            .collect()
    }

    /// Supervises one warm call through the connected relay socket `sock_fd` (borrowed, not
    /// closed): sends `request`, takes the worker's descriptors, and returns None when the
    /// worker was gone before the code began, else `{"report": <report dict>, "result":
    /// <the worker's result frame, bytes or None>, "result_dropped": <the size of a result
    /// frame over the cap, discarded unread, or None>, "alive": <the worker lives on>}`.
    #[pyo3(signature = (sock_fd, request, spec_json, stateful, on_output=None, cancel=None))]
    #[allow(clippy::too_many_arguments)]
    fn warm_call<'py>(
        &self,
        py: Python<'py>,
        sock_fd: i32,
        request: Vec<u8>,
        spec_json: &str,
        stateful: bool,
        on_output: Option<PyObject>,
        cancel: Option<PyObject>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let spec = parse_spec(spec_json, None, None)?;
        if sock_fd < 0 {
            return Err(to_pyerr(cellblock_core::Error::InvalidSpec(
                "sock_fd must be an open descriptor".into(),
            )));
        }
        // SAFETY: the caller keeps the socket open for the duration of the call.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock_fd) };
        let outcome = watched(py, on_output, cancel, TtyHooks::default(), |hooks| {
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
        d.set_item("result_dropped", o.result_dropped)?;
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

    /// Connects to a unix stream socket inside the sandbox (resolved like the files API);
    /// returns the connected socket's fd, owned by the caller (`socket.socket(fileno=fd)`).
    /// `parent`: the listening process must be a child of this host pid (a call's PID 1, as
    /// `exec`'s `on_start` gave it), else `SandboxIOError` before anything is sent.
    #[pyo3(signature = (path, parent=None))]
    fn connect_unix(&self, py: Python<'_>, path: &str, parent: Option<i32>) -> PyResult<i32> {
        let fd = py
            .allow_threads(|| match parent {
                Some(p) => self.inner.connect_unix_child_of(path, p),
                None => self.inner.connect_unix(path),
            })
            .map_err(to_pyerr)?;
        Ok(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }

    /// Reads a whole regular file of the sandbox (secrets redacted), at most `max_size` bytes.
    fn read_file<'py>(
        &self,
        py: Python<'py>,
        path: &str,
        max_size: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .allow_threads(|| self.inner.read_file(path, max_size))
            .map_err(to_pyerr)?;
        Ok(PyBytes::new(py, &data))
    }

    /// Opens a regular file of the sandbox for reading in chunks.
    fn open_read(&self, py: Python<'_>, path: &str, max_size: u64) -> PyResult<FileReader> {
        let reader = py
            .allow_threads(|| self.inner.open_read(path, max_size))
            .map_err(to_pyerr)?;
        Ok(FileReader {
            inner: Mutex::new(Some(reader)),
        })
    }

    /// Writes a whole file of the sandbox (created or truncated; parents created).
    fn write_file(&self, py: Python<'_>, path: &str, data: &[u8]) -> PyResult<()> {
        py.allow_threads(|| self.inner.write_file(path, data))
            .map_err(to_pyerr)
    }

    /// Opens (creates or truncates) a regular file of the sandbox for writing in chunks.
    fn open_write(&self, py: Python<'_>, path: &str) -> PyResult<FileWriter> {
        let writer = py
            .allow_threads(|| self.inner.open_write(path))
            .map_err(to_pyerr)?;
        Ok(FileWriter {
            inner: Mutex::new(Some(writer)),
        })
    }

    /// Creates a directory and its parents.
    fn make_dirs(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.allow_threads(|| self.inner.make_dirs(path))
            .map_err(to_pyerr)
    }

    /// Lists a directory: [{"name", "kind", "size"}] (names redacted).
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

    /// Copies this session's /workspace into `dest`'s (a fork): returns
    /// `{"files", "dirs", "symlinks", "bytes", "skipped"}` (skipped: paths with the reason).
    fn copy_workspace_to<'py>(
        &self,
        py: Python<'py>,
        dest: &Session,
    ) -> PyResult<Bound<'py, PyDict>> {
        let r = py
            .allow_threads(|| self.inner.copy_workspace_to(&dest.inner))
            .map_err(to_pyerr)?;
        let d = PyDict::new(py);
        d.set_item("files", r.files)?;
        d.set_item("dirs", r.dirs)?;
        d.set_item("symlinks", r.symlinks)?;
        d.set_item("bytes", r.bytes)?;
        d.set_item("skipped", r.skipped)?;
        Ok(d)
    }

    /// Copies one regular file of this session's scratch mounts to `dest_path` in `dest`'s,
    /// raw, at most `max_size` bytes; returns the bytes copied.
    fn copy_file_to(
        &self,
        py: Python<'_>,
        path: &str,
        dest: &Session,
        dest_path: &str,
        max_size: u64,
    ) -> PyResult<u64> {
        py.allow_threads(|| {
            self.inner
                .copy_file_to(path, &dest.inner, dest_path, max_size)
        })
        .map_err(to_pyerr)
    }
}

/// Locks a reader's or writer's state; `None` once closed.
fn lock_open<'a, T>(m: &'a Mutex<Option<T>>) -> PyResult<std::sync::MutexGuard<'a, Option<T>>> {
    m.lock()
        .map_err(|_| crate::errors::internal("a files-API handle was poisoned"))
}

fn closed_err() -> PyErr {
    to_pyerr(cellblock_core::Error::Io(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the file was closed",
    )))
}

/// A sandbox file open for reading: `read(n)` returns redacted chunks, `b""` at the end.
#[pyclass(module = "cellblock._native", frozen)]
pub struct FileReader {
    inner: Mutex<Option<cellblock_core::FileReader>>,
}

#[pymethods]
impl FileReader {
    /// The next chunk (at most `n` bytes of the file, secrets redacted); `b""` at the end.
    #[pyo3(signature = (n=1 << 20))]
    fn read<'py>(&self, py: Python<'py>, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let chunk = py.allow_threads(|| {
            let mut guard = lock_open(&self.inner)?;
            let reader = guard.as_mut().ok_or_else(closed_err)?;
            reader.read_chunk(n).map_err(to_pyerr)
        })?;
        Ok(PyBytes::new(py, &chunk))
    }

    /// The file's size when it was opened.
    #[getter]
    fn size(&self) -> PyResult<u64> {
        let guard = lock_open(&self.inner)?;
        Ok(guard.as_ref().map_or(0, |r| r.size()))
    }

    /// Closes the file (idempotent).
    fn close(&self) -> PyResult<()> {
        lock_open(&self.inner)?.take();
        Ok(())
    }
}

/// A sandbox file open for writing: `write(data)` appends, `close()` ends it.
#[pyclass(module = "cellblock._native", frozen)]
pub struct FileWriter {
    inner: Mutex<Option<cellblock_core::FileWriter>>,
}

#[pymethods]
impl FileWriter {
    /// Appends `data` to the file.
    fn write(&self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        py.allow_threads(|| {
            let mut guard = lock_open(&self.inner)?;
            let writer = guard.as_mut().ok_or_else(closed_err)?;
            writer.write(data).map_err(to_pyerr)
        })
    }

    /// Closes the file (idempotent).
    fn close(&self) -> PyResult<()> {
        lock_open(&self.inner)?.take();
        Ok(())
    }
}

/// Adds the class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Session>()?;
    m.add_class::<FileReader>()?;
    m.add_class::<FileWriter>()?;
    Ok(())
}
