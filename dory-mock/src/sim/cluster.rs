//! A simulated cluster: nodes, instances running a deterministic stateful processor, and the
//! faults a real cluster has. It implements [`Placement`] and [`InstanceControl`], so the real
//! orchestrator drives it exactly as it drives Kubernetes or local processes.
//!
//! Each instance runs a counter over a deterministic input sequence and publishes every step,
//! checkpoints at its interval, renews its ownership lease, stops publishing when a due
//! checkpoint cannot be stored (so what it publishes is never more than one checkpoint
//! interval ahead of what is committed), and freezes itself when its lease runs out — as the
//! real runtime does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use dory_core::snapshot::{self, Encoder, Limits};
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
    latency: Mutex<super::SimRng>,
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
            latency: Mutex::new(super::SimRng::new(0)),
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

    /// Seeds the control-call latencies (the simulator passes its seed).
    pub fn with_latency_seed(self, seed: u64) -> Self {
        *self.latency.lock().unwrap_or_else(|e| e.into_inner()) = super::SimRng::new(seed);
        self
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

    /// Makes the next `n` control calls (freeze, fetch, load, resume) fail.
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
                let mut st = self.lock();
                if let Some(inst) = st.instances.get_mut(key) {
                    match result {
                        Ok(expiry) => {
                            inst.lease_until = expiry;
                            inst.last_checkpoint = now;
                            inst.checkpoint_due = false;
                            inst.checkpointed = state;
                        }
                        Err(Error::Fenced(_)) => inst.fence(),
                        Err(_) => {}
                    }
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
            Some(snap) => {
                match snapshot::decode_state::<CounterState>(&snap.bytes, &Limits::default()) {
                    Ok((_, state)) => state,
                    Err(e) => {
                        let mut st = self.lock();
                        if let Some(inst) = st.instances.get_mut(key) {
                            inst.record.phase = Phase::Failed {
                                reason: format!("cannot restore: {e}"),
                            };
                        }
                        return;
                    }
                }
            }
        };
        let renewed = self
            .store
            .renew_lease(processor, *epoch, self.timing.lease)
            .await;
        let mut st = self.lock();
        let Some(inst) = st.instances.get_mut(key) else {
            return;
        };
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

    /// Common checks of every control call: reachable, not failing, latency, hangs.
    async fn control_call(&self, instance: &Instance, timeout: Option<Duration>) -> Result<()> {
        let max = self.timing.control_latency.as_millis().max(1) as u64;
        let ms = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .between(1, max);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let key = (instance.processor.clone(), instance.epoch);
        let flaky_roll = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .below(100);
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
        // Permissive on purpose: a running instance answers too, so a protocol that skips the
        // freeze shows up as an invariant violation instead of being refused here.
        let state = self.with_instance(instance, |i| Ok(i.state))?;
        self.encode(&instance.processor, instance.epoch, state)
    }

    async fn load(&self, instance: &Instance, bytes: &[u8]) -> Result<()> {
        self.control_call(instance, None).await?;
        let (header, state) = snapshot::decode_state::<CounterState>(bytes, &Limits::default())?;
        self.with_instance(instance, |i| {
            if header.processor != i.record.processor || header.epoch >= i.record.epoch {
                return Err(Error::invalid(format!(
                    "snapshot of {} {} cannot load into {} {}",
                    header.processor, header.epoch, i.record.processor, i.record.epoch
                )));
            }
            if i.record.phase != Phase::Standby {
                return Err(Error::conflict(format!(
                    "instance {} of {} is {}, not standby",
                    i.record.epoch, i.record.processor, i.record.phase
                )));
            }
            i.state = state;
            i.checkpointed = state;
            i.loaded = true;
            Ok(())
        })
    }

    async fn resume(&self, instance: &Instance) -> Result<()> {
        self.control_call(instance, None).await?;
        let now = self.clock.now();
        let lease = self.timing.lease;
        let resumed = self.with_instance(instance, |i| match i.record.phase {
            Phase::Running => Ok(false),
            Phase::Standby if !i.loaded => Err(Error::conflict(format!(
                "instance {} of {} has no state loaded",
                i.record.epoch, i.record.processor
            ))),
            _ if i.fenced => Err(Error::fenced(format!(
                "instance {} of {} was fenced off by the store and cannot resume",
                i.record.epoch, i.record.processor
            ))),
            Phase::Standby | Phase::Frozen => {
                if i.record.phase == Phase::Standby {
                    // A fresh owner trusts the orchestrator's commit for its first lease and
                    // renews it at its first heartbeat.
                    i.lease_until = now.plus(lease);
                    i.last_checkpoint = now;
                }
                i.record.phase = Phase::Running;
                Ok(true)
            }
            ref other => Err(Error::conflict(format!(
                "instance {} of {} is {other}; cannot resume",
                i.record.epoch, i.record.processor
            ))),
        })?;
        if resumed {
            {
                let mut st = self.lock();
                self.note(
                    &mut st,
                    format!("resumed {} {}", instance.processor, instance.epoch),
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
}
