//! The orchestrator's main loop: lead, observe, plan, act, report, wait.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tracing::Instrument;

use super::ops::{Op, Outcome};
use super::{EventKind, Inner, PlantedFault, View};
use crate::error::{Error, Result};
use crate::model::{
    DesiredState, Epoch, Instance, Phase, ProcessorId, ProcessorSpec, ProcessorStatus, Term,
    Timestamp,
};
use crate::planner::{self, Observed, RestartHistory, StartReason};

enum LeadOutcome {
    Stopped,
    Deposed,
}

pub(super) async fn run(
    inner: Arc<Inner>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    tokio::pin!(shutdown);
    let mut backoff = inner.settings.retry_initial;
    loop {
        let acquired = tokio::select! {
            biased;
            _ = &mut shutdown => return Ok(()),
            t = inner.backends.leadership.acquire() => t,
        };
        let term = match acquired {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(target: "dory::orchestrator", error = %e, "cannot acquire leadership; retrying");
                tokio::select! {
                    biased;
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(inner.settings.retry_max);
                continue;
            }
        };
        backoff = inner.settings.retry_initial;
        inner.emit(None, EventKind::Leading { term });
        tracing::info!(target: "dory::orchestrator", %term, "leading");
        let mut leader = Leader::new(inner.clone(), term).await;
        match leader.lead(&mut shutdown).await {
            LeadOutcome::Stopped => {
                if let Err(e) = inner.backends.leadership.resign(term).await {
                    tracing::warn!(target: "dory::orchestrator", error = %e, "resigning leadership");
                }
                return Ok(());
            }
            LeadOutcome::Deposed => {
                inner.emit(None, EventKind::Deposed { term });
                tracing::warn!(target: "dory::orchestrator", %term, "lost leadership");
            }
        }
    }
}

type OpResult = (ProcessorId, bool, Result<Outcome>);

/// One leadership term's worth of orchestrator memory. Everything here is either rebuilt from
/// observation or merely an optimisation (retry timers, what status was last written).
struct Leader {
    inner: Arc<Inner>,
    term: Term,
    ops: JoinSet<OpResult>,
    /// Which processor each operation task serves, so that a task that panicked still frees
    /// its processor (looked up by task id, never iterated).
    tasks: std::collections::HashMap<tokio::task::Id, ProcessorId>,
    busy: BTreeMap<ProcessorId, bool>,
    retry: BTreeMap<ProcessorId, (u32, Timestamp, String)>,
    history: BTreeMap<ProcessorId, RestartHistory>,
    counted_failures: BTreeSet<(ProcessorId, Epoch)>,
    /// The last move and failover of each processor, for the status.
    last: super::status::Last,
    written: BTreeMap<String, ProcessorStatus>,
    /// Set until the first round has run: crashes seen then were counted by a former leader.
    first_round: bool,
}

impl Leader {
    async fn new(inner: Arc<Inner>, term: Term) -> Self {
        let mut leader = Leader {
            inner,
            term,
            ops: JoinSet::new(),
            tasks: std::collections::HashMap::new(),
            first_round: true,
            busy: BTreeMap::new(),
            retry: BTreeMap::new(),
            history: BTreeMap::new(),
            counted_failures: BTreeSet::new(),
            last: super::status::Last::default(),
            written: BTreeMap::new(),
        };
        leader.restore_history().await;
        leader
    }

    /// Restart counters and the crash-loop breaker live in the status, so a new leader picks
    /// them up where the last one left them.
    async fn restore_history(&mut self) {
        let Some(sink) = &self.inner.backends.status else {
            return;
        };
        let read = bounded(self.inner.settings.call_timeout, "read status", sink.read()).await;
        let statuses = match read {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(target: "dory::orchestrator", error = %e, "cannot read status; restart history starts empty");
                return;
            }
        };
        for status in statuses {
            let Ok(id) = ProcessorId::new(status.processor.clone()) else {
                continue;
            };
            let failed =
                (status.phase == "failed").then(|| status.last_error.clone().unwrap_or_default());
            self.history.insert(
                id.clone(),
                RestartHistory {
                    restarts: status.restarts,
                    recent_failures: status.recent_failures.clone(),
                    failed_revision: failed.as_ref().and(status.spec_revision),
                    failed,
                },
            );
            if let (Some(at), Some(pause)) = (status.last_move_at, status.last_move_pause_ms) {
                self.last.moves.insert(id.clone(), (at, pause));
            }
            if let Some(report) = &status.last_failover {
                self.last.failovers.insert(id, report.clone());
            }
            self.written.insert(status.processor.clone(), status);
        }
    }

    async fn lead(&mut self, shutdown: &mut (impl Future<Output = ()> + Unpin)) -> LeadOutcome {
        let mut config_changes = self.inner.backends.config.changes();
        let mut placement_changes = self.inner.backends.placement.changes();
        let mut stopping = false;
        let mut last_round: Option<tokio::time::Instant> = None;
        loop {
            // However often operations finish or nudges arrive, rounds are spaced by at least
            // the poll interval, so nothing can make the orchestrator spin.
            if let Some(last) = last_round {
                tokio::time::sleep_until(last + self.inner.settings.poll_interval).await;
            }
            last_round = Some(tokio::time::Instant::now());
            let clock = self.inner.backends.clock.clone();
            let mut wake = clock.now().plus(self.inner.settings.resync_interval);
            if !stopping {
                let checked = bounded(
                    self.inner.settings.call_timeout,
                    "confirm leadership",
                    self.inner.backends.leadership.check(self.term),
                )
                .await;
                match checked {
                    Err(Error::Fenced(_)) => {
                        // Our writes would be refused anyway; stop acting at once.
                        self.ops.abort_all();
                        while self.ops.join_next().await.is_some() {}
                        return LeadOutcome::Deposed;
                    }
                    Err(e) => {
                        tracing::warn!(target: "dory::orchestrator", error = %e, "cannot confirm leadership; not acting this round");
                        wake = clock.now().plus(self.inner.settings.retry_initial);
                    }
                    Ok(()) => {
                        let span = tracing::info_span!("reconcile", term = self.term.0);
                        if let Some(at) = self.round().instrument(span).await {
                            wake = wake.min(at);
                        }
                    }
                }
            }
            if stopping && self.ops.is_empty() {
                return LeadOutcome::Stopped;
            }
            let sleep_for = wake.since(clock.now()).max(Duration::from_millis(1));
            tokio::select! {
                biased;
                _ = &mut *shutdown, if !stopping => stopping = true,
                Some(done) = self.ops.join_next_with_id(), if !self.ops.is_empty() => self.finished(done),
                _ = config_changes.changed(), if !stopping => {}
                _ = placement_changes.changed(), if !stopping => {}
                _ = tokio::time::sleep(sleep_for) => {}
            }
        }
    }

    fn finished(
        &mut self,
        done: std::result::Result<(tokio::task::Id, OpResult), tokio::task::JoinError>,
    ) {
        let (processor, result) = match done {
            Ok((id, (processor, _, result))) => {
                self.tasks.remove(&id);
                (processor, result)
            }
            Err(e) => {
                // A panicking operation is a bug: report it, free its processor and retry it
                // with backoff like any failed operation.
                tracing::error!(target: "dory::orchestrator", error = %e, "operation task failed");
                let Some(processor) = self.tasks.remove(&e.id()) else {
                    return;
                };
                let error = Error::unavailable(format!("operation task failed: {e}"));
                (processor, Err(error))
            }
        };
        self.busy.remove(&processor);
        let now = self.inner.backends.clock.now();
        match result {
            Ok(outcome) => {
                self.retry.remove(&processor);
                let history = self.history.entry(processor.clone()).or_default();
                match outcome {
                    Outcome::Started {
                        reason: StartReason::Restart,
                        ..
                    } => history.restarts += 1,
                    Outcome::Started {
                        failover: Some(report),
                        ..
                    } => {
                        self.last.failovers.insert(processor, *report);
                    }
                    Outcome::Moved { pause_ms } => {
                        self.last.moves.insert(processor, (now, pause_ms));
                    }
                    Outcome::MarkedFailed { reason, revision } => {
                        history.failed = Some(reason);
                        history.failed_revision = revision;
                    }
                    Outcome::Started { .. } | Outcome::Done => {}
                }
            }
            Err(error) => {
                let (failures, _, _) = self.retry.get(&processor).cloned().unwrap_or_default();
                let failures = failures + 1;
                let s = &self.inner.settings;
                let exp = s
                    .retry_initial
                    .saturating_mul(1u32 << (failures - 1).min(16))
                    .min(s.retry_max);
                let jitter = super::status::jitter(&processor, failures, exp / 4);
                self.inner.emit(
                    Some(&processor),
                    EventKind::Failed {
                        operation: "operation".into(),
                        error: error.to_string(),
                    },
                );
                self.retry.insert(
                    processor,
                    (failures, now.plus(exp + jitter), error.to_string()),
                );
            }
        }
    }

    /// Observes, plans, starts operations and writes status. Returns when it wants to run
    /// again at the latest.
    async fn round(&mut self) -> Option<Timestamp> {
        // Take in every operation that has finished first. The loop joins one operation per
        // wake-up, so one that finished while the last round ran (or beside another) would
        // otherwise be taken in only after this round, whose status would then show its new
        // instance without the move or failover that made it.
        while let Some(done) = self.ops.try_join_next_with_id() {
            self.finished(done);
        }
        // tokio's clock, so the simulator's paused time measures it deterministically.
        let started = tokio::time::Instant::now();
        let b = &self.inner.backends;
        let observed = bounded(self.inner.settings.call_timeout, "observe", async {
            let desired = b
                .config
                .desired()
                .await
                .map_err(|e| e.context("read desired state"))?;
            let nodes = b
                .placement
                .nodes()
                .await
                .map_err(|e| e.context("list nodes"))?;
            let instances = b
                .placement
                .instances()
                .await
                .map_err(|e| e.context("list instances"))?;
            let ownership = b
                .store
                .ownerships()
                .await
                .map_err(|e| e.context("read ownership"))?;
            Ok::<_, Error>((desired, nodes, instances, ownership))
        })
        .await;
        let now = b.clock.now();
        let (desired, nodes, instances, ownership) = match observed {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(target: "dory::orchestrator", error = %e, "cannot observe; retrying");
                self.inner.emit(
                    None,
                    EventKind::Failed {
                        operation: "observe".into(),
                        error: e.to_string(),
                    },
                );
                return Some(now.plus(self.inner.settings.retry_initial));
            }
        };
        self.update_history(&desired, &nodes, &instances, &ownership, now);
        self.first_round = false;
        let mut observed = Observed {
            nodes,
            instances,
            ownership,
            history: self.history.clone(),
            busy: self.busy.keys().cloned().collect(),
            moves_in_flight: self.busy.values().filter(|m| **m).count(),
        };
        if self.inner.fault == PlantedFault::FailoverWithoutWaiting {
            for node in observed.nodes.iter_mut().filter(|n| !n.ready) {
                node.ready_since = Timestamp(0);
            }
            for row in &mut observed.ownership {
                row.lease_expires = None;
            }
        }
        let plan = planner::plan(&desired, &observed, now, &self.inner.settings.planner);
        let mut wake = plan.wake_at;
        let specs: BTreeMap<&ProcessorId, &ProcessorSpec> =
            desired.processors.iter().map(|s| (&s.id, s)).collect();
        for action in &plan.actions {
            let processor = action.processor().clone();
            if let Some((_, at, _)) = self.retry.get(&processor)
                && *at > now
            {
                wake = Some(wake.map_or(*at, |w| w.min(*at)));
                continue;
            }
            self.inner.emit(
                Some(&processor),
                EventKind::Began {
                    action: action.clone(),
                },
            );
            let op = Op {
                inner: self.inner.clone(),
                term: self.term,
                action: action.clone(),
                spec: specs.get(&processor).map(|s| (*s).clone()),
                instances: observed
                    .instances
                    .iter()
                    .filter(|i| i.processor == processor)
                    .cloned()
                    .collect(),
                row: observed
                    .ownership
                    .iter()
                    .find(|o| o.processor == processor)
                    .cloned(),
                lost: lost_with(action, &observed),
            };
            let is_move = action.is_move();
            self.busy.insert(processor.clone(), is_move);
            let task = processor.clone();
            let handle = self
                .ops
                .spawn(async move { (task, is_move, op.run().await) });
            self.tasks.insert(handle.id(), processor);
        }
        let status = self.write_status(&desired, &observed, &plan, now).await;
        self.inner.view.send_replace(Arc::new(View {
            at: now,
            term: Some(self.term),
            desired,
            observed,
            plan,
            status,
            reconcile: started.elapsed(),
        }));
        wake
    }

    /// Counts failures of owning instances for the restart policy and the crash-loop breaker.
    fn update_history(
        &mut self,
        desired: &DesiredState,
        nodes: &[crate::model::Node],
        instances: &[Instance],
        ownership: &[crate::model::Ownership],
        now: Timestamp,
    ) {
        let specs: BTreeMap<&ProcessorId, &ProcessorSpec> =
            desired.processors.iter().map(|s| (&s.id, s)).collect();
        self.history.retain(|p, _| specs.contains_key(p));
        let owners: BTreeMap<&ProcessorId, Epoch> = ownership
            .iter()
            .filter_map(|o| o.owner.map(|e| (&o.processor, e)))
            .collect();
        let node_ready: BTreeMap<_, _> = nodes.iter().map(|n| (&n.id, n.ready)).collect();
        for instance in instances {
            let Some(spec) = specs.get(&instance.processor) else {
                continue;
            };
            let owns = owners.get(&instance.processor) == Some(&instance.epoch);
            let history = self.history.entry(instance.processor.clone()).or_default();
            if history.failed.is_some() && history.failed_revision != Some(spec.revision()) {
                // A new spec gets a fresh chance.
                *history = RestartHistory::default();
            }
            let crashed = match &instance.phase {
                Phase::Exited { code } => *code != 0,
                Phase::Failed { .. } => node_ready.get(&instance.node).copied().unwrap_or(false),
                _ => false,
            };
            let key = (instance.processor.clone(), instance.epoch);
            // A crash already on record when this leader took over was counted by the leader
            // before it (the history comes from the status it wrote).
            if owns && crashed && self.counted_failures.insert(key) && !self.first_round {
                history.recent_failures.push(now);
            }
            if owns
                && instance.phase == Phase::Running
                && now.since(instance.started_at) >= spec.restart.crash_loop_window
            {
                history.restarts = 0;
            }
            let window = spec.restart.crash_loop_window;
            history.recent_failures.retain(|t| now.since(*t) < window);
        }
        let present: BTreeSet<(&ProcessorId, Epoch)> =
            instances.iter().map(|i| (&i.processor, i.epoch)).collect();
        self.counted_failures
            .retain(|(p, e)| present.contains(&(p, *e)));
    }

    async fn write_status(
        &mut self,
        desired: &DesiredState,
        observed: &Observed,
        plan: &crate::planner::Plan,
        now: Timestamp,
    ) -> BTreeMap<String, ProcessorStatus> {
        let statuses = super::status::build(
            desired,
            observed,
            plan,
            &self.history,
            &self.last,
            &self.retry,
            now,
        );
        if let Some(sink) = &self.inner.backends.status {
            let changed: Vec<ProcessorStatus> = statuses
                .values()
                .filter(|s| {
                    self.written
                        .get(&s.processor)
                        .is_none_or(|w| !super::status::same(w, s))
                })
                .cloned()
                .collect();
            let gone: Vec<String> = self
                .written
                .keys()
                .filter(|p| !statuses.contains_key(*p))
                .cloned()
                .collect();
            let result = bounded(self.inner.settings.call_timeout, "write status", async {
                if !changed.is_empty() {
                    sink.upsert(&changed).await?;
                }
                if !gone.is_empty() {
                    sink.remove(&gone).await?;
                }
                Ok::<_, Error>(())
            })
            .await;
            match result {
                Ok(()) => self.written = statuses.clone(),
                Err(e) => {
                    tracing::warn!(target: "dory::orchestrator", error = %e, "cannot write status")
                }
            }
        }
        statuses
    }
}

/// For a failover: the node its lost owner ran on and, if that node is not ready, since when.
fn lost_with(
    action: &planner::Action,
    observed: &Observed,
) -> Option<(crate::model::NodeId, Option<Timestamp>)> {
    let planner::Action::Start {
        processor,
        expected_owner: Some(owner),
        reason: StartReason::Failover,
        ..
    } = action
    else {
        return None;
    };
    let instance = observed
        .instances
        .iter()
        .find(|i| &i.processor == processor && i.epoch == *owner)?;
    let down_since = observed
        .nodes
        .iter()
        .find(|n| n.id == instance.node)
        .filter(|n| !n.ready)
        .map(|n| n.ready_since);
    Some((instance.node.clone(), down_since))
}

/// Runs a call of the leader's own (observation, leadership, status) with a timeout, so one
/// backend that hangs cannot keep the leader from noticing it was deposed or asked to stop.
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::unavailable(format!(
            "{what}: no answer within {timeout:?}"
        ))),
    }
}
