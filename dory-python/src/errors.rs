//! Rust errors as Python exceptions: one class per meaning of [`dory_core::Error`], under
//! `dory.DoryError`.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _dory,
    DoryError,
    PyException,
    "Every error Dory raises: catch this one for all of them."
);
create_exception!(
    _dory,
    FencedError,
    DoryError,
    "This instance is no longer entitled to write: another epoch owns the processor. Never \
     retried: the instance stops."
);
create_exception!(
    _dory,
    NotFoundError,
    DoryError,
    "The thing asked for does not exist."
);
create_exception!(
    _dory,
    ConflictError,
    DoryError,
    "A concurrent change won; read again and decide again."
);
create_exception!(
    _dory,
    UnavailableError,
    DoryError,
    "A backend (state store, broker) could not be reached or did not answer in time; \
     retryable."
);
create_exception!(
    _dory,
    InvalidError,
    DoryError,
    "Malformed input: a bad setting, a corrupt snapshot, an oversized body."
);
create_exception!(
    _dory,
    StateError,
    InvalidError,
    "The processor's state cannot be saved or restored: an attribute holds a value of an \
     unsupported type, or a stored state cannot be read or migrated."
);

/// `error` as the Python exception of its meaning.
pub(crate) fn to_py(error: dory_core::Error) -> PyErr {
    use dory_core::Error;
    let message = error.to_string();
    match error {
        Error::Fenced(_) => FencedError::new_err(message),
        Error::NotFound(_) => NotFoundError::new_err(message),
        Error::Conflict(_) => ConflictError::new_err(message),
        Error::Unavailable(_) => UnavailableError::new_err(message),
        Error::Invalid(_) => InvalidError::new_err(message),
        // `dory_core::Error` may grow meanings; until this module maps one, it is a DoryError.
        _ => DoryError::new_err(message),
    }
}

/// Adds the exception classes to the module.
pub(crate) fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add("DoryError", py.get_type::<DoryError>())?;
    module.add("FencedError", py.get_type::<FencedError>())?;
    module.add("NotFoundError", py.get_type::<NotFoundError>())?;
    module.add("ConflictError", py.get_type::<ConflictError>())?;
    module.add("UnavailableError", py.get_type::<UnavailableError>())?;
    module.add("InvalidError", py.get_type::<InvalidError>())?;
    module.add("StateError", py.get_type::<StateError>())?;
    Ok(())
}
