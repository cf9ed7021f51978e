//! A Python processor's state as the runtime holds it: the declared attributes of the
//! processor object, encoded as CBOR when the runtime takes a snapshot.
//!
//! The stored form is the CBOR map `{"version": <state_version>, "state": {<attribute>:
//! <value>, ...}}`, inside the runtime's snapshot envelope.

use std::sync::{Arc, Mutex, PoisonError};

use ciborium::value::Value;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::errors::StateError;

/// The processor object whose declared attributes are the state.
pub(crate) struct Live {
    processor: Py<PyAny>,
    /// The encoding a `ctx.checkpoint()` made to check the state, kept for the snapshot the
    /// runtime takes right after it (the processor is parked in between, so it still holds).
    encoded: Mutex<Option<Vec<u8>>>,
}

impl Live {
    pub(crate) fn new(processor: Py<PyAny>) -> Arc<Live> {
        Arc::new(Live {
            processor,
            encoded: Mutex::new(None),
        })
    }

    /// Encodes the declared attributes; an unsupported value is a `StateError` naming the
    /// attribute, its place and its type.
    pub(crate) fn encode(&self) -> PyResult<Vec<u8>> {
        Python::attach(|py| encode(self.processor.bind(py)))
    }

    /// Encodes the state now, raising what is wrong with it, and keeps the bytes for the
    /// snapshot about to be taken.
    pub(crate) fn check(&self) -> PyResult<()> {
        let bytes = self.encode()?;
        *self.encoded.lock().unwrap_or_else(PoisonError::into_inner) = Some(bytes);
        Ok(())
    }

    /// Forgets a kept encoding: the processor runs again and may change its state.
    pub(crate) fn resumed(&self) {
        self.encoded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Sets the declared attributes from a stored state (migrating it if its version is
    /// older), or leaves the defaults when there is none.
    pub(crate) fn apply(&self, stored: &[u8]) -> PyResult<()> {
        Python::attach(|py| apply(self.processor.bind(py), stored))
    }
}

/// The state as the runtime holds it.
#[derive(Default)]
pub(crate) enum PyState {
    /// Nothing stored: the processor starts from its declared defaults.
    #[default]
    Fresh,
    /// Read from a snapshot, not yet given to the processor object.
    Stored(Vec<u8>),
    /// Held by the processor object.
    Live(Arc<Live>),
}

impl Serialize for PyState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PyState::Fresh => serializer.serialize_bytes(&[]),
            PyState::Stored(bytes) => serializer.serialize_bytes(bytes),
            PyState::Live(live) => {
                let kept = live
                    .encoded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                let bytes = match kept {
                    Some(bytes) => bytes,
                    None => live.encode().map_err(ser::Error::custom)?,
                };
                serializer.serialize_bytes(&bytes)
            }
        }
    }
}

impl<'de> Deserialize<'de> for PyState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = PyState;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a Python processor's state as CBOR bytes")
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<PyState, E> {
                self.visit_byte_buf(bytes.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<PyState, E> {
                Ok(if bytes.is_empty() {
                    PyState::Fresh
                } else {
                    PyState::Stored(bytes)
                })
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PyState, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(byte) = seq.next_element::<u8>()? {
                    bytes.push(byte);
                }
                self.visit_byte_buf(bytes)
            }
        }
        deserializer.deserialize_byte_buf(Bytes)
    }
}

/// The processor's class name, for messages.
fn class_name(processor: &Bound<'_, PyAny>) -> String {
    processor
        .get_type()
        .qualname()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "processor".into())
}

fn state_version(processor: &Bound<'_, PyAny>) -> PyResult<u64> {
    processor.getattr("state_version")?.extract().map_err(|_| {
        StateError::new_err(format!(
            "{}.state_version must be a non-negative int",
            class_name(processor)
        ))
    })
}

/// CBOR of `{"version": .., "state": {declared attribute: value}}`.
pub(crate) fn encode(processor: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let declared = processor.call_method0("_dory_state")?;
    let declared = declared.cast::<PyDict>()?;
    encode_document(state_version(processor)?, declared, &class_name(processor))
}

/// The CBOR document of `state` at `version`; errors name `owner.attribute`.
pub(crate) fn encode_document(
    version: u64,
    state: &Bound<'_, PyDict>,
    owner: &str,
) -> PyResult<Vec<u8>> {
    let mut entries = Vec::with_capacity(state.len());
    for (name, value) in state.iter() {
        let name: String = name.extract()?;
        let encoded = codec::to_cbor(&value).map_err(|e| {
            StateError::new_err(format!(
                "cannot save {owner}.{name}: {} (at {})",
                e.reason,
                e.at(&name)
            ))
        })?;
        entries.push((Value::Text(name), encoded));
    }
    let document = Value::Map(vec![
        (
            Value::Text("version".into()),
            Value::Integer(version.into()),
        ),
        (Value::Text("state".into()), Value::Map(entries)),
    ]);
    codec::write(&document).map_err(|e| StateError::new_err(e.reason))
}

/// Gives a stored state to the processor: `_dory_load(version, state)` migrates and sets it.
pub(crate) fn apply(processor: &Bound<'_, PyAny>, stored: &[u8]) -> PyResult<()> {
    let py = processor.py();
    let (version, state) = read(py, stored)?;
    processor.call_method1("_dory_load", (version, state))?;
    Ok(())
}

/// The version and the attribute dict of a stored state.
pub(crate) fn read<'py>(py: Python<'py>, stored: &[u8]) -> PyResult<(u64, Bound<'py, PyAny>)> {
    let bad = |why: String| StateError::new_err(format!("the stored state cannot be read: {why}"));
    let document = codec::read(stored).map_err(|e| bad(e.reason))?;
    let Value::Map(entries) = document else {
        return Err(bad("not a map".into()));
    };
    let field = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, Value::Text(t) if t == key))
            .map(|(_, v)| v)
    };
    let version = match field("version") {
        Some(Value::Integer(v)) => {
            u64::try_from(*v).map_err(|_| bad("a negative version".into()))?
        }
        _ => return Err(bad("no version".into())),
    };
    let Some(state @ Value::Map(_)) = field("state") else {
        return Err(bad("no state map".into()));
    };
    let state = codec::from_cbor(py, state)
        .map_err(|e| bad(format!("{} (at {})", e.reason, e.at("state"))))?;
    Ok((version, state))
}
