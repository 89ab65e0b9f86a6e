//! `cellblock._native`: the thin PyO3 layer over cellblock-core.
//!
//! Python builds the run spec (JSON text plus byte buffers); this layer parses it, releases the
//! GIL for the whole run, and returns the report as a dict. Core errors become Python exceptions
//! of the same names (see `errors.rs`).

use cellblock_core::RunReport;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

mod cells;
mod errors;
mod forkserver;
mod process;
mod redact;
mod session;

/// Converts a report into the dict `cellblock.RunResult` is built from.
pub(crate) fn report_to_dict<'py>(py: Python<'py>, r: &RunReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("exit_code", r.exit_code)?;
    d.set_item("signal", r.signal)?;
    let reason = serde_json::to_value(r.reason).map_err(errors::internal)?;
    d.set_item("reason", reason.as_str())?;
    d.set_item("stdout_bytes", PyBytes::new(py, &r.stdout))?;
    d.set_item("stderr_bytes", PyBytes::new(py, &r.stderr))?;
    d.set_item("stdout_truncated", r.stdout_truncated)?;
    d.set_item("stderr_truncated", r.stderr_truncated)?;
    d.set_item("wall_time_s", r.wall_time_s)?;
    d.set_item("cpu_time_s", r.cpu_time_s)?;
    d.set_item("peak_memory_bytes", r.peak_memory_bytes)?;
    // Plain-data parts take their serde (JSON) form so the Python side sees exactly the CLI's
    // shape; converted directly (a `json.loads` of the text cost ~0.1 ms per run).
    let plain = |v: serde_json::Result<serde_json::Value>| -> PyResult<PyObject> {
        json_to_py(py, &v.map_err(errors::internal)?)
    };
    d.set_item("violations", plain(serde_json::to_value(&r.violations))?)?;
    d.set_item("enforcement", plain(serde_json::to_value(&r.enforcement))?)?;
    d.set_item("redactions", plain(serde_json::to_value(&r.redactions))?)?;
    d.set_item("network", plain(serde_json::to_value(&r.network))?)?;
    d.set_item("seccomp_profile", r.seccomp_profile.as_deref())?;
    d.set_item("cleanup_errors", &r.cleanup_errors)?;
    d.set_item("limits_hit", &r.limits_hit)?;
    d.set_item("limits_unverified", &r.limits_unverified)?;
    d.set_item("time_namespace", r.time_namespace)?;
    Ok(d)
}

/// The Python value `json.loads` gives for `v`'s JSON text (integers as int, others as float).
fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<PyObject> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any().unbind(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any().unbind(),
            _ => n
                .as_f64()
                .unwrap_or(f64::NAN)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        Value::Array(a) => {
            let items = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

/// Runs one command in a fresh sandbox.
///
/// `spec_json` is a RunSpec as JSON; `stdin` and `bpf` carry the byte buffers; `on_output`, when
/// given, is called as `on_output(stream: int, data: bytes)` (1 = stdout, 2 = stderr) with
/// redacted output as it arrives; `cancel` (e.g. a `threading.Event`), once set, kills the run;
/// `cells=False` builds the sandbox now even when a pre-created cell is ready; `window()`, when
/// given, is polled while a tty run goes on and returns its terminal's (rows, cols) or None;
/// `on_terminal(fd)` is called once with a tty run's terminal master (borrowed: dup it).
#[pyfunction]
#[pyo3(signature = (spec_json, stdin=None, bpf=None, on_output=None, cancel=None, cells=true, window=None, on_terminal=None))]
#[allow(clippy::too_many_arguments)]
fn run<'py>(
    py: Python<'py>,
    spec_json: &str,
    stdin: Option<Vec<u8>>,
    bpf: Option<Vec<u8>>,
    on_output: Option<PyObject>,
    cancel: Option<PyObject>,
    cells: bool,
    window: Option<PyObject>,
    on_terminal: Option<PyObject>,
) -> PyResult<Bound<'py, PyDict>> {
    let spec = session::parse_spec(spec_json, stdin, bpf)?;
    let tty = session::TtyHooks {
        window,
        on_terminal,
    };
    let report = session::watched(py, on_output, cancel, tty, |hooks| {
        cellblock_core::run_with(&spec, hooks, cells)
    })?;
    report_to_dict(py, &report)
}

/// Facts about this machine that decide how limits are enforced (for reports and benches).
#[pyfunction]
fn host_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let layout = cellblock_core::cgroup::layout();
    d.set_item("root", cellblock_core::spawn::is_root())?;
    d.set_item(
        "cgroup_v2_dir",
        layout.v2_dir.as_ref().map(|p| p.display().to_string()),
    )?;
    d.set_item(
        "cgroup_v2_controllers",
        PyList::new(py, &layout.v2_controllers)?,
    )?;
    let v1: Vec<String> = layout.v1_dirs.iter().map(|(c, _)| c.clone()).collect();
    d.set_item("cgroup_v1_controllers", PyList::new(py, &v1)?)?;
    Ok(d)
}

/// Reclaims the cgroups (and frozen processes) left by dead cellblock processes; how many.
#[pyfunction]
fn sweep_stale_cgroups(py: Python<'_>) -> usize {
    py.allow_threads(cellblock_core::cgroup::sweep_stale)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    redact::register(m)?;
    session::register(m)?;
    process::register(m)?;
    cells::register(m)?;
    forkserver::register(m)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(host_info, m)?)?;
    m.add_function(wrap_pyfunction!(sweep_stale_cgroups, m)?)?;
    // The one definition of the report's vocabularies (cellblock.result uses these).
    let reasons: Vec<&str> = cellblock_core::Reason::ALL
        .iter()
        .map(|r| r.name())
        .collect();
    m.add("REASONS", pyo3::types::PyTuple::new(m.py(), reasons)?)?;
    let enforcers: Vec<&str> = cellblock_core::Enforcer::ALL
        .iter()
        .map(|e| e.name())
        .collect();
    m.add("ENFORCERS", pyo3::types::PyTuple::new(m.py(), enforcers)?)?;
    // Signals a session process's init forwards to its command (Process.signal).
    m.add(
        "FORWARDED_SIGNALS",
        pyo3::types::PyTuple::new(m.py(), cellblock_core::session::FORWARDED_SIGNALS)?,
    )?;
    Ok(())
}
