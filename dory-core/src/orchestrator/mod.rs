//! The orchestrator: observe, plan, act — level-triggered and stateless.
//!
//! Each round reads the desired state, the nodes and instances, and the ownership rows; asks
//! the pure [`planner`](crate::planner) what to do; and runs the actions, at most one
//! operation per processor, a bounded number of moves at once, with exponential backoff on
//! errors. It keeps nothing it cannot rebuild from what it observes, so it can be killed at any
//! instant: a half-done move is rolled back (before its commit) or forward (after it) by the
//! next leader.
//!
//! The orchestrator is a library type: build it from any backends, run it inside your own
//! tokio runtime, watch its [`OrchestratorHandle`], stop it with a shutdown future.
//!
//! ```no_run
//! # async fn example(
//! #     config: std::sync::Arc<dyn dory_core::ConfigSource>,
//! #     placement: std::sync::Arc<dyn dory_core::Placement>,
//! #     control: std::sync::Arc<dyn dory_core::InstanceControl>,
//! #     store: std::sync::Arc<dyn dory_core::StateStore>,
//! #     leadership: std::sync::Arc<dyn dory_core::Leadership>,
//! # ) -> dory_core::Result<()> {
//! use dory_core::orchestrator::Orchestrator;
//!
//! let orchestrator = Orchestrator::builder(config, placement, control, store, leadership).build();
//! let handle = orchestrator.handle();
//! let mut events = handle.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         println!("{event}");
//!     }
//! });
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # drop(stop);
//! orchestrator.run_until(async { let _ = stopped.await; }).await
//! # }
//! ```

mod ops;
mod round;
mod status;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::backend::{
    ConfigSource, InstanceControl, Leadership, Placement, StateStore, StatusSink,
};
use crate::clock::{Clock, SystemClock};
use crate::error::Result;
use crate::model::{DesiredState, Epoch, NodeId, ProcessorId, ProcessorStatus, Timestamp};
use crate::planner::{Observed, Plan, PlannerConfig};

/// The orchestrator's tunables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// The planner's tunables (lease, grace periods, move bound).
    pub planner: PlannerConfig,
    /// How often the orchestrator plans even when nothing nudged it.
    pub resync_interval: Duration,
    /// How long a freeze may take before it counts as failed (the instance keeps running).
    pub freeze_timeout: Duration,
    /// How long one backend call may take before it counts as unavailable.
    pub call_timeout: Duration,
    /// How long a launched instance may take to become healthy.
    pub start_timeout: Duration,
    /// How long a terminated instance gets to save and exit.
    pub stop_grace: Duration,
    /// How often the orchestrator polls while it waits for an instance to change phase.
    pub poll_interval: Duration,
    /// The first retry delay after a failed operation; doubles on each further failure.
    pub retry_initial: Duration,
    /// The longest retry delay.
    pub retry_max: Duration,
    /// Whether a move loads the replacement while it commits, when both instances run the
    /// same revision: the pause then waits for the longer of the two, not both, and a load
    /// lost meanwhile is mended by the replacement restoring the committed snapshot at its
    /// resume. Off, the replacement loads before the commit, so any load failure rolls the
    /// move back with the old instance running: for processors whose code can change under
    /// one revision (a command rebuilt in place, a mutable image tag), or instances on a
    /// runtime older than `resume_committed`. Default on.
    #[serde(default = "load_while_committing")]
    pub load_while_committing: bool,
}

fn load_while_committing() -> bool {
    true
}

impl Settings {
    /// Checks the settings; the error names the field. An interval of zero would make the
    /// orchestrator spin, a duration of years would overflow deadlines, and a lost-node grace
    /// period within the lease would let a failover start while the old owner may still write.
    pub fn validate(&self) -> crate::Result<()> {
        const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
        let p = &self.planner;
        let durations = [
            ("planner.lease", p.lease),
            ("planner.lease_margin", p.lease_margin),
            ("planner.node_lost_grace", p.node_lost_grace),
            ("planner.stabilisation", p.stabilisation),
            ("planner.min_move_time", p.min_move_time),
            ("resync_interval", self.resync_interval),
            ("freeze_timeout", self.freeze_timeout),
            ("call_timeout", self.call_timeout),
            ("start_timeout", self.start_timeout),
            ("stop_grace", self.stop_grace),
            ("poll_interval", self.poll_interval),
            ("retry_initial", self.retry_initial),
            ("retry_max", self.retry_max),
        ];
        for (field, d) in durations {
            if d > LONGEST {
                return Err(crate::Error::invalid(format!(
                    "orchestrator setting `{field}` is {d:?}; at most a year is allowed"
                )));
            }
        }
        for (field, d) in [
            ("planner.lease", p.lease),
            ("resync_interval", self.resync_interval),
            ("freeze_timeout", self.freeze_timeout),
            ("call_timeout", self.call_timeout),
            ("start_timeout", self.start_timeout),
            ("poll_interval", self.poll_interval),
            ("retry_initial", self.retry_initial),
        ] {
            if d.is_zero() {
                return Err(crate::Error::invalid(format!(
                    "orchestrator setting `{field}` must be greater than zero"
                )));
            }
        }
        if self.retry_max < self.retry_initial {
            return Err(crate::Error::invalid(
                "orchestrator setting `retry_max` must be at least `retry_initial`",
            ));
        }
        if p.max_concurrent_moves == 0 {
            return Err(crate::Error::invalid(
                "orchestrator setting `planner.max_concurrent_moves` must be at least 1",
            ));
        }
        if p.node_lost_grace <= p.lease + p.lease_margin {
            return Err(crate::Error::invalid(format!(
                "orchestrator setting `planner.node_lost_grace` ({:?}) must be longer than `planner.lease` + `planner.lease_margin` ({:?}): a cut-off owner may write until its lease runs out",
                p.node_lost_grace,
                p.lease + p.lease_margin
            )));
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            planner: PlannerConfig::default(),
            resync_interval: Duration::from_secs(5),
            freeze_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(60),
            stop_grace: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
            retry_initial: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            load_while_committing: load_while_committing(),
        }
    }
}

/// A deliberately broken step of the move protocol, planted to prove the simulator catches
/// it. **For testing only**: never set this in production. It is a run-time switch on the
/// builder, not a Cargo feature, so it cannot leak into other crates' builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlantedFault {
    /// The correct protocol.
    #[default]
    None,
    /// Resume the replacement before the commit (two writers while the old one still owns).
    ResumeBeforeCommit,
    /// Fetch the snapshot without freezing the old instance (it keeps running and publishing
    /// after its state was captured).
    SkipFreeze,
    /// Fail over as soon as a node is not ready, without waiting for the lost-node grace period
    /// or the old owner's lease (a cut-off instance may still be writing). The store refuses
    /// to hand ownership on before the lease has run out, so this one is stopped there.
    FailoverWithoutWaiting,
    /// After a failure past the commit, roll back instead of forward (the old, fenced instance
    /// is resumed).
    RollBackAfterCommit,
}

impl PlantedFault {
    /// Every planted fault except [`PlantedFault::None`].
    pub const ALL: [PlantedFault; 4] = [
        PlantedFault::ResumeBeforeCommit,
        PlantedFault::SkipFreeze,
        PlantedFault::FailoverWithoutWaiting,
        PlantedFault::RollBackAfterCommit,
    ];
}

impl fmt::Display for PlantedFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// Something the orchestrator did, for the caller to watch (logs, progress displays, tests).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    pub at: Timestamp,
    /// About which processor (`None` for orchestrator-wide events).
    pub processor: Option<ProcessorId>,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum EventKind {
    /// This orchestrator became the leader.
    Leading {
        /// Its term.
        term: crate::model::Term,
    },
    /// This orchestrator lost leadership.
    Deposed {
        /// The term it had.
        term: crate::model::Term,
    },
    /// An operation began.
    Began {
        /// The action, as the planner gave it.
        action: crate::planner::Action,
    },
    /// An instance was started.
    Started {
        /// Its epoch.
        epoch: Epoch,
        /// Its node.
        node: NodeId,
        /// Why (new, restart, failover).
        reason: crate::planner::StartReason,
        /// For a failover: the checkpoint restored and how old it was when the node was lost.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failover: Option<crate::model::FailoverReport>,
    },
    /// A move committed and finished.
    Moved {
        /// The old epoch.
        from: Epoch,
        /// The new epoch.
        to: Epoch,
        /// The new node.
        node: NodeId,
        /// The pause the processor saw (freeze to resume), in milliseconds.
        pause_ms: u64,
    },
    /// A move failed before its commit and was rolled back.
    RolledBack {
        /// The owner that kept the processor.
        owner: Epoch,
        /// The replacement that was removed.
        replacement: Epoch,
        /// Why.
        error: String,
    },
    /// A half-done move was rolled forward.
    RolledForward {
        /// The owner (the replacement).
        owner: Epoch,
        /// The old instance that was removed.
        old: Epoch,
    },
    /// An instance was terminated.
    Terminated {
        /// Its epoch.
        epoch: Epoch,
    },
    /// The crash-loop breaker tripped.
    MarkedFailed {
        /// Why.
        reason: String,
    },
    /// An operation failed; it is retried with backoff.
    Failed {
        /// The operation.
        operation: String,
        /// The error.
        error: String,
    },
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] ", self.at)?;
        if let Some(p) = &self.processor {
            write!(f, "{p}: ")?;
        }
        match &self.kind {
            EventKind::Leading { term } => write!(f, "leading with term {term}"),
            EventKind::Deposed { term } => write!(f, "lost leadership (term {term})"),
            EventKind::Began { action } => write!(f, "begin {action:?}"),
            EventKind::Started {
                epoch,
                node,
                reason,
                failover,
            } => {
                write!(f, "started {epoch} on {node} ({reason:?})")?;
                match failover {
                    Some(report) => write!(f, ": {report}"),
                    None => Ok(()),
                }
            }
            EventKind::Moved {
                from,
                to,
                node,
                pause_ms,
            } => write!(f, "moved {from} -> {to} on {node}, pause {pause_ms} ms"),
            EventKind::RolledBack {
                owner,
                replacement,
                error,
            } => write!(
                f,
                "move rolled back ({owner} kept, {replacement} removed): {error}"
            ),
            EventKind::RolledForward { owner, old } => {
                write!(f, "move rolled forward ({owner} owns, {old} removed)")
            }
            EventKind::Terminated { epoch } => write!(f, "terminated {epoch}"),
            EventKind::MarkedFailed { reason } => write!(f, "marked failed: {reason}"),
            EventKind::Failed { operation, error } => write!(f, "{operation} failed: {error}"),
        }
    }
}

/// What the orchestrator saw and decided in its latest round.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// When the round ran.
    pub at: Timestamp,
    /// The leader's term (`None` while not leading).
    pub term: Option<crate::model::Term>,
    /// The desired state.
    pub desired: DesiredState,
    /// The observed state.
    pub observed: Observed,
    /// The plan.
    pub plan: Plan,
    /// The status of every processor, by id.
    pub status: BTreeMap<String, ProcessorStatus>,
    /// How long the round took: observe, plan, start operations, write status.
    pub reconcile: Duration,
}

/// A handle on a running (or not yet running) orchestrator: its latest view and its events.
#[derive(Clone, Debug)]
pub struct OrchestratorHandle {
    view: watch::Receiver<Arc<View>>,
    events: broadcast::Sender<Event>,
}

impl OrchestratorHandle {
    /// The latest view.
    pub fn view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Waits for the next round's view.
    pub async fn next_view(&mut self) -> Arc<View> {
        let _ = self.view.changed().await;
        self.view.borrow_and_update().clone()
    }

    /// A subscription to events from now on.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

struct Backends {
    config: Arc<dyn ConfigSource>,
    placement: Arc<dyn Placement>,
    control: Arc<dyn InstanceControl>,
    store: Arc<dyn StateStore>,
    leadership: Arc<dyn Leadership>,
    status: Option<Arc<dyn StatusSink>>,
    clock: Arc<dyn Clock>,
}

/// Builds an [`Orchestrator`] from backends.
pub struct OrchestratorBuilder {
    backends: Backends,
    settings: Settings,
    fault: PlantedFault,
}

impl OrchestratorBuilder {
    /// Where observed status is written (none by default).
    pub fn status_sink(mut self, status: Arc<dyn StatusSink>) -> Self {
        self.backends.status = Some(status);
        self
    }

    /// The clock (wall-clock time by default; the simulator passes simulated time).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.backends.clock = clock;
        self
    }

    /// The tunables.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }

    /// Plants a bug in the move protocol. **For testing the simulator only.**
    pub fn planted_fault(mut self, fault: PlantedFault) -> Self {
        self.fault = fault;
        self
    }

    /// Builds the orchestrator.
    pub fn build(self) -> Orchestrator {
        let (view_tx, _) = watch::channel(Arc::new(View::default()));
        let (events, _) = broadcast::channel(1024);
        Orchestrator {
            inner: Arc::new(Inner {
                backends: self.backends,
                settings: self.settings,
                fault: self.fault,
                view: view_tx,
                events,
            }),
        }
    }
}

struct Inner {
    backends: Backends,
    settings: Settings,
    fault: PlantedFault,
    view: watch::Sender<Arc<View>>,
    events: broadcast::Sender<Event>,
}

impl Inner {
    fn emit(&self, processor: Option<&ProcessorId>, kind: EventKind) {
        let event = Event {
            at: self.backends.clock.now(),
            processor: processor.cloned(),
            kind,
        };
        tracing::debug!(target: "dory::orchestrator", "{event}");
        let _ = self.events.send(event);
    }
}

/// The orchestrator engine. See the [module docs](self).
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator")
            .field("settings", &self.inner.settings)
            .field("fault", &self.inner.fault)
            .finish()
    }
}

impl Orchestrator {
    /// A builder over the backends every orchestrator needs.
    pub fn builder(
        config: Arc<dyn ConfigSource>,
        placement: Arc<dyn Placement>,
        control: Arc<dyn InstanceControl>,
        store: Arc<dyn StateStore>,
        leadership: Arc<dyn Leadership>,
    ) -> OrchestratorBuilder {
        OrchestratorBuilder {
            backends: Backends {
                config,
                placement,
                control,
                store,
                leadership,
                status: None,
                clock: Arc::new(SystemClock),
            },
            settings: Settings::default(),
            fault: PlantedFault::None,
        }
    }

    /// A handle to watch the orchestrator.
    pub fn handle(&self) -> OrchestratorHandle {
        OrchestratorHandle {
            view: self.inner.view.subscribe(),
            events: self.inner.events.clone(),
        }
    }

    /// Runs until `shutdown` resolves: takes leadership, then plans and acts round after
    /// round. On shutdown it lets operations in flight finish (each is bounded by the
    /// timeouts in [`Settings`]) and resigns leadership. Dropping the future instead stops at
    /// once; that is safe too, as a later leader rolls half-done moves back or forward.
    ///
    /// Fails at once with [`Invalid`](crate::Error::Invalid) when the [`Settings`] do not
    /// validate.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        self.inner.settings.validate()?;
        round::run(self.inner.clone(), shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[allow(dead_code)]
    fn run_future_is_send(o: Orchestrator) {
        let f = async move { o.run_until(std::future::pending()).await };
        assert_send(&f);
    }

    #[test]
    fn settings_validation_names_the_field() {
        assert!(Settings::default().validate().is_ok());
        let s = Settings {
            poll_interval: Duration::ZERO,
            ..Settings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("`poll_interval`")
        );
        let mut s = Settings::default();
        s.planner.node_lost_grace = s.planner.lease;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("`planner.node_lost_grace`")
        );
        let s = Settings {
            stop_grace: Duration::MAX,
            ..Settings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("`stop_grace`")
        );
        let s = Settings {
            retry_max: Duration::from_millis(1),
            ..Settings::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("`retry_max`")
        );
    }

    #[test]
    fn planted_faults_display_kebab_case() {
        assert_eq!(
            PlantedFault::ResumeBeforeCommit.to_string(),
            "resume-before-commit"
        );
    }
}
