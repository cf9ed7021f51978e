//! What the run loop, the heartbeat, the endpoint server and user code's [`Context`] share:
//! the control state (a `watch` channel, never held across an await), the publish gate and
//! the metrics (atomics).
//!
//! [`Context`]: crate::Context

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dory_core::snapshot::Base;
use dory_core::{Epoch, Error, Phase, ProcessorId, Result, Sequence, SnapshotMeta};
use tokio::sync::watch;
use tokio::time::Instant;

/// Why the run loop stands still.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Frozen {
    /// Not frozen.
    #[default]
    No,
    /// Frozen for a `POST /state/freeze`, holding this exact snapshot: a delta when the
    /// instance pre-copied a base, with the serialized state kept in `full_body` so that
    /// `GET /state/full` can still answer the whole state.
    ForRequest {
        bytes: Bytes,
        meta: SnapshotMeta,
        full_body: Option<Bytes>,
    },
}

/// The run loop's answer to the pre-copy requests it took at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PreCopied {
    /// The last request answered ([`Ctl::precopy_requested`] when the run loop took them): a
    /// request waits for an answer to itself, never for one begun before it asked, whose base
    /// a later pre-copy would already have replaced.
    pub(crate) request: u64,
    /// The stored full checkpoint, or why there is none.
    pub(crate) outcome: Result<Bytes, Error>,
}

/// The control state every party reads and the run loop acts on at its safe points.
#[derive(Debug, Default)]
pub(crate) struct Ctl {
    pub(crate) phase: Option<Phase>,
    /// Freeze requests in flight; a dropped request withdraws itself.
    pub(crate) freeze_waiters: usize,
    /// A freeze request was answered since the last resume: the orchestrator holds the
    /// snapshot, so the instance stays frozen even when no request is waiting any more.
    pub(crate) delivered: bool,
    pub(crate) frozen: Frozen,
    pub(crate) resume_requested: bool,
    /// The sequence the orchestrator committed for this epoch, when the resume said: a
    /// standby holding another snapshot restores that one from the store before it runs.
    pub(crate) resume_committed: Option<Sequence>,
    pub(crate) shutdown: bool,
    pub(crate) fenced: Option<String>,
    /// A snapshot loaded in standby: its (epoch, sequence) and bytes, for idempotence.
    pub(crate) loaded: Option<(Epoch, Sequence, Bytes)>,
    /// The last full snapshot loaded in standby, decompressed: the base a pre-copy move's
    /// delta applies to.
    pub(crate) loaded_full: Option<Arc<Base>>,
    /// Pre-copy requests made so far, each numbered by this count when it was made.
    pub(crate) precopy_requested: u64,
    /// The last request the run loop has taken on (its answer may still be on its way: the
    /// write runs beside the processor, which need not stop for it).
    pub(crate) precopy_taken: u64,
    /// The answer to the last pre-copy requests taken.
    pub(crate) precopied: Option<PreCopied>,
    /// Why the run loop has frozen itself (lease or checkpoint trouble), if it has.
    pub(crate) paused: Option<String>,
}

impl Ctl {
    pub(crate) fn phase(&self) -> Phase {
        self.phase.clone().unwrap_or(Phase::Starting)
    }

    /// Whether the run loop must stop at its next safe point.
    pub(crate) fn wants_safe_point(&self) -> bool {
        self.freeze_waiters > 0 || self.precopy_wanted() || self.shutdown || self.fenced.is_some()
    }

    /// Whether a pre-copy request waits for the run loop to take it on.
    pub(crate) fn precopy_wanted(&self) -> bool {
        self.precopy_requested > self.precopy_taken
    }
}

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) iterations: AtomicU64,
    pub(crate) publishes: AtomicU64,
    pub(crate) sequence: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    pub(crate) checkpoint_failures: AtomicU64,
    /// Milliseconds since the runtime started, of the last committed checkpoint (0: none).
    pub(crate) last_checkpoint_ms: AtomicU64,
    pub(crate) snapshot_bytes: AtomicU64,
    pub(crate) freeze_ms: AtomicU64,
    pub(crate) freezes: AtomicU64,
    pub(crate) precopies: AtomicU64,
    pub(crate) restore_ms: AtomicU64,
    pub(crate) step_errors: AtomicU64,
}

/// The state shared by everything in one instance.
pub(crate) struct Shared {
    pub(crate) processor: ProcessorId,
    pub(crate) epoch: Epoch,
    pub(crate) config: serde_json::Value,
    pub(crate) lease: Duration,
    pub(crate) ctl: watch::Sender<Ctl>,
    pub(crate) metrics: Metrics,
    started: Instant,
    /// Milliseconds since `started` until which the lease is known to run; 0: no lease.
    lease_until_ms: AtomicU64,
    /// A due checkpoint could not be stored: no publishing until one is.
    checkpoint_failing: AtomicBool,
    fenced: AtomicBool,
    /// The run loop is running (not standby, frozen or stopped).
    running: AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        processor: ProcessorId,
        epoch: Epoch,
        config: serde_json::Value,
        lease: Duration,
    ) -> Self {
        Shared {
            processor,
            epoch,
            config,
            lease,
            ctl: watch::Sender::new(Ctl::default()),
            metrics: Metrics::default(),
            started: Instant::now(),
            lease_until_ms: AtomicU64::new(0),
            checkpoint_failing: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            running: AtomicBool::new(false),
        }
    }

    /// Milliseconds since the runtime started (tokio's clock, so paused time works).
    pub(crate) fn now_ms(&self) -> u64 {
        // At least 1, so that 0 can mean "never".
        (self.started.elapsed().as_millis() as u64).max(1)
    }

    /// The lease runs until `sent_ms + lease`: counted from when the renewing call was
    /// sent, so the instance's view never outlasts the store's.
    pub(crate) fn lease_renewed(&self, sent_ms: u64) {
        let until = sent_ms + self.lease.as_millis() as u64;
        self.lease_until_ms.fetch_max(until, Ordering::SeqCst);
    }

    pub(crate) fn lease_running(&self) -> bool {
        self.now_ms() < self.lease_until_ms.load(Ordering::SeqCst)
    }

    pub(crate) fn set_checkpoint_failing(&self, failing: bool) {
        self.checkpoint_failing.store(failing, Ordering::SeqCst);
    }

    pub(crate) fn set_running(&self, running: bool) {
        self.running.store(running, Ordering::SeqCst);
    }

    /// Fences the instance: no publish, no checkpoint, no resume from now on.
    pub(crate) fn fence(&self, why: String) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(target: "dory::runtime", processor = %self.processor, epoch = self.epoch.0, "fenced, stopping: {why}");
        }
        self.ctl.send_modify(|c| {
            c.fenced.get_or_insert(why);
        });
    }

    pub(crate) fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Whether publishing is allowed now, or why not.
    pub(crate) fn may_publish(&self) -> Result<()> {
        let who = || format!("processor {} epoch {}", self.processor, self.epoch);
        if self.is_fenced() {
            return Err(Error::fenced(format!(
                "{}: the instance no longer owns the processor",
                who()
            )));
        }
        if !self.running.load(Ordering::SeqCst) {
            return Err(Error::unavailable(format!("{}: not running", who())));
        }
        if !self.lease_running() {
            return Err(Error::unavailable(format!(
                "{}: the ownership lease could not be renewed in time",
                who()
            )));
        }
        if self.checkpoint_failing.load(Ordering::SeqCst) {
            return Err(Error::unavailable(format!(
                "{}: a due checkpoint could not be stored",
                who()
            )));
        }
        Ok(())
    }

    /// The run loop may step: running, owner, lease running and checkpoints storing.
    pub(crate) fn can_step(&self) -> Result<()> {
        self.may_publish()
    }

    pub(crate) fn published(&self, sequence: Sequence) {
        self.metrics.publishes.fetch_add(1, Ordering::Relaxed);
        self.metrics.sequence.store(sequence.0, Ordering::Relaxed);
    }

    /// Resolves once the run loop is wanted at a safe point (freeze, shutdown, fenced).
    pub(crate) async fn wants_safe_point(&self) {
        let mut rx = self.ctl.subscribe();
        // The sender lives as long as `self`, so this only ends when the predicate holds.
        let _ = rx.wait_for(Ctl::wants_safe_point).await;
    }

    /// The metrics in the Prometheus text format.
    pub(crate) fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let m = &self.metrics;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let now = self.now_ms();
        let last = get(&m.last_checkpoint_ms);
        let age = if last == 0 {
            -1.0
        } else {
            now.saturating_sub(last) as f64 / 1000.0
        };
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        };
        metric(
            "dory_iterations_total",
            "counter",
            "Steps the processor completed.",
            get(&m.iterations).to_string(),
        );
        metric(
            "dory_step_errors_total",
            "counter",
            "Steps that returned an error.",
            get(&m.step_errors).to_string(),
        );
        metric(
            "dory_publishes_total",
            "counter",
            "Messages published and confirmed.",
            get(&m.publishes).to_string(),
        );
        metric(
            "dory_sequence",
            "gauge",
            "The sequence of the last message published.",
            get(&m.sequence).to_string(),
        );
        metric(
            "dory_checkpoints_total",
            "counter",
            "Checkpoints committed to the state store.",
            get(&m.checkpoints).to_string(),
        );
        metric(
            "dory_checkpoint_failures_total",
            "counter",
            "Checkpoints the state store did not take.",
            get(&m.checkpoint_failures).to_string(),
        );
        metric(
            "dory_checkpoint_age_seconds",
            "gauge",
            "Seconds since the last committed checkpoint (-1: none yet).",
            format!("{age}"),
        );
        metric(
            "dory_snapshot_bytes",
            "gauge",
            "Encoded size of the last snapshot taken.",
            get(&m.snapshot_bytes).to_string(),
        );
        metric(
            "dory_freezes_total",
            "counter",
            "Freezes completed.",
            get(&m.freezes).to_string(),
        );
        metric(
            "dory_precopies_total",
            "counter",
            "Full checkpoints stored for a move's pre-copy.",
            get(&m.precopies).to_string(),
        );
        metric(
            "dory_freeze_duration_seconds",
            "gauge",
            "Duration of the last freeze, from request at a safe point to frozen.",
            format!("{}", get(&m.freeze_ms) as f64 / 1000.0),
        );
        metric(
            "dory_restore_duration_seconds",
            "gauge",
            "Duration of the restore or load of the state.",
            format!("{}", get(&m.restore_ms) as f64 / 1000.0),
        );
        metric(
            "dory_epoch",
            "gauge",
            "This instance's epoch.",
            self.epoch.0.to_string(),
        );
        out
    }
}

/// A state-sized buffer with its pages touched, shared by the endpoint (which prepares it when
/// a standby loads a full snapshot, and applies the delta that follows into it) and the run
/// loop (which takes it over at the resume and serializes into it from then on). Once taken
/// over it is closed: a preparation finishing later drops its buffer instead of keeping a
/// state's worth of memory nobody will use.
#[derive(Clone, Default)]
pub(crate) struct SpareBody(Arc<std::sync::Mutex<Spare>>);

enum Spare {
    Open(Vec<u8>),
    Closed,
}

impl Default for Spare {
    fn default() -> Self {
        Spare::Open(Vec::new())
    }
}

impl SpareBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, Spare> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the run loop has not taken it over yet.
    pub(crate) fn is_open(&self) -> bool {
        matches!(*self.lock(), Spare::Open(_))
    }

    /// Keeps `buffer` (dropping the one kept before), unless closed.
    pub(crate) fn put(&self, buffer: Vec<u8>) {
        let dropped = match &mut *self.lock() {
            Spare::Open(kept) => std::mem::replace(kept, buffer),
            Spare::Closed => buffer,
        };
        // Outside the lock: freeing a large buffer unmaps it.
        drop(dropped);
    }

    /// The kept buffer (empty when there is none).
    pub(crate) fn take(&self) -> Vec<u8> {
        match &mut *self.lock() {
            Spare::Open(kept) => std::mem::take(kept),
            Spare::Closed => Vec::new(),
        }
    }

    /// The kept buffer, for the run loop; nothing is kept from now on.
    pub(crate) fn close(&self) -> Vec<u8> {
        match std::mem::replace(&mut *self.lock(), Spare::Closed) {
            Spare::Open(kept) => kept,
            Spare::Closed => Vec::new(),
        }
    }
}

/// Room for a serialized state of `len` bytes and what it may grow by before the next one.
pub(crate) fn room_for(len: usize) -> usize {
    len + len / 16 + 64
}

/// An empty buffer with room for `len` bytes (and a little more: a state grows between a
/// pre-copy and the freeze), every page of it written once so that filling it faults none.
pub(crate) fn warm_buffer(len: usize) -> Vec<u8> {
    let room = room_for(len);
    let mut buffer = Vec::new();
    if buffer.try_reserve_exact(room).is_err() {
        return buffer;
    }
    // Not zeros: an allocation filled with zeros may be turned into a zeroed one, whose pages
    // the kernel maps lazily, which is the very cost this avoids.
    buffer.resize(room, 0xA5);
    buffer.clear();
    buffer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_spare_keeps_nothing() {
        let spare = SpareBody::default();
        spare.put(warm_buffer(100));
        assert!(spare.take().capacity() >= 100);
        assert_eq!(spare.take().capacity(), 0);
        spare.put(warm_buffer(100));
        assert!(spare.close().capacity() >= 100);
        assert!(!spare.is_open());
        spare.put(warm_buffer(100));
        assert_eq!(spare.take().capacity(), 0);
        assert_eq!(spare.close().capacity(), 0);
    }
}
