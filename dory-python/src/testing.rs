//! What the unit tests share: an embedded interpreter with a few helpers, and the encoder
//! that wrote every snapshot before the direct one, kept to check that both agree.

use std::ffi::CString;

use ciborium::value::Value;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PySet, PyString, PyTuple};

use crate::codec::{CodecError, MAX_DEPTH, Reader, TUPLE_TAG};

/// Python the tests evaluate their values in.
const PRELUDE: &str = r#"
import collections
import datetime
import math

UTC = datetime.timezone.utc

def same(a, b):
    """Equal values of exactly the same types all the way down; NaN equals NaN and 0.0 is
    not -0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, set):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, datetime.datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return a == b

def nested(depth, make=lambda inner: [inner]):
    """A value `depth` containers deep: its innermost item sits at `depth`."""
    value = 0
    for _ in range(depth):
        value = make(value)
    return value

class Sub(int):
    pass

class Opaque:
    pass
"#;

/// One value of every supported type, with the corner cases of each.
pub(crate) const EVERYTHING: &str = r#"{
    "none": None,
    "yes": True,
    "no": False,
    "ints": [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
             2**64 - 1, -1, -24, -25, -256, -257, -65537, -2**63, -2**63 - 1, -2**64,
             -2**64 - 1],
    "big": [2**64, 2**200 + 1, -(2**100), 255 * 2**64, -(2**64) - 2, 2**1000],
    "floats": [0.0, -0.0, 1.5, -2.0, 65504.0, 65505.0, 2.0**-24, 2.0**-25, 2.0**-14,
               6.0e-8, 0.1, 1.0 / 3, 1.5e-300, 5e-324, 3.4028234663852886e38, 1e39,
               float("inf"), float("-inf"), float("nan")],
    "text": ["", "x", "grüße, 世界 \u0000 end", "y" * 23, "z" * 24, "w" * 300],
    "raw": [b"", b"\x00", bytes(range(256)), b"\xff" * 70000],
    "empties": [[], (), set(), {}, "", b""],
    "pair": (1, ("nested", 2)),
    "numbers": {1, 2, 3},
    "mixed_set": {None, 1, "a", (1, 2), b"b", 2.5},
    "mapping": {"a": 1, 2: "int key", (1, 2): "tuple key", None: [True], b"k": 1.5,
                -3: {"deeper": [{}]}},
    "when": datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC),
    "naive": datetime.datetime(1999, 12, 31, 12, 0),
    "offset": datetime.datetime(2020, 1, 1, 8, 0, tzinfo=datetime.timezone(
        datetime.timedelta(hours=5, minutes=30))),
    "west": datetime.datetime(2020, 1, 1, 8, 0, 0, 1, tzinfo=datetime.timezone(
        datetime.timedelta(hours=-3))),
}"#;

/// Runs `f` attached to the embedded interpreter, starting it first if need be.
pub(crate) fn with_python<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> R {
    Python::initialize();
    Python::attach(f)
}

/// The value of the Python expression `expr`, with the prelude's names in scope.
pub(crate) fn eval<'py>(py: Python<'py>, expr: &str) -> Bound<'py, PyAny> {
    let globals = PyDict::new(py);
    let prelude = CString::new(PRELUDE).expect("no NUL in the prelude");
    py.run(&prelude, Some(&globals), None)
        .expect("the prelude runs");
    let expr = CString::new(expr).expect("no NUL in the expression");
    py.eval(&expr, Some(&globals), None)
        .unwrap_or_else(|e| panic!("evaluating the test value: {e}"))
}

/// Whether `a` and `b` are equal values of the same types all the way down.
pub(crate) fn same(a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> bool {
    eval(a.py(), "same")
        .call1((a, b))
        .and_then(|r| r.extract())
        .expect("same() answers")
}

/// `bytes` read as one complete value.
pub(crate) fn decode<'py>(py: Python<'py>, bytes: &[u8]) -> Result<Bound<'py, PyAny>, CodecError> {
    let mut reader = Reader::new(bytes, 0);
    let value = reader.value(py, 0)?;
    reader.finish()?;
    Ok(value)
}

/// The bytes ciborium writes for `value`.
pub(crate) fn ciborium_bytes(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).expect("ciborium writes any value");
    bytes
}

/// The value tree the encoder before the direct one built for `value`, which it then had
/// ciborium write: the same code, kept to check that stored snapshots and new ones agree.
pub(crate) fn old_to_cbor(value: &Bound<'_, PyAny>) -> Value {
    old_encode(value, 0).expect("the old encoder takes the test values")
}

fn old_encode(value: &Bound<'_, PyAny>, depth: usize) -> PyResult<Value> {
    assert!(depth <= MAX_DEPTH);
    let py = value.py();
    if value.is_none() {
        return Ok(Value::Null);
    }
    if value.is_exact_instance_of::<PyBool>() {
        return Ok(Value::Bool(value.extract::<bool>()?));
    }
    if value.is_exact_instance_of::<PyInt>() {
        return old_encode_int(value);
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
        return old_items(list.iter(), depth).map(Value::Array);
    }
    if let Ok(tuple) = value.cast_exact::<PyTuple>() {
        let items = old_items(tuple.iter(), depth)?;
        return Ok(Value::Tag(TUPLE_TAG, Box::new(Value::Array(items))));
    }
    if let Ok(set) = value.cast_exact::<PySet>() {
        let items = old_items(set.iter(), depth)?;
        return Ok(Value::Tag(258, Box::new(Value::Array(items))));
    }
    if let Ok(dict) = value.cast_exact::<PyDict>() {
        let mut entries = Vec::with_capacity(dict.len());
        for (key, item) in dict.iter() {
            entries.push((old_encode(&key, depth + 1)?, old_encode(&item, depth + 1)?));
        }
        return Ok(Value::Map(entries));
    }
    let datetime = py.import("datetime")?.getattr("datetime")?;
    assert!(value.get_type().is(&datetime), "a supported type");
    let text: String = value.call_method0("isoformat")?.extract()?;
    Ok(Value::Tag(0, Box::new(Value::Text(text))))
}

fn old_items<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: usize,
) -> PyResult<Vec<Value>> {
    items.map(|item| old_encode(&item, depth + 1)).collect()
}

fn old_encode_int(value: &Bound<'_, PyAny>) -> PyResult<Value> {
    if let Ok(small) = value.extract::<i64>() {
        return Ok(Value::Integer(small.into()));
    }
    if let Ok(small) = value.extract::<u64>() {
        return Ok(Value::Integer(small.into()));
    }
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
    let tag = if negative { 3 } else { 2 };
    Ok(Value::Tag(tag, Box::new(Value::Bytes(bytes))))
}
