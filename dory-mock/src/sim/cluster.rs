//! A simulated cluster: nodes, instances running a deterministic stateful processor, and the
//! faults a real cluster has. It implements [`Placement`] and [`InstanceControl`], so the real
//! orchestrator drives it exactly as it drives Kubernetes or local processes.
//!
//! Each instance runs a counter over a deterministic input sequence and publishes every step,
//! checkpoints at its interval, renews its ownership lease, stops publishing when a due
//! checkpoint cannot be stored (so what it publishes is never more than one checkpoint
//! interval ahead of what is committed), and freezes itself when its lease runs out — as the
//! real runtime does.
//!
//! Instances pre-copy as the runtime does: asked while running, an instance stores a full
//! checkpoint through the store (its periodic checkpoints' path, fenced alike), keeps its body
//! as the base and takes its next step at once, as a running processor would; its freeze's
//! snapshot is then a delta against that base. A standby applies a delta only onto the full
//! snapshot it loaded, a restore reads a committed delta beside its stored base, and instances
//! prune the store as they checkpoint, so a pre-copied base may be gone by the commit. How
//! often a pre-copy is declined or its answer lost, and how hard instances prune, is a
//! [`PreCopyModel`]: the simulator draws those choices from its seed, so the delta path and
//! both ways back to the whole state (the replacement refuses the delta, the store refuses to
//! commit it) are all exercised.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use dory_core::snapshot::{self, Base, Codec, Encoder, Limits, SnapshotKind};
use dory_core::{
    ChangeNotifier, Changes, Clock, ControlEndpoint, Epoch, Error, Health, Instance,
    InstanceControl, LaunchMode, LaunchRequest, Node, NodeId, OutputMessage, Phase, Placement,
    ProcessorId, Publisher, Result, Sequence, SnapshotMeta, StateStore, Timestamp,
};

use super::check::Checker;

/// The state of the simulated processor: a running sum over its input.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterState {
    /// The last step taken (also the output sequence).
    pub seq: u64,
    /// The sum of the inputs of steps `1..=seq`.
    pub value: u64,
}

impl CounterState {
    /// The state after one more step.
    pub fn step(self, processor: &ProcessorId) -> CounterState {
        let seq = self.seq + 1;
        CounterState {
            seq,
            value: self.value.wrapping_add(input(processor, seq)),
        }
    }
}

/// The processor's input at step `seq`: a fixed function, so the expected output of every
/// step is known and a lost or repeated step shows up in the output.
pub fn input(processor: &ProcessorId, seq: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(processor.as_str().as_bytes(), seq) % 1000
}

/// Timing of the simulated instances.
#[derive(Clone, Debug)]
pub struct InstanceTiming {
    /// From launch to healthy.
    pub start_delay: Duration,
    /// From a terminate request to exit.
    pub stop_delay: Duration,
    /// The longest latency of a control call; each call takes a seeded random latency from
    /// 1 ms up to this.
    pub control_latency: Duration,
    /// The ownership lease period.
    pub lease: Duration,
}

/// How the simulated instances pre-copy and prune the store.
///
/// The default is the runtime's own behaviour: every pre-copy is taken, every answer arrives,
/// and an instance keeps the newest 5 snapshots, pruning with its first checkpoint and every
/// 16th after it. The simulator's scenario ([`SimConfig`](super::SimConfig)) declines some
/// pre-copies, loses some answers and prunes at every checkpoint, so that the moves that send
/// a delta and both fallbacks to the whole state all happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreCopyModel {
    /// Out of 100 pre-copy requests, how many an instance declines with `Conflict`, as one
    /// that cannot pre-copy would; that move's freeze sends the whole state.
    pub decline_percent: u64,
    /// Out of 100 pre-copies an instance stores, how many answers are lost on the way back
    /// (the caller gave up as the instance answered). The instance keeps its base but the
    /// replacement never loads it, so the replacement refuses the freeze's delta.
    pub lost_answer_percent: u64,
    /// How many snapshots an instance keeps when it prunes the store (at least one is kept).
    pub keep_snapshots: usize,
    /// An instance prunes with its first stored checkpoint and every `prune_every`-th after
    /// it; 0 never prunes. A checkpoint between a pre-copy and its move's commit may prune the
    /// pre-copied base, and the store then refuses to commit the delta.
    pub prune_every: u64,
}

impl Default for PreCopyModel {
    fn default() -> Self {
        PreCopyModel {
            decline_percent: 0,
            lost_answer_percent: 0,
            keep_snapshots: 5,
            prune_every: 16,
        }
    }
}

/// What the simulated instances did of pre-copy moves, for a run's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PreCopyStats {
    /// Pre-copies stored (including those whose answer was lost).
    pub precopies: u64,
    /// Pre-copy requests declined: the model's choice, or no step since the last checkpoint.
    pub declined: u64,
    /// Pre-copies stored whose answer was lost.
    pub lost_answers: u64,
    /// Frozen snapshots fetched as a delta.
    pub deltas_fetched: u64,
    /// Deltas a replacement applied onto the pre-copied state it had loaded.
    pub deltas_loaded: u64,
    /// Deltas a replacement refused (no full snapshot loaded, or another one): the move sent
    /// the whole state instead.
    pub deltas_refused: u64,
    /// Whole states fetched from a frozen instance after its delta could not be used.
    pub full_fetches: u64,
    /// Of those, the ones after a replacement had taken the delta whose base the store no
    /// longer held (pruned): the store refused to commit the delta, and the move committed the
    /// whole state.
    pub delta_commits_refused: u64,
    /// Replacements resumed as owners from a delta the store committed: moves that sent only
    /// what changed since the pre-copy.
    pub delta_moves: u64,
    /// Restores that read a committed delta beside its stored base.
    pub delta_restores: u64,
}

impl std::ops::Add for PreCopyStats {
    type Output = PreCopyStats;

    /// The counts of two runs together.
    fn add(self, b: PreCopyStats) -> PreCopyStats {
        PreCopyStats {
            precopies: self.precopies + b.precopies,
            declined: self.declined + b.declined,
            lost_answers: self.lost_answers + b.lost_answers,
            deltas_fetched: self.deltas_fetched + b.deltas_fetched,
            deltas_loaded: self.deltas_loaded + b.deltas_loaded,
            deltas_refused: self.deltas_refused + b.deltas_refused,
            full_fetches: self.full_fetches + b.full_fetches,
            delta_commits_refused: self.delta_commits_refused + b.delta_commits_refused,
            delta_moves: self.delta_moves + b.delta_moves,
            delta_restores: self.delta_restores + b.delta_restores,
        }
    }
}

struct SimNode {
    node: Node,
    crashed: bool,
    partitioned: bool,
}

struct SimInstance {
    record: Instance,
    mode: LaunchMode,
    checkpoint_interval: Duration,
    state: CounterState,
    checkpointed: CounterState,
    loaded: bool,
    lease_until: Timestamp,
    last_checkpoint: Timestamp,
    checkpoint_due: bool,
    fenced: bool,
    hung_until: Timestamp,
    exit_at: Option<Timestamp>,
    terminate_pending: bool,
    /// The full checkpoint the last pre-copy stored, kept while running: the freeze's snapshot
    /// is a delta against it.
    base: Option<Base>,
    /// The full snapshot a standby loaded: a delta applies only onto it.
    loaded_full: Option<Base>,
    /// Whether the state loaded last came as a delta.
    loaded_delta: bool,
    /// The replacement that took this frozen instance's delta: a request for the whole state
    /// after that can only come from the store refusing the delta.
    delta_taken_by: Option<Epoch>,
    /// The store refused the delta this standby loaded; its move committed the whole state.
    delta_commit_refused: bool,
    /// Checkpoints stored, counted for pruning.
    checkpoints: u64,
    /// Restoring the committed snapshot a resume named: another resume waits for it, as the
    /// runtime's run loop takes one resume at a time.
    restoring: bool,
}

impl SimInstance {
    /// The store refused this instance: it stops its loop and publishing at once.
    fn fence(&mut self) {
        self.fenced = true;
        if self.record.phase == Phase::Running {
            self.record.phase = Phase::Frozen;
        }
    }
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<NodeId, SimNode>,
    instances: BTreeMap<(ProcessorId, Epoch), SimInstance>,
    failing_control_calls: u32,
    flaky_until: Timestamp,
    flaky_percent: u64,
    trace: Vec<String>,
    precopy: PreCopyStats,
}

/// The simulated cluster.
pub struct SimCluster {
    state: Mutex<State>,
    notifier: ChangeNotifier,
    clock: Arc<dyn Clock>,
    /// The store as instances reach it (faults included).
    store: Arc<dyn StateStore>,
    /// The store without injected faults, for the checker's view of the truth.
    truth: Arc<dyn StateStore>,
    publisher: Arc<dyn Publisher>,
    checker: Arc<Mutex<Checker>>,
    timing: InstanceTiming,
    encoder: Encoder,
    /// The cluster's own seeded draws: control-call latencies, flaky-network rolls, pre-copy
    /// choices.
    rng: Mutex<super::SimRng>,
    precopy: PreCopyModel,
}

/// What reading a committed snapshot came to.
enum Read {
    State(CounterState),
    /// The store could not be reached: try again at the next step.
    Later,
    Failed(Error),
}

enum Work {
    None,
    Restore,
    Checkpoint(CounterState),
    Renew,
    Publish(CounterState),
    FinalSave(CounterState),
}

impl SimCluster {
    /// A cluster of `nodes` whose instances use `store` and `publisher`.
    pub fn new(
        nodes: Vec<Node>,
        clock: Arc<dyn Clock>,
        store: Arc<dyn StateStore>,
        truth: Arc<dyn StateStore>,
        publisher: Arc<dyn Publisher>,
        checker: Arc<Mutex<Checker>>,
        timing: InstanceTiming,
    ) -> Self {
        let nodes = nodes
            .into_iter()
            .map(|node| {
                (
                    node.id.clone(),
                    SimNode {
                        node,
                        crashed: false,
                        partitioned: false,
                    },
                )
            })
            .collect();
        SimCluster {
            state: Mutex::new(State {
                nodes,
                ..State::default()
            }),
            notifier: ChangeNotifier::new(),
            clock,
            store,
            truth,
            publisher,
            checker,
            timing,
            encoder: Encoder::default(),
            rng: Mutex::new(super::SimRng::new(0)),
            precopy: PreCopyModel::default(),
        }
    }

    /// A cluster outside a simulation run (an embedding example, a test of your own): it
    /// checks the output of its instances with a fresh [`Checker`] that allows failovers to
    /// lose up to 100 steps; see [`SimCluster::violations`].
    pub fn standalone(
        nodes: Vec<Node>,
        clock: Arc<dyn Clock>,
        store: crate::MemoryStore,
        publisher: Arc<dyn Publisher>,
        timing: InstanceTiming,
    ) -> Self {
        SimCluster::new(
            nodes,
            clock,
            Arc::new(store.clone()),
            Arc::new(store),
            publisher,
            Arc::new(Mutex::new(Checker::new(100))),
            timing,
        )
    }

    /// The invariant violations the cluster's checker has seen.
    pub fn violations(&self) -> Vec<String> {
        self.checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .violations()
            .to_vec()
    }

    /// How many messages the instances have published.
    pub fn publishes(&self) -> u64 {
        self.checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
            .publishes
    }

    /// Seeds the control-call latencies and the pre-copy choices (the simulator passes its
    /// seed).
    pub fn with_latency_seed(self, seed: u64) -> Self {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = super::SimRng::new(seed);
        self
    }

    /// How the instances pre-copy and prune (the default is the runtime's behaviour).
    pub fn with_precopy(mut self, model: PreCopyModel) -> Self {
        self.precopy = model;
        self
    }

    /// What the instances did of pre-copy moves so far.
    pub fn precopy_stats(&self) -> PreCopyStats {
        self.lock().precopy
    }

    /// A number in `[0, n)` from the cluster's seeded generator.
    fn roll(&self, n: u64) -> u64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).below(n)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, st: &mut State, line: String) {
        st.trace.push(format!("{} {line}", self.clock.now().0));
    }

    /// Takes the cluster's trace lines written since the last call.
    pub fn drain_trace(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().trace)
    }

    /// Node ids, sorted.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.lock().nodes.keys().cloned().collect()
    }

    /// The processors with a running instance, sorted.
    pub fn running(&self) -> Vec<(ProcessorId, Epoch)> {
        self.lock()
            .instances
            .iter()
            .filter(|(_, i)| i.record.phase == Phase::Running)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The instances that have not ended, sorted.
    pub fn alive(&self) -> Vec<(ProcessorId, Epoch)> {
        self.lock()
            .instances
            .iter()
            .filter(|(_, i)| i.record.phase.is_alive())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every instance record.
    pub fn instance_records(&self) -> Vec<Instance> {
        self.lock()
            .instances
            .values()
            .map(|i| i.record.clone())
            .collect()
    }

    /// Whether every node is up, reachable and uninterrupted.
    pub fn all_nodes_healthy(&self) -> bool {
        self.lock().nodes.values().all(|n| {
            !n.crashed && !n.partitioned && n.node.schedulable && n.node.interruption.is_none()
        })
    }

    fn with_node(&self, id: &NodeId, what: &str, f: impl FnOnce(&mut SimNode, Timestamp) -> bool) {
        let now = self.clock.now();
        let mut st = self.lock();
        let changed = st.nodes.get_mut(id).is_some_and(|n| f(n, now));
        if changed {
            self.note(&mut st, format!("fault {what} {id}"));
            drop(st);
            self.notifier.notify();
        }
    }

    /// Cordons a node and marks it draining (no deadline).
    pub fn drain(&self, id: &NodeId) {
        self.with_node(id, "drain", |n, _| {
            n.node.schedulable = false;
            n.node.interruption = Some(dory_core::Interruption {
                reason: dory_core::InterruptionReason::Drain,
                deadline: None,
            });
            true
        });
    }

    /// Announces that a node will be reclaimed at `deadline`.
    pub fn spot_notice(&self, id: &NodeId, deadline: Timestamp) {
        self.with_node(id, "spot-notice", |n, _| {
            n.node.schedulable = false;
            n.node.interruption = Some(dory_core::Interruption {
                reason: dory_core::InterruptionReason::SpotReclaim,
                deadline: Some(deadline),
            });
            true
        });
    }

    /// Uncordons a node and clears its interruption (a replacement node came up under the
    /// same name, or the drain was cancelled).
    pub fn uncordon(&self, id: &NodeId) {
        self.with_node(id, "uncordon", |n, _| {
            let changed = !n.node.schedulable || n.node.interruption.is_some();
            n.node.schedulable = true;
            n.node.interruption = None;
            changed
        });
    }

    /// Kills a node and everything on it.
    pub fn crash_node(&self, id: &NodeId) {
        let now = self.clock.now();
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(id) else {
            return;
        };
        if node.crashed {
            return;
        }
        node.crashed = true;
        if node.node.ready {
            node.node.ready = false;
            node.node.ready_since = now;
        }
        for inst in st.instances.values_mut().filter(|i| &i.record.node == id) {
            if !inst.record.phase.is_gone() {
                inst.record.phase = Phase::Failed {
                    reason: format!("node {id} crashed"),
                };
            }
        }
        self.note(&mut st, format!("fault crash-node {id}"));
        drop(st);
        self.notifier.notify();
    }

    /// Brings a crashed node back, empty, or heals a partitioned one.
    pub fn restore_node(&self, id: &NodeId) {
        let now = self.clock.now();
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(id) else {
            return;
        };
        if !node.crashed && !node.partitioned {
            return;
        }
        node.crashed = false;
        node.partitioned = false;
        node.node.ready = true;
        node.node.ready_since = now;
        node.node.schedulable = true;
        node.node.interruption = None;
        let stop_delay = self.timing.stop_delay;
        for inst in st.instances.values_mut().filter(|i| &i.record.node == id) {
            if inst.terminate_pending && !inst.record.phase.is_gone() {
                inst.record.phase = Phase::Terminating;
                inst.exit_at = Some(now.plus(stop_delay));
            }
        }
        self.note(&mut st, format!("fault restore-node {id}"));
        drop(st);
        self.notifier.notify();
    }

    /// Cuts a node off from the orchestrator and the store; its instances keep running and
    /// can still reach the broker (the worst case the lease protects against).
    pub fn partition(&self, id: &NodeId) {
        self.with_node(id, "partition", |n, now| {
            if n.crashed || n.partitioned {
                return false;
            }
            n.partitioned = true;
            n.node.ready = false;
            n.node.ready_since = now;
            true
        });
    }

    /// Crashes one instance (exit code 137).
    pub fn crash_instance(&self, processor: &ProcessorId, epoch: Epoch) {
        let mut st = self.lock();
        if let Some(inst) = st.instances.get_mut(&(processor.clone(), epoch))
            && inst.record.phase.is_alive()
        {
            inst.record.phase = Phase::Exited { code: 137 };
            self.note(&mut st, format!("fault crash-instance {processor} {epoch}"));
            drop(st);
            self.notifier.notify();
        }
    }

    /// Makes an instance hang (no steps, control calls stall) until `until`.
    pub fn hang_instance(&self, processor: &ProcessorId, epoch: Epoch, until: Timestamp) {
        let mut st = self.lock();
        if let Some(inst) = st.instances.get_mut(&(processor.clone(), epoch)) {
            inst.hung_until = until;
            self.note(
                &mut st,
                format!("fault hang {processor} {epoch} until {}", until.0),
            );
        }
    }

    /// Makes the next `n` control calls (health, pre-copy, freeze, fetch, load, resume) fail.
    pub fn fail_control_calls(&self, n: u32) {
        let mut st = self.lock();
        st.failing_control_calls += n;
        self.note(&mut st, format!("fault fail-control {n}"));
    }

    /// Makes control calls fail with probability `p` until `until` (a flaky network).
    pub fn flaky_control(&self, until: Timestamp, p_percent: u64) {
        let mut st = self.lock();
        st.flaky_until = until;
        st.flaky_percent = p_percent;
        self.note(
            &mut st,
            format!("fault flaky-control {p_percent}% until {}", until.0),
        );
    }

    /// Advances every instance by one step of its processor, in a fixed order.
    pub async fn tick(&self) {
        let keys: Vec<(ProcessorId, Epoch)> = self.lock().instances.keys().cloned().collect();
        for key in keys {
            self.tick_instance(&key).await;
        }
    }

    fn reachable(st: &State, node: &NodeId) -> bool {
        st.nodes
            .get(node)
            .is_some_and(|n| !n.crashed && !n.partitioned)
    }

    fn encode(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        state: CounterState,
    ) -> Result<Vec<u8>> {
        self.encoder
            .encode_state(processor, epoch, Sequence(state.seq), &state)
    }

    /// The full snapshot of `state`, ready to store, and its body kept as a delta's base.
    fn encode_full(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        state: CounterState,
    ) -> Result<(dory_core::StoredSnapshot, Base)> {
        let body = snapshot::serialize_state(processor, epoch, &state)?;
        let bytes = self.encoder.encode_body(
            processor,
            epoch,
            Sequence(state.seq),
            Codec::Bincode,
            &body,
        )?;
        let base = Base::of_encoded(&bytes, body)?;
        Ok((
            dory_core::StoredSnapshot::from_encoded(bytes, self.clock.now())?,
            base,
        ))
    }

    async fn tick_instance(&self, key: &(ProcessorId, Epoch)) {
        let now = self.clock.now();
        let (processor, epoch) = key;
        let (work, cut_off) = {
            let mut st = self.lock();
            let node_ok = |st: &State, n: &NodeId| st.nodes.get(n).is_some_and(|n| !n.crashed);
            let Some(inst) = st.instances.get(key) else {
                return;
            };
            if !node_ok(&st, &inst.record.node)
                || inst.hung_until > now
                || inst.record.phase.is_gone()
            {
                return;
            }
            let cut_off = !Self::reachable(&st, &inst.record.node);
            let inst = st.instances.get_mut(key).expect("present");
            let work = match inst.record.phase {
                Phase::Starting if now >= inst.record.started_at.plus(self.timing.start_delay) => {
                    match inst.mode {
                        LaunchMode::Standby => {
                            inst.record.phase = Phase::Standby;
                            Work::None
                        }
                        LaunchMode::Restore => Work::Restore,
                    }
                }
                Phase::Running if !inst.fenced => {
                    let lease_ok = inst.lease_until > now;
                    let due = now.since(inst.last_checkpoint) >= inst.checkpoint_interval;
                    if (due || inst.checkpoint_due) && inst.state != inst.checkpointed {
                        inst.checkpoint_due = true;
                        Work::Checkpoint(inst.state)
                    } else if due {
                        // Nothing new to store (e.g. the broker was down): a heartbeat keeps
                        // the lease without a checkpoint the store would refuse as not newer.
                        inst.last_checkpoint = now;
                        Work::Renew
                    } else if !lease_ok || inst.lease_until.since(now) < self.timing.lease / 2 {
                        // A light heartbeat; with the lease run out this is also the only
                        // thing a self-frozen instance does until it can renew again.
                        Work::Renew
                    } else {
                        Work::Publish(inst.state.step(processor))
                    }
                }
                Phase::Terminating if inst.exit_at.is_some_and(|t| now >= t) => {
                    if inst.fenced || inst.state == inst.checkpointed {
                        inst.record.phase = Phase::Exited { code: 0 };
                        Work::None
                    } else {
                        Work::FinalSave(inst.state)
                    }
                }
                _ => Work::None,
            };
            if matches!(inst.record.phase, Phase::Exited { .. }) {
                self.note(&mut st, format!("exit {processor} {epoch}"));
                drop(st);
                self.notifier.notify();
                return;
            }
            (work, cut_off)
        };
        match work {
            Work::None => {}
            Work::Restore => self.restore(key, cut_off, now).await,
            Work::Checkpoint(state) => {
                let result = if cut_off {
                    Err(Error::unavailable("store unreachable from node"))
                } else {
                    self.checkpoint(processor, *epoch, state).await
                };
                let prune = {
                    let mut st = self.lock();
                    let Some(inst) = st.instances.get_mut(key) else {
                        return;
                    };
                    match result {
                        Ok(expiry) => {
                            inst.lease_until = expiry;
                            inst.last_checkpoint = now;
                            inst.checkpoint_due = false;
                            inst.checkpointed = state;
                            inst.checkpoints += 1;
                            let every = self.precopy.prune_every;
                            every > 0 && (inst.checkpoints - 1) % every == 0
                        }
                        Err(Error::Fenced(_)) => {
                            inst.fence();
                            false
                        }
                        Err(_) => false,
                    }
                };
                if prune {
                    // As the runtime does, so the store does not grow forever. The store keeps
                    // every base a stored delta needs, but not a pre-copied base no commit
                    // names yet. Past the injected faults: nobody waits for a prune's outcome,
                    // and a lost reply spent on one would be one fewer on a checkpoint.
                    let _ = self
                        .truth
                        .prune(processor, self.precopy.keep_snapshots.max(1))
                        .await;
                }
            }
            Work::Renew => {
                let result = if cut_off {
                    Err(Error::unavailable("store unreachable from node"))
                } else {
                    self.store
                        .renew_lease(processor, *epoch, self.timing.lease)
                        .await
                };
                let mut st = self.lock();
                if let Some(inst) = st.instances.get_mut(key) {
                    match result {
                        Ok(expiry) => inst.lease_until = expiry,
                        Err(Error::Fenced(_)) => inst.fence(),
                        Err(_) => {}
                    }
                }
            }
            Work::Publish(next) => {
                let message = OutputMessage {
                    processor: processor.clone(),
                    epoch: *epoch,
                    sequence: Sequence(next.seq),
                    routing_key: None,
                    payload: next.value.to_le_bytes().to_vec(),
                };
                // The owner at the instant of the publish, read past any injected store fault.
                let owner = self
                    .truth
                    .ownership(processor)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|o| o.owner);
                if self.publisher.publish(message).await.is_ok() {
                    let lease_until = {
                        let mut st = self.lock();
                        let Some(inst) = st.instances.get_mut(key) else {
                            return;
                        };
                        inst.state = next;
                        inst.lease_until
                    };
                    self.checker
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .on_publish(
                            processor,
                            *epoch,
                            next.seq,
                            next.value,
                            owner,
                            cut_off,
                            lease_until,
                            now,
                        );
                }
            }
            Work::FinalSave(state) => {
                let result = if cut_off {
                    Err(Error::unavailable("store unreachable from node"))
                } else {
                    self.checkpoint(processor, *epoch, state).await
                };
                let mut st = self.lock();
                if let Some(inst) = st.instances.get_mut(key) {
                    if result.is_ok() {
                        inst.checkpointed = state;
                    }
                    inst.record.phase = Phase::Exited { code: 0 };
                }
                self.note(
                    &mut st,
                    format!("exit {processor} {epoch} saved={}", result.is_ok()),
                );
                drop(st);
                self.notifier.notify();
            }
        }
    }

    async fn checkpoint(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        state: CounterState,
    ) -> Result<Timestamp> {
        let bytes = self.encode(processor, epoch, state)?;
        let snapshot = dory_core::StoredSnapshot::from_encoded(bytes, self.clock.now())?;
        self.store
            .put_checkpoint(&snapshot, self.timing.lease)
            .await
    }

    async fn restore(&self, key: &(ProcessorId, Epoch), cut_off: bool, now: Timestamp) {
        let (processor, epoch) = key;
        if cut_off {
            return;
        }
        let latest = match self.store.latest(processor).await {
            Ok(latest) => latest,
            Err(_) => return,
        };
        // A snapshot filed under this very epoch was committed by an evacuation: the frozen,
        // exact state, so restoring it must lose nothing.
        let exact = latest.as_ref().is_some_and(|s| s.meta.epoch == *epoch);
        let state = match latest {
            None => CounterState::default(),
            Some(snap) => match self.read_stored(processor, snap.bytes).await {
                Read::State(state) => state,
                Read::Later => return,
                Read::Failed(e) => {
                    let mut st = self.lock();
                    if let Some(inst) = st.instances.get_mut(key) {
                        inst.record.phase = Phase::Failed {
                            reason: format!("cannot restore: {e}"),
                        };
                    }
                    return;
                }
            },
        };
        let renewed = self
            .store
            .renew_lease(processor, *epoch, self.timing.lease)
            .await;
        let mut st = self.lock();
        let Some(inst) = st.instances.get_mut(key) else {
            return;
        };
        if !matches!(inst.record.phase, Phase::Starting | Phase::Standby) {
            // It ran meanwhile (or ended): a restore never rewinds a running state.
            return;
        }
        match renewed {
            Ok(expiry) => {
                inst.state = state;
                inst.checkpointed = state;
                inst.lease_until = expiry;
                inst.last_checkpoint = now;
                inst.record.phase = Phase::Running;
                self.note(
                    &mut st,
                    format!("restored {processor} {epoch} at {}", state.seq),
                );
                self.checker
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .on_restore(processor, *epoch, state.seq, exact, now);
            }
            Err(Error::Fenced(e)) => {
                inst.record.phase = Phase::Exited { code: 3 };
                self.note(&mut st, format!("fenced at start {processor} {epoch}: {e}"));
            }
            Err(_) => return,
        }
        drop(st);
        self.notifier.notify();
    }

    /// A committed snapshot's state. A delta (a pre-copy move's commit) is read beside its
    /// base, fetched from the store as the runtime's restore does; a store that cannot be
    /// reached now is tried again at the next step.
    async fn read_stored(&self, processor: &ProcessorId, bytes: Vec<u8>) -> Read {
        let limits = Limits::default();
        let base = match snapshot::delta_base(&bytes) {
            Ok(None) => {
                return match snapshot::decode_state::<CounterState>(&bytes, &limits) {
                    Ok((_, state)) => Read::State(state),
                    Err(e) => Read::Failed(e),
                };
            }
            Ok(Some(base)) => base,
            Err(e) => return Read::Failed(e),
        };
        let full = match self.store.get(processor, base.epoch, base.sequence).await {
            Ok(Some(full)) => full,
            Ok(None) => {
                // The store commits a delta only beside its base and keeps the base while
                // the delta is kept: a committed delta without one is committed state lost.
                let e = base.missing(&format!("restore of {processor}"));
                self.checker
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .fail(self.clock.now(), format!("committed state lost: {e}"));
                return Read::Failed(e);
            }
            Err(_) => return Read::Later,
        };
        let state = snapshot::apply_delta(&full.bytes, &bytes, &limits)
            .and_then(|(header, body)| snapshot::decode_state_body::<CounterState>(&header, &body));
        match state {
            Ok(state) => {
                let mut st = self.lock();
                st.precopy.delta_restores += 1;
                self.note(
                    &mut st,
                    format!(
                        "read delta {processor} at {} beside its base {} {}",
                        state.seq, base.epoch, base.sequence.0
                    ),
                );
                Read::State(state)
            }
            Err(e) => Read::Failed(e),
        }
    }

    /// Common checks of every control call: reachable, not failing, latency, hangs.
    async fn control_call(&self, instance: &Instance, timeout: Option<Duration>) -> Result<()> {
        let max = self.timing.control_latency.as_millis().max(1) as u64;
        let ms = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .between(1, max);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let key = (instance.processor.clone(), instance.epoch);
        let flaky_roll = self.roll(100);
        let hung_until = {
            let mut st = self.lock();
            if self.clock.now() < st.flaky_until && flaky_roll < st.flaky_percent {
                return Err(Error::unavailable(format!(
                    "instance {} of {}: connection reset (flaky network)",
                    instance.epoch, instance.processor
                )));
            }
            if st.failing_control_calls > 0 {
                st.failing_control_calls -= 1;
                return Err(Error::unavailable(format!(
                    "instance {} of {}: injected control failure",
                    instance.epoch, instance.processor
                )));
            }
            let Some(inst) = st.instances.get(&key) else {
                return Err(Error::not_found(format!(
                    "instance {} of {}",
                    instance.epoch, instance.processor
                )));
            };
            if !Self::reachable(&st, &inst.record.node) || inst.record.phase.is_gone() {
                return Err(Error::unavailable(format!(
                    "instance {} of {} is unreachable",
                    instance.epoch, instance.processor
                )));
            }
            inst.hung_until
        };
        let now = self.clock.now();
        if hung_until > now {
            let wait = hung_until.since(now);
            match timeout {
                Some(t) if t < wait => {
                    tokio::time::sleep(t).await;
                    return Err(Error::unavailable(format!(
                        "instance {} of {} reached no safe point within {t:?}",
                        instance.epoch, instance.processor
                    )));
                }
                _ => tokio::time::sleep(wait).await,
            }
        }
        Ok(())
    }

    fn with_instance<T>(
        &self,
        instance: &Instance,
        f: impl FnOnce(&mut SimInstance) -> Result<T>,
    ) -> Result<T> {
        let mut st = self.lock();
        let key = (instance.processor.clone(), instance.epoch);
        let inst = st.instances.get_mut(&key).ok_or_else(|| {
            Error::not_found(format!(
                "instance {} of {}",
                instance.epoch, instance.processor
            ))
        })?;
        f(inst)
    }
}

#[async_trait]
impl Placement for SimCluster {
    async fn nodes(&self) -> Result<Vec<Node>> {
        Ok(self.lock().nodes.values().map(|n| n.node.clone()).collect())
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        Ok(self.instance_records())
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Instance> {
        let now = self.clock.now();
        let mut st = self.lock();
        let key = (request.spec.id.clone(), request.epoch);
        if st.instances.contains_key(&key) {
            return Err(Error::conflict(format!(
                "instance {} of {} already exists",
                request.epoch, request.spec.id
            )));
        }
        if !Self::reachable(&st, &request.node) {
            return Err(Error::unavailable(format!(
                "node {} is not reachable",
                request.node
            )));
        }
        let record = Instance {
            processor: request.spec.id.clone(),
            epoch: request.epoch,
            node: request.node.clone(),
            phase: Phase::Starting,
            revision: request.spec.revision(),
            started_at: now,
            endpoint: Some(ControlEndpoint {
                address: format!("sim://{}/{}", request.spec.id, request.epoch.0),
                token: format!("token-{}-{}", request.spec.id, request.epoch.0),
            }),
        };
        st.instances.insert(
            key,
            SimInstance {
                record: record.clone(),
                mode: request.mode,
                checkpoint_interval: request.spec.checkpoint_interval,
                state: CounterState::default(),
                checkpointed: CounterState::default(),
                loaded: false,
                lease_until: Timestamp(0),
                last_checkpoint: now,
                checkpoint_due: false,
                fenced: false,
                hung_until: Timestamp(0),
                exit_at: None,
                terminate_pending: false,
                base: None,
                loaded_full: None,
                loaded_delta: false,
                delta_taken_by: None,
                delta_commit_refused: false,
                checkpoints: 0,
                restoring: false,
            },
        );
        self.note(
            &mut st,
            format!(
                "launch {} {} on {} {}",
                request.spec.id, request.epoch, request.node, request.mode
            ),
        );
        drop(st);
        self.notifier.notify();
        Ok(record)
    }

    async fn terminate(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> Result<()> {
        let now = self.clock.now();
        let mut st = self.lock();
        let reachable = st
            .instances
            .get(&(processor.clone(), epoch))
            .map(|i| Self::reachable(&st, &i.record.node));
        let Some(reachable) = reachable else {
            return Err(Error::not_found(format!("instance {epoch} of {processor}")));
        };
        let delay = self.timing.stop_delay.min(grace);
        let inst = st
            .instances
            .get_mut(&(processor.clone(), epoch))
            .expect("present");
        if inst.record.phase.is_gone() || inst.record.phase == Phase::Terminating {
            return Ok(());
        }
        if reachable {
            inst.record.phase = Phase::Terminating;
            inst.exit_at = Some(now.plus(delay));
        } else {
            // The request waits until the node is back (as a pod deletion waits for its
            // kubelet).
            inst.terminate_pending = true;
        }
        self.note(&mut st, format!("terminate {processor} {epoch}"));
        drop(st);
        self.notifier.notify();
        Ok(())
    }

    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> Result<()> {
        let mut st = self.lock();
        let key = (processor.clone(), epoch);
        match st.instances.get(&key) {
            None => Ok(()),
            Some(inst) if inst.record.phase.is_gone() => {
                st.instances.remove(&key);
                self.note(&mut st, format!("forget {processor} {epoch}"));
                Ok(())
            }
            Some(inst) => Err(Error::conflict(format!(
                "instance {epoch} of {processor} is {}, not ended",
                inst.record.phase
            ))),
        }
    }

    fn changes(&self) -> Changes {
        self.notifier.subscribe()
    }
}

#[async_trait]
impl InstanceControl for SimCluster {
    async fn health(&self, instance: &Instance) -> Result<Health> {
        self.control_call(instance, None).await?;
        self.with_instance(instance, |i| {
            Ok(Health {
                phase: i.record.phase.clone(),
                epoch: i.record.epoch,
                sequence: Sequence(i.state.seq),
                protocol: dory_core::CONTROL_PROTOCOL,
            })
        })
    }

    async fn freeze(&self, instance: &Instance, timeout: Duration) -> Result<SnapshotMeta> {
        self.control_call(instance, Some(timeout)).await?;
        let now = self.clock.now();
        let meta = self.with_instance(instance, |i| match i.record.phase {
            Phase::Running | Phase::Frozen => {
                i.record.phase = Phase::Frozen;
                Ok(SnapshotMeta {
                    processor: i.record.processor.clone(),
                    epoch: i.record.epoch,
                    sequence: Sequence(i.state.seq),
                    size: 0,
                    created_at: now,
                })
            }
            ref other => Err(Error::conflict(format!(
                "instance {} of {} is {other}; only a running instance can freeze",
                i.record.epoch, i.record.processor
            ))),
        })?;
        let mut st = self.lock();
        self.note(
            &mut st,
            format!(
                "frozen {} {} at {}",
                meta.processor, meta.epoch, meta.sequence.0
            ),
        );
        Ok(meta)
    }

    async fn fetch(&self, instance: &Instance) -> Result<Vec<u8>> {
        self.control_call(instance, None).await?;
        let (processor, epoch) = (&instance.processor, instance.epoch);
        // Permissive on purpose: a running instance answers too (its whole state), so a
        // protocol that skips the freeze shows up as an invariant violation instead of being
        // refused here.
        let (state, base) = self.with_instance(instance, |i| {
            // Frozen and stepped since its pre-copy: only what changed since goes out.
            let base = i
                .base
                .as_ref()
                .filter(|b| i.record.phase == Phase::Frozen && b.id.sequence.0 < i.state.seq)
                .cloned();
            Ok((i.state, base))
        })?;
        let Some(base) = base else {
            return self.encode(processor, epoch, state);
        };
        let body = snapshot::serialize_state(processor, epoch, &state)?;
        let bytes =
            self.encoder
                .encode_delta(processor, epoch, Sequence(state.seq), &base, &body)?;
        let mut st = self.lock();
        st.precopy.deltas_fetched += 1;
        self.note(
            &mut st,
            format!(
                "fetched delta {processor} {epoch} at {} (base {})",
                state.seq, base.id.sequence.0
            ),
        );
        Ok(bytes)
    }

    async fn fetch_full(&self, instance: &Instance) -> Result<Vec<u8>> {
        self.control_call(instance, None).await?;
        let (processor, epoch) = (&instance.processor, instance.epoch);
        // Permissive as `fetch` is. Asked only when the delta `fetch` answered could not be
        // used: by the replacement, or, if one took it, by the store.
        let (state, taken_by, base) = self.with_instance(instance, |i| {
            Ok((
                i.state,
                i.delta_taken_by.take(),
                i.base.as_ref().map(|b| b.id),
            ))
        })?;
        let bytes = self.encode(processor, epoch, state)?;
        // Read past the injected faults, for the report only.
        let base_gone = match (taken_by, base) {
            (Some(_), Some(base)) => matches!(
                self.truth.get(processor, base.epoch, base.sequence).await,
                Ok(None)
            ),
            _ => false,
        };
        let mut st = self.lock();
        st.precopy.full_fetches += 1;
        if let Some(replacement) = taken_by
            && let Some(r) = st.instances.get_mut(&(processor.clone(), replacement))
        {
            // Whatever its move commits now is the whole state.
            r.delta_commit_refused = true;
        }
        st.precopy.delta_commits_refused += u64::from(base_gone);
        let why = match taken_by {
            Some(_) if base_gone => "the store refused the delta, its base pruned",
            Some(_) => "the delta was taken but not committed",
            None => "the replacement did not take the delta",
        };
        self.note(
            &mut st,
            format!("full state {processor} {epoch} at {}: {why}", state.seq),
        );
        Ok(bytes)
    }

    async fn load(&self, instance: &Instance, bytes: &[u8]) -> Result<()> {
        self.control_call(instance, None).await?;
        let limits = Limits::default();
        let delta = snapshot::verify(bytes)?.kind == SnapshotKind::Delta;
        // A full snapshot is read on its own; a delta only onto the full one loaded before.
        let full = if delta {
            None
        } else {
            Some(snapshot::decode_body(bytes, &limits)?)
        };
        let key = (instance.processor.clone(), instance.epoch);
        let mut st = self.lock();
        let inst = st.instances.get_mut(&key).ok_or_else(|| {
            Error::not_found(format!(
                "instance {} of {}",
                instance.epoch, instance.processor
            ))
        })?;
        // Every check comes before anything is kept: a refused snapshot leaves the loaded
        // state as it was.
        if inst.record.phase != Phase::Standby {
            return Err(Error::conflict(format!(
                "instance {} of {} is {}, not standby",
                inst.record.epoch, inst.record.processor, inst.record.phase
            )));
        }
        let applied = match full {
            Some((header, body)) => {
                Base::of_decoded(&header, body.clone()).map(|base| (header, body, Some(base)))
            }
            None => match &inst.loaded_full {
                None => Err(Error::conflict(format!(
                    "instance {} of {}: the snapshot is a delta and no full snapshot is loaded for it to apply to",
                    instance.epoch, instance.processor
                ))),
                // A delta naming another base is `Invalid`.
                Some(base) => snapshot::apply_delta_to(base, bytes, &limits)
                    .map(|(header, body)| (header, body, None)),
            },
        };
        let (header, body, base) = match applied {
            Ok(applied) => applied,
            Err(e) => {
                if delta {
                    st.precopy.deltas_refused += 1;
                    self.note(
                        &mut st,
                        format!(
                            "delta refused {} {}: {e}",
                            instance.processor, instance.epoch
                        ),
                    );
                }
                return Err(e);
            }
        };
        let state = snapshot::decode_state_body::<CounterState>(&header, &body)?;
        if header.processor != inst.record.processor || header.epoch >= inst.record.epoch {
            return Err(Error::invalid(format!(
                "snapshot of {} {} cannot load into {} {}",
                header.processor, header.epoch, inst.record.processor, inst.record.epoch
            )));
        }
        if state.seq != header.sequence.0 {
            return Err(Error::invalid(format!(
                "snapshot of {} {} says sequence {} but holds the state of step {}",
                header.processor, header.epoch, header.sequence, state.seq
            )));
        }
        inst.state = state;
        inst.checkpointed = state;
        inst.loaded = true;
        inst.loaded_delta = delta;
        inst.delta_commit_refused = false;
        // The store reads a delta only beside its base: an instance that took its state as
        // one stores a full checkpoint after its first step, as the runtime does.
        inst.checkpoint_due = delta;
        if let Some(base) = base {
            inst.loaded_full = Some(base);
        }
        if delta {
            st.precopy.deltas_loaded += 1;
            if let Some(old) = st
                .instances
                .get_mut(&(header.processor.clone(), header.epoch))
            {
                old.delta_taken_by = Some(instance.epoch);
            }
            self.note(
                &mut st,
                format!(
                    "loaded delta {} {} at {} from {}",
                    instance.processor, instance.epoch, state.seq, header.epoch
                ),
            );
        }
        Ok(())
    }

    async fn precopy(&self, instance: &Instance, timeout: Duration) -> Result<Vec<u8>> {
        self.control_call(instance, Some(timeout)).await?;
        let (processor, epoch) = (&instance.processor, instance.epoch);
        let key = (processor.clone(), epoch);
        // Both drawn on every call, so one call's outcome never shifts the draws of the next.
        let declines = self.roll(100) < self.precopy.decline_percent;
        let loses_answer = self.roll(100) < self.precopy.lost_answer_percent;
        let state = {
            let mut st = self.lock();
            let inst = st
                .instances
                .get(&key)
                .ok_or_else(|| Error::not_found(format!("instance {epoch} of {processor}")))?;
            let declined = if inst.fenced {
                return Err(Error::fenced(format!(
                    "instance {epoch} of {processor} was fenced off by the store"
                )));
            } else if inst.record.phase != Phase::Running {
                return Err(Error::conflict(format!(
                    "instance {epoch} of {processor} is {}; only a running instance pre-copies",
                    inst.record.phase
                )));
            } else if declines {
                Some("it does not pre-copy")
            } else if inst.state == inst.checkpointed {
                // The store takes only newer sequences.
                Some("no step since the last checkpoint; ask again after the next step")
            } else {
                None
            };
            let state = inst.state;
            if let Some(why) = declined {
                st.precopy.declined += 1;
                self.note(
                    &mut st,
                    format!("pre-copy declined {processor} {epoch}: {why}"),
                );
                return Err(Error::conflict(format!(
                    "instance {epoch} of {processor}: {why}"
                )));
            }
            state
        };
        // Stored as a periodic checkpoint is (fenced and renewing the lease alike), its body
        // kept as the base of the freeze's delta.
        let stored = match self.encode_full(processor, epoch, state) {
            Ok((snapshot, base)) => {
                let put = self
                    .store
                    .put_checkpoint(&snapshot, self.timing.lease)
                    .await;
                put.map(|expiry| (snapshot.bytes, base, expiry))
            }
            Err(e) => Err(e),
        };
        let bytes = {
            let mut st = self.lock();
            let inst = st
                .instances
                .get_mut(&key)
                .ok_or_else(|| Error::not_found(format!("instance {epoch} of {processor}")))?;
            match stored {
                Ok((bytes, base, expiry)) => {
                    inst.lease_until = expiry;
                    if state.seq > inst.checkpointed.seq {
                        inst.checkpointed = state;
                    }
                    inst.base = Some(base);
                    st.precopy.precopies += 1;
                    st.precopy.lost_answers += u64::from(loses_answer);
                    let lost = if loses_answer { " (answer lost)" } else { "" };
                    self.note(
                        &mut st,
                        format!("pre-copied {processor} {epoch} at {}{lost}", state.seq),
                    );
                    bytes
                }
                Err(e) => {
                    // The move this was for sends the whole state.
                    inst.base = None;
                    if matches!(e, Error::Fenced(_)) {
                        inst.fence();
                    }
                    return Err(e.context(format!("pre-copy of {epoch} of {processor}")));
                }
            }
        };
        // The processor keeps running while its pre-copy is stored and sent: its next step
        // follows at once, so the freeze finds the state moved on from the base.
        self.tick_instance(&key).await;
        if loses_answer {
            return Err(Error::unavailable(format!(
                "instance {epoch} of {processor}: the pre-copy was stored but its answer was lost"
            )));
        }
        Ok(bytes)
    }

    async fn resume(&self, instance: &Instance) -> Result<()> {
        self.control_call(instance, None).await?;
        let now = self.clock.now();
        let lease = self.timing.lease;
        let resumed = self.with_instance(instance, |i| match i.record.phase {
            _ if i.restoring => Err(Error::unavailable(format!(
                "instance {} of {} is restoring the committed snapshot",
                i.record.epoch, i.record.processor
            ))),
            Phase::Running => Ok(None),
            Phase::Standby if !i.loaded => Err(Error::conflict(format!(
                "instance {} of {} has no state loaded",
                i.record.epoch, i.record.processor
            ))),
            _ if i.fenced => Err(Error::fenced(format!(
                "instance {} of {} was fenced off by the store and cannot resume",
                i.record.epoch, i.record.processor
            ))),
            Phase::Standby | Phase::Frozen => {
                let from_delta = if i.record.phase == Phase::Standby {
                    // A fresh owner trusts the orchestrator's commit for its first lease and
                    // renews it at its first heartbeat.
                    i.lease_until = now.plus(lease);
                    i.last_checkpoint = now;
                    i.loaded_full = None;
                    i.loaded_delta && !i.delta_commit_refused
                } else {
                    // The move this base was for did not happen; the next one pre-copies
                    // again.
                    i.base = None;
                    i.delta_taken_by = None;
                    false
                };
                i.record.phase = Phase::Running;
                Ok(Some(from_delta))
            }
            ref other => Err(Error::conflict(format!(
                "instance {} of {} is {other}; cannot resume",
                i.record.epoch, i.record.processor
            ))),
        })?;
        if let Some(from_delta) = resumed {
            {
                let mut st = self.lock();
                st.precopy.delta_moves += u64::from(from_delta);
                let how = if from_delta { " from a delta" } else { "" };
                self.note(
                    &mut st,
                    format!("resumed {} {}{how}", instance.processor, instance.epoch),
                );
            }
            self.notifier.notify();
            // A resumed processor runs at once: its first step does not wait for the next
            // tick, so a resume that came too early shows in the output.
            self.tick_instance(&(instance.processor.clone(), instance.epoch))
                .await;
        }
        Ok(())
    }

    async fn resume_committed(&self, instance: &Instance, committed: Sequence) -> Result<()> {
        // As the runtime: a standby holding another state than the committed one (a
        // pre-copy's base, or nothing: the load lost its race with the commit, or the
        // orchestrator died between them) restores the committed one from the store.
        self.control_call(instance, None).await?;
        // Decided on arrival, as the runtime's run loop does when it takes the resume.
        let stale = self.with_instance(instance, |i| {
            if i.restoring {
                return Err(Error::unavailable(format!(
                    "instance {} of {} is restoring the committed snapshot",
                    i.record.epoch, i.record.processor
                )));
            }
            let stale = i.record.phase == Phase::Standby
                && !i.fenced
                && (!i.loaded || i.state.seq != committed.0);
            if stale {
                i.restoring = true;
                i.loaded = false;
                i.loaded_full = None;
            }
            Ok(stale)
        })?;
        if !stale {
            return self.resume(instance).await;
        }
        let key = (instance.processor.clone(), instance.epoch);
        let cut_off = {
            let mut st = self.lock();
            self.note(
                &mut st,
                format!(
                    "restoring committed {} {} at {}",
                    instance.processor, instance.epoch, committed.0
                ),
            );
            !Self::reachable(&st, &instance.node)
        };
        self.restore(&key, cut_off, self.clock.now()).await;
        let running = self.with_instance(instance, |i| {
            i.restoring = false;
            Ok(i.record.phase == Phase::Running)
        })?;
        if !running {
            return Err(Error::unavailable(format!(
                "instance {} of {} could not restore the committed snapshot yet",
                instance.epoch, instance.processor
            )));
        }
        self.tick_instance(&key).await;
        Ok(())
    }
}
