//! Fault injection as wrappers: [`Faulty`] puts a [`FaultSwitch`] in front of any backend.
//!
//! The backends themselves stay fault-free; a test or the simulator wraps the ones it wants to
//! break and flips the switch (from its seeded RNG, so runs replay). The switch holds no
//! randomness and reads no clock: latency is a `tokio::time::sleep`, which is simulated time
//! under a paused runtime.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{
    Changes, ConfigSource, DesiredState, Epoch, Error, Intent, Leadership, OutputMessage,
    Ownership, ProcessorId, ProcessorStatus, Publisher, Result, Sequence, SnapshotMeta, StateStore,
    StatusSink, StoredSnapshot, Term, Timestamp,
};

use crate::config::MemoryConfig;
use crate::leadership::MemoryLeadership;
use crate::publisher::MemoryPublisher;
use crate::status::MemoryStatus;
use crate::store::MemoryStore;

/// The faults to inject into every backend wrapped with one switch. A cheap handle: clones
/// share the settings, so the simulator keeps one and the wrapper another.
///
/// Each call through a wrapper first waits out the [latency](FaultSwitch::set_latency), then
/// fails without reaching the backend if there is an [outage](FaultSwitch::set_outage) or a
/// [planned failure](FaultSwitch::fail_next) left; otherwise it reaches the backend, and if a
/// [lost reply](FaultSwitch::lose_next_replies) is planned, a call that succeeded is reported
/// as failed anyway. Every injected failure is [`Error::Unavailable`].
#[derive(Clone, Default)]
pub struct FaultSwitch {
    settings: Arc<Mutex<Settings>>,
}

#[derive(Clone, Debug, Default)]
struct Settings {
    outage: bool,
    fail_next: u64,
    lose_next_replies: u64,
    latency: Duration,
    calls: u64,
    injected: u64,
}

impl FaultSwitch {
    /// A switch with every fault off.
    pub fn new() -> Self {
        FaultSwitch::default()
    }

    /// Starts (`true`) or ends an outage: while it lasts every call fails without reaching the
    /// backend.
    pub fn set_outage(&self, on: bool) {
        self.lock().outage = on;
    }

    /// Whether an outage is on.
    pub fn outage(&self) -> bool {
        self.lock().outage
    }

    /// Makes the next `n` calls fail without reaching the backend (replacing any earlier
    /// count).
    pub fn fail_next(&self, n: u64) {
        self.lock().fail_next = n;
    }

    /// Makes the next `n` calls that succeed report failure anyway: the write took effect but
    /// its reply was lost, the ambiguous failure that retries and restarts must cope with
    /// (replacing any earlier count).
    pub fn lose_next_replies(&self, n: u64) {
        self.lock().lose_next_replies = n;
    }

    /// Delays every call by `latency` before anything else happens (zero for none).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// The latency added to every call.
    pub fn latency(&self) -> Duration {
        self.lock().latency
    }

    /// Turns every fault off (the counters keep counting).
    pub fn clear(&self) {
        let mut settings = self.lock();
        let (calls, injected) = (settings.calls, settings.injected);
        *settings = Settings {
            calls,
            injected,
            ..Settings::default()
        };
    }

    /// How many calls went through wrappers using this switch.
    pub fn calls(&self) -> u64 {
        self.lock().calls
    }

    /// How many of those calls failed because of an injected fault.
    pub fn injected(&self) -> u64 {
        self.lock().injected
    }

    /// Runs `call` through the switch. `target` names the backend and `what` describes the call
    /// (built only when a fault is injected), for the error message.
    pub async fn run<T>(
        &self,
        target: &str,
        what: impl FnOnce() -> String,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let latency = {
            let mut settings = self.lock();
            settings.calls += 1;
            settings.latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        // Decided after the wait, so an outage that began meanwhile hits the call.
        let refused = {
            let mut settings = self.lock();
            let why = if settings.outage {
                Some("outage")
            } else if settings.fail_next > 0 {
                settings.fail_next -= 1;
                Some("injected failure")
            } else {
                None
            };
            settings.injected += u64::from(why.is_some());
            why
        };
        if let Some(why) = refused {
            return Err(Error::unavailable(format!(
                "{target} {why}: {} not attempted",
                what()
            )));
        }
        let result = call.await;
        if result.is_ok() {
            let mut settings = self.lock();
            if settings.lose_next_replies > 0 {
                settings.lose_next_replies -= 1;
                settings.injected += 1;
                drop(settings);
                return Err(Error::unavailable(format!(
                    "{target} reply lost: {} took effect, but the caller cannot know",
                    what()
                )));
            }
        }
        result
    }

    fn lock(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for FaultSwitch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock().clone();
        f.debug_struct("FaultSwitch")
            .field("outage", &s.outage)
            .field("fail_next", &s.fail_next)
            .field("lose_next_replies", &s.lose_next_replies)
            .field("latency", &s.latency)
            .field("calls", &s.calls)
            .field("injected", &s.injected)
            .finish()
    }
}

/// A backend `B` behind a [`FaultSwitch`]. It implements each backend trait that `B`
/// implements; the aliases ([`FaultyStore`], [`FaultyConfig`], ...) name the usual wrappings.
#[derive(Clone, Debug)]
pub struct Faulty<B> {
    inner: B,
    switch: FaultSwitch,
}

/// A [`StateStore`] behind a [`FaultSwitch`].
pub type FaultyStore<S = MemoryStore> = Faulty<S>;
/// A [`ConfigSource`] behind a [`FaultSwitch`].
pub type FaultyConfig<C = MemoryConfig> = Faulty<C>;
/// A [`Publisher`] behind a [`FaultSwitch`].
pub type FaultyPublisher<P = MemoryPublisher> = Faulty<P>;
/// A [`StatusSink`] behind a [`FaultSwitch`].
pub type FaultyStatus<S = MemoryStatus> = Faulty<S>;
/// A [`Leadership`] participant behind a [`FaultSwitch`] (in a real deployment leadership
/// lives in the store, so the simulator can hand both the store's switch).
pub type FaultyLeadership<L = MemoryLeadership> = Faulty<L>;

impl<B> Faulty<B> {
    /// Wraps `inner`; faults are whatever `switch` says at each call.
    pub fn new(inner: B, switch: FaultSwitch) -> Self {
        Faulty { inner, switch }
    }

    /// The wrapped backend, reachable without faults.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The switch this wrapper obeys.
    pub fn switch(&self) -> &FaultSwitch {
        &self.switch
    }
}

#[async_trait]
impl<S: StateStore> StateStore for Faulty<S> {
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> Result<Epoch> {
        let what = || format!("claim_epoch of {processor}");
        self.switch
            .run(STORE, what, self.inner.claim_epoch(processor, term))
            .await
    }

    async fn assign_owner(
        &self,
        processor: &ProcessorId,
        expected: Option<Epoch>,
        epoch: Epoch,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let what = || format!("assign_owner of {processor} to {epoch}");
        let call = self
            .inner
            .assign_owner(processor, expected, epoch, lease, term);
        self.switch.run(STORE, what, call).await
    }

    async fn commit_move(
        &self,
        from: Epoch,
        snapshot: &StoredSnapshot,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let meta = &snapshot.meta;
        let what = || {
            format!(
                "commit_move of {} from {from} to {}",
                meta.processor, meta.epoch
            )
        };
        self.switch
            .run(
                STORE,
                what,
                self.inner.commit_move(from, snapshot, lease, term),
            )
            .await
    }

    async fn release(&self, processor: &ProcessorId, epoch: Epoch, term: Term) -> Result<()> {
        let what = || format!("release of {processor} by {epoch}");
        self.switch
            .run(STORE, what, self.inner.release(processor, epoch, term))
            .await
    }

    async fn put_checkpoint(
        &self,
        snapshot: &StoredSnapshot,
        lease: Duration,
    ) -> Result<Timestamp> {
        let meta = &snapshot.meta;
        let what = || {
            format!(
                "put_checkpoint of {} {} {}",
                meta.processor, meta.epoch, meta.sequence
            )
        };
        self.switch
            .run(STORE, what, self.inner.put_checkpoint(snapshot, lease))
            .await
    }

    async fn renew_lease(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<Timestamp> {
        let what = || format!("renew_lease of {processor} by {epoch}");
        self.switch
            .run(STORE, what, self.inner.renew_lease(processor, epoch, lease))
            .await
    }

    async fn ownership(&self, processor: &ProcessorId) -> Result<Option<Ownership>> {
        let what = || format!("ownership of {processor}");
        self.switch
            .run(STORE, what, self.inner.ownership(processor))
            .await
    }

    async fn ownerships(&self) -> Result<Vec<Ownership>> {
        self.switch
            .run(STORE, || "ownerships".into(), self.inner.ownerships())
            .await
    }

    async fn latest(&self, processor: &ProcessorId) -> Result<Option<StoredSnapshot>> {
        let what = || format!("latest of {processor}");
        self.switch
            .run(STORE, what, self.inner.latest(processor))
            .await
    }

    async fn get(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<Option<StoredSnapshot>> {
        let what = || format!("get of {processor} {epoch} {sequence}");
        self.switch
            .run(STORE, what, self.inner.get(processor, epoch, sequence))
            .await
    }

    async fn history(&self, processor: &ProcessorId) -> Result<Vec<SnapshotMeta>> {
        let what = || format!("history of {processor}");
        self.switch
            .run(STORE, what, self.inner.history(processor))
            .await
    }

    async fn prune(&self, processor: &ProcessorId, keep: usize) -> Result<usize> {
        let what = || format!("prune of {processor}");
        self.switch
            .run(STORE, what, self.inner.prune(processor, keep))
            .await
    }
}

#[async_trait]
impl<L: Leadership> Leadership for Faulty<L> {
    async fn acquire(&self) -> Result<Term> {
        self.switch
            .run(LEADERSHIP, || "acquire".into(), self.inner.acquire())
            .await
    }

    async fn check(&self, term: Term) -> Result<()> {
        self.switch
            .run(
                LEADERSHIP,
                || format!("check of {term}"),
                self.inner.check(term),
            )
            .await
    }

    async fn resign(&self, term: Term) -> Result<()> {
        self.switch
            .run(
                LEADERSHIP,
                || format!("resign of {term}"),
                self.inner.resign(term),
            )
            .await
    }
}

#[async_trait]
impl<C: ConfigSource> ConfigSource for Faulty<C> {
    async fn desired(&self) -> Result<DesiredState> {
        self.switch
            .run(CONFIG, || "desired".into(), self.inner.desired())
            .await
    }

    /// Not faulted: a subscription is local, and a lost feed shows up as missing nudges,
    /// which the orchestrator's periodic resync covers.
    fn changes(&self) -> Changes {
        self.inner.changes()
    }

    async fn record_intent(&self, intent: &Intent) -> Result<()> {
        let what = || format!("record_intent {intent:?}");
        self.switch
            .run(CONFIG, what, self.inner.record_intent(intent))
            .await
    }
}

#[async_trait]
impl<S: StatusSink> StatusSink for Faulty<S> {
    async fn upsert(&self, statuses: &[ProcessorStatus]) -> Result<()> {
        let what = || format!("upsert of {} statuses", statuses.len());
        self.switch
            .run(STATUS, what, self.inner.upsert(statuses))
            .await
    }

    async fn remove(&self, processors: &[String]) -> Result<()> {
        let what = || format!("remove of {} statuses", processors.len());
        self.switch
            .run(STATUS, what, self.inner.remove(processors))
            .await
    }

    async fn read(&self) -> Result<Vec<ProcessorStatus>> {
        self.switch
            .run(STATUS, || "read".into(), self.inner.read())
            .await
    }
}

#[async_trait]
impl<P: Publisher> Publisher for Faulty<P> {
    async fn publish(&self, message: OutputMessage) -> Result<()> {
        // The id is only formatted when a fault is injected: publishing is a hot path.
        let (processor, epoch, sequence) =
            (message.processor.clone(), message.epoch, message.sequence);
        self.switch
            .run(
                PUBLISHER,
                || format!("publish of {processor}:{}:{}", epoch.0, sequence.0),
                self.inner.publish(message),
            )
            .await
    }

    async fn flush(&self) -> Result<()> {
        self.switch
            .run(PUBLISHER, || "flush".into(), self.inner.flush())
            .await
    }
}

const STORE: &str = "state store";
const LEADERSHIP: &str = "leadership";
const CONFIG: &str = "config source";
const STATUS: &str = "status sink";
const PUBLISHER: &str = "publisher";
