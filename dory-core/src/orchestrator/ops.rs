//! The operations that carry out the planner's actions.
//!
//! A move is an explicit state machine ([`MoveStep`]): every step is one call against a
//! backend, and where the machine stands when a step fails decides the way out — roll back
//! before the commit, roll forward after it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::{EventKind, Inner, PlantedFault};
use crate::error::{Error, Result};
use crate::model::{
    Epoch, FailoverReport, Instance, InterruptionReason, LaunchMode, LaunchRequest, NodeId,
    Ownership, Phase, ProcessorId, ProcessorSpec, Sequence, StoredSnapshot, Term, Timestamp,
};
use crate::planner::{Action, StartReason};

/// What an operation did, for the round to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Nothing to record.
    Done,
    /// An instance was started; for a failover, what it restored.
    Started {
        reason: StartReason,
        failover: Option<Box<FailoverReport>>,
    },
    /// A move (or evacuation) committed; the pause the processor saw.
    Moved { pause_ms: u64 },
    /// The crash-loop breaker tripped on this spec revision.
    MarkedFailed {
        reason: String,
        revision: Option<u64>,
    },
}

/// What an operation works with.
pub(super) struct Op {
    pub(super) inner: Arc<Inner>,
    pub(super) term: Term,
    pub(super) action: Action,
    /// The processor's spec, when it is desired.
    pub(super) spec: Option<ProcessorSpec>,
    /// The processor's instances as observed when the action was planned.
    pub(super) instances: Vec<Instance>,
    /// The processor's ownership row as observed when the action was planned.
    pub(super) row: Option<Ownership>,
    /// For a failover: the node the owner was lost with and since when it has not been
    /// ready, as observed when the action was planned.
    pub(super) lost: Option<(NodeId, Option<Timestamp>)>,
}

impl Op {
    pub(super) async fn run(self) -> Result<Outcome> {
        let span = tracing::info_span!(
            "operation",
            processor.id = %self.action.processor(),
            action = action_name(&self.action),
        );
        self.run_inner().instrument(span).await
    }

    async fn run_inner(&self) -> Result<Outcome> {
        match self.action.clone() {
            Action::Start {
                processor,
                node,
                expected_owner,
                reason,
            } => self.start(&processor, &node, expected_owner, reason).await,
            Action::Move {
                processor,
                from,
                to,
                ..
            } => {
                let old = self.instance(from)?;
                MoveOp::new(self, processor, old, to).run().await
            }
            Action::Evacuate {
                processor,
                from,
                to,
                reason,
            } => self.evacuate(&processor, from, &to, reason).await,
            Action::RollBack {
                processor,
                owner,
                replacement,
            } => {
                self.remove_and_confirm(&processor, replacement).await?;
                let owner = self.instance(owner)?;
                self.resume_owner(&owner, "resume owner").await?;
                self.inner.emit(
                    Some(&processor),
                    EventKind::RolledBack {
                        owner: owner.epoch,
                        replacement,
                        error: "found uncommitted after a restart".into(),
                    },
                );
                Ok(Outcome::Done)
            }
            Action::RollForward {
                processor,
                owner,
                old,
            } => {
                let owner = self.instance(owner)?;
                self.resume_owner(&owner, "resume owner").await?;
                self.terminate(&processor, old).await?;
                self.inner.emit(
                    Some(&processor),
                    EventKind::RolledForward {
                        owner: owner.epoch,
                        old,
                    },
                );
                Ok(Outcome::Done)
            }
            Action::Resume { epoch, .. } => {
                let owner = self.instance(epoch)?;
                self.resume_owner(&owner, "resume").await?;
                Ok(Outcome::Done)
            }
            Action::Terminate {
                processor,
                epoch,
                release,
            } => {
                if release {
                    self.remove_and_confirm(&processor, epoch).await?;
                    self.release(&processor, epoch).await?;
                } else {
                    self.terminate(&processor, epoch).await?;
                }
                Ok(Outcome::Done)
            }
            Action::Release { processor, epoch } => {
                self.release(&processor, epoch).await?;
                Ok(Outcome::Done)
            }
            Action::Forget { processor, epoch } => {
                self.call(
                    "forget instance",
                    self.inner.backends.placement.forget(&processor, epoch),
                )
                .await?;
                Ok(Outcome::Done)
            }
            Action::MarkFailed { processor, reason } => {
                self.inner.emit(
                    Some(&processor),
                    EventKind::MarkedFailed {
                        reason: reason.clone(),
                    },
                );
                Ok(Outcome::MarkedFailed {
                    reason,
                    revision: self.spec.as_ref().map(ProcessorSpec::revision),
                })
            }
        }
    }

    /// Gives up ownership of a processor that is no longer desired.
    async fn release(&self, processor: &ProcessorId, epoch: Epoch) -> Result<()> {
        let store = &self.inner.backends.store;
        self.call(
            "release ownership",
            store.release(processor, epoch, self.term),
        )
        .await
    }

    fn ctl(&self) -> &dyn crate::backend::InstanceControl {
        &*self.inner.backends.control
    }

    fn spec(&self) -> Result<&ProcessorSpec> {
        self.spec.as_ref().ok_or_else(|| {
            Error::not_found(format!(
                "processor {} is no longer desired",
                self.action.processor()
            ))
        })
    }

    fn instance(&self, epoch: Epoch) -> Result<Instance> {
        self.instances
            .iter()
            .find(|i| i.epoch == epoch)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!(
                    "instance {} of processor {}",
                    epoch,
                    self.action.processor()
                ))
            })
    }

    /// Runs one backend call with the call timeout; the error names the operation.
    async fn call<T>(&self, what: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
        let timeout = self.inner.settings.call_timeout;
        match tokio::time::timeout(timeout, fut).await {
            Ok(result) => result.map_err(|e| e.context(what)),
            Err(_) => Err(Error::unavailable(format!(
                "{what}: no answer within {timeout:?}"
            ))),
        }
    }

    /// The current record of one instance, if the placement still lists it.
    async fn lookup(&self, processor: &ProcessorId, epoch: Epoch) -> Result<Option<Instance>> {
        let all = self
            .call("list instances", self.inner.backends.placement.instances())
            .await?;
        Ok(all
            .into_iter()
            .find(|i| &i.processor == processor && i.epoch == epoch))
    }

    /// Polls until the instance satisfies `done`, fails, or `timeout` passes.
    async fn wait_for(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        timeout: Duration,
        what: &str,
        done: impl Fn(Option<&Instance>) -> bool,
    ) -> Result<Option<Instance>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.lookup(processor, epoch).await?;
            if done(current.as_ref()) {
                return Ok(current);
            }
            if let Some(Instance {
                phase: Phase::Failed { reason },
                ..
            }) = &current
            {
                return Err(Error::unavailable(format!(
                    "instance {epoch} of {processor} failed while waiting until {what}: {reason}"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::unavailable(format!(
                    "instance {epoch} of {processor}: not {what} within {timeout:?}"
                )));
            }
            tokio::time::sleep(self.inner.settings.poll_interval).await;
        }
    }

    async fn terminate(&self, processor: &ProcessorId, epoch: Epoch) -> Result<()> {
        let grace = self.inner.settings.stop_grace;
        match self
            .call(
                "terminate",
                self.inner
                    .backends
                    .placement
                    .terminate(processor, epoch, grace),
            )
            .await
        {
            Ok(()) | Err(Error::NotFound(_)) => {
                self.inner
                    .emit(Some(processor), EventKind::Terminated { epoch });
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Terminates an instance, confirms it is gone, and forgets its record.
    async fn remove_and_confirm(&self, processor: &ProcessorId, epoch: Epoch) -> Result<()> {
        self.terminate(processor, epoch).await?;
        let wait = self.inner.settings.stop_grace + self.inner.settings.call_timeout;
        self.wait_for(processor, epoch, wait, "gone", |i| {
            i.is_none_or(|i| i.phase.is_gone())
        })
        .await?;
        self.call(
            "forget instance",
            self.inner.backends.placement.forget(processor, epoch),
        )
        .await
    }

    async fn launch(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        node: &NodeId,
        mode: LaunchMode,
    ) -> Result<Instance> {
        let request = LaunchRequest {
            spec: self.spec()?.clone(),
            epoch,
            node: node.clone(),
            mode,
        };
        self.call(
            &format!("launch {epoch} of {processor} on {node}"),
            self.inner.backends.placement.launch(&request),
        )
        .await
    }

    async fn start(
        &self,
        processor: &ProcessorId,
        node: &NodeId,
        expected_owner: Option<Epoch>,
        reason: StartReason,
    ) -> Result<Outcome> {
        let store = &self.inner.backends.store;
        for ended in self.instances.iter().filter(|i| i.phase.is_gone()) {
            self.call(
                "forget ended instance",
                self.inner.backends.placement.forget(processor, ended.epoch),
            )
            .await?;
        }
        let epoch = self
            .call("claim epoch", store.claim_epoch(processor, self.term))
            .await?;
        let lease = self.inner.settings.planner.lease;
        self.call(
            "take ownership",
            store.assign_owner(processor, expected_owner, epoch, lease, self.term),
        )
        .await?;
        let failover = match reason {
            StartReason::Failover => Some(Box::new(
                self.failover_report(processor, epoch, expected_owner).await,
            )),
            StartReason::New | StartReason::Restart => None,
        };
        self.launch(processor, epoch, node, LaunchMode::Restore)
            .await?;
        self.inner.emit(
            Some(processor),
            EventKind::Started {
                epoch,
                node: node.clone(),
                reason: reason.clone(),
                failover: failover.as_deref().cloned(),
            },
        );
        Ok(Outcome::Started { reason, failover })
    }

    /// What a failover to `epoch` restores and may have lost. Read once `epoch` owns the
    /// processor, the row's committed checkpoint is exactly the one the replacement restores
    /// (the lost owner may have committed one more since the round looked, until the store
    /// handed ownership on); if the row cannot be read, the round's observation stands in.
    async fn failover_report(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lost_epoch: Option<Epoch>,
    ) -> FailoverReport {
        let read = self
            .call(
                "read ownership",
                self.inner.backends.store.ownership(processor),
            )
            .await;
        let row = match read {
            Ok(Some(row)) => Some(row),
            Ok(None) | Err(_) => self.row.clone(),
        };
        FailoverReport::new(
            self.inner.backends.clock.now(),
            epoch,
            lost_epoch,
            self.lost.clone(),
            row.as_ref(),
        )
    }

    /// Freeze, commit the final snapshot to a new epoch, terminate, restore elsewhere: for a
    /// deadline too short for a make-before-break move.
    async fn evacuate(
        &self,
        processor: &ProcessorId,
        from: Epoch,
        to: &NodeId,
        _reason: InterruptionReason,
    ) -> Result<Outcome> {
        let old = self.instance(from)?;
        let store = &self.inner.backends.store;
        let epoch = self
            .call("claim epoch", store.claim_epoch(processor, self.term))
            .await?;
        let frozen_at = self.inner.backends.clock.now();
        let captured = async {
            self.call(
                "freeze",
                self.ctl().freeze(&old, self.inner.settings.freeze_timeout),
            )
            .await?;
            self.call("fetch snapshot", self.ctl().fetch(&old)).await
        }
        .await;
        let bytes = match captured {
            Ok(bytes) => bytes,
            Err(e) => {
                // Not committed: the old instance keeps the processor.
                let _ = self.resume_owner(&old, "resume after failed freeze").await;
                return Err(e);
            }
        };
        if let Err(e) = self.commit_frozen(&old, epoch, bytes).await.map(drop) {
            match self.commit_state(processor, from, epoch).await {
                CommitState::Committed => {
                    tracing::warn!(target: "dory::orchestrator", error = %e, "commit reported an error but took effect");
                }
                CommitState::NotCommitted => {
                    let _ = self.resume_owner(&old, "resume after failed commit").await;
                    return Err(e);
                }
                CommitState::Unknown => return Err(e),
            }
        }
        self.terminate(processor, from).await?;
        self.launch(processor, epoch, to, LaunchMode::Restore)
            .await?;
        let pause_ms = self.inner.backends.clock.now().since(frozen_at).as_millis() as u64;
        self.inner.emit(
            Some(processor),
            EventKind::Moved {
                from,
                to: epoch,
                node: to.clone(),
                pause_ms,
            },
        );
        Ok(Outcome::Moved { pause_ms })
    }

    /// Commits the snapshot fetched from the frozen `old` as `to`'s. A delta (the old instance
    /// pre-copied, for this move or one that did not happen) that the store refuses with
    /// `Conflict` lacks its stored base, and a refusal changes nothing: the whole state is
    /// fetched and committed instead.
    async fn commit_frozen(&self, old: &Instance, to: Epoch, bytes: Vec<u8>) -> Result<Sequence> {
        let delta = is_delta(&bytes);
        match self.commit(&old.processor, old.epoch, to, bytes).await {
            Err(Error::Conflict(why)) if delta => {
                tracing::info!(target: "dory::orchestrator", error = %why, "the store refused the delta; committing the whole state");
                let full = self
                    .call("fetch full snapshot", self.ctl().fetch_full(old))
                    .await?;
                self.commit(&old.processor, old.epoch, to, full).await
            }
            committed => committed,
        }
    }

    /// Commits a move: ownership `from` → `to` plus the snapshot, conditional on the term.
    /// Returns the committed snapshot's sequence.
    async fn commit(
        &self,
        processor: &ProcessorId,
        from: Epoch,
        to: Epoch,
        bytes: Vec<u8>,
    ) -> Result<Sequence> {
        let now = self.inner.backends.clock.now();
        let mut snapshot = StoredSnapshot::from_encoded(bytes, now)
            .map_err(|e| e.context(format!("snapshot of {processor} from {from}")))?;
        if &snapshot.meta.processor != processor {
            return Err(Error::invalid(format!(
                "snapshot fetched from {from} of {processor} names processor {}",
                snapshot.meta.processor
            )));
        }
        // The header keeps the epoch that took the snapshot; the store files it as the new
        // owner's first checkpoint.
        snapshot.meta.epoch = to;
        let lease = self.inner.settings.planner.lease;
        self.call(
            "commit move",
            self.inner
                .backends
                .store
                .commit_move(from, &snapshot, lease, self.term),
        )
        .await?;
        Ok(snapshot.meta.sequence)
    }

    /// Where a move from `from` to `to` stands, read from the ownership row. Anything but
    /// "owned by `to`" or "still owned by `from`" (another leader moved it meanwhile, or the
    /// store cannot be read) is unknown, and unknown means: touch nothing.
    async fn commit_state(&self, processor: &ProcessorId, from: Epoch, to: Epoch) -> CommitState {
        let row = self
            .call(
                "read ownership",
                self.inner.backends.store.ownership(processor),
            )
            .await;
        match row.map(|r| r.and_then(|r| r.owner)) {
            Ok(Some(owner)) if owner == to => CommitState::Committed,
            Ok(Some(owner)) if owner == from => CommitState::NotCommitted,
            _ => CommitState::Unknown,
        }
    }

    /// Resumes `instance` only while this leader's term is current and the store still shows
    /// the instance as the owner. Instance calls are not fenced by the term, so a deposed
    /// leader, or one acting on a stale observation, must not wake an instance that another
    /// leader has moved away from.
    async fn resume_owner(&self, instance: &Instance, what: &str) -> Result<()> {
        self.call(
            "confirm leadership",
            self.inner.backends.leadership.check(self.term),
        )
        .await?;
        let row = self
            .call(
                "read ownership",
                self.inner.backends.store.ownership(&instance.processor),
            )
            .await?;
        let owner = row.as_ref().and_then(|r| r.owner);
        if owner != Some(instance.epoch) {
            return Err(Error::conflict(format!(
                "{what}: {} of {} no longer owns the processor (owner {}); not resuming it",
                instance.epoch,
                instance.processor,
                owner.map_or("none".to_string(), |e| e.to_string())
            )));
        }
        // A replacement whose move committed while it loaded (or whose orchestrator died
        // between the two) is told what was committed, and restores it if it holds another.
        // An instance on a runtime before that protocol was never loaded while committing:
        // what it holds is what its move committed.
        // An instance that cannot be asked is not resumed: a plain resume could run a stale
        // standby.
        match row.and_then(|r| r.committed) {
            Some((epoch, sequence))
                if epoch == instance.epoch && self.speaks_resume_committed(instance).await? =>
            {
                self.call(what, self.ctl().resume_committed(instance, sequence))
                    .await
            }
            _ => self.call(what, self.ctl().resume(instance)).await,
        }
    }

    /// Whether `instance` says it speaks the protocol of
    /// [`InstanceControl::resume_committed`](crate::InstanceControl::resume_committed).
    async fn speaks_resume_committed(&self, instance: &Instance) -> Result<bool> {
        let health = self.call("health", self.ctl().health(instance)).await?;
        Ok(health.protocol >= 1)
    }
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Start { .. } => "start",
        Action::Move { .. } => "move",
        Action::Evacuate { .. } => "evacuate",
        Action::RollBack { .. } => "roll-back",
        Action::RollForward { .. } => "roll-forward",
        Action::Resume { .. } => "resume",
        Action::Terminate { .. } => "terminate",
        Action::Release { .. } => "release",
        Action::Forget { .. } => "forget",
        Action::MarkFailed { .. } => "mark-failed",
    }
}

/// What the ownership row says about a move whose commit call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitState {
    /// The new epoch owns the processor: roll forward.
    Committed,
    /// The old epoch still owns it: roll back.
    NotCommitted,
    /// Neither, or unreadable: leave it to the next round.
    Unknown,
}

/// Whether `bytes` is a delta snapshot (unreadable bytes are not: their load error stands).
fn is_delta(bytes: &[u8]) -> bool {
    crate::snapshot::decode_header(bytes)
        .is_ok_and(|h| h.kind == crate::snapshot::SnapshotKind::Delta)
}

/// Where a make-before-break move stands. Steps before [`MoveStep::Commit`] roll back on
/// failure; the commit and the steps after it roll forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum MoveStep {
    /// Claim the replacement's epoch.
    Claim,
    /// Launch the replacement in standby.
    Launch,
    /// Wait until the replacement is healthy in standby.
    AwaitStandby,
    /// Have the old instance store a full checkpoint while it runs and load it into the
    /// replacement, so the freeze sends only what changed since. Never fails the move: without
    /// it the freeze sends the whole state.
    PreCopy,
    /// Freeze the old instance at a safe point.
    Freeze,
    /// Fetch the frozen snapshot.
    Fetch,
    /// Load it into the replacement; when both instances run the same revision of the
    /// processor, commit at the same time (see [`MoveOp::load_and_commit`]).
    Load,
    /// Commit: ownership and snapshot, atomically, conditional on the term.
    Commit,
    /// Resume the replacement.
    Resume,
    /// Terminate the old instance.
    TerminateOld,
    /// Finished.
    Done,
}

struct MoveOp<'a> {
    op: &'a Op,
    processor: ProcessorId,
    old: Instance,
    to: NodeId,
    step: MoveStep,
    epoch: Option<Epoch>,
    replacement: Option<Instance>,
    snapshot: Option<Vec<u8>>,
    /// The committed snapshot's sequence, once committed.
    committed: Option<Sequence>,
    /// Whether the replacement's runtime takes a resume naming the committed sequence (asked
    /// before the freeze); only then may its load run beside the commit.
    replacement_resumes_committed: bool,
    frozen_at: Option<crate::model::Timestamp>,
    pause_ms: u64,
}

impl<'a> MoveOp<'a> {
    fn new(op: &'a Op, processor: ProcessorId, old: Instance, to: NodeId) -> Self {
        MoveOp {
            op,
            processor,
            old,
            to,
            step: MoveStep::Claim,
            epoch: None,
            replacement: None,
            snapshot: None,
            committed: None,
            replacement_resumes_committed: false,
            frozen_at: None,
            pause_ms: 0,
        }
    }

    async fn run(mut self) -> Result<Outcome> {
        let span = tracing::info_span!("move", processor.id = %self.processor, epoch = self.old.epoch.0, node = %self.to);
        async {
            while self.step != MoveStep::Done {
                if let Err(e) = self.advance().await {
                    // The step that failed: a load that commits at the same time fails as the
                    // commit when the commit does.
                    let step = self.step;
                    tracing::warn!(target: "dory::orchestrator", ?step, error = %e, "move step failed");
                    return Err(self.recover(step, e).await);
                }
            }
            let to = self.epoch.unwrap_or_default();
            self.op.inner.emit(
                Some(&self.processor),
                EventKind::Moved {
                    from: self.old.epoch,
                    to,
                    node: self.to.clone(),
                    pause_ms: self.pause_ms,
                },
            );
            Ok(Outcome::Moved {
                pause_ms: self.pause_ms,
            })
        }
        .instrument(span)
        .await
    }

    fn fault(&self) -> PlantedFault {
        self.op.inner.fault
    }

    fn replacement(&self) -> Result<&Instance> {
        self.replacement
            .as_ref()
            .ok_or_else(|| Error::not_found("replacement instance"))
    }

    /// Performs the current step and moves to the next.
    async fn advance(&mut self) -> Result<()> {
        let op = self.op;
        let p = &self.processor;
        self.step = match self.step {
            MoveStep::Claim => {
                let store = &op.inner.backends.store;
                self.epoch = Some(
                    op.call("claim epoch", store.claim_epoch(p, op.term))
                        .await?,
                );
                MoveStep::Launch
            }
            MoveStep::Launch => {
                let epoch = self.epoch.unwrap_or_default();
                op.launch(p, epoch, &self.to, LaunchMode::Standby).await?;
                MoveStep::AwaitStandby
            }
            MoveStep::AwaitStandby => {
                let epoch = self.epoch.unwrap_or_default();
                let ready = op
                    .wait_for(p, epoch, op.inner.settings.start_timeout, "standby", |i| {
                        i.is_some_and(|i| i.phase == Phase::Standby && i.endpoint.is_some())
                    })
                    .await?;
                self.replacement = ready;
                MoveStep::PreCopy
            }
            MoveStep::PreCopy => {
                // Asked only when the answer can matter; unanswered, the replacement is loaded
                // before the commit, as an old one is.
                if self.may_overlap()
                    && let Ok(replacement) = self.replacement()
                {
                    self.replacement_resumes_committed = op
                        .speaks_resume_committed(replacement)
                        .await
                        .unwrap_or(false);
                }
                self.precopy().await;
                MoveStep::Freeze
            }
            MoveStep::Freeze => {
                self.frozen_at = Some(op.inner.backends.clock.now());
                if self.fault() == PlantedFault::SkipFreeze {
                    return {
                        self.step = MoveStep::Fetch;
                        Ok(())
                    };
                }
                op.call(
                    "freeze",
                    op.ctl().freeze(&self.old, op.inner.settings.freeze_timeout),
                )
                .await?;
                MoveStep::Fetch
            }
            MoveStep::Fetch => {
                self.snapshot = Some(op.call("fetch snapshot", op.ctl().fetch(&self.old)).await?);
                MoveStep::Load
            }
            MoveStep::Load if self.overlaps() => {
                return self.load_and_commit().await;
            }
            MoveStep::Load => {
                let bytes = self.snapshot.take().unwrap_or_default();
                let full = self.load(&bytes).await?;
                self.snapshot = Some(full.unwrap_or(bytes));
                if self.fault() == PlantedFault::ResumeBeforeCommit {
                    op.call("resume replacement", op.ctl().resume(self.replacement()?))
                        .await?;
                }
                MoveStep::Commit
            }
            MoveStep::Commit => {
                let bytes = self.snapshot.take().unwrap_or_default();
                let epoch = self.epoch.unwrap_or_default();
                self.committed = Some(op.commit_frozen(&self.old, epoch, bytes).await?);
                MoveStep::Resume
            }
            MoveStep::Resume => {
                let replacement = self.replacement()?;
                let resumed = match self.committed {
                    Some(sequence) if self.replacement_resumes_committed => {
                        op.ctl().resume_committed(replacement, sequence)
                    }
                    _ => op.ctl().resume(replacement),
                };
                op.call("resume replacement", resumed).await?;
                if let Some(frozen_at) = self.frozen_at {
                    self.pause_ms =
                        op.inner.backends.clock.now().since(frozen_at).as_millis() as u64;
                }
                MoveStep::TerminateOld
            }
            MoveStep::TerminateOld => {
                op.terminate(p, self.old.epoch).await?;
                MoveStep::Done
            }
            MoveStep::Done => MoveStep::Done,
        };
        Ok(())
    }

    /// Whether the load and the commit run at once. Only when both instances run the same
    /// revision: a load the replacement refuses then means a lost or damaged transfer, which
    /// the replacement mends at the resume by restoring the committed snapshot from the store
    /// ([`InstanceControl::resume_committed`](crate::InstanceControl::resume_committed)). A
    /// new revision may fail to decode the state, and that must roll the move back with the
    /// old instance running, so it loads before the commit. And only when the replacement
    /// speaks that protocol ([`CONTROL_PROTOCOL`](crate::CONTROL_PROTOCOL) 1): an older runtime
    /// would resume with whatever it holds.
    fn overlaps(&self) -> bool {
        self.may_overlap() && self.replacement_resumes_committed
    }

    /// [`overlaps`](Self::overlaps) but for the replacement's protocol, which is asked only
    /// when this holds.
    fn may_overlap(&self) -> bool {
        self.fault() == PlantedFault::None
            && self.op.inner.settings.load_while_committing
            && self
                .replacement
                .as_ref()
                .is_some_and(|r| r.revision == self.old.revision)
    }

    /// Loads the frozen snapshot `bytes` into the replacement; a delta it refuses (it lacks
    /// the pre-copied base) is followed by the whole state, which is returned.
    async fn load(&self, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        let op = self.op;
        let loaded = op
            .call("load snapshot", op.ctl().load(self.replacement()?, bytes))
            .await;
        let Err(e) = loaded else {
            return Ok(None);
        };
        if !is_delta(bytes) {
            return Err(e);
        }
        tracing::info!(target: "dory::orchestrator", error = %e, "the replacement refused the delta; sending the whole state");
        let full = op
            .call("fetch full snapshot", op.ctl().fetch_full(&self.old))
            .await?;
        op.call("load snapshot", op.ctl().load(self.replacement()?, &full))
            .await?;
        Ok(Some(full))
    }

    /// The load and the commit at once: the pause then waits for the longer of the two, not
    /// both. A failed commit is the commit step's failure (the ownership row decides between
    /// rolling back and forward); a failed load after a commit is mended at the resume.
    async fn load_and_commit(&mut self) -> Result<()> {
        let op = self.op;
        let bytes = self.snapshot.take().unwrap_or_default();
        let epoch = self.epoch.unwrap_or_default();
        let (loaded, committed) = tokio::join!(
            self.load(&bytes),
            op.commit_frozen(&self.old, epoch, bytes.clone())
        );
        match committed {
            Ok(sequence) => {
                if let Err(e) = loaded {
                    tracing::warn!(target: "dory::orchestrator", error = %e, "the replacement did not load the frozen snapshot; it restores the committed one at the resume");
                }
                self.committed = Some(sequence);
                self.step = MoveStep::Resume;
                Ok(())
            }
            Err(e) => {
                self.step = MoveStep::Commit;
                Err(e)
            }
        }
    }

    /// The pre-copy step: failures are logged, never fatal.
    async fn precopy(&mut self) {
        let op = self.op;
        let Ok(replacement) = self.replacement().cloned() else {
            return;
        };
        let timeout = op.inner.settings.freeze_timeout;
        let base = match op
            .call("pre-copy", op.ctl().precopy(&self.old, timeout))
            .await
        {
            Ok(base) => base,
            Err(e) => {
                tracing::debug!(target: "dory::orchestrator", error = %e, "no pre-copy; the freeze sends the whole state");
                return;
            }
        };
        if let Err(e) = op
            .call("load pre-copied state", op.ctl().load(&replacement, &base))
            .await
        {
            tracing::warn!(target: "dory::orchestrator", error = %e, "the replacement did not take the pre-copied state; the freeze sends the whole state");
        }
    }

    /// A step failed: roll back before the commit, leave the rest to the next round after it.
    async fn recover(&mut self, failed: MoveStep, error: Error) -> Error {
        let op = self.op;
        let committed = match failed {
            s if s < MoveStep::Commit => false,
            MoveStep::Commit => {
                // The commit may have taken effect even though the call failed (a lost
                // answer): only the ownership row can tell.
                let to = self.epoch.unwrap_or_default();
                match op.commit_state(&self.processor, self.old.epoch, to).await {
                    CommitState::Committed => true,
                    CommitState::NotCommitted => false,
                    // Unknown: the next round decides from the row.
                    CommitState::Unknown => return error,
                }
            }
            _ => true,
        };
        if committed && self.fault() != PlantedFault::RollBackAfterCommit {
            // Roll forward is what the next round's planner does (RollForward); doing nothing
            // here keeps one place for it.
            return error;
        }
        if let Some(epoch) = self.epoch
            && failed > MoveStep::Launch
            && let Err(e) = op.remove_and_confirm(&self.processor, epoch).await
        {
            // The replacement may still be alive: resuming the old one now could make two
            // writers. Leave both for the next round's RollBack.
            return e.context(format!("roll back after: {error}"));
        } else if let Some(epoch) = self.epoch
            && failed == MoveStep::Launch
        {
            // The launch may have gone through even though the call failed.
            if let Err(e) = op.remove_and_confirm(&self.processor, epoch).await {
                return e.context(format!("roll back after: {error}"));
            }
        }
        if failed >= MoveStep::Freeze {
            let resumed = if self.fault() == PlantedFault::RollBackAfterCommit {
                op.call("resume old instance", op.ctl().resume(&self.old))
                    .await
            } else {
                op.resume_owner(&self.old, "resume old instance").await
            };
            if let Err(e) = resumed {
                return e.context(format!("roll back after: {error}"));
            }
        }
        op.inner.emit(
            Some(&self.processor),
            EventKind::RolledBack {
                owner: self.old.epoch,
                replacement: self.epoch.unwrap_or_default(),
                error: error.to_string(),
            },
        );
        error
    }
}
