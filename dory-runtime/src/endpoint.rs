//! The runtime's [`InstanceEndpoint`]: answers the control routes from the shared control
//! state, never waiting on user code.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dory_control::InstanceEndpoint;
use dory_core::snapshot::{self, Limits};
use dory_core::{Error, Health, Phase, Result, Sequence, SnapshotMeta};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::shared::{Ctl, Frozen, Shared};

/// What a snapshot body holds: the user's state with the runtime's own part of it.
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

/// The same fields by reference, for encoding without a copy (bincode is positional).
#[derive(Serialize)]
pub(crate) struct EnvelopeRef<'a, S> {
    pub(crate) version: u64,
    pub(crate) sequence: u64,
    pub(crate) position: &'a dory_core::InputPosition,
    pub(crate) state: &'a S,
}

/// The state loaded in standby, handed to the run loop at resume.
pub(crate) type Loaded<S> = Arc<Mutex<Option<Envelope<S>>>>;

pub(crate) struct Endpoint<S> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) loaded: Loaded<S>,
    pub(crate) limits: Limits,
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
        let (header, envelope) = snapshot::decode_state::<Envelope<S>>(&bytes, &self.limits)?;
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
        let mut refused = None;
        self.shared.ctl.send_if_modified(|c: &mut Ctl| {
            if c.phase() != Phase::Standby {
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

    async fn resume(&self) -> Result<()> {
        let mut refused = None;
        self.shared.ctl.send_if_modified(|c| {
            if let Some(why) = &c.fenced {
                refused = Some(Error::fenced(why.clone()));
                return false;
            }
            match c.phase() {
                Phase::Running => false,
                Phase::Standby if c.loaded.is_none() => {
                    refused = Some(Error::conflict(
                        "the instance has no snapshot loaded; PUT /state first",
                    ));
                    false
                }
                Phase::Standby | Phase::Frozen => {
                    c.resume_requested = true;
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
        Ok(())
    }
}
