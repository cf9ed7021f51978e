//! The snapshot codec: a processor's state as one self-checking byte string.
//!
//! A snapshot is what travels when a processor moves and what the state store keeps between
//! checkpoints, so it has to survive being stored for longer than any one build of Dory runs
//! and being read back by a node that did not write it. It is a small fixed header followed by
//! the state body compressed with zstd. The header says how the body was serialized
//! ([`Codec`]), so Rust state (bincode) and Python state (CBOR, produced by the SDK) share one
//! format, and a later codec can be added without breaking stored snapshots.
//!
//! Decoding never trusts the bytes: every length is checked against what is present, the
//! checksum covers every byte but its own, and the decompressed size is bounded by both the
//! header's claim and [`Limits::max_decoded`] before anything is allocated; the state decoder
//! allocates a string only once its bytes are known to be there. A damaged snapshot is
//! an [`Error::Invalid`] naming what was wrong, never a panic.
//!
//! # Layout
//!
//! Integers are little-endian. The format version comes straight after the magic so that a
//! later version may change everything after it.
//!
//! | offset   | size             | field          | meaning                                             |
//! |----------|------------------|----------------|-----------------------------------------------------|
//! | 0        | 8                | magic          | `DORYSNAP` ([`MAGIC`])                               |
//! | 8        | 2                | format version | [`FORMAT_VERSION`]                                  |
//! | 10       | 2                | kind           | [`SnapshotKind`] id (0: full)                       |
//! | 12       | 2                | codec          | [`Codec`] id: how the body was serialized           |
//! | 14       | 8                | epoch          | the epoch that took the snapshot                    |
//! | 22       | 8                | sequence       | the processor's sequence at the snapshot            |
//! | 30       | 8                | raw_len        | body length after decompression                     |
//! | 38       | 8                | compressed_len | length of the compressed body                       |
//! | 46       | 8                | checksum       | xxh3-64 of every byte of the snapshot but these 8   |
//! | 54       | 1                | id length `n`  | length of the processor id                          |
//! | 55       | `n`              | processor id   | a valid [`ProcessorId`] (ASCII)                      |
//! | 55 + `n` | `compressed_len` | body           | a zstd frame; nothing may follow it                 |
//!
//! A delta snapshot (kind 1) has the same header; its `raw_len` is the whole state's, and its
//! body names its base and carries only the chunks that changed (see [`Encoder::encode_delta`]
//! and [`apply_delta`]).
//!
//! ```
//! use std::collections::BTreeMap;
//!
//! use dory_core::snapshot::{self, Encoder, Limits};
//! use dory_core::{Epoch, ProcessorId, Sequence};
//!
//! let counts = BTreeMap::from([("edge".to_string(), 3u64), ("cloud".to_string(), 1)]);
//! let id = ProcessorId::new("word-count")?;
//! let bytes = Encoder::default().encode_state(&id, Epoch(3), Sequence(42), &counts)?;
//!
//! // Stores check a snapshot cheaply, without decompressing it...
//! assert_eq!(snapshot::verify(&bytes)?.sequence, Sequence(42));
//! // ...and the new instance decodes it.
//! let (header, back): (_, BTreeMap<String, u64>) =
//!     snapshot::decode_state(&bytes, &Limits::default())?;
//! assert_eq!((header.epoch, back), (Epoch(3), counts));
//! # Ok::<(), dory_core::Error>(())
//! ```

use std::any::type_name;
use std::fmt;
use std::io::Cursor;

use serde::Serialize;
use serde::de::DeserializeOwned;
use xxhash_rust::xxh3::Xxh3Default;

use crate::columns::{count, timestamp};
use crate::error::{Error, Result};
use crate::model::{Epoch, ProcessorId, Sequence, SnapshotMeta, StoredSnapshot, Timestamp};

mod bounded;
mod delta;

pub use delta::{
    Base, CHUNK_SIZE, DeltaBase, apply_delta, apply_delta_into, apply_delta_to, delta_base,
    resolve_delta,
};

/// The first eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"DORYSNAP";

/// The layout version this build writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

const VERSION_AT: usize = 8;
const KIND_AT: usize = 10;
const CODEC_AT: usize = 12;
const EPOCH_AT: usize = 14;
const SEQUENCE_AT: usize = 22;
const RAW_LEN_AT: usize = 30;
const COMPRESSED_LEN_AT: usize = 38;
const CHECKSUM_AT: usize = 46;
const ID_LEN_AT: usize = 54;
/// Everything before the processor id.
const FIXED_LEN: usize = 55;

/// How the state body is serialized before compression. Stored as a u16 in the header so the
/// codec can change without breaking stored snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// The body is stored as given: the caller serialized it in a way only it knows.
    Raw = 0,
    /// bincode 2.0.1 through serde with `bincode::config::standard()` (Rust state, see
    /// [`Encoder::encode_state`]).
    Bincode = 1,
    /// postcard through serde.
    Postcard = 2,
    /// CBOR, written by the Python SDK from the declared state (never pickle).
    Cbor = 3,
}

impl Codec {
    /// The id stored in the header.
    pub fn id(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for Codec {
    type Error = Error;

    fn try_from(id: u16) -> Result<Self> {
        Ok(match id {
            0 => Codec::Raw,
            1 => Codec::Bincode,
            2 => Codec::Postcard,
            3 => Codec::Cbor,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown codec id {id} (known: 0 raw, 1 bincode, 2 postcard, 3 cbor)"
                )));
            }
        })
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Raw => "raw",
            Codec::Bincode => "bincode",
            Codec::Postcard => "postcard",
            Codec::Cbor => "cbor",
        })
    }
}

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotKind {
    /// The whole state.
    Full = 0,
    /// The changes from a full snapshot, its base (a pre-copy move's final snapshot; see
    /// [`Encoder::encode_delta`]).
    Delta = 1,
}

impl SnapshotKind {
    /// The id stored in the header.
    pub fn id(self) -> u16 {
        self as u16
    }
}

impl TryFrom<u16> for SnapshotKind {
    type Error = Error;

    fn try_from(id: u16) -> Result<Self> {
        match id {
            0 => Ok(SnapshotKind::Full),
            1 => Ok(SnapshotKind::Delta),
            _ => Err(Error::invalid(format!(
                "unknown snapshot kind {id} (known: 0 full, 1 delta)"
            ))),
        }
    }
}

impl fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Delta => "delta",
        })
    }
}

/// A snapshot's header, as read by [`decode_header`] (see the layout in the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// The layout version ([`FORMAT_VERSION`]).
    pub format_version: u16,
    /// What the body holds.
    pub kind: SnapshotKind,
    /// How the body was serialized before compression.
    pub codec: Codec,
    /// The processor whose state it is.
    pub processor: ProcessorId,
    /// The epoch that took the snapshot.
    pub epoch: Epoch,
    /// The processor's sequence at the moment of the snapshot.
    pub sequence: Sequence,
    /// The body's length after decompression.
    pub raw_len: u64,
    /// The compressed body's length.
    pub compressed_len: u64,
    /// xxh3-64 of every byte of the snapshot except the checksum field itself.
    pub checksum: u64,
}

impl SnapshotHeader {
    /// The header's own length: the fixed fields and the processor id.
    fn len(&self) -> usize {
        FIXED_LEN + self.processor.as_str().len()
    }

    /// Errors about a snapshot whose header was read name its processor and epoch, so a store
    /// holding many can say which one is damaged.
    fn invalid(&self, what: impl fmt::Display) -> Error {
        Error::invalid(format!(
            "snapshot of processor {} epoch {}: {what}",
            self.processor, self.epoch
        ))
    }

    /// A delta cannot be read on its own: it needs its base ([`apply_delta`]).
    fn require_full(&self) -> Result<()> {
        match self.kind {
            SnapshotKind::Full => Ok(()),
            SnapshotKind::Delta => Err(self.invalid(format!(
                "sequence {} is a delta snapshot; it is read together with its base (apply_delta)",
                self.sequence
            ))),
        }
    }

    /// Writes the header into `out`, which is exactly [`Self::len`] bytes long.
    fn write(&self, out: &mut [u8]) {
        out[..VERSION_AT].copy_from_slice(&MAGIC);
        out[VERSION_AT..KIND_AT].copy_from_slice(&self.format_version.to_le_bytes());
        out[KIND_AT..CODEC_AT].copy_from_slice(&self.kind.id().to_le_bytes());
        out[CODEC_AT..EPOCH_AT].copy_from_slice(&self.codec.id().to_le_bytes());
        out[EPOCH_AT..SEQUENCE_AT].copy_from_slice(&self.epoch.0.to_le_bytes());
        out[SEQUENCE_AT..RAW_LEN_AT].copy_from_slice(&self.sequence.0.to_le_bytes());
        out[RAW_LEN_AT..COMPRESSED_LEN_AT].copy_from_slice(&self.raw_len.to_le_bytes());
        out[COMPRESSED_LEN_AT..CHECKSUM_AT].copy_from_slice(&self.compressed_len.to_le_bytes());
        out[CHECKSUM_AT..ID_LEN_AT].copy_from_slice(&self.checksum.to_le_bytes());
        let id = self.processor.as_str().as_bytes();
        // Ids are at most MAX_PROCESSOR_ID_LEN (42) bytes, so the length fits a u8.
        out[ID_LEN_AT] = id.len() as u8;
        out[FIXED_LEN..].copy_from_slice(id);
    }
}

/// Bounds on what decoding may allocate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest decompressed body accepted, in bytes. The decompressed size is bounded by
    /// both this and the header's `raw_len` claim.
    pub max_decoded: u64,
}

impl Limits {
    /// The default [`Limits::max_decoded`]: 1 GiB.
    pub const DEFAULT_MAX_DECODED: u64 = 1 << 30;

    /// Limits accepting bodies of at most `max_decoded` bytes once decompressed.
    pub const fn new(max_decoded: u64) -> Self {
        Limits { max_decoded }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(Limits::DEFAULT_MAX_DECODED)
    }
}

/// Writes snapshots at one zstd compression level.
///
/// The default level is 1, zstd's fastest regular level: the final snapshot of a move is taken
/// while the processor is paused, so encoding time is pause time. Level 1 compresses at
/// hundreds of MB/s per core and already removes most of the redundancy of typical state
/// (counters, keys, buffered records); higher levels cost several times the CPU for a few
/// percent fewer bytes, which only pays off on links far slower than the compressor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoder {
    level: i32,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new(Encoder::DEFAULT_LEVEL)
    }
}

impl Encoder {
    /// The default zstd level (see [`Encoder`] for why it is the fastest regular one).
    pub const DEFAULT_LEVEL: i32 = 1;

    /// An encoder at zstd `level`, clamped to the levels zstd supports (negative levels trade
    /// ratio for even more speed; 0 means zstd's own default, 3).
    pub fn new(level: i32) -> Self {
        let range = zstd::compression_level_range();
        Encoder {
            level: level.clamp(*range.start(), *range.end()),
        }
    }

    /// The zstd level in use.
    pub fn level(&self) -> i32 {
        self.level
    }

    /// Encodes a body that is already serialized with `codec` (for example CBOR from the
    /// Python SDK).
    pub fn encode_body(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
        codec: Codec,
        body: &[u8],
    ) -> Result<Vec<u8>> {
        let mut header = SnapshotHeader {
            format_version: FORMAT_VERSION,
            kind: SnapshotKind::Full,
            codec,
            processor: processor.clone(),
            epoch,
            sequence,
            raw_len: body.len() as u64,
            compressed_len: 0,
            checksum: 0,
        };
        let header_len = header.len();
        // zstd compresses straight into the space after the header, so the body is never
        // copied: the header is filled in once the compressed length is known.
        let mut out = Vec::new();
        out.try_reserve_exact(header_len + zstd::compress_bound(body.len()))
            .map_err(|_| {
                header.invalid(format!(
                    "cannot allocate room to compress a {}-byte body",
                    body.len()
                ))
            })?;
        out.resize(header_len, 0);
        let mut cursor = Cursor::new(out);
        cursor.set_position(header_len as u64);
        let compressed_len = with_compressor(self.level, |zstd| {
            zstd.compress_to_buffer(body, &mut cursor)
        })
        .map_err(|e| header.invalid(format!("zstd compression failed: {e}")))?;
        let mut out = cursor.into_inner();
        header.compressed_len = compressed_len as u64;
        header.write(&mut out[..header_len]);
        header.checksum = checksum(&out);
        out[CHECKSUM_AT..ID_LEN_AT].copy_from_slice(&header.checksum.to_le_bytes());
        // The buffer was sized for incompressible input; snapshots are kept in memory by
        // stores and in flight, so give the slack back (a cheap in-place shrink).
        out.shrink_to_fit();
        Ok(out)
    }

    /// Serializes `state` with [`Codec::Bincode`] and encodes it.
    pub fn encode_state<T: Serialize>(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
        state: &T,
    ) -> Result<Vec<u8>> {
        let body = serialize_state(processor, epoch, state)?;
        self.encode_body(processor, epoch, sequence, Codec::Bincode, &body)
    }
}

/// Reads and checks a snapshot's header: magic, format version, processor id, known kind and
/// codec, and that the lengths match `bytes.len()` exactly. Does NOT verify the checksum (see
/// [`verify`]).
pub fn decode_header(bytes: &[u8]) -> Result<SnapshotHeader> {
    let prefix = &bytes[..bytes.len().min(MAGIC.len())];
    if prefix != &MAGIC[..prefix.len()] {
        return Err(Error::invalid(format!(
            "snapshot: bad magic b\"{}\", expected b\"DORYSNAP\" (not a Dory snapshot)",
            prefix.escape_ascii()
        )));
    }
    // The version is checked before the rest of the length so that a snapshot from a later
    // version, whose header may be longer or shorter, is reported as such.
    if bytes.len() >= KIND_AT {
        let version = u16_at(bytes, VERSION_AT);
        if version != FORMAT_VERSION {
            return Err(Error::invalid(format!(
                "snapshot: unsupported format version {version} (this build reads version {FORMAT_VERSION})"
            )));
        }
    }
    if bytes.len() < FIXED_LEN {
        return Err(Error::invalid(format!(
            "snapshot: truncated: {} bytes, shorter than the {FIXED_LEN}-byte fixed header",
            bytes.len()
        )));
    }
    let id_len = usize::from(bytes[ID_LEN_AT]);
    let Some(id) = bytes.get(FIXED_LEN..FIXED_LEN + id_len) else {
        return Err(Error::invalid(format!(
            "snapshot: truncated: {} bytes, shorter than the {}-byte header with its {id_len}-byte processor id",
            bytes.len(),
            FIXED_LEN + id_len
        )));
    };
    let id = std::str::from_utf8(id)
        .map_err(|_| {
            Error::invalid(format!(
                "snapshot: processor id b\"{}\" is not UTF-8",
                id.escape_ascii()
            ))
        })
        .and_then(ProcessorId::new)
        .map_err(|e| e.context("snapshot"))?;
    let epoch = Epoch(u64_at(bytes, EPOCH_AT));
    let context = |e: Error| e.context(format!("snapshot of processor {id} epoch {epoch}"));
    let kind = SnapshotKind::try_from(u16_at(bytes, KIND_AT)).map_err(context)?;
    let codec = Codec::try_from(u16_at(bytes, CODEC_AT)).map_err(context)?;
    let header = SnapshotHeader {
        format_version: FORMAT_VERSION,
        kind,
        codec,
        processor: id,
        epoch,
        sequence: Sequence(u64_at(bytes, SEQUENCE_AT)),
        raw_len: u64_at(bytes, RAW_LEN_AT),
        compressed_len: u64_at(bytes, COMPRESSED_LEN_AT),
        checksum: u64_at(bytes, CHECKSUM_AT),
    };
    let present = (bytes.len() - header.len()) as u64;
    if header.compressed_len > present {
        return Err(header.invalid(format!(
            "truncated: header claims {} body bytes, {present} present",
            header.compressed_len
        )));
    }
    if header.compressed_len < present {
        return Err(header.invalid(format!(
            "{} unexpected bytes after the {}-byte body",
            present - header.compressed_len,
            header.compressed_len
        )));
    }
    Ok(header)
}

/// Reads the header and checks the checksum over the whole snapshot, without decompressing:
/// cheap enough for a store to run on every read.
pub fn verify(bytes: &[u8]) -> Result<SnapshotHeader> {
    let header = decode_header(bytes)?;
    let computed = checksum(bytes);
    if computed != header.checksum {
        return Err(header.invalid(format!(
            "checksum mismatch (header 0x{:016x}, computed 0x{computed:016x})",
            header.checksum
        )));
    }
    Ok(header)
}

/// Verifies the snapshot and decompresses its body, whatever its codec. The body is exactly
/// `raw_len` bytes; anything claiming more than `limits` allows is refused before allocating.
pub fn decode_body(bytes: &[u8], limits: &Limits) -> Result<(SnapshotHeader, Vec<u8>)> {
    let header = verify(bytes)?;
    header.require_full()?;
    let body = decompress(&header, &bytes[header.len()..], limits)?;
    Ok((header, body))
}

/// Verifies the snapshot, decompresses it and deserializes the state. Only [`Codec::Bincode`]
/// bodies decode here (they are what [`Encoder::encode_state`] writes); any other codec is an
/// error naming it.
pub fn decode_state<T: DeserializeOwned>(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(SnapshotHeader, T)> {
    let (header, body) = decode_body(bytes, limits)?;
    let state = decode_state_body(&header, &body)?;
    Ok((header, state))
}

/// Serializes `state` as [`Encoder::encode_state`] does, into the body that
/// [`Encoder::encode_body`] (or [`Encoder::encode_delta`]) then encodes with [`Codec::Bincode`].
pub fn serialize_state<T: Serialize>(
    processor: &ProcessorId,
    epoch: Epoch,
    state: &T,
) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(state, bincode::config::standard())
        .map_err(|e| unserializable::<T>(processor, epoch, &e))
}

/// [`serialize_state`], appended to `out`, so a caller that keeps one buffer for its state's
/// body reuses its memory instead of allocating (and page-faulting in) a fresh state-sized one
/// every time, and may write a header of its own before the state.
pub fn serialize_state_into<T: Serialize>(
    processor: &ProcessorId,
    epoch: Epoch,
    state: &T,
    out: &mut Vec<u8>,
) -> Result<()> {
    bincode::serde::encode_into_std_write(state, out, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| unserializable::<T>(processor, epoch, &e))
}

fn unserializable<T>(
    processor: &ProcessorId,
    epoch: Epoch,
    e: &bincode::error::EncodeError,
) -> Error {
    Error::invalid(format!(
        "snapshot of processor {processor} epoch {epoch}: state of type {} cannot be serialized with bincode: {e}",
        type_name::<T>()
    ))
}

/// Deserializes a decompressed [`Codec::Bincode`] body (from [`decode_body`] or
/// [`apply_delta`]) of the snapshot `header` describes; any other codec is an error naming it.
pub fn decode_state_body<T: DeserializeOwned>(header: &SnapshotHeader, body: &[u8]) -> Result<T> {
    if header.codec != Codec::Bincode {
        return Err(header.invalid(format!(
            "codec {} is not Rust state (only bincode is); read the body with decode_body",
            header.codec
        )));
    }
    let (state, used) = bounded::decode::<T>(body).map_err(|e| {
        let why = match e {
            bincode::error::DecodeError::UnexpectedEnd { .. } => {
                "it needs more bytes than the body holds".to_string()
            }
            e => e.to_string(),
        };
        header.invalid(format!(
            "state does not decode as {}: {why}",
            type_name::<T>()
        ))
    })?;
    if used != body.len() {
        return Err(header.invalid(format!(
            "state decodes as {} from {used} of the {} body bytes (a different type wrote it?)",
            type_name::<T>(),
            body.len()
        )));
    }
    Ok(state)
}

/// A stored snapshot's metadata as a SQL store reads it, column by column, in the order
/// [`SnapshotMeta::from_columns`] takes them: epoch, sequence, size, created at (ms since the
/// Unix epoch).
pub type MetaColumns = (i64, i64, i64, i64);

impl SnapshotMeta {
    /// The metadata of a snapshot of `processor` a SQL store listed (see [`MetaColumns`]); a
    /// negative number is [`Error::Invalid`] naming `what`.
    pub fn from_columns(processor: &ProcessorId, row: MetaColumns, what: &str) -> Result<Self> {
        let (epoch, sequence, size, created_at) = row;
        Ok(SnapshotMeta {
            processor: processor.clone(),
            epoch: Epoch(count(epoch, what)?),
            sequence: Sequence(count(sequence, what)?),
            size: count(size, what)?,
            created_at: timestamp(created_at),
        })
    }
}

impl StoredSnapshot {
    /// A snapshot of `processor` read back from a SQL store's table: its metadata columns (see
    /// [`MetaColumns`]) and its bytes, [`verify`]d, because bytes rot and a bad write may have
    /// stored garbage. The header must name the processor and sequence it is filed under (its
    /// epoch is the one that took it, which for a move is not the one it is filed under) and
    /// the recorded size must be the bytes'. Errors are [`Error::Invalid`] naming processor,
    /// epoch and sequence.
    pub fn from_columns(
        processor: &ProcessorId,
        meta: MetaColumns,
        bytes: Vec<u8>,
    ) -> Result<StoredSnapshot> {
        let (epoch, sequence, ..) = meta;
        let what =
            format!("stored snapshot of processor {processor} epoch {epoch} sequence {sequence}");
        let meta = SnapshotMeta::from_columns(processor, meta, &what)?;
        let header = verify(&bytes).map_err(|e| e.context(&what))?;
        if header.processor != *processor || header.sequence != meta.sequence {
            return Err(Error::invalid(format!(
                "{what}: the header says processor {} {}",
                header.processor, header.sequence
            )));
        }
        if meta.size != bytes.len() as u64 {
            return Err(Error::invalid(format!(
                "{what}: {} bytes stored, {} recorded",
                bytes.len(),
                meta.size
            )));
        }
        Ok(StoredSnapshot { meta, bytes })
    }

    /// Wraps an encoded snapshot after [`verify`]ing it, taking the metadata from its header
    /// (`size` is the encoded length).
    pub fn from_encoded(bytes: Vec<u8>, created_at: Timestamp) -> Result<StoredSnapshot> {
        let header = verify(&bytes)?;
        Ok(StoredSnapshot {
            meta: SnapshotMeta {
                processor: header.processor,
                epoch: header.epoch,
                sequence: header.sequence,
                size: bytes.len() as u64,
                created_at,
            },
            bytes,
        })
    }

    /// The base a delta snapshot needs (`None` for a full one): a store committing a delta
    /// checks that the base is stored, and keeps it while the delta is kept. Reads the header
    /// and the delta's prefix only, not the checksum: call it after
    /// [`check_incoming`](Self::check_incoming), which has verified every byte, so a commit
    /// does not hash a large snapshot twice.
    pub fn delta_base(&self) -> Result<Option<DeltaBase>> {
        delta::base_named(&decode_header(&self.bytes)?, &self.bytes)
    }

    /// [`check_incoming`](Self::check_incoming) for a checkpoint from its owner, which is
    /// always a full snapshot (only a move commits a delta).
    pub fn check_checkpoint(&self, what: &str) -> Result<()> {
        self.check_incoming(self.meta.epoch, what)?;
        if self.delta_base()?.is_some() {
            return Err(Error::invalid(format!(
                "{what}: a checkpoint is a full snapshot, this is a delta"
            )));
        }
        Ok(())
    }

    /// Checks a snapshot handed to a state store before anything is written: the bytes
    /// [`verify`], the header names the metadata's processor and sequence and the epoch
    /// `taken_by` (the owner for a checkpoint, the old owner for a move's commit), and the
    /// metadata's size is the bytes'. Errors are [`Invalid`](Error::Invalid), prefixed with
    /// `what`.
    pub fn check_incoming(&self, taken_by: Epoch, what: &str) -> Result<()> {
        let meta = &self.meta;
        let header = verify(&self.bytes).map_err(|e| e.context(what))?;
        if (&header.processor, header.epoch, header.sequence)
            != (&meta.processor, taken_by, meta.sequence)
        {
            return Err(Error::invalid(format!(
                "{what}: the snapshot's header says processor {} epoch {} {}, expected epoch \
                 {taken_by}",
                header.processor, header.epoch, header.sequence
            )));
        }
        if meta.size != self.bytes.len() as u64 {
            return Err(Error::invalid(format!(
                "{what}: metadata says {} bytes, the snapshot has {}",
                meta.size,
                self.bytes.len()
            )));
        }
        Ok(())
    }
}

/// xxh3-64 of the whole snapshot except the checksum field, so a flip anywhere else, header or
/// body, changes it.
fn checksum(bytes: &[u8]) -> u64 {
    let mut hasher = Xxh3Default::new();
    hasher.update(&bytes[..CHECKSUM_AT]);
    hasher.update(&bytes[ID_LEN_AT..]);
    hasher.digest()
}

/// Decompresses a verified body into a buffer of exactly `raw_len` bytes, allocated only once
/// `raw_len` is known to be within the limit.
fn decompress(header: &SnapshotHeader, body: &[u8], limits: &Limits) -> Result<Vec<u8>> {
    let raw_len = header.raw_len;
    if raw_len > limits.max_decoded {
        return Err(header.invalid(format!(
            "decompressed size {raw_len} exceeds limit {}",
            limits.max_decoded
        )));
    }
    // The frame records its decompressed size (the encoder always writes it): a disagreement
    // is caught here, before the buffer is allocated.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(body)
        && declared != raw_len
    {
        return Err(header.invalid(format!(
            "zstd frame declares {declared} decompressed bytes, header claims {raw_len}"
        )));
    }
    let capacity = usize::try_from(raw_len).map_err(|_| {
        header.invalid(format!(
            "decompressed size {raw_len} does not fit in memory"
        ))
    })?;
    let mut out = Vec::new();
    out.try_reserve_exact(capacity).map_err(|_| {
        header.invalid(format!(
            "cannot allocate {raw_len} bytes to decompress the body"
        ))
    })?;
    // zstd never writes past the buffer's capacity, so a body that decompresses to more than
    // the header claims fails here instead of growing the buffer.
    let written =
        with_decompressor(|zstd| zstd.decompress_to_buffer(body, &mut out)).map_err(|e| {
            header.invalid(format!(
                "body does not decompress within the {raw_len} bytes the header claims: {e}"
            ))
        })?;
    if written != capacity {
        return Err(header.invalid(format!(
            "body decompressed to {written} bytes, header claims {raw_len}"
        )));
    }
    Ok(out)
}

thread_local! {
    // Creating a zstd context costs more than compressing a small snapshot, and checkpoints
    // are frequent: each thread keeps one compressor (with its level) and one decompressor.
    // zstd resets a context at every frame, so reuse never changes the output.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's compressor at `level`.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        match slot.as_mut() {
            Some((current, zstd)) if *current == level => f(zstd),
            _ => {
                let mut zstd = zstd::bulk::Compressor::new(level)?;
                let result = f(&mut zstd);
                *slot = Some((level, zstd));
                result
            }
        }
    })
}

/// Runs `f` with this thread's decompressor.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.try_borrow_mut().map_err(std::io::Error::other)?;
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(zstd) => f(zstd),
            None => Err(std::io::Error::other("no zstd decompressor")),
        }
    })
}

/// Reads a u16 at `at`; callers have checked that the bytes are present.
fn u16_at(bytes: &[u8], at: usize) -> u16 {
    let mut le = [0; 2];
    le.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(le)
}

/// Reads a u64 at `at`; callers have checked that the bytes are present.
fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde::Deserialize;

    use super::*;

    const CODECS: [Codec; 4] = [Codec::Raw, Codec::Bincode, Codec::Postcard, Codec::Cbor];

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct State {
        name: String,
        counts: BTreeMap<String, u64>,
        payload: Vec<u8>,
        tags: Vec<String>,
        offset: Option<i64>,
    }

    fn id(s: &str) -> ProcessorId {
        ProcessorId::new(s).unwrap()
    }

    fn sample_state() -> State {
        State {
            name: "word-count".into(),
            counts: BTreeMap::from([("edge".into(), 3), ("cloud".into(), 12345)]),
            payload: b"the quick brown fox".to_vec(),
            tags: vec!["a".into(), "b".into()],
            offset: Some(-7),
        }
    }

    #[test]
    fn serializing_into_a_used_buffer_appends_what_a_fresh_one_gets() {
        let state = sample_state();
        let fresh = serialize_state(&id("p"), Epoch(1), &state).unwrap();
        let mut used = vec![0xEE; fresh.len() * 3];
        used.truncate(2);
        serialize_state_into(&id("p"), Epoch(1), &state, &mut used).unwrap();
        assert_eq!(used[..2], [0xEE, 0xEE]);
        assert_eq!(used[2..], fresh);
    }

    fn sample() -> Vec<u8> {
        Encoder::default()
            .encode_state(&id("p"), Epoch(3), Sequence(9), &sample_state())
            .unwrap()
    }

    fn invalid_message(result: Result<impl fmt::Debug>) -> String {
        match result {
            Err(Error::Invalid(message)) => message,
            other => panic!("expected Error::Invalid, got {other:?}"),
        }
    }

    fn set_u16(bytes: &mut [u8], at: usize, value: u16) {
        bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u64(bytes: &mut [u8], at: usize, value: u64) {
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Recomputes the checksum of a forged snapshot, so that the check under test is the one
    /// that catches it.
    fn reseal(bytes: &mut [u8]) {
        let sum = checksum(bytes);
        set_u64(bytes, CHECKSUM_AT, sum);
    }

    /// A snapshot whose body is `frame` as is, claiming `raw_len`.
    fn with_frame(frame: &[u8], raw_len: u64) -> Vec<u8> {
        let mut bytes = Encoder::default()
            .encode_body(&id("p"), Epoch(3), Sequence(1), Codec::Raw, b"")
            .unwrap();
        let header_len = FIXED_LEN + 1;
        bytes.truncate(header_len);
        bytes.extend_from_slice(frame);
        set_u64(&mut bytes, RAW_LEN_AT, raw_len);
        set_u64(&mut bytes, COMPRESSED_LEN_AT, frame.len() as u64);
        reseal(&mut bytes);
        bytes
    }

    /// A zstd frame that does not record its decompressed size, as a forger might write.
    fn frame_without_size(data: &[u8]) -> Vec<u8> {
        let mut zstd = zstd::bulk::Compressor::new(1).unwrap();
        zstd.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(false))
            .unwrap();
        let frame = zstd.compress(data).unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&frame).unwrap(),
            None
        );
        frame
    }

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            // Failures print their minimal input; keep the source tree free of
            // regression files.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn processor_ids() -> impl Strategy<Value = ProcessorId> {
        "[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?".prop_map(|s| ProcessorId::new(s).unwrap())
    }

    fn states() -> impl Strategy<Value = State> {
        (
            ".{0,24}",
            prop::collection::btree_map("[a-z]{0,12}", any::<u64>(), 0..32),
            prop::collection::vec(any::<u8>(), 0..2048),
            prop::collection::vec("\\PC{0,8}", 0..8),
            any::<Option<i64>>(),
        )
            .prop_map(|(name, counts, payload, tags, offset)| State {
                name,
                counts,
                payload,
                tags,
                offset,
            })
    }

    proptest! {
        #![proptest_config(config(128))]

        #[test]
        fn states_round_trip(
            processor in processor_ids(),
            epoch in any::<u64>(),
            sequence in any::<u64>(),
            level in -5i32..=6,
            state in states(),
        ) {
            let bytes = Encoder::new(level)
                .encode_state(&processor, Epoch(epoch), Sequence(sequence), &state)
                .unwrap();
            let (header, back): (_, State) = decode_state(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(back, state);
            prop_assert_eq!(header.codec, Codec::Bincode);
            prop_assert_eq!(header.kind, SnapshotKind::Full);
            prop_assert_eq!(&header.processor, &processor);
            prop_assert_eq!((header.epoch, header.sequence), (Epoch(epoch), Sequence(sequence)));
            prop_assert_eq!(verify(&bytes).unwrap(), header.clone());
            prop_assert_eq!(decode_header(&bytes).unwrap(), header);
        }

        #[test]
        fn bodies_round_trip_for_every_codec(
            processor in processor_ids(),
            codec in prop::sample::select(&CODECS[..]),
            body in prop::collection::vec(any::<u8>(), 0..4096),
            repeat in 1usize..64,
        ) {
            // Repeating the body makes it compressible too.
            let body = body.repeat(repeat);
            let bytes = Encoder::default()
                .encode_body(&processor, Epoch(1), Sequence(2), codec, &body)
                .unwrap();
            let (header, back) = decode_body(&bytes, &Limits::default()).unwrap();
            prop_assert_eq!(back, body);
            prop_assert_eq!(header.codec, codec);
            prop_assert_eq!(header.raw_len, header_raw_len(&bytes));
            prop_assert_eq!(Codec::try_from(codec.id()).unwrap(), codec);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            tail in prop::collection::vec(any::<u8>(), 0..512),
            prefixed in any::<bool>(),
        ) {
            // With a valid magic and version the bytes get past the first checks.
            let mut bytes = Vec::new();
            if prefixed {
                bytes.extend_from_slice(&MAGIC);
                bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            }
            bytes.extend_from_slice(&tail);
            let _ = decode_header(&bytes);
            prop_assert!(verify(&bytes).is_err());
            prop_assert!(decode_body(&bytes, &Limits::default()).is_err());
            prop_assert!(decode_state::<State>(&bytes, &Limits::default()).is_err());
        }

        #[test]
        fn damaged_random_snapshots_error(
            state in states(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let bytes = Encoder::default()
                .encode_state(&id("p"), Epoch(3), Sequence(9), &state)
                .unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(decode_body(&bytes[..cut], &Limits::default()).is_err());
            let bit = flip.index(bytes.len() * 8);
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode_body(&flipped, &Limits::default()).is_err());
            prop_assert!(decode_state::<State>(&flipped, &Limits::default()).is_err());
        }
    }

    fn header_raw_len(bytes: &[u8]) -> u64 {
        u64_at(bytes, RAW_LEN_AT)
    }

    #[test]
    fn every_truncation_errors() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            let message = invalid_message(decode_body(&bytes[..cut], &Limits::default()));
            assert!(message.contains("truncated"), "cut at {cut}: {message}");
        }
    }

    #[test]
    fn every_bit_flip_errors() {
        let bytes = sample();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(verify(&flipped).is_err(), "bit {bit} went unnoticed");
        }
    }

    #[test]
    fn a_claim_above_the_limit_errors_before_decompressing() {
        let bytes = Encoder::default()
            .encode_body(&id("p"), Epoch(3), Sequence(1), Codec::Raw, &[0; 2_000_000])
            .unwrap();
        let message = invalid_message(decode_body(&bytes, &Limits::new(1_000_000)));
        assert!(
            message.contains("decompressed size 2000000 exceeds limit 1000000"),
            "{message}"
        );
        assert!(decode_body(&bytes, &Limits::new(2_000_000)).is_ok());

        // A claim that could never be allocated is refused by the limit alone.
        let mut forged = sample();
        set_u64(&mut forged, RAW_LEN_AT, 1 << 50);
        reseal(&mut forged);
        let message = invalid_message(decode_body(&forged, &Limits::default()));
        assert!(message.contains("exceeds limit 1073741824"), "{message}");

        // Without a limit, a huge claim is still refused before allocating.
        let forged = with_frame(&frame_without_size(b"tiny"), u64::MAX / 2);
        let message = invalid_message(decode_body(&forged, &Limits::new(u64::MAX)));
        assert!(message.contains("cannot allocate"), "{message}");
    }

    #[test]
    fn a_body_larger_than_claimed_errors() {
        let data = vec![7u8; 1000];
        // The frame records its size: caught before allocating.
        let forged = with_frame(&zstd::bulk::compress(&data, 1).unwrap(), 500);
        let message = invalid_message(decode_body(&forged, &Limits::default()));
        assert!(
            message.contains("zstd frame declares 1000 decompressed bytes, header claims 500"),
            "{message}"
        );
        // The frame does not record it: zstd stops at the claimed size.
        let forged = with_frame(&frame_without_size(&data), 500);
        let message = invalid_message(decode_body(&forged, &Limits::default()));
        assert!(message.contains("within the 500 bytes"), "{message}");
        // A zstd bomb: a few hundred bytes that would decompress to 64 MiB.
        let bomb = frame_without_size(&vec![0; 64 << 20]);
        assert!(bomb.len() < 64 << 10);
        let forged = with_frame(&bomb, 1 << 20);
        let message = invalid_message(decode_body(&forged, &Limits::default()));
        assert!(message.contains("within the 1048576 bytes"), "{message}");
    }

    #[test]
    fn a_body_smaller_than_claimed_errors() {
        let forged = with_frame(&frame_without_size(&[1; 1000]), 2000);
        let message = invalid_message(decode_body(&forged, &Limits::default()));
        assert!(
            message.contains("body decompressed to 1000 bytes, header claims 2000"),
            "{message}"
        );
    }

    #[test]
    fn a_forged_string_length_does_not_allocate_it() {
        // A bincode body whose first string claims 2^62 bytes.
        let mut body = vec![0xfd];
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        let bytes = Encoder::default()
            .encode_body(&id("p"), Epoch(3), Sequence(1), Codec::Bincode, &body)
            .unwrap();
        let message = invalid_message(decode_state::<State>(&bytes, &Limits::default()));
        assert!(
            message.contains("needs more bytes than the body holds"),
            "{message}"
        );
    }

    #[test]
    fn messages_name_the_problem() {
        let good = sample();

        let mut bad = good.clone();
        bad[0] = b'X';
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(message.contains("bad magic b\"XORYSNAP\""), "{message}");
        let message = invalid_message(verify(b"PK\x03\x04"));
        assert!(message.contains("bad magic"), "{message}");

        let mut bad = good.clone();
        set_u16(&mut bad, VERSION_AT, 9);
        reseal(&mut bad);
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(
            message.contains("unsupported format version 9"),
            "{message}"
        );
        // Even when the rest of a later version's header is shorter than ours.
        let message = invalid_message(decode_header(&bad[..12]));
        assert!(
            message.contains("unsupported format version 9"),
            "{message}"
        );

        let mut bad = good.clone();
        set_u16(&mut bad, CODEC_AT, 77);
        reseal(&mut bad);
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(
            message.contains("snapshot of processor p epoch e3: unknown codec id 77"),
            "{message}"
        );

        let mut bad = good.clone();
        set_u16(&mut bad, KIND_AT, 4);
        reseal(&mut bad);
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(message.contains("unknown snapshot kind 4"), "{message}");

        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 0x10;
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(
            message.starts_with("snapshot of processor p epoch e3: checksum mismatch (header 0x"),
            "{message}"
        );

        let message = invalid_message(decode_body(&good[..good.len() - 3], &Limits::default()));
        let body_len = good.len() - FIXED_LEN - 1;
        assert!(
            message.contains(&format!(
                "truncated: header claims {body_len} body bytes, {} present",
                body_len - 3
            )),
            "{message}"
        );

        let mut long = good.clone();
        long.extend_from_slice(b"junk");
        let message = invalid_message(decode_body(&long, &Limits::default()));
        assert!(
            message.contains("4 unexpected bytes after the"),
            "{message}"
        );

        let mut bad = good.clone();
        bad[FIXED_LEN] = b'P';
        reseal(&mut bad);
        let message = invalid_message(decode_body(&bad, &Limits::default()));
        assert!(message.contains("field `id`"), "{message}");

        let cbor = Encoder::default()
            .encode_body(&id("p"), Epoch(3), Sequence(1), Codec::Cbor, b"\xa0")
            .unwrap();
        let message = invalid_message(decode_state::<State>(&cbor, &Limits::default()));
        assert!(
            message.contains("codec cbor is not Rust state"),
            "{message}"
        );

        let other = Encoder::default()
            .encode_state(&id("p"), Epoch(3), Sequence(1), &(1u8, 2u8, 3u8))
            .unwrap();
        let message = invalid_message(decode_state::<u8>(&other, &Limits::default()));
        assert!(message.contains("from 1 of the 3 body bytes"), "{message}");
    }

    #[test]
    fn empty_bodies_round_trip() {
        let bytes = Encoder::default()
            .encode_body(&id("p"), Epoch(0), Sequence(0), Codec::Raw, b"")
            .unwrap();
        let (header, body) = decode_body(&bytes, &Limits::new(0)).unwrap();
        assert_eq!((header.raw_len, body), (0, Vec::new()));
    }

    #[test]
    fn the_layout_is_as_documented() {
        let bytes = sample();
        let header = verify(&bytes).unwrap();
        assert_eq!(&bytes[..8], b"DORYSNAP");
        assert_eq!(u16_at(&bytes, VERSION_AT), 1);
        assert_eq!(u16_at(&bytes, CODEC_AT), Codec::Bincode.id());
        assert_eq!(u64_at(&bytes, EPOCH_AT), 3);
        assert_eq!(u64_at(&bytes, SEQUENCE_AT), 9);
        assert_eq!(bytes[ID_LEN_AT], 1);
        assert_eq!(bytes[FIXED_LEN], b'p');
        assert_eq!(header.compressed_len as usize, bytes.len() - FIXED_LEN - 1);
        assert_eq!(
            &bytes[FIXED_LEN + 1..FIXED_LEN + 5],
            &[0x28, 0xb5, 0x2f, 0xfd]
        );
        let expected =
            xxhash_rust::xxh3::xxh3_64(&[&bytes[..CHECKSUM_AT], &bytes[ID_LEN_AT..]].concat());
        assert_eq!(header.checksum, expected);
    }

    #[test]
    fn stored_snapshots_take_their_meta_from_the_header() {
        let bytes = sample();
        let len = bytes.len() as u64;
        let stored = StoredSnapshot::from_encoded(bytes, Timestamp(5)).unwrap();
        assert_eq!(
            stored.meta,
            SnapshotMeta {
                processor: id("p"),
                epoch: Epoch(3),
                sequence: Sequence(9),
                size: len,
                created_at: Timestamp(5),
            }
        );
        let mut bad = stored.bytes;
        bad[20] ^= 1;
        assert!(StoredSnapshot::from_encoded(bad, Timestamp(5)).is_err());
    }

    #[test]
    fn snapshots_read_from_columns_are_checked() {
        let bytes = sample();
        let len = bytes.len() as i64;
        // Filed under epoch 4 (a move's new owner), taken by 3: fine.
        let stored = StoredSnapshot::from_columns(&id("p"), (4, 9, len, 5), bytes.clone());
        let stored = stored.unwrap();
        assert_eq!(
            (stored.meta.epoch, stored.meta.size),
            (Epoch(4), len as u64)
        );
        assert_eq!(stored.meta.created_at, Timestamp(5));
        for (processor, meta) in [
            ("q", (4, 9, len, 5)),
            ("p", (4, 8, len, 5)),
            ("p", (4, 9, 1, 5)),
        ] {
            let e = StoredSnapshot::from_columns(&id(processor), meta, bytes.clone()).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{e}");
            assert!(e.to_string().contains("epoch 4"), "{e}");
        }
        let e = StoredSnapshot::from_columns(&id("p"), (-1, 9, len, 5), bytes).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
    }

    #[test]
    fn ids_and_levels() {
        for codec in CODECS {
            assert_eq!(Codec::try_from(codec.id()).unwrap(), codec);
        }
        assert_eq!(SnapshotKind::try_from(0).unwrap(), SnapshotKind::Full);
        assert!(Codec::try_from(4).is_err());
        assert_eq!(Encoder::default().level(), 1);
        assert_eq!(
            Encoder::new(1000).level(),
            *zstd::compression_level_range().end()
        );
    }
}
