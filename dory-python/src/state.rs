//! A Python processor's state as the runtime holds it: the declared attributes of the
//! processor object, encoded as CBOR when the runtime takes a snapshot.
//!
//! The stored form is the CBOR map `{"version": <state_version>, "state": {<attribute>:
//! <value>, ...}}`, inside the runtime's snapshot envelope.

use std::mem;
use std::sync::{Arc, Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{self, Serializer};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, Head, Reader};
use crate::errors::StateError;

/// A buffer kept for the next encoding is cut down once its capacity is this many times the
/// encoding it last held, so a state that shrank a lot does not pin its old size for ever...
const SHRINK_FACTOR: usize = 4;
/// ...unless it is this small anyway: not worth giving back.
const KEEP_AT_LEAST: usize = 64 * 1024;

/// The processor object whose declared attributes are the state.
pub(crate) struct Live {
    processor: Py<PyAny>,
    /// The buffer encodings are written into, reused so that a large state is written into
    /// memory already paged in rather than a fresh allocation each time.
    encoding: Mutex<Encoding>,
}

/// The reused buffer, and whether it holds the encoding a `ctx.checkpoint()` made to check the
/// state, kept for the snapshot the runtime takes right after it (the processor is parked in
/// between, so it still holds).
#[derive(Default)]
struct Encoding {
    bytes: Vec<u8>,
    kept: bool,
}

impl Live {
    /// The state of `processor`, a `dory.BaseProcessor`.
    pub(crate) fn new(processor: Py<PyAny>) -> Arc<Live> {
        Arc::new(Live {
            processor,
            encoding: Mutex::new(Encoding::default()),
        })
    }

    /// Takes the buffer out for one encoding. It is never held locked while Python runs: a
    /// thread waiting for the lock while attached would keep the encoding thread from
    /// getting the GIL back if Python code (a finalizer) let it go.
    fn take_encoding(&self) -> Encoding {
        mem::take(&mut *self.encoding.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn put_back(&self, mut encoding: Encoding) {
        let bytes = &mut encoding.bytes;
        // Empty after a failed encoding, which says nothing about the state's size.
        if !bytes.is_empty()
            && bytes.capacity() > KEEP_AT_LEAST
            && bytes.capacity() / SHRINK_FACTOR > bytes.len()
        {
            bytes.shrink_to((bytes.len() + bytes.len() / 2).max(KEEP_AT_LEAST));
        }
        *self.encoding.lock().unwrap_or_else(PoisonError::into_inner) = encoding;
    }

    /// Encodes the declared attributes into `out`, replacing what it held; an unsupported
    /// value is a `StateError` naming the attribute, its place and its type, and leaves `out`
    /// empty.
    fn encode_into(&self, out: &mut Vec<u8>) -> PyResult<()> {
        out.clear();
        let result = Python::attach(|py| encode_into(self.processor.bind(py), out));
        if result.is_err() {
            out.clear();
        }
        result
    }

    /// Encodes the state now, raising what is wrong with it, and keeps the bytes for the
    /// snapshot about to be taken.
    pub(crate) fn check(&self) -> PyResult<()> {
        let mut encoding = self.take_encoding();
        let result = self.encode_into(&mut encoding.bytes);
        encoding.kept = result.is_ok();
        self.put_back(encoding);
        result
    }

    /// Forgets a kept encoding: the processor runs again and may change its state.
    pub(crate) fn resumed(&self) {
        self.encoding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kept = false;
    }

    /// Hands `use_bytes` the state's encoding: the one a checkpoint kept, or a fresh one.
    fn with_encoding<R>(&self, use_bytes: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
        let mut encoding = self.take_encoding();
        let result = if encoding.kept {
            Ok(())
        } else {
            self.encode_into(&mut encoding.bytes)
        };
        let used = result.map(|()| use_bytes(&encoding.bytes));
        // Used once: the processor may change its state before the next snapshot.
        encoding.kept = false;
        self.put_back(encoding);
        used
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
            PyState::Live(live) => live
                .with_encoding(|bytes| serializer.serialize_bytes(bytes))
                .map_err(ser::Error::custom)?,
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
        // The runtime decodes state as `DeserializeOwned` (dory-core's bounded bincode reader),
        // which answers this with one owned copy of exactly the bytes present, handed to
        // `visit_byte_buf` and kept as they are: the state's only copy on the way in.
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

/// CBOR of `{"version": .., "state": {declared attribute: value}}`, appended to `out`.
pub(crate) fn encode_into(processor: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> PyResult<()> {
    let declared = processor.call_method0("_dory_state")?;
    let declared = declared.cast::<PyDict>()?;
    encode_document_into(
        state_version(processor)?,
        declared,
        &class_name(processor),
        out,
    )
}

/// The CBOR document of `state` at `version`; errors name `owner.attribute`.
pub(crate) fn encode_document(
    version: u64,
    state: &Bound<'_, PyDict>,
    owner: &str,
) -> PyResult<Vec<u8>> {
    let mut out = Vec::new();
    encode_document_into(version, state, owner, &mut out)?;
    Ok(out)
}

/// [`encode_document`], appended to `out`; on an error `out` is left as it was.
pub(crate) fn encode_document_into(
    version: u64,
    state: &Bound<'_, PyDict>,
    owner: &str,
    out: &mut Vec<u8>,
) -> PyResult<()> {
    let start = out.len();
    let written = write_document(version, state, owner, out);
    if written.is_err() {
        out.truncate(start);
    }
    written
}

fn write_document(
    version: u64,
    state: &Bound<'_, PyDict>,
    owner: &str,
    out: &mut Vec<u8>,
) -> PyResult<()> {
    codec::write_map_head(out, 2);
    codec::write_text(out, "version");
    codec::write_unsigned(out, version);
    codec::write_text(out, "state");
    let len = state.len();
    codec::write_map_head(out, len);
    let mut written = 0;
    for (name, value) in state.iter() {
        let name: String = name.extract()?;
        codec::write_text(out, &name);
        codec::write_value(&value, out).map_err(|e| {
            StateError::new_err(format!(
                "cannot save {owner}.{name}: {} (at {})",
                e.reason,
                e.at(&name)
            ))
        })?;
        written += 1;
    }
    if written != len {
        return Err(StateError::new_err(format!(
            "cannot save {owner}: its attributes changed while being saved"
        )));
    }
    Ok(())
}

/// Gives a stored state to the processor: `_dory_load(version, state)` migrates and sets it.
pub(crate) fn apply(processor: &Bound<'_, PyAny>, stored: &[u8]) -> PyResult<()> {
    let py = processor.py();
    let (version, state) = read(py, stored)?;
    processor.call_method1("_dory_load", (version, state))?;
    Ok(())
}

/// Where the values of a document's fields start.
#[derive(Default)]
struct Fields {
    version: Option<usize>,
    state: Option<usize>,
}

/// Checks that `stored` is one well-formed CBOR item and, if it is a map, finds its `version`
/// and `state` fields (the first of each, as the reader before this one took them).
fn locate(stored: &[u8]) -> Result<Option<Fields>, CodecError> {
    let mut reader = Reader::new(stored, 0);
    let fields = match reader.head()? {
        Head::Map(len) => {
            let mut fields = Fields::default();
            for _ in 0..len {
                let key = match reader.head()? {
                    Head::Text(len) => Some(reader.text(len)?),
                    other => {
                        reader.skip_rest(other, 0)?;
                        None
                    }
                };
                let at = reader.position();
                match key {
                    Some("version") => _ = fields.version.get_or_insert(at),
                    Some("state") => _ = fields.state.get_or_insert(at),
                    _ => {}
                }
                match reader.head()? {
                    // The state map's values are at the codec's top level, as when written.
                    Head::Map(len) if key == Some("state") => {
                        for _ in 0..len * 2 {
                            reader.skip(0)?;
                        }
                    }
                    other => reader.skip_rest(other, 0)?,
                }
            }
            Some(fields)
        }
        other => {
            reader.skip_rest(other, 0)?;
            None
        }
    };
    reader.finish()?;
    Ok(fields)
}

/// The version and the attribute dict of a stored state.
pub(crate) fn read<'py>(py: Python<'py>, stored: &[u8]) -> PyResult<(u64, Bound<'py, PyAny>)> {
    let bad = |why: String| StateError::new_err(format!("the stored state cannot be read: {why}"));
    // The whole document is checked before any Python object is made from it.
    let fields = locate(stored).map_err(|e| bad(format!("not valid CBOR state: {}", e.reason)))?;
    let Some(fields) = fields else {
        return Err(bad("not a map".into()));
    };
    // Heads already read once, so they cannot fail here.
    let head_at = |at: usize| {
        let mut reader = Reader::new(stored, at);
        reader.head().ok().map(|head| (head, reader))
    };
    let version = match fields.version.and_then(head_at) {
        Some((Head::Unsigned(v), _)) => v,
        Some((Head::Negative(_), _)) => return Err(bad("a negative version".into())),
        _ => return Err(bad("no version".into())),
    };
    let Some((Head::Map(len), mut reader)) = fields.state.and_then(head_at) else {
        return Err(bad("no state map".into()));
    };
    let state = reader
        .map(py, len, 0)
        .map_err(|e| bad(format!("{} (at {})", e.reason, e.at("state"))))?;
    Ok((version, state.into_any()))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use ciborium::value::Value;
    use pyo3::types::PyDict;

    use super::*;
    use crate::testing::{EVERYTHING, ciborium_bytes, eval, old_to_cbor, same, with_python};

    /// The document the encoder before the direct one wrote.
    fn old_document(version: u64, state: &Bound<'_, PyDict>) -> Vec<u8> {
        let entries = state
            .iter()
            .map(|(name, value)| (Value::Text(name.extract().unwrap()), old_to_cbor(&value)))
            .collect();
        ciborium_bytes(&Value::Map(vec![
            (
                Value::Text("version".into()),
                Value::Integer(version.into()),
            ),
            (Value::Text("state".into()), Value::Map(entries)),
        ]))
    }

    /// A processor object as `dory.BaseProcessor` looks to the runtime.
    fn processor<'py>(py: Python<'py>, state: &str) -> Bound<'py, PyAny> {
        let class = eval(
            py,
            "type('Proc', (), {'state_version': 3, \
             '_dory_state': lambda self: self.state, \
             '_dory_load': lambda self, version, state: setattr(self, 'loaded', (version, state))})",
        );
        let object = class.call0().unwrap();
        object.setattr("state", eval(py, state)).unwrap();
        object
    }

    fn read_error(stored: &[u8]) -> String {
        with_python(|py| match read(py, stored) {
            Ok((version, state)) => panic!("{stored:x?} read as version {version}, {state}"),
            Err(e) => e.to_string(),
        })
    }

    #[test]
    fn a_document_round_trips_with_its_version() {
        with_python(|py| {
            let state = eval(py, EVERYTHING);
            let state = state.cast::<PyDict>().unwrap();
            let bytes = encode_document(u64::MAX, state, "Owner").unwrap();
            let (version, back) = read(py, &bytes).unwrap();
            assert_eq!(version, u64::MAX);
            assert!(same(state, &back), "{state} came back as {back}");
        });
    }

    #[test]
    fn documents_ciborium_wrote_read_alike_and_are_written_alike() {
        with_python(|py| {
            let state = eval(py, EVERYTHING);
            let state = state.cast::<PyDict>().unwrap();
            for version in [0, 7, 1 << 40] {
                let old = old_document(version, state);
                let (read_version, back) = read(py, &old).unwrap();
                assert_eq!(read_version, version);
                assert!(same(state, &back), "{state} came back as {back}");
                assert_eq!(encode_document(version, state, "Owner").unwrap(), old);
            }
        });
    }

    #[test]
    fn a_document_that_is_not_a_state_is_refused() {
        let prefix = "the stored state cannot be read: ";
        let document = |entries: &[(&str, Value)]| {
            ciborium_bytes(&Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (Value::Text((*k).into()), v.clone()))
                    .collect(),
            ))
        };
        let state = Value::Map(vec![(Value::Text("a".into()), Value::Integer(1.into()))]);
        let version = Value::Integer(1.into());
        let cases = [
            (
                ciborium_bytes(&Value::Array(vec![])),
                "not a map".to_string(),
            ),
            (document(&[("state", state.clone())]), "no version".into()),
            (
                document(&[
                    ("version", Value::Integer((-1).into())),
                    ("state", state.clone()),
                ]),
                "a negative version".into(),
            ),
            (
                document(&[("version", Value::Float(1.0)), ("state", state.clone())]),
                "no version".into(),
            ),
            (
                document(&[("version", version.clone())]),
                "no state map".into(),
            ),
            (
                document(&[
                    ("version", version.clone()),
                    ("state", Value::Array(vec![])),
                ]),
                "no state map".into(),
            ),
            (
                {
                    let mut bytes =
                        document(&[("version", version.clone()), ("state", state.clone())]);
                    bytes.push(0);
                    bytes
                },
                "not valid CBOR state: 1 bytes after the end of the document".into(),
            ),
            (
                document(&[
                    ("version", version.clone()),
                    (
                        "state",
                        Value::Map(vec![(
                            Value::Text("x".into()),
                            Value::Array(vec![Value::Null, Value::Tag(99, Box::new(Value::Null))]),
                        )]),
                    ),
                ]),
                "unknown CBOR tag 99 (at state['x'][1])".into(),
            ),
            (
                vec![0xa1, 0x61, 0x76],
                "not valid CBOR state: truncated".into(),
            ),
            (
                vec![0xbf, 0xff],
                "not valid CBOR state: a map of indefinite length".into(),
            ),
        ];
        for (stored, expected) in cases {
            let error = read_error(&stored);
            assert!(
                error.starts_with("StateError: ") && error.contains(&format!("{prefix}{expected}")),
                "{stored:x?}: {error}"
            );
        }
    }

    #[test]
    fn fields_beyond_version_and_state_are_stepped_over_and_the_first_of_each_counts() {
        with_python(|py| {
            let text = |t: &str| Value::Text(t.into());
            let stored = ciborium_bytes(&Value::Map(vec![
                (
                    Value::Integer(5.into()),
                    Value::Tag(99, Box::new(Value::Bytes(vec![1; 9]))),
                ),
                (
                    text("state"),
                    Value::Map(vec![(text("a"), Value::Integer(1.into()))]),
                ),
                (
                    text("extra"),
                    Value::Array(vec![Value::Map(vec![]), Value::Float(0.5)]),
                ),
                (text("version"), Value::Integer(4.into())),
                (text("version"), Value::Integer(5.into())),
                (text("state"), Value::Null),
            ]));
            let (version, state) = read(py, &stored).unwrap();
            assert_eq!(version, 4);
            assert!(same(&state, &eval(py, "{'a': 1}")), "{state}");
        });
    }

    #[test]
    fn an_unsupported_value_is_named_and_leaves_the_buffer_as_it_was() {
        with_python(|py| {
            let state = eval(py, "{'fine': 1, 'counts': {'a': [1, 2, Opaque()]}}");
            let mut out = vec![1, 2, 3];
            let error = encode_document_into(1, state.cast().unwrap(), "Owner", &mut out)
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                "StateError: cannot save Owner.counts: unsupported type Opaque: state holds \
                 only None, bool, int, float, str, bytes, list, tuple, dict, set and datetime \
                 (exact types, not subclasses) (at counts['a'][2])"
            );
            assert_eq!(out, [1, 2, 3]);
        });
    }

    #[test]
    fn live_reuses_its_buffer_and_serializes_what_the_checkpoint_checked() {
        let live = with_python(|py| Live::new(processor(py, "{'blob': bytes(1 << 20)}").unbind()));
        live.check().unwrap();
        let (address, capacity) = {
            let encoding = live.encoding.lock().unwrap();
            assert!(encoding.kept);
            (encoding.bytes.as_ptr(), encoding.bytes.capacity())
        };
        assert!(capacity > 1 << 20);
        // A snapshot right after the checkpoint uses its encoding; the next one encodes again,
        // into the same memory.
        let first = live.with_encoding(|bytes| bytes.to_vec()).unwrap();
        assert!(!live.encoding.lock().unwrap().kept);
        live.resumed();
        let second = live.with_encoding(|bytes| bytes.as_ptr()).unwrap();
        assert_eq!(second, address);
        with_python(|py| {
            let (version, state) = read(py, &first).unwrap();
            assert_eq!(version, 3);
            assert!(same(&state, &eval(py, "{'blob': bytes(1 << 20)}")));
        });

        // A state that shrank a lot gives most of the memory back.
        with_python(|py| {
            live.processor
                .bind(py)
                .setattr("state", eval(py, "{'small': 1}"))
                .unwrap();
        });
        live.with_encoding(|_| ()).unwrap();
        assert!(live.encoding.lock().unwrap().bytes.capacity() <= KEEP_AT_LEAST);

        // A failed check keeps nothing, and the snapshot after it fails alike.
        with_python(|py| {
            live.processor
                .bind(py)
                .setattr("state", eval(py, "{'thing': Opaque()}"))
                .unwrap();
        });
        let error = live.check().unwrap_err().to_string();
        assert!(
            error.contains("cannot save Proc.thing: unsupported type Opaque"),
            "{error}"
        );
        assert!(!live.encoding.lock().unwrap().kept);
        assert!(live.with_encoding(|_| ()).is_err());
    }

    #[test]
    fn py_state_serializes_as_bytes_and_reads_back_stored() {
        let live = with_python(|py| Live::new(processor(py, "{'a': [1, 'two']}").unbind()));
        let json = serde_json::to_vec(&PyState::Live(Arc::clone(&live))).unwrap();
        let PyState::Stored(stored) = serde_json::from_slice(&json).unwrap() else {
            panic!("not read back as stored bytes");
        };
        with_python(|py| {
            let (version, state) = read(py, &stored).unwrap();
            assert_eq!(version, 3);
            assert!(same(&state, &eval(py, "{'a': [1, 'two']}")));
            live.apply(&stored).unwrap();
            let loaded = live.processor.bind(py).getattr("loaded").unwrap();
            assert!(same(&loaded, &eval(py, "(3, {'a': [1, 'two']})")));
        });
        let fresh = serde_json::to_vec(&PyState::Fresh).unwrap();
        assert!(matches!(
            serde_json::from_slice(&fresh).unwrap(),
            PyState::Fresh
        ));
    }

    /// Not a test: prints how long a state of one 1 MiB `bytes` takes to encode (into the
    /// reused buffer, as a snapshot does) and to decode, against the encoder and decoder
    /// before through ciborium's value tree. Run it in release:
    /// `cargo test --release -p dory-python -- --ignored --nocapture timing`.
    #[test]
    #[ignore]
    fn timing_of_a_one_mib_state() {
        const ROUNDS: usize = 200;
        fn median(mut times: Vec<f64>) -> f64 {
            times.sort_by(f64::total_cmp);
            times[times.len() / 2]
        }
        fn time(mut f: impl FnMut()) -> f64 {
            let times = (0..ROUNDS)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            median(times)
        }
        let live = with_python(|py| {
            Live::new(processor(py, "{'blob': __import__('os').urandom(1 << 20), 'n': 7}").unbind())
        });
        let encode = time(|| {
            live.with_encoding(|bytes| assert!(bytes.len() > 1 << 20))
                .unwrap();
        });
        let stored = live.with_encoding(<[u8]>::to_vec).unwrap();
        let decode = with_python(|py| time(|| drop(read(py, &stored).unwrap())));
        let old_encode = with_python(|py| {
            let state = live.processor.bind(py).getattr("state").unwrap();
            let state = state.cast::<PyDict>().unwrap();
            time(|| assert!(old_document(3, state).len() > 1 << 20))
        });
        let old_decode = with_python(|py| {
            time(|| {
                let value: Value = ciborium::de::from_reader(&stored[..]).unwrap();
                let Value::Map(entries) = value else { panic!() };
                let Value::Map(state) = &entries[1].1 else {
                    panic!()
                };
                let Value::Bytes(blob) = &state[0].1 else {
                    panic!()
                };
                drop(pyo3::types::PyBytes::new(py, blob));
            })
        });
        println!(
            "1 MiB state, median of {ROUNDS}: encode {encode:.3} ms (before: {old_encode:.3} ms), \
             decode {decode:.3} ms (before: {old_decode:.3} ms)"
        );
    }
}
