//! `dory._dory`, the native half of the `dory` Python package: the bridge that runs a Python
//! processor on Dory's Rust runtime (`dory-runtime`), the CBOR codec of Python state, and the
//! exception hierarchy.
//!
//! Processor authors import `dory`, not this module; the HTTP endpoints, checkpoints, leases,
//! the snapshot format and publishing are the Rust runtime's, shared with Rust processors.

mod codec;
mod errors;
mod host;
mod state;
#[cfg(test)]
mod testing;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Encodes a processor state (`{attribute: value}`) at `version` as the CBOR document a
/// snapshot holds; raises `StateError` naming the attribute that holds an unsupported value.
#[pyfunction]
fn encode_state<'py>(
    py: Python<'py>,
    version: u64,
    state: &Bound<'py, pyo3::types::PyDict>,
) -> PyResult<Bound<'py, PyBytes>> {
    let bytes = state::encode_document(version, state, "state")?;
    Ok(PyBytes::new(py, &bytes))
}

/// Decodes a CBOR state document into `(version, {attribute: value})`; raises `StateError`
/// for bytes that are not one.
#[pyfunction]
fn decode_state<'py>(py: Python<'py>, data: &[u8]) -> PyResult<(u64, Bound<'py, PyAny>)> {
    state::read(py, data)
}

/// The native module.
#[pymodule]
fn _dory(module: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(module)?;
    module.add_class::<host::Host>()?;
    module.add_function(wrap_pyfunction!(encode_state, module)?)?;
    module.add_function(wrap_pyfunction!(decode_state, module)?)?;
    module.add("MAX_DEPTH", codec::MAX_DEPTH)?;
    Ok(())
}
