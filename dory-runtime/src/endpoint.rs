//! The runtime's [`InstanceEndpoint`]: answers the control routes from the shared control
//! state, never waiting on user code.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dory_control::InstanceEndpoint;
use dory_core::snapshot::{self, Base, Encoder, Limits, SnapshotKind};
use dory_core::{Error, Health, Phase, Result, Sequence, SnapshotMeta};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::shared::{Ctl, Frozen, Shared, SpareBody};

/// What a snapshot body holds: the user's state with the runtime's own part of it.
///
/// Written as [`FIXED_HEAD`], the version and the output sequence as 8 bytes each
/// (little-endian), then the input position and the state in bincode. Read in that form or
/// in the one before it, all four fields in bincode (see [`decode_envelope`]).
#[derive(serde::Deserialize)]
pub(crate) struct Envelope<S> {
    /// The state's version: the snapshot's sequence, one up for every step, so a state that
    /// changed without publishing is still a newer checkpoint.
    pub(crate) version: u64,
    /// The last output sequence published.
    pub(crate) sequence: u64,
    pub(crate) position: dory_core::InputPosition,
    pub(crate) state: S,
}

/// The first byte of an envelope whose version and output sequence are fixed-width. In the
/// form before, they were bincode varints, and a version or sequence crossing 250, 65,536 or
/// 2³² lengthened them and shifted every byte of the state after them: the next delta was as
/// large as the state. A bincode varint never starts with 255 (its tags stop at 254), so
/// both forms read.
pub(crate) const FIXED_HEAD: u8 = 255;

/// [`FIXED_HEAD`], the version and the output sequence.
const FIXED_HEAD_LEN: usize = 1 + 8 + 8;

/// Serializes an envelope into `out`, after what it holds.
pub(crate) fn serialize_envelope<S: Serialize>(
    processor: &dory_core::ProcessorId,
    epoch: dory_core::Epoch,
    version: u64,
    sequence: u64,
    position: &dory_core::InputPosition,
    state: &S,
    out: &mut Vec<u8>,
) -> Result<()> {
    out.push(FIXED_HEAD);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    snapshot::serialize_state_into(processor, epoch, &(position, state), out)
}

/// Reads an envelope from a decompressed body of the snapshot `header` describes, in either
/// form (see [`FIXED_HEAD`]).
pub(crate) fn decode_envelope<S: DeserializeOwned>(
    header: &snapshot::SnapshotHeader,
    body: &[u8],
) -> Result<Envelope<S>> {
    if body.first() != Some(&FIXED_HEAD) {
        return snapshot::decode_state_body::<Envelope<S>>(header, body);
    }
    let Some((head, rest)) = body.split_at_checked(FIXED_HEAD_LEN) else {
        return Err(Error::invalid(format!(
            "snapshot of {} epoch {} sequence {}: the state's version and output sequence are cut short ({} bytes)",
            header.processor,
            header.epoch,
            header.sequence,
            body.len()
        )));
    };
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let (position, state) =
        snapshot::decode_state_body::<(dory_core::InputPosition, S)>(header, rest)?;
    Ok(Envelope {
        version: word(1),
        sequence: word(9),
        position,
        state,
    })
}

/// The state loaded in standby, handed to the run loop at resume.
pub(crate) type Loaded<S> = Arc<Mutex<Option<Envelope<S>>>>;

pub(crate) struct Endpoint<S> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) loaded: Loaded<S>,
    pub(crate) limits: Limits,
    /// A buffer the size of the loaded full snapshot's body, its pages touched, for the state
    /// a delta makes of it: applying the delta at the freeze then faults no fresh pages in.
    pub(crate) spare_body: SpareBody,
}

/// Withdraws a freeze request when its future is dropped before it was answered.
struct FreezeGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for FreezeGuard<'_> {
    fn drop(&mut self) {
        let delivered = !self.armed;
        self.shared.ctl.send_modify(|c| {
            c.freeze_waiters = c.freeze_waiters.saturating_sub(1);
            if delivered {
                c.delivered = true;
            }
        });
        if self.armed {
            tracing::warn!(target: "dory::runtime", "freeze request withdrawn before the processor froze; it keeps running");
        }
    }
}

#[async_trait]
impl<S> InstanceEndpoint for Endpoint<S>
where
    S: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn health(&self) -> Health {
        Health {
            phase: self.shared.ctl.borrow().phase(),
            epoch: self.shared.epoch,
            sequence: Sequence(self.shared.metrics.sequence.load(Ordering::Relaxed)),
            protocol: dory_core::CONTROL_PROTOCOL,
        }
    }

    fn ready(&self) -> Result<()> {
        let ctl = self.shared.ctl.borrow();
        if let Some(why) = &ctl.fenced {
            return Err(Error::fenced(why.clone()));
        }
        if let Some(why) = &ctl.paused {
            return Err(Error::unavailable(why.clone()));
        }
        match ctl.phase() {
            Phase::Standby | Phase::Running | Phase::Frozen => Ok(()),
            other => Err(Error::unavailable(format!("the instance is {other}"))),
        }
    }

    fn metrics(&self) -> String {
        self.shared.render_metrics()
    }

    async fn freeze(&self, _timeout: Duration) -> Result<SnapshotMeta> {
        // The router bounds this future by the timeout and drops it then; the guard withdraws
        // the request, so the run loop never freezes for a caller that has gone.
        let mut rx = self.shared.ctl.subscribe();
        {
            let c = rx.borrow();
            match c.phase() {
                Phase::Running | Phase::Frozen => {}
                other => {
                    return Err(Error::conflict(format!(
                        "the instance is {other}; only a running instance can freeze"
                    )));
                }
            }
            if let Some(why) = &c.fenced {
                return Err(Error::fenced(why.clone()));
            }
        }
        self.shared.ctl.send_modify(|c| c.freeze_waiters += 1);
        let mut guard = FreezeGuard {
            shared: &self.shared,
            armed: true,
        };
        let outcome = rx
            .wait_for(|c| {
                matches!(c.frozen, Frozen::ForRequest { .. }) || c.fenced.is_some() || c.shutdown
            })
            .await
            .map_err(|_| Error::unavailable("the instance is stopping"))
            .and_then(|c| match (&c.frozen, &c.fenced) {
                (Frozen::ForRequest { meta, .. }, _) => Ok(meta.clone()),
                (_, Some(why)) => Err(Error::fenced(why.clone())),
                _ => Err(Error::unavailable("the instance is shutting down")),
            });
        if outcome.is_ok() {
            guard.armed = false;
        }
        outcome
    }

    async fn snapshot(&self) -> Result<Bytes> {
        match &self.shared.ctl.borrow().frozen {
            Frozen::ForRequest { bytes, .. } => Ok(bytes.clone()),
            Frozen::No => Err(Error::conflict(
                "the instance is not frozen; freeze it first",
            )),
        }
    }

    async fn full_snapshot(&self) -> Result<Bytes> {
        let (bytes, meta, full_body) = match &self.shared.ctl.borrow().frozen {
            Frozen::ForRequest {
                bytes,
                meta,
                full_body,
            } => (bytes.clone(), meta.clone(), full_body.clone()),
            Frozen::No => {
                return Err(Error::conflict(
                    "the instance is not frozen; freeze it first",
                ));
            }
        };
        let Some(body) = full_body else {
            return Ok(bytes);
        };
        // Only when the replacement could not take the delta: off the usual move's path, so
        // encoded on demand rather than at every freeze.
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            Encoder::default().encode_body(
                &shared.processor,
                shared.epoch,
                meta.sequence,
                snapshot::Codec::Bincode,
                &body,
            )
        })
        .await
        .map_err(|e| Error::unavailable(format!("encoding the full snapshot stopped: {e}")))?
        .map(Bytes::from)
    }

    async fn precopy(&self, _timeout: Duration) -> Result<Bytes> {
        // Bounded by the router, which drops this future at the timeout; a run loop that
        // answers late only stored one more checkpoint.
        let mut rx = self.shared.ctl.subscribe();
        {
            let c = rx.borrow();
            if c.phase() != Phase::Running {
                return Err(Error::conflict(format!(
                    "the instance is {}; only a running instance pre-copies",
                    c.phase()
                )));
            }
            if let Some(why) = &c.fenced {
                return Err(Error::fenced(why.clone()));
            }
        }
        let mut request = 0;
        self.shared.ctl.send_modify(|c| {
            c.precopy_requested += 1;
            request = c.precopy_requested;
        });
        let answered = rx
            .wait_for(|c| {
                c.precopied.as_ref().is_some_and(|p| p.request >= request)
                    || c.fenced.is_some()
                    || c.shutdown
                    || c.freeze_waiters > 0
            })
            .await
            .map_err(|_| Error::unavailable("the instance is stopping"))?;
        match (&answered.precopied, &answered.fenced) {
            (_, Some(why)) => Err(Error::fenced(why.clone())),
            (Some(p), _) if p.request >= request => p.outcome.clone(),
            _ => Err(Error::conflict(
                "the instance is freezing or stopping; no pre-copy",
            )),
        }
    }

    async fn load(&self, bytes: Bytes) -> Result<()> {
        let phase = self.shared.ctl.borrow().phase();
        if phase != Phase::Standby {
            return Err(Error::conflict(format!(
                "the instance is {phase}; only a standby instance loads a snapshot"
            )));
        }
        let started = tokio::time::Instant::now();
        // Everything is checked before anything is kept: a refused snapshot leaves the
        // instance exactly as it was.
        // The kind only; the decode below verifies the checksum.
        let is_full = snapshot::decode_header(&bytes)?.kind == SnapshotKind::Full;
        let (header, envelope, base) = if is_full {
            let (header, body) = snapshot::decode_body(&bytes, &self.limits)?;
            let envelope = decode_envelope::<S>(&header, &body)?;
            // The buffer for the state a delta makes of this one, prepared in the background:
            // when this full snapshot is the freeze's own, the resume follows at once and
            // nothing waits for it.
            let (spare, len) = (self.spare_body.clone(), body.len());
            tokio::task::spawn_blocking(move || {
                if spare.is_open() {
                    spare.put(crate::shared::warm_buffer(len));
                }
            });
            // Kept decompressed: a pre-copy move's delta follows and applies to it.
            let base = Base::of_decoded(&header, body)?;
            (header, envelope, Some(Arc::new(base)))
        } else {
            // A pre-copy move's delta: it applies only to the full snapshot loaded before.
            let base = self.shared.ctl.borrow().loaded_full.clone();
            let Some(base) = base else {
                return Err(Error::conflict(
                    "the snapshot is a delta and no full snapshot is loaded for it to apply to",
                ));
            };
            let target = self.spare_body.take();
            let (header, body) = snapshot::apply_delta_into(&base, &bytes, &self.limits, target)?;
            // Decoded before the answer, never while the move commits: a new revision of the
            // processor may decode the base and not every later value, and a refused load
            // rolls the move back with the old instance running, where a failure after the
            // commit would leave the processor down.
            let envelope = decode_envelope::<S>(&header, &body);
            // Warm still: the run loop serializes into it once resumed.
            self.spare_body.put(body);
            (header, envelope?, None)
        };
        let (processor, epoch) = (&self.shared.processor, self.shared.epoch);
        if header.processor != *processor {
            return Err(Error::invalid(format!(
                "snapshot is of processor {}, this instance runs {processor}",
                header.processor
            )));
        }
        if header.epoch >= epoch {
            return Err(Error::invalid(format!(
                "snapshot was taken by epoch {}, which is not older than this instance's epoch {epoch}",
                header.epoch
            )));
        }
        if envelope.version != header.sequence.0 {
            return Err(Error::invalid(format!(
                "snapshot header says sequence {} but its state is version {}",
                header.sequence, envelope.version
            )));
        }
        let output = envelope.sequence;
        let mut base = base;
        let mut refused = None;
        self.shared.ctl.send_if_modified(|c: &mut Ctl| {
            if c.phase() != Phase::Standby || c.resume_requested {
                refused = Some(Error::conflict("the instance is no longer standby"));
                return false;
            }
            if let Some((e, s, loaded)) = &c.loaded {
                if (*e, *s) == (header.epoch, header.sequence) && *loaded == bytes {
                    return false; // the same snapshot again: nothing to do
                }
                if (header.epoch, header.sequence) <= (*e, *s) {
                    refused = Some(Error::invalid(format!(
                        "snapshot of epoch {} sequence {} is not newer than the one already loaded (epoch {e} sequence {s})",
                        header.epoch, header.sequence
                    )));
                    return false;
                }
            }
            *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = Some(envelope);
            c.loaded = Some((header.epoch, header.sequence, bytes.clone()));
            if let Some(base) = base.take() {
                c.loaded_full = Some(base);
            }
            true
        });
        if let Some(e) = refused {
            return Err(e);
        }
        self.shared
            .metrics
            .restore_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.shared
            .metrics
            .snapshot_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        self.shared
            .metrics
            .sequence
            .store(output, Ordering::Relaxed);
        tracing::info!(target: "dory::runtime", processor = %processor, epoch = epoch.0, from_epoch = header.epoch.0, sequence = header.sequence.0, "snapshot loaded");
        Ok(())
    }

    async fn resume(&self, committed: Option<Sequence>) -> Result<()> {
        let mut refused = None;
        self.shared.ctl.send_if_modified(|c| {
            if let Some(why) = &c.fenced {
                refused = Some(Error::fenced(why.clone()));
                return false;
            }
            match c.phase() {
                Phase::Running => false,
                Phase::Standby if c.loaded.is_none() && committed.is_none() => {
                    refused = Some(Error::conflict(
                        "the instance has no snapshot loaded; PUT /state first",
                    ));
                    false
                }
                Phase::Standby | Phase::Frozen => {
                    c.resume_requested = true;
                    // A repeated request must not drop what an earlier one named.
                    c.resume_committed = c.resume_committed.max(committed);
                    true
                }
                other => {
                    refused = Some(Error::conflict(format!(
                        "the instance is {other}; it cannot resume"
                    )));
                    false
                }
            }
        });
        if let Some(e) = refused {
            return Err(e);
        }
        // Answer once the run loop has taken the resume, so health says Running after it.
        let mut rx = self.shared.ctl.subscribe();
        let _ = rx
            .wait_for(|c| !c.resume_requested || c.fenced.is_some() || c.shutdown)
            .await;
        let c = self.shared.ctl.borrow();
        if c.resume_requested {
            // Woken by a fence or a shutdown before the run loop took the resume.
            return Err(match &c.fenced {
                Some(why) => Error::fenced(why.clone()),
                None => Error::unavailable("the instance is shutting down"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use dory_core::snapshot::{Base, Codec, Encoder, Limits};
    use dory_core::{Epoch, InputPosition, ProcessorId};

    use super::*;

    fn id() -> ProcessorId {
        ProcessorId::new("envelope").unwrap()
    }

    fn body(version: u64, state: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let state = state.to_vec();
        serialize_envelope(
            &id(),
            Epoch(1),
            version,
            version,
            &InputPosition::new(),
            &state,
            &mut out,
        )
        .unwrap();
        out
    }

    fn header_of(bytes: &[u8]) -> snapshot::SnapshotHeader {
        snapshot::decode_header(bytes).unwrap()
    }

    #[test]
    fn a_version_crossing_a_varint_boundary_shifts_nothing() {
        // Incompressible, so the delta's size is the chunks it carries.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let state: Vec<u8> = (0..64 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let before = body(200, &state);
        let after = body(300, &state);
        assert_eq!(before.len(), after.len());
        let full = Encoder::default()
            .encode_body(&id(), Epoch(1), Sequence(200), Codec::Bincode, &before)
            .unwrap();
        let base = Base::of_encoded(&full, before).unwrap();
        let delta = Encoder::default()
            .encode_delta(&id(), Epoch(1), Sequence(300), &base, &after)
            .unwrap();
        // Only the chunk with the version and sequence changed, not all 17.
        assert!(delta.len() < 2 * 4096, "{} bytes", delta.len());
        let (header, applied) =
            snapshot::apply_delta_to(&base, &delta, &Limits::default()).unwrap();
        let envelope = decode_envelope::<Vec<u8>>(&header, &applied).unwrap();
        assert_eq!((envelope.version, envelope.sequence), (300, 300));
        assert_eq!(envelope.state, state);
    }

    #[test]
    fn an_envelope_of_the_form_before_still_reads() {
        #[derive(Serialize)]
        struct Before {
            version: u64,
            sequence: u64,
            position: InputPosition,
            state: u64,
        }
        let old = Before {
            version: 70_000,
            sequence: 69_999,
            position: InputPosition::new(),
            state: 42,
        };
        let bytes = Encoder::default()
            .encode_state(&id(), Epoch(1), Sequence(70_000), &old)
            .unwrap();
        let (header, body) = snapshot::decode_body(&bytes, &Limits::default()).unwrap();
        assert_ne!(body[0], FIXED_HEAD);
        let envelope = decode_envelope::<u64>(&header, &body).unwrap();
        assert_eq!(
            (envelope.version, envelope.sequence, envelope.state),
            (70_000, 69_999, 42)
        );
    }

    #[test]
    fn a_cut_short_envelope_is_refused_with_what_is_missing() {
        let whole = body(7, b"abc");
        let bytes = Encoder::default()
            .encode_body(&id(), Epoch(1), Sequence(7), Codec::Bincode, &whole)
            .unwrap();
        let header = header_of(&bytes);
        let error = decode_envelope::<Vec<u8>>(&header, &whole[..10])
            .err()
            .unwrap();
        assert!(error.to_string().contains("cut short"), "{error}");
        let error = decode_envelope::<Vec<u8>>(&header, &whole[..whole.len() - 1])
            .err()
            .unwrap();
        assert!(error.to_string().contains("does not decode"), "{error}");
    }
}
