//! `cellblock._native` functions of the zygote (see `cellblock_core::zygote`).

use crate::errors::to_pyerr;
use pyo3::prelude::*;

/// Sets the command that starts a zygote (once per process; later calls are ignored).
#[pyfunction]
fn zygote_set_command(argv: Vec<String>) -> PyResult<()> {
    cellblock_core::zygote::set_command(argv).map_err(to_pyerr)
}

/// Serves as a zygote on fd 3 until it closes; never returns (the process exits).
#[pyfunction]
fn zygote_serve(py: Python<'_>) -> PyResult<()> {
    py.allow_threads(|| cellblock_core::zygote::serve())
}

/// Adds the functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(zygote_set_command, m)?)?;
    m.add_function(wrap_pyfunction!(zygote_serve, m)?)?;
    Ok(())
}
