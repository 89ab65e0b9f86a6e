//! `cellblock._native` functions of the fork server (see `cellblock_core::forkserver`).

use crate::errors::to_pyerr;
use pyo3::prelude::*;

/// Sets the command that starts a fork server (once per process; later calls are ignored).
#[pyfunction]
fn forkserver_set_command(argv: Vec<String>) -> PyResult<()> {
    cellblock_core::forkserver::set_command(argv).map_err(to_pyerr)
}

/// Serves as a fork server on fd 3 until it closes; never returns (the process exits).
#[pyfunction]
fn forkserver_serve(py: Python<'_>) -> PyResult<()> {
    py.allow_threads(|| cellblock_core::forkserver::serve())
}

/// Adds the functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forkserver_set_command, m)?)?;
    m.add_function(wrap_pyfunction!(forkserver_serve, m)?)?;
    Ok(())
}
