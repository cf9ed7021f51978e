//! Python state as CBOR: plain, self-describing values, never pickle.
//!
//! | Python | CBOR |
//! |---|---|
//! | `None`, `bool`, `float`, `str`, `bytes`, `list`, `dict` | their CBOR major types |
//! | `int` | an integer; beyond 64 bits a bignum (tags 2 and 3) |
//! | `tuple` | tag [`TUPLE_TAG`] around an array |
//! | `set` | tag 258 (a finite set) around an array |
//! | `datetime.datetime` | tag 0 around its ISO 8601 text (with its offset, if it has one) |
//!
//! Types are matched exactly: a subclass (`defaultdict`, an `IntEnum`) would come back as its
//! base type and behave differently after a restore, so it is refused with an error naming
//! where it sits, never turned into something else in silence.

use ciborium::value::Value;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PySet, PyString, PyTuple};

/// The CBOR tag of a Python tuple (from the first-come-first-served range).
pub(crate) const TUPLE_TAG: u64 = 0x646f_7279;
/// CBOR's registered tag of a finite set.
const SET_TAG: u64 = 258;
/// CBOR's registered tag of a date-time string.
const DATETIME_TAG: u64 = 0;
/// CBOR's registered tags of positive and negative bignums.
const POSITIVE_BIGNUM: u64 = 2;
const NEGATIVE_BIGNUM: u64 = 3;

/// How deeply values may nest, encoding and decoding alike: deeper input is refused before it
/// can exhaust the stack.
pub(crate) const MAX_DEPTH: usize = 128;

/// Why a value could not be encoded or decoded, with where it sits (`counts['a'][2]`).
#[derive(Debug)]
pub(crate) struct CodecError {
    /// Where the value sits, from the outermost container in.
    pub(crate) path: Vec<String>,
    /// What is wrong with it.
    pub(crate) reason: String,
}

impl CodecError {
    fn new(reason: impl Into<String>) -> Self {
        CodecError {
            path: Vec::new(),
            reason: reason.into(),
        }
    }

    fn within(mut self, step: String) -> Self {
        self.path.push(step);
        self
    }

    /// The path as Python would write it, starting at `root`.
    pub(crate) fn at(&self, root: &str) -> String {
        let mut text = root.to_string();
        for step in self.path.iter().rev() {
            text.push_str(step);
        }
        text
    }
}

impl From<PyErr> for CodecError {
    fn from(error: PyErr) -> Self {
        CodecError::new(error.to_string())
    }
}

/// `value` as CBOR.
pub(crate) fn to_cbor(value: &Bound<'_, PyAny>) -> Result<Value, CodecError> {
    encode(value, 0)
}

fn encode(value: &Bound<'_, PyAny>, depth: usize) -> Result<Value, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::new(format!(
            "nested deeper than {MAX_DEPTH} levels"
        )));
    }
    let py = value.py();
    if value.is_none() {
        return Ok(Value::Null);
    }
    if value.is_exact_instance_of::<PyBool>() {
        return Ok(Value::Bool(value.extract::<bool>()?));
    }
    if value.is_exact_instance_of::<PyInt>() {
        return encode_int(value);
    }
    if value.is_exact_instance_of::<PyFloat>() {
        return Ok(Value::Float(value.extract::<f64>()?));
    }
    if value.is_exact_instance_of::<PyString>() {
        return Ok(Value::Text(value.extract::<String>()?));
    }
    if let Ok(bytes) = value.cast_exact::<PyBytes>() {
        return Ok(Value::Bytes(bytes.as_bytes().to_vec()));
    }
    if let Ok(list) = value.cast_exact::<PyList>() {
        return encode_items(list.iter(), depth).map(Value::Array);
    }
    if let Ok(tuple) = value.cast_exact::<PyTuple>() {
        let items = encode_items(tuple.iter(), depth)?;
        return Ok(Value::Tag(TUPLE_TAG, Box::new(Value::Array(items))));
    }
    if let Ok(set) = value.cast_exact::<PySet>() {
        let items = encode_items(set.iter(), depth)?;
        return Ok(Value::Tag(SET_TAG, Box::new(Value::Array(items))));
    }
    if let Ok(dict) = value.cast_exact::<PyDict>() {
        let mut entries = Vec::with_capacity(dict.len());
        for (key, item) in dict.iter() {
            let step = || {
                format!(
                    "[{}]",
                    key.repr().map(|r| r.to_string()).unwrap_or_default()
                )
            };
            let key_value = encode(&key, depth + 1).map_err(|e| e.within(step()))?;
            let item_value = encode(&item, depth + 1).map_err(|e| e.within(step()))?;
            entries.push((key_value, item_value));
        }
        return Ok(Value::Map(entries));
    }
    let datetime = py.import("datetime")?.getattr("datetime")?;
    if value.get_type().is(&datetime) {
        let text: String = value.call_method0("isoformat")?.extract()?;
        return Ok(Value::Tag(DATETIME_TAG, Box::new(Value::Text(text))));
    }
    let type_name = value
        .get_type()
        .fully_qualified_name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "<unknown>".into());
    Err(CodecError::new(format!(
        "unsupported type {type_name}: state holds only None, bool, int, float, str, bytes, \
         list, tuple, dict, set and datetime (exact types, not subclasses)"
    )))
}

fn encode_items<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: usize,
) -> Result<Vec<Value>, CodecError> {
    items
        .enumerate()
        .map(|(i, item)| encode(&item, depth + 1).map_err(|e| e.within(format!("[{i}]"))))
        .collect()
}

fn encode_int(value: &Bound<'_, PyAny>) -> Result<Value, CodecError> {
    if let Ok(small) = value.extract::<i64>() {
        return Ok(Value::Integer(small.into()));
    }
    if let Ok(small) = value.extract::<u64>() {
        return Ok(Value::Integer(small.into()));
    }
    // A bignum: the magnitude's big-endian bytes; a negative n is stored as -1 - n.
    let negative = value.lt(0)?;
    let magnitude = if negative {
        value.neg()?.add(-1)?
    } else {
        value.clone()
    };
    let bits: usize = magnitude.call_method0("bit_length")?.extract()?;
    let bytes: Vec<u8> = magnitude
        .call_method1("to_bytes", (bits.div_ceil(8), "big"))?
        .extract()?;
    let tag = if negative {
        NEGATIVE_BIGNUM
    } else {
        POSITIVE_BIGNUM
    };
    Ok(Value::Tag(tag, Box::new(Value::Bytes(bytes))))
}

/// `value` back as a Python object.
pub(crate) fn from_cbor<'py>(
    py: Python<'py>,
    value: &Value,
) -> Result<Bound<'py, PyAny>, CodecError> {
    decode(py, value, 0)
}

fn decode<'py>(
    py: Python<'py>,
    value: &Value,
    depth: usize,
) -> Result<Bound<'py, PyAny>, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::new(format!(
            "nested deeper than {MAX_DEPTH} levels"
        )));
    }
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Integer(i) => i128::from(*i)
            .into_pyobject(py)
            .map_or_else(|never| match never {}, |i| i.into_any()),
        Value::Float(f) => PyFloat::new(py, *f).into_any(),
        Value::Text(s) => PyString::new(py, s).into_any(),
        Value::Bytes(b) => PyBytes::new(py, b).into_any(),
        Value::Array(items) => PyList::new(py, decode_items(py, items, depth)?)?.into_any(),
        Value::Map(entries) => {
            let dict = PyDict::new(py);
            for (key, item) in entries {
                let key = decode(py, key, depth + 1)?;
                let item = decode(py, item, depth + 1).map_err(|e| {
                    e.within(format!(
                        "[{}]",
                        key.repr().map(|r| r.to_string()).unwrap_or_default()
                    ))
                })?;
                dict.set_item(key, item)?;
            }
            dict.into_any()
        }
        Value::Tag(TUPLE_TAG, inner) => match inner.as_ref() {
            Value::Array(items) => PyTuple::new(py, decode_items(py, items, depth)?)?.into_any(),
            _ => return Err(CodecError::new("a tuple tag around something not an array")),
        },
        Value::Tag(SET_TAG, inner) => match inner.as_ref() {
            Value::Array(items) => PySet::new(py, decode_items(py, items, depth)?)?.into_any(),
            _ => return Err(CodecError::new("a set tag around something not an array")),
        },
        Value::Tag(DATETIME_TAG, inner) => match inner.as_ref() {
            Value::Text(text) => py
                .import("datetime")?
                .getattr("datetime")?
                .call_method1("fromisoformat", (text,))?,
            _ => return Err(CodecError::new("a date-time tag around something not text")),
        },
        Value::Tag(tag @ (POSITIVE_BIGNUM | NEGATIVE_BIGNUM), inner) => match inner.as_ref() {
            Value::Bytes(bytes) => {
                let int = py.get_type::<PyInt>();
                let magnitude = int.call_method1("from_bytes", (PyBytes::new(py, bytes), "big"))?;
                if *tag == NEGATIVE_BIGNUM {
                    magnitude.add(1)?.neg()?
                } else {
                    magnitude
                }
            }
            _ => return Err(CodecError::new("a bignum tag around something not bytes")),
        },
        Value::Tag(tag, _) => return Err(CodecError::new(format!("unknown CBOR tag {tag}"))),
        other => return Err(CodecError::new(format!("unsupported CBOR value {other:?}"))),
    })
}

fn decode_items<'py>(
    py: Python<'py>,
    items: &[Value],
    depth: usize,
) -> Result<Vec<Bound<'py, PyAny>>, CodecError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| decode(py, item, depth + 1).map_err(|e| e.within(format!("[{i}]"))))
        .collect()
}

/// CBOR bytes of `value`.
pub(crate) fn write(value: &Value) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes)
        .map_err(|e| CodecError::new(format!("cannot write CBOR: {e}")))?;
    Ok(bytes)
}

/// The CBOR value in `bytes`, refusing nesting deeper than [`MAX_DEPTH`].
pub(crate) fn read(bytes: &[u8]) -> Result<Value, CodecError> {
    ciborium::de::from_reader_with_recursion_limit(bytes, MAX_DEPTH + 2)
        .map_err(|e| CodecError::new(format!("not valid CBOR state: {e}")))
}
