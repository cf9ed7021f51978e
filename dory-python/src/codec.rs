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
//!
//! Both directions go straight between Python objects and bytes, with no tree of values in
//! between: a state holding a large `bytes` is copied once into the (reused) output buffer when
//! it is saved, and once out of the input when it is restored. The bytes are those `ciborium`
//! wrote for the same values before (lengths and integers in their shortest form, floats in the
//! shortest width that holds them exactly), so stored snapshots and new ones read alike.
//!
//! The reader trusts nothing in its input: lengths are checked against the bytes actually left
//! before anything is allocated, nesting is bounded by [`MAX_DEPTH`], and indefinite lengths,
//! unknown simple values and unknown tags are refused with the byte offset where they sit.

use pyo3::IntoPyObjectExt;
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

/// CBOR's major types, as the top three bits of an item's first byte.
const UNSIGNED: u8 = 0;
const NEGATIVE: u8 = 1;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;

/// The simple values the format uses (major type 7).
const FALSE: u8 = 20;
const TRUE: u8 = 21;
const NULL: u8 = 22;
const UNDEFINED: u8 = 23;

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

fn too_deep() -> CodecError {
    CodecError::new(format!("nested deeper than {MAX_DEPTH} levels"))
}

// Encoding.

/// Appends the head of an item: its major type and `argument` (a value, a length or a tag) in
/// the shortest form, as RFC 8949's preferred serialization (and ciborium) has it.
pub(crate) fn write_head(out: &mut Vec<u8>, major: u8, argument: u64) {
    let major = major << 5;
    if argument < 24 {
        out.push(major | argument as u8);
    } else if let Ok(byte) = u8::try_from(argument) {
        out.extend_from_slice(&[major | 24, byte]);
    } else if let Ok(short) = u16::try_from(argument) {
        out.push(major | 25);
        out.extend_from_slice(&short.to_be_bytes());
    } else if let Ok(word) = u32::try_from(argument) {
        out.push(major | 26);
        out.extend_from_slice(&word.to_be_bytes());
    } else {
        out.push(major | 27);
        out.extend_from_slice(&argument.to_be_bytes());
    }
}

/// Appends `text` as a CBOR text string.
pub(crate) fn write_text(out: &mut Vec<u8>, text: &str) {
    write_head(out, TEXT, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Appends `n` as a CBOR unsigned integer.
pub(crate) fn write_unsigned(out: &mut Vec<u8>, n: u64) {
    write_head(out, UNSIGNED, n);
}

/// Appends the head of a map of `len` entries; the entries follow, key before value.
pub(crate) fn write_map_head(out: &mut Vec<u8>, len: usize) {
    write_head(out, MAP, len as u64);
}

/// Appends `value` in the narrowest of half, single and double precision that gives back
/// exactly its bits, which is what ciborium writes for a float.
fn write_float(out: &mut Vec<u8>, value: f64) {
    if let Some(half) = exact_f16(value) {
        out.push(0xf9);
        out.extend_from_slice(&half.to_be_bytes());
        return;
    }
    let single = value as f32;
    if f64::from(single).to_bits() == value.to_bits() {
        out.push(0xfa);
        out.extend_from_slice(&single.to_be_bytes());
    } else {
        out.push(0xfb);
        out.extend_from_slice(&value.to_be_bytes());
    }
}

/// The half-precision bits of `value` if reading them back gives exactly `value`'s bits.
fn exact_f16(value: f64) -> Option<u16> {
    const LOW_42: u64 = (1 << 42) - 1;
    const QUIET: u64 = 1 << 51;
    let bits = value.to_bits();
    let sign = ((bits >> 48) & 0x8000) as u16;
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let mantissa = bits & ((1 << 52) - 1);
    match exponent {
        0x7ff if mantissa == 0 => Some(sign | 0x7c00),
        // A half NaN keeps the top ten bits of the payload and always reads back quiet.
        0x7ff if mantissa & LOW_42 == 0 && mantissa & QUIET != 0 => {
            Some(sign | 0x7c00 | (mantissa >> 42) as u16)
        }
        0x7ff => None,
        // Zero; a double's subnormals are far below the smallest half.
        0 => (mantissa == 0).then_some(sign),
        _ => {
            let unbiased = exponent - 1023;
            if (-14..=15).contains(&unbiased) {
                (mantissa & LOW_42 == 0)
                    .then(|| sign | (((unbiased + 15) as u16) << 10) | (mantissa >> 42) as u16)
            } else if (-24..-14).contains(&unbiased) {
                // A half subnormal is a multiple of 2^-24 below 2^-14: the significand, with
                // its implicit bit, must have no bits below that.
                let significand = (1 << 52) | mantissa;
                let shift = 52 - (unbiased + 24);
                (significand & ((1 << shift) - 1) == 0)
                    .then(|| sign | (significand >> shift) as u16)
            } else {
                None
            }
        }
    }
}

/// Appends `value`'s CBOR to `out`. On an error `out` ends in part of an item: the caller
/// drops what it wrote.
pub(crate) fn write_value(value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    encode(value, out, 0)
}

fn encode(value: &Bound<'_, PyAny>, out: &mut Vec<u8>, depth: usize) -> Result<(), CodecError> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    let py = value.py();
    if value.is_none() {
        out.push(0xe0 | NULL);
        return Ok(());
    }
    if let Ok(boolean) = value.cast_exact::<PyBool>() {
        out.push(0xe0 | if boolean.is_true() { TRUE } else { FALSE });
        return Ok(());
    }
    if value.is_exact_instance_of::<PyInt>() {
        return encode_int(value, out);
    }
    if let Ok(float) = value.cast_exact::<PyFloat>() {
        write_float(out, float.value());
        return Ok(());
    }
    if let Ok(text) = value.cast_exact::<PyString>() {
        write_text(out, text.to_str()?);
        return Ok(());
    }
    if let Ok(bytes) = value.cast_exact::<PyBytes>() {
        let bytes = bytes.as_bytes();
        write_head(out, BYTES, bytes.len() as u64);
        out.extend_from_slice(bytes);
        return Ok(());
    }
    if let Ok(list) = value.cast_exact::<PyList>() {
        return encode_items(list.iter(), list.len(), out, depth);
    }
    if let Ok(tuple) = value.cast_exact::<PyTuple>() {
        write_head(out, TAG, TUPLE_TAG);
        return encode_items(tuple.iter(), tuple.len(), out, depth);
    }
    if let Ok(set) = value.cast_exact::<PySet>() {
        write_head(out, TAG, SET_TAG);
        return encode_items(set.iter(), set.len(), out, depth);
    }
    if let Ok(dict) = value.cast_exact::<PyDict>() {
        let len = dict.len();
        write_map_head(out, len);
        let mut written = 0;
        for (key, item) in dict.iter() {
            let step = || {
                format!(
                    "[{}]",
                    key.repr().map(|r| r.to_string()).unwrap_or_default()
                )
            };
            encode(&key, out, depth + 1).map_err(|e| e.within(step()))?;
            encode(&item, out, depth + 1).map_err(|e| e.within(step()))?;
            written += 1;
        }
        return same_size(len, written);
    }
    let datetime = py.import("datetime")?.getattr("datetime")?;
    if value.get_type().is(&datetime) {
        let text = value.call_method0("isoformat")?;
        write_head(out, TAG, DATETIME_TAG);
        write_text(out, text.cast::<PyString>().map_err(PyErr::from)?.to_str()?);
        return Ok(());
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

/// Writes an array of `len` items, then the items.
fn encode_items<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<(), CodecError> {
    write_head(out, ARRAY, len as u64);
    let mut written = 0;
    for (i, item) in items.enumerate() {
        encode(&item, out, depth + 1).map_err(|e| e.within(format!("[{i}]")))?;
        written += 1;
    }
    same_size(len, written)
}

/// The length went into the head before the items were written: a container that changed
/// size in between (only Python code run meanwhile, a finalizer, could do it) would leave a
/// document that does not read back.
fn same_size(announced: usize, written: usize) -> Result<(), CodecError> {
    if announced == written {
        Ok(())
    } else {
        Err(CodecError::new(format!(
            "changed size while being saved ({announced} items, then {written})"
        )))
    }
}

fn encode_int(value: &Bound<'_, PyAny>, out: &mut Vec<u8>) -> Result<(), CodecError> {
    if let Ok(small) = value.extract::<i64>() {
        match u64::try_from(small) {
            Ok(n) => write_head(out, UNSIGNED, n),
            // CBOR stores a negative n as -1 - n, which is !n in two's complement.
            Err(_) => write_head(out, NEGATIVE, !small as u64),
        }
        return Ok(());
    }
    if let Ok(large) = value.extract::<u64>() {
        write_head(out, UNSIGNED, large);
        return Ok(());
    }
    // Below i64::MIN a bignum, although CBOR's negative integers reach -2^64: the encoder
    // always did so, and the same value keeps the same bytes.
    // A bignum: the magnitude's big-endian bytes; a negative n is stored as -1 - n.
    let negative = value.lt(0)?;
    let magnitude = if negative {
        value.neg()?.add(-1)?
    } else {
        value.clone()
    };
    let bits: usize = magnitude.call_method0("bit_length")?.extract()?;
    let bytes = magnitude.call_method1("to_bytes", (bits.div_ceil(8), "big"))?;
    let bytes = bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes();
    let tag = if negative {
        NEGATIVE_BIGNUM
    } else {
        POSITIVE_BIGNUM
    };
    write_head(out, TAG, tag);
    write_head(out, BYTES, bytes.len() as u64);
    out.extend_from_slice(bytes);
    Ok(())
}

// Decoding.

/// An item's head, as [`Reader::head`] reads it. Lengths are already checked against the
/// input left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Head {
    /// An unsigned integer.
    Unsigned(u64),
    /// The negative integer -1 - n.
    Negative(u64),
    /// A byte string of this many bytes.
    Bytes(usize),
    /// A text string of this many bytes.
    Text(usize),
    /// An array of this many items.
    Array(usize),
    /// A map of this many entries.
    Map(usize),
    /// A tag; its item follows.
    Tag(u64),
    /// A simple value (false, true, null, ...).
    Simple(u8),
    /// A float of any width.
    Float(f64),
}

/// A cursor over CBOR input that never reads past its end.
pub(crate) struct Reader<'a> {
    input: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Reads `input` from `at`.
    pub(crate) fn new(input: &'a [u8], at: usize) -> Self {
        Reader { input, at }
    }

    /// The offset of the next byte to read.
    pub(crate) fn position(&self) -> usize {
        self.at
    }

    fn left(&self) -> usize {
        self.input.len() - self.at
    }

    /// The next `n` bytes of the item that starts at `start`.
    fn take(&mut self, n: usize, start: usize) -> Result<&'a [u8], CodecError> {
        if n > self.left() {
            return Err(CodecError::new(format!(
                "truncated: the item at byte {start} needs {n} more bytes, {} are left",
                self.left()
            )));
        }
        let bytes = &self.input[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, start: usize) -> Result<[u8; N], CodecError> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(self.take(N, start)?);
        Ok(bytes)
    }

    /// Refuses anything after the document.
    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        match self.left() {
            0 => Ok(()),
            n => Err(CodecError::new(format!(
                "{n} bytes after the end of the document (from byte {})",
                self.at
            ))),
        }
    }

    /// Reads the next item's head.
    pub(crate) fn head(&mut self) -> Result<Head, CodecError> {
        let start = self.at;
        let [first] = self.array::<1>(start)?;
        let major = first >> 5;
        let info = first & 0x1f;
        let argument = match info {
            0..=23 => u64::from(info),
            24 => {
                let [byte] = self.array::<1>(start)?;
                if major == 7 && byte < 32 {
                    return Err(CodecError::new(format!(
                        "the simple value {byte} at byte {start} in two bytes, where one is \
                         the only valid form"
                    )));
                }
                u64::from(byte)
            }
            25 => {
                let bytes = self.array::<2>(start)?;
                if major == 7 {
                    return Ok(Head::Float(f16_to_f64(u16::from_be_bytes(bytes))));
                }
                u64::from(u16::from_be_bytes(bytes))
            }
            26 => {
                let bytes = self.array::<4>(start)?;
                if major == 7 {
                    return Ok(Head::Float(f64::from(f32::from_be_bytes(bytes))));
                }
                u64::from(u32::from_be_bytes(bytes))
            }
            27 => {
                let bytes = self.array::<8>(start)?;
                if major == 7 {
                    return Ok(Head::Float(f64::from_be_bytes(bytes)));
                }
                u64::from_be_bytes(bytes)
            }
            28..=30 => {
                return Err(CodecError::new(format!(
                    "reserved additional information {info} in the item at byte {start}"
                )));
            }
            _ => {
                return Err(CodecError::new(match major {
                    BYTES | TEXT | ARRAY | MAP => format!(
                        "{} of indefinite length at byte {start}: only definite lengths are read",
                        kind(major)
                    ),
                    7 => format!("a break code at byte {start} outside any indefinite-length item"),
                    _ => format!(
                        "{} at byte {start} with an indefinite length, which it cannot have",
                        kind(major)
                    ),
                }));
            }
        };
        Ok(match major {
            UNSIGNED => Head::Unsigned(argument),
            NEGATIVE => Head::Negative(argument),
            BYTES => Head::Bytes(self.length(argument, 1, major, start)?),
            TEXT => Head::Text(self.length(argument, 1, major, start)?),
            ARRAY => Head::Array(self.length(argument, 1, major, start)?),
            MAP => Head::Map(self.length(argument, 2, major, start)?),
            TAG => Head::Tag(argument),
            // Only 24 (one extra byte) gets here with an argument beyond 23.
            _ => Head::Simple(argument as u8),
        })
    }

    /// `claimed` as a length, if the input left can hold it (every item takes at least a byte,
    /// so an array of n items needs n bytes, a map 2n): a forged length is refused here,
    /// before anything is allocated for it.
    fn length(
        &self,
        claimed: u64,
        bytes_each: usize,
        major: u8,
        start: usize,
    ) -> Result<usize, CodecError> {
        let left = self.left();
        match usize::try_from(claimed) {
            Ok(n) if n <= left / bytes_each => Ok(n),
            _ => Err(CodecError::new(format!(
                "{} at byte {start} claims a length of {claimed}, more than the {left} bytes \
                 left can hold",
                kind(major)
            ))),
        }
    }

    /// The text of a text string whose head said `len`.
    pub(crate) fn text(&mut self, len: usize) -> Result<&'a str, CodecError> {
        let start = self.at;
        std::str::from_utf8(self.take(len, start)?).map_err(|e| {
            CodecError::new(format!("the text at byte {start} is not valid UTF-8: {e}"))
        })
    }

    /// Steps over the next item, checking its structure and nesting but building nothing.
    pub(crate) fn skip(&mut self, depth: usize) -> Result<(), CodecError> {
        let head = self.head()?;
        self.skip_rest(head, depth)
    }

    /// Steps over what follows `head` in its item.
    pub(crate) fn skip_rest(&mut self, head: Head, depth: usize) -> Result<(), CodecError> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        match head {
            Head::Bytes(len) | Head::Text(len) => {
                let start = self.at;
                self.take(len, start)?;
            }
            Head::Array(len) => {
                for _ in 0..len {
                    self.skip(depth + 1)?;
                }
            }
            Head::Map(len) => {
                for _ in 0..len * 2 {
                    self.skip(depth + 1)?;
                }
            }
            // A tag adds no level, as in the encoder: its item sits where the tag does. Tags
            // on tags are followed in a loop, so a long chain of them cannot exhaust the stack.
            Head::Tag(_) => {
                let mut item = self.head()?;
                while let Head::Tag(_) = item {
                    item = self.head()?;
                }
                self.skip_rest(item, depth)?;
            }
            Head::Unsigned(_) | Head::Negative(_) | Head::Simple(_) | Head::Float(_) => {}
        }
        Ok(())
    }

    /// Reads the next item as a Python object.
    pub(crate) fn value<'py>(
        &mut self,
        py: Python<'py>,
        depth: usize,
    ) -> Result<Bound<'py, PyAny>, CodecError> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        let start = self.at;
        Ok(match self.head()? {
            Head::Unsigned(n) => n.into_bound_py_any(py)?,
            Head::Negative(n) => (-1 - i128::from(n)).into_bound_py_any(py)?,
            Head::Float(f) => PyFloat::new(py, f).into_any(),
            Head::Bytes(len) => PyBytes::new(py, self.take(len, start)?).into_any(),
            Head::Text(len) => PyString::new(py, self.text(len)?).into_any(),
            Head::Array(len) => PyList::new(py, self.items(py, len, depth)?)?.into_any(),
            Head::Map(len) => self.map(py, len, depth + 1)?.into_any(),
            Head::Tag(tag) => self.tagged(py, tag, depth)?,
            Head::Simple(FALSE) => PyBool::new(py, false).to_owned().into_any(),
            Head::Simple(TRUE) => PyBool::new(py, true).to_owned().into_any(),
            Head::Simple(NULL) => py.None().into_bound(py),
            Head::Simple(UNDEFINED) => {
                return Err(CodecError::new(format!(
                    "the simple value undefined at byte {start}: state writes None as null"
                )));
            }
            Head::Simple(other) => {
                return Err(CodecError::new(format!(
                    "unknown simple value {other} at byte {start}"
                )));
            }
        })
    }

    /// Reads the `len` entries of a map whose head is read into a dict; its keys and values
    /// sit at `depth`.
    pub(crate) fn map<'py>(
        &mut self,
        py: Python<'py>,
        len: usize,
        depth: usize,
    ) -> Result<Bound<'py, PyDict>, CodecError> {
        let dict = PyDict::new(py);
        for _ in 0..len {
            let key = self.value(py, depth)?;
            let item = self.value(py, depth).map_err(|e| {
                e.within(format!(
                    "[{}]",
                    key.repr().map(|r| r.to_string()).unwrap_or_default()
                ))
            })?;
            dict.set_item(key, item)?;
        }
        Ok(dict)
    }

    fn items<'py>(
        &mut self,
        py: Python<'py>,
        len: usize,
        depth: usize,
    ) -> Result<Vec<Bound<'py, PyAny>>, CodecError> {
        // `len` is at most the bytes left, so this allocation is bounded by the input.
        let mut items = Vec::with_capacity(len);
        for i in 0..len {
            items.push(
                self.value(py, depth + 1)
                    .map_err(|e| e.within(format!("[{i}]")))?,
            );
        }
        Ok(items)
    }

    /// The item of a tag whose head said `tag`.
    fn tagged<'py>(
        &mut self,
        py: Python<'py>,
        tag: u64,
        depth: usize,
    ) -> Result<Bound<'py, PyAny>, CodecError> {
        let start = self.at;
        Ok(match tag {
            TUPLE_TAG => match self.head()? {
                Head::Array(len) => PyTuple::new(py, self.items(py, len, depth)?)?.into_any(),
                _ => return Err(CodecError::new("a tuple tag around something not an array")),
            },
            SET_TAG => match self.head()? {
                Head::Array(len) => PySet::new(py, self.items(py, len, depth)?)?.into_any(),
                _ => return Err(CodecError::new("a set tag around something not an array")),
            },
            DATETIME_TAG => match self.head()? {
                Head::Text(len) => {
                    let text = self.text(len)?;
                    py.import("datetime")?
                        .getattr("datetime")?
                        .call_method1("fromisoformat", (text,))?
                }
                _ => return Err(CodecError::new("a date-time tag around something not text")),
            },
            POSITIVE_BIGNUM | NEGATIVE_BIGNUM => match self.head()? {
                Head::Bytes(len) => {
                    let bytes = PyBytes::new(py, self.take(len, start)?);
                    let int = py.get_type::<PyInt>();
                    let magnitude = int.call_method1("from_bytes", (bytes, "big"))?;
                    if tag == NEGATIVE_BIGNUM {
                        magnitude.add(1)?.neg()?
                    } else {
                        magnitude
                    }
                }
                _ => return Err(CodecError::new("a bignum tag around something not bytes")),
            },
            tag => return Err(CodecError::new(format!("unknown CBOR tag {tag}"))),
        })
    }
}

/// The name of a major type, for messages.
fn kind(major: u8) -> &'static str {
    match major {
        UNSIGNED => "an unsigned integer",
        NEGATIVE => "a negative integer",
        BYTES => "a byte string",
        TEXT => "a text string",
        ARRAY => "an array",
        MAP => "a map",
        TAG => "a tag",
        _ => "a simple value",
    }
}

/// A half-precision float's value; a NaN keeps its payload and reads back quiet, as ciborium
/// (through the `half` crate) reads it.
fn f16_to_f64(half: u16) -> f64 {
    let sign = if half & 0x8000 == 0 { 1.0 } else { -1.0 };
    let exponent = i32::from((half >> 10) & 0x1f);
    let mantissa = half & 0x3ff;
    match exponent {
        0 => sign * f64::from(mantissa) * 2f64.powi(-24),
        0x1f if mantissa == 0 => sign * f64::INFINITY,
        0x1f => f64::from_bits(
            (u64::from(half & 0x8000) << 48) | 0x7ff8_0000_0000_0000 | (u64::from(mantissa) << 42),
        ),
        _ => sign * f64::from(0x400 | mantissa) * 2f64.powi(exponent - 25),
    }
}

#[cfg(test)]
mod tests {
    use ciborium::value::Value;
    use pyo3::prelude::*;

    use super::*;
    use crate::testing::{
        EVERYTHING, ciborium_bytes, decode, eval, old_to_cbor, same, with_python,
    };

    fn encode_all(value: &Bound<'_, PyAny>) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::new();
        write_value(value, &mut out)?;
        Ok(out)
    }

    fn ciborium_read(bytes: &[u8]) -> Value {
        ciborium::de::from_reader(bytes).expect("ciborium reads it")
    }

    #[test]
    fn every_supported_type_round_trips() {
        with_python(|py| {
            let everything = eval(py, EVERYTHING);
            let bytes = encode_all(&everything).unwrap();
            let back = decode(py, &bytes).unwrap();
            assert!(same(&everything, &back), "{everything} came back as {back}");
            // The checker itself tells values apart.
            assert!(!same(&eval(py, "[0.0, 1]"), &eval(py, "[-0.0, 1]")));
            assert!(!same(&eval(py, "(1,)"), &eval(py, "[1]")));
        });
    }

    #[test]
    fn the_writer_writes_the_bytes_ciborium_wrote() {
        with_python(|py| {
            let everything = eval(py, EVERYTHING);
            let mut values = vec![everything.clone()];
            for (_, value) in everything.cast::<PyDict>().unwrap().iter() {
                values.push(value.clone());
                if let Ok(list) = value.cast_exact::<PyList>() {
                    values.extend(list.iter());
                }
            }
            for value in values {
                let old = old_to_cbor(&value);
                let old_bytes = ciborium_bytes(&old);
                let new_bytes = encode_all(&value).unwrap();
                assert_eq!(new_bytes, old_bytes, "{value}");
                // Debug, not ==, so that a NaN compares equal to itself.
                assert_eq!(
                    format!("{:?}", ciborium_read(&new_bytes)),
                    format!("{:?}", ciborium_read(&old_bytes)),
                    "{value}"
                );
            }
        });
    }

    #[test]
    fn what_ciborium_wrote_reads_back_as_the_value_it_held() {
        with_python(|py| {
            let everything = eval(py, EVERYTHING);
            let stored = ciborium_bytes(&old_to_cbor(&everything));
            let back = decode(py, &stored).unwrap();
            assert!(same(&everything, &back), "{everything} came back as {back}");

            // Forms ciborium writes for values the encoder never gave it, and forms longer
            // than needed: all still plain values.
            let cases: Vec<(Value, &str)> = vec![
                (
                    Value::Integer((-(1i128 << 64)).try_into().unwrap()),
                    "-2**64",
                ),
                (Value::Integer(u64::MAX.into()), "2**64 - 1"),
                (Value::Float(1.5), "1.5"),
                (
                    Value::Float(f64::from(0.1f32)),
                    "float.fromhex('0x1.99999a0000000p-4')",
                ),
                (
                    Value::Tag(2, Box::new(Value::Bytes(vec![0, 0, 1, 0]))),
                    "256",
                ),
                (Value::Tag(3, Box::new(Value::Bytes(vec![]))), "-1"),
                (
                    Value::Tag(2, Box::new(Value::Bytes(vec![1; 40]))),
                    "int.from_bytes(b'\\x01' * 40, 'big')",
                ),
            ];
            for (value, expected) in cases {
                let back = decode(py, &ciborium_bytes(&value)).unwrap();
                assert!(same(&back, &eval(py, expected)), "{value:?} read as {back}");
            }
            let longer: [(&[u8], &str); 5] = [
                (&[0x18, 0x05], "5"),
                (&[0x3b, 0, 0, 0, 0, 0, 0, 0, 0], "-1"),
                (&[0x59, 0, 1, 0x61], "b'a'"),
                (&[0xfa, 0x3f, 0xc0, 0, 0], "1.5"),
                (&[0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0], "1.5"),
            ];
            for (bytes, expected) in longer {
                let back = decode(py, bytes).unwrap();
                assert!(
                    same(&back, &eval(py, expected)),
                    "{bytes:x?} read as {back}"
                );
            }
        });
    }

    /// A few hundred thousand doubles: the specials, every kind of NaN, values exact in half
    /// and single precision, and random bit patterns.
    fn doubles() -> Vec<f64> {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            65504.0,
            65505.0,
            65520.0,
            2f64.powi(-24),
            2f64.powi(-25),
            2f64.powi(-14),
            2f64.powi(-14) * (1.0 - 2f64.powi(-10)),
            3.0 * 2f64.powi(-24),
            3.0 * 2f64.powi(-25),
            f64::from(f32::MAX),
            f64::from(f32::MIN_POSITIVE),
            f64::from(f32::from_bits(1)),
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::from_bits(1),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            -f64::NAN,
        ];
        for payload in [
            1u64,
            1 << 41,
            1 << 42,
            1 << 50,
            (1 << 51) - 1,
            3 << 42,
            1 << 29,
        ] {
            for quiet in [0, 1u64 << 51] {
                for sign in [0, 1u64 << 63] {
                    values.push(f64::from_bits(
                        sign | 0x7ff0_0000_0000_0000 | quiet | payload,
                    ));
                }
            }
        }
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..100_000 {
            let bits = next();
            values.push(f64::from_bits(bits));
            values.push(f64::from(f32::from_bits(bits as u32)));
            values.push(f16_to_f64(bits as u16));
        }
        values
    }

    #[test]
    fn floats_take_the_width_ciborium_gives_them() {
        let mut widths = [0; 3];
        for value in doubles() {
            let mut ours = Vec::new();
            write_float(&mut ours, value);
            let theirs = ciborium_bytes(&Value::Float(value));
            assert_eq!(ours, theirs, "{value:e} ({:#018x})", value.to_bits());
            widths[match ours.len() {
                3 => 0,
                5 => 1,
                _ => 2,
            }] += 1;
        }
        assert!(
            widths.iter().all(|&n| n > 1000),
            "every width is tried: {widths:?}"
        );
    }

    #[test]
    fn floats_of_every_width_read_as_ciborium_reads_them() {
        let check = |bytes: &[u8]| {
            let Ok(Head::Float(ours)) = Reader::new(bytes, 0).head() else {
                panic!("{bytes:x?} is not read as a float");
            };
            let Value::Float(theirs) = ciborium_read(bytes) else {
                panic!("ciborium does not read {bytes:x?} as a float");
            };
            assert_eq!(ours.to_bits(), theirs.to_bits(), "{bytes:x?}");
        };
        for half in 0..=u16::MAX {
            let [a, b] = half.to_be_bytes();
            check(&[0xf9, a, b]);
        }
        for value in doubles() {
            let [a, b, c, d] = (value as f32).to_be_bytes();
            check(&[0xfa, a, b, c, d]);
            let mut double = vec![0xfb];
            double.extend_from_slice(&value.to_be_bytes());
            check(&double);
        }
    }

    #[test]
    fn bad_input_is_refused_with_what_is_wrong() {
        with_python(|py| {
            let mut too_deep = vec![0x81; MAX_DEPTH + 1];
            too_deep.push(0);
            let cases: Vec<(Vec<u8>, &str)> = vec![
                (
                    vec![],
                    "truncated: the item at byte 0 needs 1 more bytes, 0 are left",
                ),
                (
                    vec![0x83, 0x01, 0x02, 0x19, 0x01],
                    "truncated: the item at byte 3 needs 2 more bytes, 1 are left",
                ),
                (
                    vec![0x19, 0x01],
                    "truncated: the item at byte 0 needs 2 more bytes, 1 are left",
                ),
                (
                    vec![0x43, 0x61, 0x62],
                    "a byte string at byte 0 claims a length of 3, more than the 2 bytes",
                ),
                (
                    vec![0x5a, 0xff, 0xff, 0xff, 0xff],
                    "claims a length of 4294967295",
                ),
                (
                    vec![0x7b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                    "a text string at byte 0 claims a length of 18446744073709551615",
                ),
                (
                    vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                    "an array at byte 0 claims",
                ),
                (
                    vec![0xba, 0x00, 0x10, 0x00, 0x00, 0x01, 0x02],
                    "a map at byte 0 claims a length of 1048576",
                ),
                // Two bytes left cannot hold a map of two entries.
                (
                    vec![0xa2, 0x01, 0x02],
                    "a map at byte 0 claims a length of 2, more than the 2 bytes",
                ),
                (
                    vec![0x01, 0x00],
                    "1 bytes after the end of the document (from byte 1)",
                ),
                (
                    vec![0x9f, 0x01, 0xff],
                    "an array of indefinite length at byte 0",
                ),
                (
                    vec![0x5f, 0x41, 0x00, 0xff],
                    "a byte string of indefinite length",
                ),
                (vec![0x7f, 0xff], "a text string of indefinite length"),
                (vec![0xbf, 0xff], "a map of indefinite length"),
                (vec![0xff], "a break code at byte 0"),
                (
                    vec![0x1f],
                    "an unsigned integer at byte 0 with an indefinite length",
                ),
                (
                    vec![0xdf, 0x00],
                    "a tag at byte 0 with an indefinite length",
                ),
                (vec![0x1c], "reserved additional information 28"),
                (vec![0xfe], "reserved additional information 30"),
                (vec![0xf7], "the simple value undefined at byte 0"),
                (vec![0x80 | 1, 0xf0], "unknown simple value 16 at byte 1"),
                (vec![0xf8, 0x20], "unknown simple value 32"),
                (
                    vec![0xf8, 0x14],
                    "the simple value 20 at byte 0 in two bytes",
                ),
                (vec![0xd8, 0x63, 0x01], "unknown CBOR tag 99"),
                (
                    vec![0xda, 0x64, 0x6f, 0x72, 0x79, 0x01],
                    "a tuple tag around something not an array",
                ),
                (
                    vec![0xd9, 0x01, 0x02, 0xa0],
                    "a set tag around something not an array",
                ),
                (
                    vec![0xc0, 0x01],
                    "a date-time tag around something not text",
                ),
                (
                    vec![0xc0, 0x63, 0x61, 0x62, 0x63],
                    "Invalid isoformat string: 'abc'",
                ),
                (vec![0xc2, 0x01], "a bignum tag around something not bytes"),
                (
                    vec![0xc3, 0x42, 0x01],
                    "a byte string at byte 1 claims a length of 2, more than the 1 bytes",
                ),
                (
                    vec![0x62, 0xff, 0xfe],
                    "the text at byte 1 is not valid UTF-8",
                ),
                (vec![0xa1, 0x80, 0x00], "unhashable type: 'list'"),
                (
                    vec![0xd9, 0x01, 0x02, 0x81, 0x80],
                    "unhashable type: 'list'",
                ),
                (too_deep, "nested deeper than 128 levels"),
            ];
            for (bytes, expected) in cases {
                match decode(py, &bytes) {
                    Ok(value) => panic!("{bytes:x?} read as {value}"),
                    Err(e) => assert!(e.reason.contains(expected), "{bytes:x?}: {}", e.reason),
                }
                // The structural pass refuses what is malformed as well (it leaves the
                // meaning of tags and simple values to the decoding).
                let mut reader = Reader::new(&bytes, 0);
                let skipped = reader.skip(0).and_then(|()| reader.finish());
                let structural = [
                    "truncated",
                    "claims",
                    "after the end",
                    "indefinite",
                    "break code",
                    "reserved",
                    "in two bytes",
                    "nested",
                ];
                if structural.iter().any(|s| expected.contains(s)) {
                    assert!(skipped.is_err(), "{bytes:x?} skipped");
                }
            }
        });
    }

    #[test]
    fn errors_name_where_the_value_sits() {
        with_python(|py| {
            // {"a": [0, undefined]}
            let e = decode(py, &[0xa1, 0x61, 0x61, 0x82, 0x00, 0xf7]).unwrap_err();
            assert_eq!(e.at("state"), "state['a'][1]");
            let e = encode_all(&eval(py, "{'counts': {'a': [1, 2, Opaque()]}}")).unwrap_err();
            assert_eq!(e.at("x"), "x['counts']['a'][2]");
            assert!(
                e.reason
                    .starts_with("unsupported type Opaque: state holds only None"),
                "{}",
                e.reason
            );
        });
    }

    #[test]
    fn subclasses_are_refused_not_turned_into_their_base() {
        with_python(|py| {
            for (expr, type_name) in [
                ("Sub(3)", "Sub"),
                ("collections.defaultdict(list)", "collections.defaultdict"),
                ("collections.OrderedDict()", "collections.OrderedDict"),
                ("frozenset()", "frozenset"),
                ("bytearray(b'x')", "bytearray"),
                ("datetime.date(2020, 1, 1)", "datetime.date"),
            ] {
                let e = encode_all(&eval(py, expr)).unwrap_err();
                assert!(
                    e.reason
                        .starts_with(&format!("unsupported type {type_name}:")),
                    "{expr}: {}",
                    e.reason
                );
            }
        });
    }

    #[test]
    fn nesting_is_bounded_alike_both_ways() {
        with_python(|py| {
            for make in [
                "lambda inner: [inner]",
                "lambda inner: (inner,)",
                "lambda inner: {'k': inner}",
            ] {
                let deepest = eval(py, &format!("nested({MAX_DEPTH}, {make})"));
                let bytes = encode_all(&deepest).unwrap();
                assert!(same(&deepest, &decode(py, &bytes).unwrap()), "{make}");
                let deeper = eval(py, &format!("nested({}, {make})", MAX_DEPTH + 1));
                let e = encode_all(&deeper).unwrap_err();
                assert_eq!(e.reason, "nested deeper than 128 levels", "{make}");
            }
            // Far deeper input is refused before it can exhaust the stack.
            let mut deep = vec![0x81; 100_000];
            deep.push(0);
            assert!(
                decode(py, &deep)
                    .unwrap_err()
                    .reason
                    .contains("nested deeper")
            );
            assert!(Reader::new(&deep, 0).skip(0).is_err());
            // A long chain of tags is no nesting, but stepping over it must not recurse.
            let mut chain = vec![0xc6; 100_000];
            chain.push(0);
            let mut reader = Reader::new(&chain, 0);
            assert!(reader.skip(0).and_then(|()| reader.finish()).is_ok());
            assert_eq!(decode(py, &chain).unwrap_err().reason, "unknown CBOR tag 6");
        });
    }

    #[test]
    fn every_cut_short_document_is_refused() {
        with_python(|py| {
            let value = eval(
                py,
                "{'a': [1, -2**70, 1.5, 'text', b'raw', (None, True), {3}], \
                                  'when': datetime.datetime(2020, 1, 1, tzinfo=UTC)}",
            );
            let bytes = encode_all(&value).unwrap();
            for len in 0..bytes.len() {
                let cut = &bytes[..len];
                assert!(decode(py, cut).is_err(), "{len} bytes read");
                assert!(Reader::new(cut, 0).skip(0).is_err(), "{len} bytes skipped");
            }
            assert!(decode(py, &bytes).is_ok());
        });
    }
}
