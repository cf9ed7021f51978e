//! The backend traits: what the orchestrator and the processor runtime need from the world.
//!
//! Each trait is small, object-safe (`async-trait`) and `Send + Sync + 'static`, so backends
//! are chosen at run time and passed around as `Arc<dyn Trait>`. Each one's **Contract**
//! section says what every implementation must guarantee; the shared behaviour suites behind
//! the `testing` feature check those guarantees against every backend.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::changes::Changes;
use crate::error::Result;
use crate::model::{
    DesiredState, Epoch, Instance, LaunchRequest, NodeId, Ownership, Phase, ProcessorId,
    ProcessorStatus, Sequence, SnapshotMeta, StoredSnapshot, Term, Timestamp,
};

/// An operator's intent, recorded in the desired state so the planner sees it as input and a
/// restarted orchestrator keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "intent")]
pub enum Intent {
    /// `dory move PROCESSOR --to NODE`: run the processor on this node (`None` unpins).
    Pin {
        /// The processor.
        processor: ProcessorId,
        /// The node, or `None` to remove the pin.
        node: Option<NodeId>,
    },
    /// `dory drain NODE` on a backend without cordons of its own.
    Cordon {
        /// The node.
        node: NodeId,
    },
    /// `dory uncordon NODE`.
    Uncordon {
        /// The node.
        node: NodeId,
    },
}

impl Intent {
    /// Refuses an intent that names an empty node, before anything is recorded; the error
    /// ([`Error::Invalid`](crate::Error::Invalid)) is prefixed with `what`.
    pub fn check(&self, what: &str) -> Result<()> {
        let node = match self {
            Intent::Pin {
                node: Some(node), ..
            }
            | Intent::Cordon { node } => node,
            Intent::Pin { node: None, .. } | Intent::Uncordon { .. } => return Ok(()),
        };
        if node.as_str().is_empty() {
            return Err(crate::Error::invalid(format!(
                "{what}: field `node` must name a node"
            )));
        }
        Ok(())
    }
}

/// The operator intents a config source has recorded, as it applies them to the desired
/// state: pins by processor id (they override an entry's own `pin`) and cordoned nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedIntents {
    /// The recorded pins, by processor id as written.
    pub pins: BTreeMap<String, NodeId>,
    /// The cordoned nodes.
    pub cordoned: BTreeSet<NodeId>,
}

impl FromIterator<(String, String, Option<String>)> for RecordedIntents {
    /// Reads intents kept as rows of `(kind, subject, node)`: `("pin", processor, Some(node))`
    /// and `("cordon", node, None)`. Any other row is skipped: the stores' tables rule them
    /// out with checks of their own.
    fn from_iter<I: IntoIterator<Item = (String, String, Option<String>)>>(rows: I) -> Self {
        let mut intents = RecordedIntents::default();
        for (kind, subject, node) in rows {
            match (kind.as_str(), node) {
                ("pin", Some(node)) => {
                    intents.pins.insert(subject, NodeId::new(node));
                }
                ("cordon", _) => {
                    intents.cordoned.insert(NodeId::new(subject));
                }
                _ => {}
            }
        }
        intents
    }
}

/// The desired processors: a config DB, a config file, or the caller's own control plane.
///
/// # Contract
/// - [`desired`](ConfigSource::desired) returns the **full** desired state every time
///   (level-triggered); the orchestrator never relies on seeing every intermediate version.
/// - An entry that does not parse or validate is reported in
///   [`DesiredState::invalid`] with an error naming the field; it never fails the whole list.
/// - A change made after [`changes`](ConfigSource::changes) was subscribed eventually nudges
///   the subscription (a lost feed is re-established and followed by a nudge, so nothing is
///   missed).
/// - [`record_intent`](ConfigSource::record_intent) is durable once it returns and shows up in
///   the next [`desired`](ConfigSource::desired).
#[async_trait]
pub trait ConfigSource: Send + Sync + 'static {
    /// The full desired state.
    async fn desired(&self) -> Result<DesiredState>;

    /// A subscription to change nudges.
    fn changes(&self) -> Changes;

    /// Records an operator intent.
    async fn record_intent(&self, intent: &Intent) -> Result<()>;
}

/// Where observed status is written for users to read.
///
/// # Contract
/// - [`upsert`](StatusSink::upsert) replaces the status of each processor it is given, by
///   processor id; [`remove`](StatusSink::remove) deletes the given ones (unknown ids are
///   ignored).
/// - [`read`](StatusSink::read) returns every stored status, sorted by processor id.
#[async_trait]
pub trait StatusSink: Send + Sync + 'static {
    /// Writes these statuses.
    async fn upsert(&self, statuses: &[ProcessorStatus]) -> Result<()>;

    /// Deletes the statuses of these processors.
    async fn remove(&self, processors: &[String]) -> Result<()>;

    /// Every stored status, sorted by processor id.
    async fn read(&self) -> Result<Vec<ProcessorStatus>>;
}

/// Where instances run: Kubernetes pods, local processes, a simulated cluster.
///
/// # Contract
/// - [`launch`](Placement::launch) of a `(processor, epoch)` that already exists fails with
///   [`Conflict`](crate::Error::Conflict) and starts nothing (names carry the epoch).
/// - [`instances`](Placement::instances) lists every instance the backend knows, including
///   ended ones (`Exited`, `Failed`) until they are [`forget`](Placement::forget)-ten, sorted by
///   `(processor, epoch)`.
/// - [`terminate`](Placement::terminate) is idempotent; the instance gets `grace` to save and
///   exit before it is killed. An instance whose node is lost is reported `Failed`.
/// - [`nodes`](Placement::nodes) is sorted by node id; interruptions carry a reason and, where
///   the signal has one, a deadline.
#[async_trait]
pub trait Placement: Send + Sync + 'static {
    /// The nodes, sorted by id.
    async fn nodes(&self) -> Result<Vec<Node>>;

    /// The instances, sorted by `(processor, epoch)`.
    async fn instances(&self) -> Result<Vec<Instance>>;

    /// Starts an instance.
    async fn launch(&self, request: &LaunchRequest) -> Result<Instance>;

    /// Asks an instance to stop, killing it after `grace`.
    async fn terminate(&self, processor: &ProcessorId, epoch: Epoch, grace: Duration)
    -> Result<()>;

    /// Drops the record of an ended instance (idempotent).
    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> Result<()>;

    /// A subscription to change nudges (instances or nodes changed).
    fn changes(&self) -> Changes;
}

pub use crate::model::Node;

/// What an instance says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The instance's phase as it sees it.
    pub phase: Phase,
    /// Its epoch.
    pub epoch: Epoch,
    /// Its current sequence.
    pub sequence: Sequence,
    /// The instance-control protocol it speaks ([`CONTROL_PROTOCOL`] for this release); an
    /// answer without the field, from a runtime before protocols were numbered, reads as 0.
    #[serde(default)]
    pub protocol: u32,
}

/// The instance-control protocol of this release. 1: a resume may name the committed
/// sequence ([`InstanceControl::resume_committed`]), and a standby that holds another snapshot
/// restores that one from the store. The orchestrator loads a replacement while it commits
/// only when the replacement speaks 1 or later: a runtime before it would resume with what it
/// holds.
pub const CONTROL_PROTOCOL: u32 = 1;

/// The orchestrator's control channel to an instance's state endpoints.
///
/// # Contract
/// - [`freeze`](InstanceControl::freeze) returns once the instance has stopped at a safe
///   point with every outstanding publish confirmed, holding an exact snapshot; it is
///   idempotent; an instance that cannot reach a safe point within `timeout` answers with an
///   error and keeps running.
/// - [`fetch`](InstanceControl::fetch) returns the frozen snapshot's encoded bytes.
/// - [`load`](InstanceControl::load) only loads (idempotent, no running); a malformed,
///   checksum-failing or wrongly fenced snapshot is refused with
///   [`Invalid`](crate::Error::Invalid) and leaves the instance's state untouched.
/// - [`resume`](InstanceControl::resume) starts (or restarts) the run loop; idempotent.
///   [`resume_committed`](InstanceControl::resume_committed) does so for an instance whose
///   epoch owns the processor with a committed snapshot of the given sequence: a standby that
///   loaded another snapshot, or none, restores that one from the state store first.
#[async_trait]
pub trait InstanceControl: Send + Sync + 'static {
    /// The instance's health.
    async fn health(&self, instance: &Instance) -> Result<Health>;

    /// Freezes the instance at its next safe point.
    async fn freeze(&self, instance: &Instance, timeout: Duration) -> Result<SnapshotMeta>;

    /// The frozen instance's snapshot, encoded.
    async fn fetch(&self, instance: &Instance) -> Result<Vec<u8>>;

    /// Loads an encoded snapshot into a standby instance.
    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> Result<()>;

    /// Starts the run loop of a standby or frozen instance.
    async fn resume(&self, instance: &Instance) -> Result<()>;

    /// Starts the run loop of an instance whose epoch owns the processor, `committed` being
    /// the sequence of the snapshot committed for it: a standby that holds another snapshot
    /// (a pre-copy's base, a load that failed) or none restores the committed one from the
    /// state store before it runs. This is what lets a move load the replacement while it
    /// commits.
    async fn resume_committed(&self, instance: &Instance, committed: Sequence) -> Result<()>;

    /// Has the running `instance` store a full checkpoint at its next safe point (within
    /// `timeout`) and keep running; returns the stored snapshot. A pre-copy move loads it into
    /// the replacement before the freeze, so the freeze sends only what changed since (a
    /// delta). An instance or backend that cannot pre-copy answers
    /// [`Conflict`](crate::Error::Conflict) (the default), and the move sends the whole state.
    async fn precopy(&self, instance: &Instance, timeout: Duration) -> Result<Vec<u8>> {
        let _ = (instance, timeout);
        Err(crate::Error::conflict(
            "this instance control does not pre-copy",
        ))
    }

    /// The frozen `instance`'s state as a full snapshot, for when the delta
    /// [`fetch`](Self::fetch) answered cannot be used.
    async fn fetch_full(&self, instance: &Instance) -> Result<Vec<u8>> {
        self.fetch(instance).await
    }
}

/// Ownership and snapshots: the ground truth of who may write a processor's state.
///
/// # Contract
/// Per processor the store keeps one ownership row (owner epoch, highest claimed epoch, owner
/// lease expiry, latest committed checkpoint) and the snapshots.
/// - [`claim_epoch`](StateStore::claim_epoch) allocates `highest + 1` by compare-and-swap:
///   concurrent claims never return the same epoch.
/// - [`put_checkpoint`](StateStore::put_checkpoint) stores the snapshot only if its epoch is
///   the owner and its sequence is above the last stored one, in one atomic step; otherwise
///   [`Fenced`](crate::Error::Fenced), and nothing is overwritten. It renews the lease. It is
///   idempotent: repeating the put of the committed checkpoint (same epoch, sequence and
///   bytes, e.g. after a lost answer) succeeds and renews the lease again.
/// - [`assign_owner`](StateStore::assign_owner) moves ownership from `expected` to a claimed
///   epoch above it (compare-and-swap on the current owner), and only once the current
///   owner's lease has run out in the store's clock, checked in the same atomic step
///   ([`Conflict`](crate::Error::Conflict) otherwise): a cut-off owner may renew its lease
///   between the orchestrator's look and its write.
/// - [`commit_move`](StateStore::commit_move) moves ownership from `from` to the snapshot's
///   epoch **and** stores the snapshot as that epoch's first checkpoint in one atomic step:
///   this is the commit point of a move. A snapshot older than the committed checkpoint is
///   refused with [`Fenced`](crate::Error::Fenced) (an equal sequence is fine: nothing was
///   published since).
/// - A snapshot's header names the epoch that took it: the owner for
///   [`put_checkpoint`](StateStore::put_checkpoint), `from` for
///   [`commit_move`](StateStore::commit_move). The first claim of a processor returns
///   `Epoch(1)`; after [`release`](StateStore::release) the lease is cleared.
/// - Every orchestrator write (`claim_epoch`, `assign_owner`, `commit_move`, `release`) is
///   refused with [`Fenced`](crate::Error::Fenced) unless `term` is the current leadership
///   term.
/// - Snapshots are verified on read; a damaged one is an error naming processor and epoch, and
///   the previous good one stays readable through [`history`](StateStore::history).
/// - A committed checkpoint never goes backwards: `(epoch, sequence)` only grows.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Allocates the next epoch of `processor` (creating its row if needed).
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> Result<Epoch>;

    /// Moves ownership from `expected` (the current owner, or `None`) to the claimed `epoch`,
    /// with a lease of `lease`.
    async fn assign_owner(
        &self,
        processor: &ProcessorId,
        expected: Option<Epoch>,
        epoch: Epoch,
        lease: Duration,
        term: Term,
    ) -> Result<()>;

    /// Moves ownership from `from` to `snapshot.meta.epoch` and stores the snapshot, atomically.
    /// The snapshot was taken by `from`, so its header names `from`, while its metadata files it
    /// as the new owner's first checkpoint.
    async fn commit_move(
        &self,
        from: Epoch,
        snapshot: &StoredSnapshot,
        lease: Duration,
        term: Term,
    ) -> Result<()>;

    /// Gives up ownership (the processor was removed); its snapshots are kept.
    async fn release(&self, processor: &ProcessorId, epoch: Epoch, term: Term) -> Result<()>;

    /// Stores a checkpoint from the owning instance and renews its lease.
    async fn put_checkpoint(&self, snapshot: &StoredSnapshot, lease: Duration)
    -> Result<Timestamp>;

    /// Renews the owning instance's lease without a checkpoint; returns the new expiry.
    async fn renew_lease(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<Timestamp>;

    /// The ownership row of one processor.
    async fn ownership(&self, processor: &ProcessorId) -> Result<Option<Ownership>>;

    /// Every ownership row, sorted by processor id.
    async fn ownerships(&self) -> Result<Vec<Ownership>>;

    /// The latest committed snapshot, verified.
    async fn latest(&self, processor: &ProcessorId) -> Result<Option<StoredSnapshot>>;

    /// One stored snapshot, verified.
    async fn get(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<Option<StoredSnapshot>>;

    /// Metadata of every stored snapshot, newest first.
    async fn history(&self, processor: &ProcessorId) -> Result<Vec<SnapshotMeta>>;

    /// Deletes all but the newest `keep` snapshots (at least one is always kept); returns how
    /// many were deleted.
    async fn prune(&self, processor: &ProcessorId, keep: usize) -> Result<usize>;
}

/// Leadership among orchestrator replicas, with a fencing term.
///
/// # Contract
/// - [`acquire`](Leadership::acquire) waits until this participant leads and returns a term
///   higher than every earlier leader's; the store refuses writes carrying an older term.
/// - [`check`](Leadership::check) fails with [`Fenced`](crate::Error::Fenced) once the term is
///   no longer current (the lock was lost or another leader took over).
/// - [`resign`](Leadership::resign) gives leadership up so another replica can take over at
///   once.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits for leadership; returns the new term.
    async fn acquire(&self) -> Result<Term>;

    /// Confirms `term` is still current.
    async fn check(&self, term: Term) -> Result<()>;

    /// Gives leadership up.
    async fn resign(&self, term: Term) -> Result<()>;
}

/// One output message of a processor.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputMessage {
    /// The processor that wrote it.
    pub processor: ProcessorId,
    /// The writing instance's epoch.
    pub epoch: Epoch,
    /// The processor's sequence for this message.
    pub sequence: Sequence,
    /// Where to route it (broker routing key); `None` uses the publisher's default.
    pub routing_key: Option<String>,
    /// The payload.
    pub payload: Vec<u8>,
}

impl OutputMessage {
    /// The message id consumers deduplicate by: `<processor>:<epoch>:<sequence>`.
    pub fn message_id(&self) -> String {
        format!("{}:{}:{}", self.processor, self.epoch.0, self.sequence.0)
    }
}

impl fmt::Debug for OutputMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutputMessage")
            .field("id", &self.message_id())
            .field("routing_key", &self.routing_key)
            .field("payload", &self.payload.len())
            .finish()
    }
}

/// Where processors publish their output.
///
/// # Contract
/// - [`publish`](Publisher::publish) resolves only once the message is durable (the broker
///   confirmed it); an error means it may or may not have been delivered, and a retry may
///   produce a duplicate carrying the same message id.
/// - [`flush`](Publisher::flush) resolves once every message published before it is durable.
/// - Messages of one processor are delivered in publish order.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one message and waits for its confirmation.
    async fn publish(&self, message: OutputMessage) -> Result<()>;

    /// Waits for every outstanding confirmation.
    async fn flush(&self) -> Result<()>;
}
