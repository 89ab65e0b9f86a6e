//! `cellblock._native.Call`: a call started in the background by `Session.start`.

use crate::errors::to_pyerr;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::Mutex;

/// A background call: `supervise()` (once, typically on its own thread) runs the supervisor
/// to the call's end and returns the report; `signal()` and `take_stdin()` work meanwhile.
#[pyclass(module = "cellblock._native", frozen)]
pub struct Call {
    call: Mutex<Option<cellblock_core::session::Call>>,
    stdin: Mutex<Option<OwnedFd>>,
    signals: Option<OwnedFd>,
    pid: i32,
}

impl Call {
    /// Wraps a started core call.
    pub fn new(mut call: cellblock_core::session::Call) -> Call {
        let stdin = call.take_stdin();
        let signals = call.signaller();
        let pid = call.pid();
        Call {
            call: Mutex::new(Some(call)),
            stdin: Mutex::new(stdin),
            signals,
            pid,
        }
    }
}

fn poisoned() -> PyErr {
    crate::errors::internal("a call handle was poisoned")
}

#[pymethods]
impl Call {
    /// Host pid of the call's init (0 when it never started).
    #[getter]
    fn pid(&self) -> i32 {
        self.pid
    }

    /// The write end of the call's stdin, once (None without `stream_stdin`, or when taken):
    /// an fd owned by the caller; closing it is EOF for the command.
    fn take_stdin(&self) -> PyResult<Option<i32>> {
        let fd = self.stdin.lock().map_err(|_| poisoned())?.take();
        Ok(fd.map(IntoRawFd::into_raw_fd))
    }

    /// Sends `sig` to the call (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 are
    /// forwarded to the command; SIGKILL ends the call). False when the call had ended.
    fn signal(&self, sig: i32) -> PyResult<bool> {
        match &self.signals {
            Some(fd) => cellblock_core::session::signal_call(fd, sig).map_err(to_pyerr),
            None => Ok(false),
        }
    }

    /// Supervises the call to its end and returns the report dict (as `Session.exec`'s).
    /// Output goes to `on_output(stream, bytes)` live; `cancel.is_set()` kills the call.
    /// A tty call's `window()` and `on_terminal(fd)` serve as for `Session.exec`.
    #[pyo3(signature = (on_output=None, cancel=None, window=None, on_terminal=None))]
    fn supervise<'py>(
        &self,
        py: Python<'py>,
        on_output: Option<PyObject>,
        cancel: Option<PyObject>,
        window: Option<PyObject>,
        on_terminal: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let call = self
            .call
            .lock()
            .map_err(|_| poisoned())?
            .take()
            .ok_or_else(|| {
                to_pyerr(cellblock_core::Error::InvalidSpec(
                    "this call is already supervised".into(),
                ))
            })?;
        let report = crate::session::watched_with(
            py,
            on_output,
            cancel,
            false,
            crate::session::TtyHooks {
                window,
                on_terminal,
            },
            |hooks| Ok(call.supervise(hooks)),
        )?;
        crate::report_to_dict(py, &report)
    }
}

/// Adds the class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Call>()
}
