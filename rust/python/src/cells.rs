//! `cellblock._native` functions of the pre-created cell pool (see `cellblock_core::cell`).

use crate::errors::to_pyerr;
use cellblock_core::cell::{self, pool::Bounds, Prepared};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::time::Duration;

/// Turns cells on or off for runs that do not choose, and optionally sets the pool's bounds.
#[pyfunction]
#[pyo3(signature = (enabled, max_cells=None, per_shape=None))]
fn cells_configure(
    py: Python<'_>,
    enabled: bool,
    max_cells: Option<usize>,
    per_shape: Option<usize>,
) {
    let bounds = (max_cells.is_some() || per_shape.is_some()).then(|| {
        let d = cell::stats();
        Bounds {
            max_cells: max_cells.unwrap_or(d.max_cells),
            per_shape: per_shape.unwrap_or(Bounds::default().per_shape),
        }
    });
    py.allow_threads(|| cell::configure(enabled, bounds));
}

/// Drops the ready cells and waits (at most `timeout` seconds) until every build and teardown
/// is finished. Returns whether everything finished in time.
#[pyfunction]
#[pyo3(signature = (timeout=10.0))]
fn cells_drain(py: Python<'_>, timeout: f64) -> bool {
    let limit = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO);
    py.allow_threads(|| cell::drain(limit))
}

/// Makes cells ready (waiting at most `timeout` seconds) for one run of each spec (JSON, as
/// `run` takes them). Returns {"status": "ready" | "disabled" | "over_bound" | "timed_out",
/// "served": [whether cells serve each spec's shape at all], "detail": str | None}. A spec a
/// run would refuse raises the run's error.
#[pyfunction]
#[pyo3(signature = (specs_json, timeout=30.0))]
fn cells_prepare<'py>(
    py: Python<'py>,
    specs_json: Vec<String>,
    timeout: f64,
) -> PyResult<Bound<'py, PyDict>> {
    let specs = specs_json
        .iter()
        .map(|s| crate::session::parse_spec(s, None, None))
        .collect::<PyResult<Vec<_>>>()?;
    let limit = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO);
    let (served, prepared) = py
        .allow_threads(|| cell::prepare(&specs, limit))
        .map_err(to_pyerr)?;
    let (status, detail) = match prepared {
        Prepared::Ready => ("ready", None),
        Prepared::Disabled => ("disabled", None),
        Prepared::OverBound(n) => (
            "over_bound",
            Some(format!(
                "more cells of one shape or in all than the pool's bound of {n}"
            )),
        ),
        Prepared::TimedOut(e) => (
            "timed_out",
            Some(e.map_or("no cell was ready in time".into(), |e| {
                format!("no cell was ready in time; last build error: {e}")
            })),
        ),
    };
    let d = PyDict::new(py);
    d.set_item("status", status)?;
    d.set_item("served", served)?;
    d.set_item("detail", detail)?;
    Ok(d)
}

/// The pool's counters as a dict.
#[pyfunction]
fn cells_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = py.allow_threads(cell::stats);
    let d = PyDict::new(py);
    d.set_item("enabled", s.enabled)?;
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("built", s.built)?;
    d.set_item("failed", s.failed)?;
    d.set_item("ready", s.ready)?;
    d.set_item("pending_teardown", s.pending_teardown)?;
    d.set_item("teardown_failures", s.teardown_failures)?;
    d.set_item("teardown_errors", &s.teardown_errors)?;
    d.set_item("max_cells", s.max_cells)?;
    d.set_item("cold_netns_ahead", s.parts.netns_hits)?;
    d.set_item("cold_cgroups_ahead", s.parts.cgroup_hits)?;
    d.set_item("parts_ready", s.parts.netns_ready + s.parts.cgroups_ready)?;
    d.set_item("fallbacks", s.fallbacks)?;
    let z = cellblock_core::forkserver::stats();
    d.set_item("forkserver_clones", z.clones)?;
    d.set_item("forkserver_pid", (z.pid > 0).then_some(z.pid))?;
    d.set_item("last_build_error", s.last_build_error)?;
    Ok(d)
}

/// Adds the functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cells_configure, m)?)?;
    m.add_function(wrap_pyfunction!(cells_drain, m)?)?;
    m.add_function(wrap_pyfunction!(cells_stats, m)?)?;
    m.add_function(wrap_pyfunction!(cells_prepare, m)?)?;
    Ok(())
}
