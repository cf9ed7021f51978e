//! The planner: a pure function from what is desired and what is observed to what to do.
//!
//! `plan(desired, observed, now, config) -> Plan`. No I/O, no clock reads, no randomness:
//! jitter and tie-breaks come from a hash of (processor, attempt), so the same inputs always
//! give the same plan, byte for byte. The executor ([`crate::orchestrator`]) performs the
//! actions; the planner never sees how.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{
    Epoch, Instance, InterruptionReason, Node, NodeId, Ownership, ProcessorId, Timestamp,
};

mod placement;
mod rules;
#[cfg(test)]
mod tests;

pub use rules::plan;

/// The planner's tunables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannerConfig {
    /// The instance ownership lease period.
    pub lease: Duration,
    /// Extra time after a lease has run out before its processor is started elsewhere
    /// (covers clock skew between the store, the orchestrator and the instance).
    pub lease_margin: Duration,
    /// How long a node must be not ready before it counts as lost and its processors fail
    /// over. Must be longer than `lease + lease_margin`.
    pub node_lost_grace: Duration,
    /// How long the preferred site must have been healthy before a processor running on its
    /// fallback site moves back.
    pub stabilisation: Duration,
    /// The most moves, evacuations and starts in flight at once.
    pub max_concurrent_moves: usize,
    /// How long a full make-before-break move takes at most; an interruption whose deadline is
    /// closer than this degrades to an evacuation (freeze, commit, terminate, restore
    /// elsewhere).
    pub min_move_time: Duration,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        PlannerConfig {
            lease: Duration::from_secs(10),
            lease_margin: Duration::from_secs(2),
            node_lost_grace: Duration::from_secs(20),
            stabilisation: Duration::from_secs(60),
            max_concurrent_moves: 8,
            min_move_time: Duration::from_secs(15),
        }
    }
}

/// What the orchestrator remembers about a processor's restarts (persisted in its status, so
/// a restarted orchestrator rebuilds it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartHistory {
    /// Restarts since the processor last ran stably; drives the backoff.
    pub restarts: u32,
    /// When each recent failure happened, oldest first; drives the crash-loop breaker.
    pub recent_failures: Vec<Timestamp>,
    /// Set once the crash-loop breaker has tripped: the reason. Cleared by a spec change.
    pub failed: Option<String>,
    /// The spec revision the breaker tripped on.
    pub failed_revision: Option<u64>,
}

/// Everything the planner is told about the world.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    /// Every node, sorted by id.
    pub nodes: Vec<Node>,
    /// Every instance, sorted by (processor, epoch).
    pub instances: Vec<Instance>,
    /// Every ownership row, sorted by processor.
    pub ownership: Vec<Ownership>,
    /// Restart history per processor.
    pub history: BTreeMap<ProcessorId, RestartHistory>,
    /// Processors with an operation in flight: the planner leaves them alone.
    pub busy: BTreeSet<ProcessorId>,
    /// How many of the busy processors are moving, evacuating or starting (counted against
    /// [`PlannerConfig::max_concurrent_moves`]).
    pub moves_in_flight: usize,
}

/// Why a processor is being started.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartReason {
    /// It has never run (or its state has no owner).
    New,
    /// Its instance ended and the restart policy says start it again.
    Restart,
    /// Its node was lost: restore from the latest committed snapshot elsewhere.
    Failover,
}

/// Why a running processor is being moved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MoveReason {
    /// Its node is going away.
    Interruption(InterruptionReason),
    /// Its node was cordoned through Dory.
    Cordon,
    /// An operator pinned it to another node.
    Pin,
    /// Its spec changed (rolled out as a move).
    SpecChange,
    /// Its preferred site is healthy again.
    MoveBack,
}

/// One thing to do. Every action names one processor; the executor runs at most one operation
/// per processor at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Claim a new epoch, take ownership from `expected_owner` (whose lease has run out, or
    /// who exited), and launch in `restore` mode on `node`.
    ///
    /// The executor forgets the processor's ended instances before it starts: a plan holds one
    /// action per processor, so the Start stands for that clean-up too.
    Start {
        /// The processor.
        processor: ProcessorId,
        /// Where.
        node: NodeId,
        /// The current owner the store must still show (compare-and-swap).
        expected_owner: Option<Epoch>,
        /// Why.
        reason: StartReason,
    },
    /// Make-before-break move of the running owner `from` to `to`.
    Move {
        /// The processor.
        processor: ProcessorId,
        /// The owning epoch now running.
        from: Epoch,
        /// The target node.
        to: NodeId,
        /// Why.
        reason: MoveReason,
    },
    /// A deadline too short for a full move: freeze `from`, commit its snapshot to a new
    /// epoch, terminate it, then restore that epoch on `to`.
    Evacuate {
        /// The processor.
        processor: ProcessorId,
        /// The owning epoch now running.
        from: Epoch,
        /// The target node.
        to: NodeId,
        /// Why.
        reason: InterruptionReason,
    },
    /// A move found half-done before its commit: terminate the replacement, confirm it is
    /// gone, then resume the owner.
    RollBack {
        /// The processor.
        processor: ProcessorId,
        /// The owner (the old instance).
        owner: Epoch,
        /// The uncommitted replacement.
        replacement: Epoch,
    },
    /// A move found half-done after its commit: resume the owner (the replacement) and
    /// terminate the old instance.
    RollForward {
        /// The processor.
        processor: ProcessorId,
        /// The owner (the replacement).
        owner: Epoch,
        /// The old instance.
        old: Epoch,
    },
    /// Resume a frozen or standby owner that nothing else is happening to.
    Resume {
        /// The processor.
        processor: ProcessorId,
        /// The owner.
        epoch: Epoch,
    },
    /// Stop an instance: the processor is no longer desired (`release` gives up its
    /// ownership once it is gone), or it is a stray that does not own the processor.
    Terminate {
        /// The processor.
        processor: ProcessorId,
        /// The instance.
        epoch: Epoch,
        /// Release ownership once the instance is gone.
        release: bool,
    },
    /// Give up ownership of a processor that is no longer desired and has no instance.
    Release {
        /// The processor.
        processor: ProcessorId,
        /// The owner.
        epoch: Epoch,
    },
    /// Drop the record of an ended instance.
    Forget {
        /// The processor.
        processor: ProcessorId,
        /// The instance.
        epoch: Epoch,
    },
    /// The crash-loop breaker tripped: stop restarting and report why.
    MarkFailed {
        /// The processor.
        processor: ProcessorId,
        /// Why, for the status.
        reason: String,
    },
}

impl Action {
    /// The processor this action is about.
    pub fn processor(&self) -> &ProcessorId {
        match self {
            Action::Start { processor, .. }
            | Action::Move { processor, .. }
            | Action::Evacuate { processor, .. }
            | Action::RollBack { processor, .. }
            | Action::RollForward { processor, .. }
            | Action::Resume { processor, .. }
            | Action::Terminate { processor, .. }
            | Action::Release { processor, .. }
            | Action::Forget { processor, .. }
            | Action::MarkFailed { processor, .. } => processor,
        }
    }

    /// Whether the action counts against [`PlannerConfig::max_concurrent_moves`].
    pub fn is_move(&self) -> bool {
        matches!(
            self,
            Action::Start { .. } | Action::Move { .. } | Action::Evacuate { .. }
        )
    }
}

/// The planner's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[must_use]
pub struct Plan {
    /// What to do now, at most one action per processor, in a deterministic order (urgent
    /// first: earliest interruption deadline, then failovers, then the rest by processor id).
    pub actions: Vec<Action>,
    /// Why a processor is waiting (backoff, lease, no node fits, the move bound): shown in
    /// its status.
    pub waiting: BTreeMap<ProcessorId, String>,
    /// The earliest time at which something now waiting becomes actionable, so the executor
    /// can plan again then without polling.
    pub wake_at: Option<Timestamp>,
}
