//! [`MemoryStore`]: the state store, and the leadership term it enforces, in memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::ownership::{self, OwnershipRules};
use dory_core::testing::SnapshotCorruptor;
use dory_core::{
    Clock, Epoch, Error, Ownership, ProcessorId, Result, Sequence, SnapshotMeta, StateStore,
    StoredSnapshot, Term, Timestamp, snapshot,
};
use tokio::sync::watch;

/// An in-memory [`StateStore`] that keeps ownership rows, snapshots and the current leadership
/// term, with leases measured on an injected [`Clock`].
///
/// It is a cheap handle: clones share one store, so a simulator can keep one clone to inspect
/// and hand another (perhaps wrapped in [`Faulty`](crate::faults::Faulty)) to the orchestrator.
/// Leadership participants ([`MemoryLeadership`](crate::leadership::MemoryLeadership)) are
/// created from it, because the store is what fences a deposed leader's writes.
///
/// Snapshots are checked with [`snapshot::verify`] when stored and when read, and nothing else
/// of their format is assumed.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Bumped whenever leadership becomes free, waking participants waiting to acquire.
    leadership_freed: watch::Sender<u64>,
}

#[derive(Default)]
pub(crate) struct State {
    rows: BTreeMap<ProcessorId, Row>,
    /// The current leadership term; 0 until a participant first acquires.
    pub(crate) term: Term,
    /// The participant holding `term`, if it still leads.
    pub(crate) leader: Option<u64>,
    pub(crate) participants: u64,
}

#[derive(Default)]
struct Row {
    highest: Epoch,
    owner: Option<Epoch>,
    /// The newest epoch that ever owned the processor: ownership only moves to epochs above
    /// it, so an epoch that was released or moved away from can never own again.
    newest_owner: Epoch,
    lease_expires: Option<Timestamp>,
    committed: Option<(Epoch, Sequence)>,
    committed_at: Option<Timestamp>,
    snapshots: BTreeMap<(Epoch, Sequence), StoredSnapshot>,
}

impl Row {
    fn ownership(&self, processor: &ProcessorId) -> Ownership {
        Ownership {
            processor: processor.clone(),
            owner: self.owner,
            highest_epoch: self.highest,
            lease_expires: self.lease_expires,
            committed: self.committed,
            committed_at: self.committed_at,
        }
    }

    /// The row as the shared ownership rules see it at `now`.
    fn rules(&self, now: Timestamp) -> OwnershipRules {
        OwnershipRules {
            owner: self.owner,
            highest: self.highest,
            newest_owner: self.newest_owner,
            lease_running: self.lease_expires.is_some_and(|expires| expires > now),
            committed: self.committed,
        }
    }

    fn store(
        &mut self,
        mut snapshot: StoredSnapshot,
        now: Timestamp,
        lease: Duration,
    ) -> Timestamp {
        let key = (snapshot.meta.epoch, snapshot.meta.sequence);
        snapshot.meta.created_at = now;
        self.snapshots.insert(key, snapshot);
        self.committed = Some(key);
        self.committed_at = Some(now);
        self.grant(now, lease)
    }

    fn grant(&mut self, now: Timestamp, lease: Duration) -> Timestamp {
        let expires = now.plus(lease);
        self.lease_expires = Some(expires);
        expires
    }
}

impl MemoryStore {
    /// An empty store whose leases run on `clock` (a [`dory_core::TokioClock`] under the
    /// simulator's paused runtime).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                clock,
                state: Mutex::new(State::default()),
                leadership_freed: watch::channel(0).0,
            }),
        }
    }

    /// The clock leases are measured on.
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.shared.clock.clone()
    }

    /// The current leadership term (0 before anyone acquired). Writes carrying any other term
    /// are refused.
    pub fn term(&self) -> Term {
        self.lock().term
    }

    /// Ends the current leader's leadership, as a lost lock or an expired lease would, and
    /// returns its term. The term stays current (its writes are still accepted) until another
    /// participant acquires, as with a term row in a database; `check` of it fails at once.
    pub fn depose_leader(&self) -> Option<Term> {
        let mut state = self.lock();
        let term = state.term;
        state.leader.take()?;
        drop(state);
        self.leadership_freed();
        Some(term)
    }

    /// The ownership row of `processor`, read without going through the async trait (for an
    /// invariant checker that runs between simulation steps).
    pub fn ownership_now(&self, processor: &ProcessorId) -> Option<Ownership> {
        self.lock()
            .rows
            .get(processor)
            .map(|row| row.ownership(processor))
    }

    /// Every ownership row, sorted by processor id, read synchronously.
    pub fn ownerships_now(&self) -> Vec<Ownership> {
        self.lock()
            .rows
            .iter()
            .map(|(p, row)| row.ownership(p))
            .collect()
    }

    /// Damages the stored snapshot of `processor` at `(epoch, sequence)` by flipping the bits
    /// of its last byte, so the next read of it fails verification.
    pub fn corrupt_snapshot(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<()> {
        let mut state = self.lock();
        let last = state
            .rows
            .get_mut(processor)
            .and_then(|row| row.snapshots.get_mut(&(epoch, sequence)))
            .and_then(|snap| snap.bytes.last_mut())
            .ok_or_else(|| {
                Error::not_found(format!(
                    "snapshot of processor {processor} {epoch} {sequence}"
                ))
            })?;
        *last = !*last;
        Ok(())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (a failed assertion in a test) leaves the state as
        // consistent as any single step leaves it; later readers still get it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn leadership_freed(&self) {
        self.shared
            .leadership_freed
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn watch_leadership(&self) -> watch::Receiver<u64> {
        self.shared.leadership_freed.subscribe()
    }

    fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }

    /// Locks the state for an orchestrator write, refusing a term that is not current.
    fn lock_for_term(
        &self,
        term: Term,
        what: &dyn Fn() -> String,
    ) -> Result<MutexGuard<'_, State>> {
        let state = self.lock();
        if term == Term(0) || term != state.term {
            return Err(Error::fenced(format!(
                "{}: leadership term {term} is not current ({} is)",
                what(),
                state.term
            )));
        }
        Ok(state)
    }
}

/// Checks an incoming snapshot; errors name the operation, processor, epoch and sequence.
fn verify_incoming(snap: &StoredSnapshot, what: &str, taken_by: Epoch) -> Result<()> {
    snap.check_incoming(taken_by, &incoming_context(snap, what))
}

/// How errors about an incoming snapshot name it.
fn incoming_context(snap: &StoredSnapshot, what: &str) -> String {
    let meta = &snap.meta;
    format!(
        "{what} of processor {} epoch {} {}",
        meta.processor, meta.epoch, meta.sequence
    )
}

/// Checks a snapshot read back from memory, as a store on disk would after a read.
fn verify_stored(snap: StoredSnapshot) -> Result<StoredSnapshot> {
    let meta = &snap.meta;
    snapshot::verify(&snap.bytes).map_err(|e| {
        e.context(format!(
            "stored snapshot of processor {} epoch {} {}",
            meta.processor, meta.epoch, meta.sequence
        ))
    })?;
    Ok(snap)
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> Result<Epoch> {
        let mut state =
            self.lock_for_term(term, &|| format!("claim an epoch of processor {processor}"))?;
        let row = state.rows.entry(processor.clone()).or_default();
        row.highest = row.highest.next();
        Ok(row.highest)
    }

    async fn assign_owner(
        &self,
        processor: &ProcessorId,
        expected: Option<Epoch>,
        epoch: Epoch,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let what = format!("assign ownership of processor {processor} to epoch {epoch}");
        let now = self.now();
        let mut state = self.lock_for_term(term, &|| what.clone())?;
        let row = state
            .rows
            .get_mut(processor)
            .ok_or_else(|| Error::invalid(format!("{what}: no epoch was ever claimed")))?;
        // Checked here, in the same step as the swap and in the store's clock.
        row.rules(now).check_assign(&what, expected, epoch)?;
        row.owner = Some(epoch);
        row.newest_owner = epoch;
        row.grant(now, lease);
        Ok(())
    }

    async fn commit_move(
        &self,
        from: Epoch,
        snapshot: &StoredSnapshot,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let (processor, to, sequence) = (
            &snapshot.meta.processor,
            snapshot.meta.epoch,
            snapshot.meta.sequence,
        );
        verify_incoming(snapshot, "commit move", from)?;
        let base = snapshot.delta_base()?;
        let what = format!("commit move of processor {processor} from {from} to {to}");
        let now = self.now();
        let mut state = self.lock_for_term(term, &|| what.clone())?;
        let row = state
            .rows
            .get_mut(processor)
            .ok_or_else(|| Error::not_found(format!("{what}: no ownership row")))?;
        row.rules(now).check_commit(&what, from, to, sequence)?;
        if let Some(base) = base
            && !row.snapshots.contains_key(&(base.epoch, base.sequence))
        {
            return Err(base.missing(&what));
        }
        row.owner = Some(to);
        row.newest_owner = to;
        row.store(snapshot.clone(), now, lease);
        Ok(())
    }

    async fn release(&self, processor: &ProcessorId, epoch: Epoch, term: Term) -> Result<()> {
        let what = || format!("release processor {processor} from epoch {epoch}");
        let mut state = self.lock_for_term(term, &what)?;
        let row = state
            .rows
            .get_mut(processor)
            .ok_or_else(|| Error::not_found(format!("{}: no ownership row", what())))?;
        if ownership::check_release(&what(), row.owner, epoch)? {
            row.owner = None;
            row.lease_expires = None;
        }
        Ok(())
    }

    async fn put_checkpoint(
        &self,
        snapshot: &StoredSnapshot,
        lease: Duration,
    ) -> Result<Timestamp> {
        let what = "checkpoint";
        let (processor, epoch, sequence) = (
            &snapshot.meta.processor,
            snapshot.meta.epoch,
            snapshot.meta.sequence,
        );
        snapshot.check_checkpoint(&incoming_context(snapshot, what))?;
        let now = self.now();
        let mut state = self.lock();
        let row = state.rows.get_mut(processor).ok_or_else(|| {
            Error::fenced(format!(
                "{what} of processor {processor} from epoch {epoch}: no epoch owns it"
            ))
        })?;
        let rules = row.rules(now);
        let what = format!("{what} of processor {processor} from epoch {epoch}");
        rules.check_owner(&what, epoch)?;
        // A retry of the checkpoint that is already the committed one (its answer was lost)
        // succeeds again and renews the lease: refusing it would fence a legitimate owner.
        if row.committed == Some((epoch, sequence))
            && row
                .snapshots
                .get(&(epoch, sequence))
                .is_some_and(|stored| stored.bytes == snapshot.bytes)
        {
            return Ok(row.grant(now, lease));
        }
        rules.check_above_committed(&what, sequence)?;
        Ok(row.store(snapshot.clone(), now, lease))
    }

    async fn renew_lease(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<Timestamp> {
        let what = "lease renewal";
        let now = self.now();
        let mut state = self.lock();
        let row = state.rows.get_mut(processor).ok_or_else(|| {
            Error::fenced(format!(
                "{what} of processor {processor} from epoch {epoch}: no epoch owns it"
            ))
        })?;
        row.rules(now).check_owner(
            &format!("{what} of processor {processor} from epoch {epoch}"),
            epoch,
        )?;
        Ok(row.grant(now, lease))
    }

    async fn ownership(&self, processor: &ProcessorId) -> Result<Option<Ownership>> {
        Ok(self.ownership_now(processor))
    }

    async fn ownerships(&self) -> Result<Vec<Ownership>> {
        Ok(self.ownerships_now())
    }

    async fn latest(&self, processor: &ProcessorId) -> Result<Option<StoredSnapshot>> {
        let found = {
            let state = self.lock();
            let Some(row) = state.rows.get(processor) else {
                return Ok(None);
            };
            let Some(key) = row.committed else {
                return Ok(None);
            };
            row.snapshots.get(&key).cloned().ok_or_else(|| {
                Error::not_found(format!(
                    "latest snapshot of processor {processor}: committed {} {} is missing",
                    key.0, key.1
                ))
            })?
        };
        verify_stored(found).map(Some)
    }

    async fn get(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<Option<StoredSnapshot>> {
        let found = self
            .lock()
            .rows
            .get(processor)
            .and_then(|row| row.snapshots.get(&(epoch, sequence)).cloned());
        found.map(verify_stored).transpose()
    }

    async fn history(&self, processor: &ProcessorId) -> Result<Vec<SnapshotMeta>> {
        let state = self.lock();
        let Some(row) = state.rows.get(processor) else {
            return Ok(Vec::new());
        };
        Ok(row
            .snapshots
            .values()
            .rev()
            .map(|s| s.meta.clone())
            .collect())
    }

    async fn prune(&self, processor: &ProcessorId, keep: usize) -> Result<usize> {
        let mut state = self.lock();
        let Some(row) = state.rows.get_mut(processor) else {
            return Ok(0);
        };
        let doomed = row.snapshots.len().saturating_sub(keep.max(1));
        // The bases of deltas that stay, stay (a delta is unreadable without its base).
        let bases: Vec<(Epoch, Sequence)> = row
            .snapshots
            .values()
            .filter_map(|s| s.delta_base().ok().flatten())
            .map(|b| (b.epoch, b.sequence))
            .collect();
        let old: Vec<(Epoch, Sequence)> = row.snapshots.keys().take(doomed).copied().collect();
        let mut deleted = 0;
        for key in old {
            if Some(key) != row.committed && !bases.contains(&key) {
                row.snapshots.remove(&key);
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

#[async_trait]
impl SnapshotCorruptor for MemoryStore {
    async fn corrupt(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<()> {
        self.corrupt_snapshot(processor, epoch, sequence)
    }
}
