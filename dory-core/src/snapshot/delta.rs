//! Delta snapshots: a state written as the chunks that changed since a full snapshot, its
//! base.
//!
//! A planned move pre-copies: while the old instance still runs it stores a full checkpoint
//! (the base) and the orchestrator loads that into the replacement. At the freeze only what
//! changed since the base is encoded, sent, loaded and committed, so the pause is bound by
//! what changed, not by the size of the state. The store keeps the delta as the new owner's
//! first checkpoint next to its base; a reader puts the two together with [`apply_delta`].
//!
//! The unit of change is a [`CHUNK_SIZE`]-byte chunk of the serialized (uncompressed) body at
//! the same offset in base and target: a state that changes in place (counters, fixed
//! buffers, maps whose keys stay put) sends little; one whose bytes shift (an insert near the
//! front of a long sequence) sends everything after the shift, never more than a full
//! snapshot's worth of chunks.
//!
//! # Body layout (after the common header, whose `raw_len` is the target body's length)
//!
//! | offset | size | field | meaning |
//! |---|---|---|---|
//! | 0 | 8 | base epoch | the epoch in the base snapshot's header |
//! | 8 | 8 | base sequence | the base snapshot's sequence |
//! | 16 | 8 | base checksum | the base snapshot's header checksum: the exact bytes |
//! | 24 | 8 | target hash | xxh3-64 of the target body, checked after applying |
//! | 32 | 4 | chunk size | [`CHUNK_SIZE`] when written by this build |
//! | 36 | 4 | changed `n` | how many chunks follow |
//! | 40 | rest | changes | a zstd frame: `n` ascending u32 chunk indexes, then those chunks |
//!
//! Every chunk is `chunk size` bytes but the target's last, which ends at `raw_len`.

use std::io::Cursor;

use xxhash_rust::xxh3::xxh3_64;

use super::{
    CHECKSUM_AT, Codec, Encoder, FORMAT_VERSION, ID_LEN_AT, Limits, SnapshotHeader, SnapshotKind,
    checksum, verify, with_compressor, with_decompressor,
};
use crate::error::{Error, Result};
use crate::model::{Epoch, ProcessorId, Sequence};

/// The size of the chunks a delta snapshot is made of: small enough that a state changing in
/// a few places sends little, large enough that the index list stays short (256 entries per
/// MiB).
pub const CHUNK_SIZE: usize = 4096;

/// The bytes before the compressed changes.
const PREFIX_LEN: usize = 40;

/// Which full snapshot a delta applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeltaBase {
    /// The epoch in the base snapshot's header (the instance that took it).
    pub epoch: Epoch,
    /// The base snapshot's sequence.
    pub sequence: Sequence,
    /// The base snapshot's header checksum, so the exact bytes are named, not just a position.
    pub checksum: u64,
}

impl DeltaBase {
    /// The error of a store asked to commit a delta whose base it does not hold.
    pub fn missing(&self, what: &str) -> Error {
        Error::conflict(format!(
            "{what}: the delta's base snapshot ({} {}) is not stored",
            self.epoch, self.sequence
        ))
    }
}

/// A full snapshot's serialized body, kept by the instance that took it so it can send only
/// what changed since (the running side of a pre-copy move).
#[derive(Clone, PartialEq, Eq)]
pub struct Base {
    /// Which snapshot it is.
    pub id: DeltaBase,
    /// How its body is serialized (a delta keeps the codec of its base).
    pub codec: Codec,
    /// The uncompressed body.
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("id", &self.id)
            .field("codec", &self.codec)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Base {
    /// The base of the full snapshot `bytes`, whose uncompressed body is `body` (the caller
    /// serialized it and encoded `bytes` from it, so neither is decoded again).
    pub fn of_encoded(bytes: &[u8], body: Vec<u8>) -> Result<Base> {
        Base::of_decoded(&verify(bytes)?, body)
    }

    /// The base of the full snapshot whose header is `header` and whose decompressed body is
    /// `body`, both already read and checked (e.g. by [`decode_body`](super::decode_body)).
    pub fn of_decoded(header: &SnapshotHeader, body: Vec<u8>) -> Result<Base> {
        header.require_full()?;
        if header.raw_len != body.len() as u64 {
            return Err(header.invalid(format!(
                "the base body has {} bytes, the snapshot {}",
                body.len(),
                header.raw_len
            )));
        }
        Ok(Base {
            id: DeltaBase {
                epoch: header.epoch,
                sequence: header.sequence,
                checksum: header.checksum,
            },
            codec: header.codec,
            body,
        })
    }
}

impl Encoder {
    /// Encodes the state whose serialized body is `body` as the chunks that differ from
    /// `base`: 4 KiB chunks ([`CHUNK_SIZE`]) of the body at the same offset, compared; only the
    /// changed ones are kept (read back with [`apply_delta`]). `sequence` must be above the base's.
    pub fn encode_delta(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
        base: &Base,
        body: &[u8],
    ) -> Result<Vec<u8>> {
        let mut header = SnapshotHeader {
            format_version: FORMAT_VERSION,
            kind: SnapshotKind::Delta,
            codec: base.codec,
            processor: processor.clone(),
            epoch,
            sequence,
            raw_len: body.len() as u64,
            compressed_len: 0,
            checksum: 0,
        };
        if sequence <= base.id.sequence {
            return Err(header.invalid(format!(
                "a delta at {sequence} cannot follow its base at {}",
                base.id.sequence
            )));
        }
        let changed: Vec<u32> = body
            .chunks(CHUNK_SIZE)
            .enumerate()
            .filter(|(i, chunk)| {
                let at = i * CHUNK_SIZE;
                base.body.get(at..at + chunk.len()) != Some(*chunk)
            })
            .map(|(i, _)| i as u32)
            .collect();
        let mut changes = Vec::with_capacity(changed.len() * (4 + CHUNK_SIZE));
        for i in &changed {
            changes.extend_from_slice(&i.to_le_bytes());
        }
        for &i in &changed {
            let at = i as usize * CHUNK_SIZE;
            changes.extend_from_slice(&body[at..(at + CHUNK_SIZE).min(body.len())]);
        }
        let header_len = header.len();
        let mut out = vec![0; header_len + PREFIX_LEN];
        let prefix = &mut out[header_len..];
        prefix[0..8].copy_from_slice(&base.id.epoch.0.to_le_bytes());
        prefix[8..16].copy_from_slice(&base.id.sequence.0.to_le_bytes());
        prefix[16..24].copy_from_slice(&base.id.checksum.to_le_bytes());
        prefix[24..32].copy_from_slice(&xxh3_64(body).to_le_bytes());
        prefix[32..36].copy_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        prefix[36..40].copy_from_slice(&(changed.len() as u32).to_le_bytes());
        out.reserve(zstd::compress_bound(changes.len()));
        let mut cursor = Cursor::new(out);
        cursor.set_position((header_len + PREFIX_LEN) as u64);
        with_compressor(self.level(), |zstd| {
            zstd.compress_to_buffer(&changes, &mut cursor)
        })
        .map_err(|e| header.invalid(format!("zstd compression failed: {e}")))?;
        let mut out = cursor.into_inner();
        header.compressed_len = (out.len() - header_len) as u64;
        header.write(&mut out[..header_len]);
        header.checksum = checksum(&out);
        out[CHECKSUM_AT..ID_LEN_AT].copy_from_slice(&header.checksum.to_le_bytes());
        Ok(out)
    }
}

/// The base a snapshot needs: `None` for a full snapshot. Checks the header and checksum
/// (see [`verify`]), not the changes.
pub fn delta_base(bytes: &[u8]) -> Result<Option<DeltaBase>> {
    base_named(&verify(bytes)?, bytes)
}

/// The base named by the snapshot whose header (already read from `bytes`) is `header`.
pub(super) fn base_named(header: &SnapshotHeader, bytes: &[u8]) -> Result<Option<DeltaBase>> {
    match header.kind {
        SnapshotKind::Full => Ok(None),
        SnapshotKind::Delta => read_prefix(header, &bytes[header.len()..]).map(|p| Some(p.base)),
    }
}

/// A delta body's fixed fields.
struct Prefix {
    base: DeltaBase,
    target_hash: u64,
    chunk_size: usize,
    changed: usize,
}

fn read_prefix(header: &SnapshotHeader, body: &[u8]) -> Result<Prefix> {
    if body.len() < PREFIX_LEN {
        return Err(header.invalid(format!(
            "delta body of {} bytes is shorter than its {PREFIX_LEN}-byte prefix",
            body.len()
        )));
    }
    let u64_at = |at: usize| super::u64_at(body, at);
    let u32_at = |at: usize| {
        let mut le = [0; 4];
        le.copy_from_slice(&body[at..at + 4]);
        u32::from_le_bytes(le) as usize
    };
    let prefix = Prefix {
        base: DeltaBase {
            epoch: Epoch(u64_at(0)),
            sequence: Sequence(u64_at(8)),
            checksum: u64_at(16),
        },
        target_hash: u64_at(24),
        chunk_size: u32_at(32),
        changed: u32_at(36),
    };
    if prefix.chunk_size == 0 {
        return Err(header.invalid("delta with a chunk size of 0"));
    }
    if prefix.base.sequence >= header.sequence {
        return Err(header.invalid(format!(
            "delta at {} names a base at {}, not older",
            header.sequence, prefix.base.sequence
        )));
    }
    Ok(prefix)
}

/// Puts a delta snapshot together with its base (a full snapshot): checks both, that the base
/// is exactly the one the delta names, and that the result hashes as the delta says; returns
/// the delta's header and the whole decompressed body (read it with
/// [`decode_state_body`](super::decode_state_body) or give it to
/// [`Encoder::encode_body`]). Neither input is trusted: every count and index is checked
/// before it is used, and nothing larger than `limits` is allocated.
pub fn apply_delta(
    base: &[u8],
    delta: &[u8],
    limits: &Limits,
) -> Result<(SnapshotHeader, Vec<u8>)> {
    let header = verify(delta)?;
    let (base_header, body) = super::decode_body(base, limits)
        .map_err(|e| e.context(format!("the base of delta {}", header.sequence)))?;
    if base_header.processor != header.processor {
        return Err(header.invalid(format!(
            "delta {} is of processor {}, its base of {}",
            header.sequence, header.processor, base_header.processor
        )));
    }
    apply_verified(
        header,
        &Base::of_decoded(&base_header, body)?,
        delta,
        limits,
        Vec::new(),
    )
}

/// [`apply_delta`] onto a base already decompressed (and checked when it was read), e.g. the
/// full snapshot a standby instance loaded before the delta: the base is not decompressed
/// again.
pub fn apply_delta_to(
    base: &Base,
    delta: &[u8],
    limits: &Limits,
) -> Result<(SnapshotHeader, Vec<u8>)> {
    apply_delta_into(base, delta, limits, Vec::new())
}

/// [`apply_delta_to`], writing the state's body into `target` (cleared first) and returning
/// it. A buffer with room for the body, its pages already touched, spares the page faults of a
/// fresh state-sized allocation, which cost more than the copy itself (a move's replacement
/// prepares one when it loads the base, so the delta at the freeze applies without them).
pub fn apply_delta_into(
    base: &Base,
    delta: &[u8],
    limits: &Limits,
    target: Vec<u8>,
) -> Result<(SnapshotHeader, Vec<u8>)> {
    apply_verified(verify(delta)?, base, delta, limits, target)
}

fn apply_verified(
    header: SnapshotHeader,
    base: &Base,
    delta: &[u8],
    limits: &Limits,
    mut target: Vec<u8>,
) -> Result<(SnapshotHeader, Vec<u8>)> {
    if header.kind != SnapshotKind::Delta {
        return Err(header.invalid(format!(
            "sequence {} is a {} snapshot, not a delta",
            header.sequence, header.kind
        )));
    }
    let body = &delta[header.len()..];
    let prefix = read_prefix(&header, body)?;
    if base.id != prefix.base {
        return Err(header.invalid(format!(
            "delta {} applies to epoch {} {} (checksum 0x{:016x}), not to epoch {} {} (checksum 0x{:016x})",
            header.sequence,
            prefix.base.epoch,
            prefix.base.sequence,
            prefix.base.checksum,
            base.id.epoch,
            base.id.sequence,
            base.id.checksum
        )));
    }
    if base.codec != header.codec {
        return Err(header.invalid(format!(
            "delta codec {} differs from its base's {}",
            header.codec, base.codec
        )));
    }
    let raw_len = header.raw_len;
    if raw_len > limits.max_decoded {
        return Err(header.invalid(format!(
            "decompressed size {raw_len} exceeds limit {}",
            limits.max_decoded
        )));
    }
    let raw_len = raw_len as usize;
    let chunks = raw_len.div_ceil(prefix.chunk_size);
    if prefix.changed > chunks {
        return Err(header.invalid(format!(
            "delta claims {} changed chunks of a {raw_len}-byte body ({chunks} chunks)",
            prefix.changed
        )));
    }
    // Bounded by the body the header claims: the changes can never be larger than the indexes
    // plus every chunk.
    let changes_bound = prefix.changed * 4 + raw_len.min(prefix.changed * prefix.chunk_size);
    let frame = &body[PREFIX_LEN..];
    let mut changes = Vec::new();
    changes.try_reserve_exact(changes_bound).map_err(|_| {
        header.invalid(format!(
            "cannot allocate {changes_bound} bytes for the changes"
        ))
    })?;
    with_decompressor(|zstd| zstd.decompress_to_buffer(frame, &mut changes)).map_err(|e| {
        header.invalid(format!(
            "delta changes do not decompress within {changes_bound} bytes: {e}"
        ))
    })?;
    let (indexes, mut data) = changes
        .split_at_checked(prefix.changed * 4)
        .ok_or_else(|| header.invalid("delta changes are shorter than their index list"))?;
    target.clear();
    target
        .try_reserve_exact(raw_len)
        .map_err(|_| header.invalid(format!("cannot allocate {raw_len} bytes for the state")))?;
    target.extend_from_slice(&base.body[..base.body.len().min(raw_len)]);
    target.resize(raw_len, 0);
    let mut last = None;
    for index in indexes.chunks_exact(4) {
        let i = u32::from_le_bytes([index[0], index[1], index[2], index[3]]) as usize;
        if i >= chunks || last.is_some_and(|l| i <= l) {
            return Err(header.invalid(format!(
                "delta chunk index {i} is out of order or past the last chunk ({chunks})"
            )));
        }
        last = Some(i);
        let at = i * prefix.chunk_size;
        let len = prefix.chunk_size.min(raw_len - at);
        let (chunk, rest) = data
            .split_at_checked(len)
            .ok_or_else(|| header.invalid(format!("delta chunk {i} is truncated")))?;
        target[at..at + len].copy_from_slice(chunk);
        data = rest;
    }
    if !data.is_empty() {
        return Err(header.invalid(format!(
            "{} unexpected bytes after the delta's chunks",
            data.len()
        )));
    }
    if xxh3_64(&target) != prefix.target_hash {
        return Err(header.invalid(
            "the state put together from the delta and its base does not hash as the delta says",
        ));
    }
    Ok((header, target))
}

/// A delta put together with its base as a full snapshot of the same processor, epoch and
/// sequence (for a reader that wants one self-contained snapshot, e.g. an export). A full
/// snapshot is returned as it is; `base` is only read for a delta.
pub fn resolve_delta(snapshot: Vec<u8>, base: Option<&[u8]>, limits: &Limits) -> Result<Vec<u8>> {
    let header = verify(&snapshot)?;
    if header.kind == SnapshotKind::Full {
        return Ok(snapshot);
    }
    let Some(base) = base else {
        return Err(header.invalid(format!("delta {} needs its base snapshot", header.sequence)));
    };
    let (header, body) = apply_delta(base, &snapshot, limits)?;
    Encoder::default().encode_body(
        &header.processor,
        header.epoch,
        header.sequence,
        header.codec,
        &body,
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::{decode_body, decode_state};

    fn id() -> ProcessorId {
        ProcessorId::new("delta-test").unwrap()
    }

    fn full(seq: u64, body: &[u8]) -> (Vec<u8>, Base) {
        let bytes = Encoder::default()
            .encode_body(&id(), Epoch(3), Sequence(seq), Codec::Raw, body)
            .unwrap();
        let base = Base::of_encoded(&bytes, body.to_vec()).unwrap();
        (bytes, base)
    }

    fn delta(base: &Base, seq: u64, body: &[u8]) -> Vec<u8> {
        Encoder::default()
            .encode_delta(&id(), Epoch(3), Sequence(seq), base, body)
            .unwrap()
    }

    #[test]
    fn a_delta_applies_into_a_used_buffer_as_into_a_fresh_one() {
        let body: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        let (_, base) = full(10, &body);
        let mut changed = body.clone();
        changed[12_345] ^= 1;
        changed.truncate(30_000);
        let d = delta(&base, 11, &changed);
        let fresh = apply_delta_to(&base, &d, &Limits::default()).unwrap();
        // Longer than the result and full of other bytes: none of it may show through.
        let used = vec![0xEE; 50_000];
        let into = apply_delta_into(&base, &d, &Limits::default(), used).unwrap();
        assert_eq!(into.1, fresh.1);
        assert_eq!(into.1, changed);
    }

    #[test]
    fn a_small_change_to_a_large_state_is_a_small_delta() {
        let body: Vec<u8> = (0..1u64 << 20).map(|i| (i * 7919 % 251) as u8).collect();
        let (base_bytes, base) = full(10, &body);
        let mut changed = body.clone();
        changed[500_000] ^= 1;
        let d = delta(&base, 11, &changed);
        assert!(d.len() < 1024, "{} bytes", d.len());
        let (header, back) = apply_delta(&base_bytes, &d, &Limits::default()).unwrap();
        assert_eq!(
            (header.kind, header.sequence),
            (SnapshotKind::Delta, Sequence(11))
        );
        assert_eq!(back, changed);
        assert_eq!(
            delta_base(&d).unwrap(),
            Some(DeltaBase {
                epoch: Epoch(3),
                sequence: Sequence(10),
                checksum: base.id.checksum
            })
        );
        assert_eq!(delta_base(&base_bytes).unwrap(), None);
    }

    #[test]
    fn a_delta_is_not_read_without_its_base() {
        let (_, base) = full(1, b"abc");
        let d = delta(&base, 2, b"abd");
        let err = decode_body(&d, &Limits::default()).unwrap_err().to_string();
        assert!(err.contains("delta snapshot"), "{err}");
        let err = decode_state::<u32>(&d, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("delta snapshot"), "{err}");
        let err = resolve_delta(d, None, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs its base"), "{err}");
    }

    #[test]
    fn a_delta_refuses_any_other_base() {
        let (_, base) = full(5, &[1; 10_000]);
        let (other_bytes, _) = full(5, &[2; 10_000]);
        let d = delta(&base, 6, &[3; 10_000]);
        let err = apply_delta(&other_bytes, &d, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("applies to epoch e3 #5"), "{err}");
    }

    #[test]
    fn a_delta_must_follow_its_base() {
        let (_, base) = full(5, b"abc");
        let err = Encoder::default()
            .encode_delta(&id(), Epoch(3), Sequence(5), &base, b"abd")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot follow its base"), "{err}");
    }

    #[test]
    fn a_damaged_delta_is_refused_naming_the_damage() {
        let (base_bytes, base) = full(1, &[7; 20_000]);
        let mut d = delta(&base, 2, &[8; 20_000]);
        let last = d.len() - 1;
        d[last] ^= 0xff;
        let err = apply_delta(&base_bytes, &d, &Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }

    #[test]
    fn a_delta_over_the_limit_is_refused_before_allocating() {
        let (base_bytes, base) = full(1, &[7; 20_000]);
        let d = delta(&base, 2, &[8; 20_000]);
        let err = apply_delta(&base_bytes, &d, &Limits::new(10_000))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds limit"), "{err}");
    }

    #[test]
    fn a_resolved_delta_is_the_full_snapshot() {
        let (base_bytes, base) = full(1, b"hello world");
        let d = delta(&base, 2, b"hello there, world");
        let resolved = resolve_delta(d, Some(&base_bytes), &Limits::default()).unwrap();
        let (header, body) = decode_body(&resolved, &Limits::default()).unwrap();
        assert_eq!(
            (header.kind, header.sequence),
            (SnapshotKind::Full, Sequence(2))
        );
        assert_eq!(body, b"hello there, world");
    }

    proptest! {
        #[test]
        fn any_target_comes_back_from_any_base(
            base_body in proptest::collection::vec(any::<u8>(), 0..20_000),
            target in proptest::collection::vec(any::<u8>(), 0..20_000),
            keep in 0usize..20_000,
        ) {
            // Targets that share a prefix with the base, as real states do.
            let keep = keep.min(base_body.len());
            let mut target_body = base_body[..keep].to_vec();
            target_body.extend_from_slice(&target);
            let (base_bytes, base) = full(1, &base_body);
            let d = delta(&base, 2, &target_body);
            let (_, back) = apply_delta(&base_bytes, &d, &Limits::default()).unwrap();
            prop_assert_eq!(back, target_body);
        }

        #[test]
        fn a_flipped_byte_anywhere_in_a_delta_is_an_error_never_a_panic(
            at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let (base_bytes, base) = full(1, &[5; 9_000]);
            let mut d = delta(&base, 2, &[6; 9_000]);
            let at = at.index(d.len());
            d[at] ^= 1 << bit;
            prop_assert!(apply_delta(&base_bytes, &d, &Limits::default()).is_err());
        }
    }
}
