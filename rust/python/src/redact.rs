//! `cellblock._native.Redactor`: the streaming secret redactor of the core, for Python callers
//! (the agent loop's own output, embedding services).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use cellblock_core::redact::{Redactor, StreamRedactor};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::errors;

/// Buffers above this size are redacted with the GIL released.
const RELEASE_GIL_ABOVE: usize = 64 * 1024;

/// Replaces secrets (raw and in every printed encoding) with `[REDACTED:NAME]`.
///
/// `Redactor(secrets)` takes a dict `{name: value}` or a list of `(name, value)` pairs, values
/// as str or bytes. `redact`/`redact_bytes` are one-shot; `feed`/`finish` redact one stream
/// whose chunks may split a secret anywhere. Values never appear in reprs or errors.
#[pyclass(name = "Redactor", module = "cellblock._native")]
pub struct PyRedactor {
    redactor: Redactor,
    stream: StreamRedactor,
    /// Redactions made by the one-shot methods (the stream keeps its own). Behind a lock so
    /// that threads can share one redactor for one-shot use while the GIL is released.
    oneshot_counts: Mutex<BTreeMap<String, u64>>,
}

#[pymethods]
impl PyRedactor {
    #[new]
    fn new(secrets: &Bound<'_, PyAny>) -> PyResult<Self> {
        let pairs = secret_pairs(secrets)?;
        let redactor = Redactor::new(&pairs).map_err(errors::to_pyerr)?;
        let stream = redactor.stream();
        Ok(PyRedactor {
            redactor,
            stream,
            oneshot_counts: Mutex::default(),
        })
    }

    /// Redacts a complete text.
    fn redact(&self, py: Python<'_>, text: &str) -> String {
        let out = self.redact_oneshot(py, text.as_bytes());
        // Matches of UTF-8 patterns in UTF-8 text fall on character boundaries; only a secret
        // given as non-UTF-8 bytes could cut a character, which is then replaced by U+FFFD.
        match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Redacts a complete byte buffer.
    fn redact_bytes<'py>(&self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let out = self.redact_oneshot(py, data);
        PyBytes::new(py, &out)
    }

    /// Feeds the next chunk of the stream; returns the bytes that are now safe to emit (a tail
    /// that may be the start of a secret is held back until the next call or `finish`).
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
        let mut out = Vec::new();
        let stream = &mut self.stream;
        if data.len() > RELEASE_GIL_ABOVE {
            py.allow_threads(|| stream.feed(data, &mut out));
        } else {
            stream.feed(data, &mut out);
        }
        PyBytes::new(py, &out)
    }

    /// Ends the stream: returns what was held back (redacted). The stream can then be reused.
    fn finish<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut out = Vec::new();
        self.stream.finish(&mut out);
        PyBytes::new(py, &out)
    }

    /// Redactions so far per secret name (one-shot and stream together).
    #[getter]
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let mut total = self.oneshot_counts().clone();
        add_counts(&mut total, self.stream.counts());
        let d = PyDict::new(py);
        for (name, n) in total {
            d.set_item(name, n)?;
        }
        Ok(d)
    }

    /// The secret names, in the order first given.
    #[getter]
    fn names(&self) -> Vec<String> {
        self.redactor.names().to_vec()
    }

    /// Number of distinct byte patterns searched for (all secrets, all encodings).
    #[getter]
    fn pattern_count(&self) -> usize {
        self.redactor.pattern_count()
    }

    fn __repr__(&self) -> String {
        // Names are restricted to [A-Za-z0-9_.-]: quoting needs no escaping.
        let names: Vec<String> = self
            .redactor
            .names()
            .iter()
            .map(|n| format!("'{n}'"))
            .collect();
        format!("Redactor(names=[{}])", names.join(", "))
    }
}

impl PyRedactor {
    fn oneshot_counts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        // Counts stay meaningful even if a holder panicked.
        self.oneshot_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn redact_oneshot(&self, py: Python<'_>, data: &[u8]) -> Vec<u8> {
        let redactor = &self.redactor;
        let (out, counts) = if data.len() > RELEASE_GIL_ABOVE {
            py.allow_threads(|| redactor.redact(data))
        } else {
            redactor.redact(data)
        };
        add_counts(&mut self.oneshot_counts(), &counts);
        out
    }
}

fn add_counts(total: &mut BTreeMap<String, u64>, more: &BTreeMap<String, u64>) {
    for (name, n) in more {
        *total.entry(name.clone()).or_insert(0) += n;
    }
}

/// `{name: value}` or `[(name, value), ...]`, values as str or bytes, in the given order.
fn secret_pairs(secrets: &Bound<'_, PyAny>) -> PyResult<Vec<(String, Vec<u8>)>> {
    let items = match secrets.downcast::<PyDict>() {
        Ok(dict) => dict.items().into_any(),
        Err(_) => secrets.clone(),
    };
    let mut pairs = Vec::new();
    for item in items.try_iter()? {
        let (name, value): (String, Bound<'_, PyAny>) = item?.extract().map_err(|_| {
            PyTypeError::new_err("secrets must be a dict {name: value} or (name, value) pairs")
        })?;
        pairs.push((name, secret_bytes(&value)?));
    }
    Ok(pairs)
}

fn secret_bytes(value: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(s) = value.downcast::<PyString>() {
        // The default error would quote the offending character of the secret.
        let text = s.to_cow().map_err(|_| {
            errors::to_pyerr(cellblock_core::Error::Secret(
                "a secret value must be valid Unicode (no lone surrogates)".into(),
            ))
        })?;
        Ok(text.as_bytes().to_vec())
    } else if let Ok(b) = value.downcast::<PyBytes>() {
        Ok(b.as_bytes().to_vec())
    } else {
        // The type only: the value itself must never reach a message.
        Err(PyTypeError::new_err(format!(
            "a secret value must be str or bytes, not {}",
            value.get_type().name()?
        )))
    }
}

/// Adds the `Redactor` class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRedactor>()
}
