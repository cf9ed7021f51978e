//! The deterministic simulator: the real orchestrator against a simulated cluster, on a
//! single-threaded tokio runtime with paused (simulated) time, every fault drawn from one
//! seeded random number generator.
//!
//! A run is a fixed number of steps. In the fault phase each step may inject one fault —
//! drain, spot notice, node crash, partition, edge outage, instance crash, hang, failing
//! control calls, orchestrator restart, store outage, broker outage — each with its own
//! recovery scheduled later; then a quiet phase lets the system converge. Moves pre-copy as
//! the real runtime does (a full checkpoint while the old instance runs, loaded into the
//! replacement, then a delta at the freeze); the [`PreCopyModel`] declines some pre-copies,
//! loses some answers and prunes hard, so the delta path and both fallbacks to the whole
//! state (the replacement refuses the delta, the store refuses to commit it) run too, and
//! [`SimReport::precopy`] counts them. The [`Checker`] watches every publish and commit; at
//! the end every desired processor must run exactly once. Every decision point is ordered
//! (`BTreeMap`s, biased `select!`s, simulated time), so a seed's trace is the same byte for
//! byte on every run: [`SimReport::trace_hash`].
//!
//! A seeded simulation of your own policy (the orchestrator's settings) and your own
//! [`ConfigSource`] — here one that runs only the even-numbered processors, as a sharding
//! control plane might — takes a few lines:
//!
//! ```
//! use std::sync::Arc;
//!
//! use dory_core::ConfigSource;
//! use dory_mock::MemoryConfig;
//! use dory_mock::sim::{ConfigFactory, SimConfig, run_seed};
//!
//! let mut config = SimConfig { steps: 300, quiet_steps: 150, ..SimConfig::default() };
//! config.settings.planner.max_concurrent_moves = 2; // the policy under test
//! config.config_source = Some(ConfigFactory::new(|specs| {
//!     let even = specs.into_iter().step_by(2);
//!     Arc::new(MemoryConfig::with_processors(even)) as Arc<dyn ConfigSource>
//! }));
//! for seed in 0..3 {
//!     let report = run_seed(&config, seed);
//!     assert!(report.passed(), "{:?}\nreplay: {}", report.violations, report.replay_command());
//!     assert_eq!(report.trace_hash, run_seed(&config, seed).trace_hash);
//! }
//! ```

mod check;
pub mod cli;
mod cluster;
mod rng;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dory_core::orchestrator::{Orchestrator, PlantedFault, Settings};
use dory_core::planner::PlannerConfig;
use dory_core::{
    Clock, ConfigSource, Epoch, Leadership, Node, NodeId, Phase, ProcessorId, ProcessorSpec,
    Resources, Site, SitePreference, StateStore, Timestamp, TokioClock,
};

pub use check::{Checker, CheckerStats};
pub use cluster::{CounterState, InstanceTiming, PreCopyModel, PreCopyStats, SimCluster, input};
pub use rng::SimRng;

use crate::{
    FaultSwitch, FaultyPublisher, FaultyStore, MemoryConfig, MemoryLeadership, MemoryStatus,
    MemoryStore,
};

/// A broker that confirms every message and keeps none.
#[derive(Clone, Copy, Debug)]
struct ConfirmingBroker;

#[async_trait::async_trait]
impl dory_core::Publisher for ConfirmingBroker {
    async fn publish(&self, _message: dory_core::OutputMessage) -> dory_core::Result<()> {
        Ok(())
    }

    async fn flush(&self) -> dory_core::Result<()> {
        Ok(())
    }
}

/// Which faults a run may inject, each with a relative weight (0 turns it off).
#[derive(Clone, Debug, PartialEq)]
pub struct FaultMix {
    /// Drain a node (cordon + interruption without deadline), uncordon later.
    pub drain: u32,
    /// Spot notice with a deadline, then the node dies at the deadline and comes back later.
    pub spot_notice: u32,
    /// A node crashes with everything on it, and comes back empty later.
    pub node_crash: u32,
    /// A node is cut off from the orchestrator and the store (its instances keep running).
    pub partition: u32,
    /// Every edge node is cut off at once, and returns later.
    pub edge_outage: u32,
    /// One instance crashes.
    pub instance_crash: u32,
    /// One instance hangs for a while (slow safe points, slow control calls).
    pub hang: u32,
    /// Control calls (pre-copy, freeze, fetch, load, resume) fail: the next few, or 30% of
    /// them for a few seconds (a flaky network).
    pub control_failure: u32,
    /// The orchestrator is killed at an arbitrary point and a new one started, or the leader
    /// is cut off from its lock but keeps running while a new one takes over.
    pub orchestrator_restart: u32,
    /// The state store is unreachable for a while, or the answers to its next few calls are
    /// lost although the calls took effect.
    pub store_outage: u32,
    /// The broker is unreachable for a while.
    pub broker_outage: u32,
}

impl Default for FaultMix {
    fn default() -> Self {
        FaultMix {
            drain: 4,
            spot_notice: 3,
            node_crash: 2,
            partition: 2,
            edge_outage: 1,
            instance_crash: 3,
            hang: 2,
            control_failure: 2,
            orchestrator_restart: 3,
            store_outage: 2,
            broker_outage: 2,
        }
    }
}

/// A simulation scenario.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of processors.
    pub processors: usize,
    /// Number of cloud nodes.
    pub cloud_nodes: usize,
    /// Number of edge nodes.
    pub edge_nodes: usize,
    /// Steps in all (fault phase plus quiet phase).
    pub steps: u64,
    /// Steps at the end without new faults, for convergence.
    pub quiet_steps: u64,
    /// Simulated time per step.
    pub step: Duration,
    /// Probability that a fault-phase step injects a fault.
    pub fault_rate: f64,
    /// Which faults.
    pub faults: FaultMix,
    /// A bug planted in the orchestrator (testing the simulator itself).
    pub planted: PlantedFault,
    /// The checkpoint interval of every processor.
    pub checkpoint_interval: Duration,
    /// The orchestrator's settings.
    pub settings: Settings,
    /// The simulated instances' timing.
    pub timing: InstanceTiming,
    /// How the simulated instances pre-copy and prune the store.
    pub precopy: PreCopyModel,
    /// Keep the full trace in the report (for debugging a seed).
    pub keep_trace: bool,
    /// Your own [`ConfigSource`] under test, made from the scenario's processors; `None`
    /// uses a [`MemoryConfig`] of them all.
    pub config_source: Option<ConfigFactory>,
}

/// Makes the [`ConfigSource`] of one simulation run from the scenario's processor specs.
#[derive(Clone)]
pub struct ConfigFactory(
    pub Arc<dyn Fn(Vec<ProcessorSpec>) -> Arc<dyn ConfigSource> + Send + Sync>,
);

impl ConfigFactory {
    /// Wraps a function that builds a config source from the scenario's processors.
    pub fn new(
        f: impl Fn(Vec<ProcessorSpec>) -> Arc<dyn ConfigSource> + Send + Sync + 'static,
    ) -> Self {
        ConfigFactory(Arc::new(f))
    }
}

impl std::fmt::Debug for ConfigFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigFactory(..)")
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        let lease = Duration::from_secs(2);
        SimConfig {
            processors: 20,
            cloud_nodes: 3,
            edge_nodes: 2,
            steps: 1000,
            quiet_steps: 300,
            step: Duration::from_millis(100),
            fault_rate: 0.04,
            faults: FaultMix::default(),
            planted: PlantedFault::None,
            checkpoint_interval: Duration::from_secs(1),
            settings: Settings {
                planner: PlannerConfig {
                    lease,
                    lease_margin: Duration::from_millis(500),
                    node_lost_grace: Duration::from_secs(4),
                    stabilisation: Duration::from_secs(8),
                    max_concurrent_moves: 6,
                    min_move_time: Duration::from_secs(2),
                },
                resync_interval: Duration::from_secs(1),
                freeze_timeout: Duration::from_millis(800),
                call_timeout: Duration::from_secs(1),
                start_timeout: Duration::from_secs(5),
                stop_grace: Duration::from_secs(1),
                poll_interval: Duration::from_millis(100),
                retry_initial: Duration::from_millis(200),
                retry_max: Duration::from_secs(3),
                load_while_committing: true,
            },
            timing: InstanceTiming {
                start_delay: Duration::from_millis(300),
                stop_delay: Duration::from_millis(100),
                control_latency: Duration::from_millis(30),
                lease,
            },
            // Most moves pre-copy and send a delta; some are declined (the whole state goes at
            // the freeze), some answers are lost (the replacement refuses the delta), and
            // pruning at every checkpoint can take a pre-copied base away before the commit
            // (the store refuses the delta).
            precopy: PreCopyModel {
                decline_percent: 20,
                lost_answer_percent: 10,
                keep_snapshots: 1,
                prune_every: 1,
            },
            keep_trace: false,
            config_source: None,
        }
    }
}

/// The result of one seed.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The planted fault, if any (part of the replay command).
    pub planted: PlantedFault,
    /// xxh3 of the whole trace: equal on every run of the same seed and scenario.
    pub trace_hash: u64,
    /// Invariant violations, empty when the run passed.
    pub violations: Vec<String>,
    /// Faults injected.
    pub faults: u64,
    /// Checker counters.
    pub stats: CheckerStats,
    /// Moves that committed.
    pub moves: u64,
    /// What the instances did of pre-copy moves: deltas sent and taken, fallbacks to the
    /// whole state.
    pub precopy: PreCopyStats,
    /// The trace, when asked for.
    pub trace: Vec<String>,
}

impl SimReport {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The one command that replays this seed.
    pub fn replay_command(&self) -> String {
        let planted = match self.planted {
            PlantedFault::None => String::new(),
            p => format!(" --planted {p}"),
        };
        format!(
            "cargo run --release -p dory-mock --bin dory-sim -- --seed {}{planted}",
            self.seed
        )
    }
}

/// Runs one seed on a fresh single-threaded runtime with paused time.
pub fn run_seed(config: &SimConfig, seed: u64) -> SimReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    let config = config.clone();
    runtime.block_on(async move {
        // Everything reads time inside the paused runtime, starting on a timer tick: the
        // origin of the simulated clock must not come from the real clock (outside the
        // runtime) nor sit between two ticks, or load on the machine would shift the
        // millisecond timestamps and with them the trace.
        tokio::time::sleep(Duration::from_millis(1)).await;
        Simulation::new(config, seed).run().await
    })
}

enum Recovery {
    Uncordon(NodeId),
    RestoreNode(NodeId),
    CrashNode(NodeId),
    StoreUp,
    BrokerUp,
}

type RunningOrchestrator = tokio::task::JoinHandle<()>;

struct Simulation {
    config: SimConfig,
    seed: u64,
    rng: SimRng,
    clock: Arc<dyn Clock>,
    store: MemoryStore,
    /// Faults of the store as the instances reach it.
    store_faults: FaultSwitch,
    /// Faults of the store as the orchestrator reaches it (an outage hits both; a lost reply
    /// one side).
    orchestrator_store_faults: FaultSwitch,
    /// The store as the orchestrator reaches it.
    orchestrator_store: Arc<dyn StateStore>,
    broker_faults: FaultSwitch,
    config_source: Arc<dyn ConfigSource>,
    status: Arc<MemoryStatus>,
    cluster: Arc<SimCluster>,
    checker: Arc<Mutex<Checker>>,
    recoveries: BTreeMap<u64, Vec<Recovery>>,
    trace: Vec<String>,
    hasher_input: Vec<u8>,
    faults: u64,
    moves: u64,
    /// Every orchestrator started and not killed, the newest last (a deposed one may still
    /// be running).
    orchestrators: Vec<(Arc<MemoryLeadership>, RunningOrchestrator)>,
    /// Event streams of every orchestrator started, drained in start order.
    events: Vec<tokio::sync::broadcast::Receiver<dory_core::orchestrator::Event>>,
    edge: Vec<NodeId>,
}

impl Simulation {
    fn new(config: SimConfig, seed: u64) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(Timestamp(1_000_000)));
        let store = MemoryStore::new(clock.clone());
        let store_faults = FaultSwitch::new();
        let broker_faults = FaultSwitch::new();
        let faulty_store: Arc<dyn StateStore> =
            Arc::new(FaultyStore::new(store.clone(), store_faults.clone()));
        // A store round trip takes time, so a crash of the orchestrator can land between a
        // claim and a launch, or between a commit and a resume.
        let orchestrator_store_faults = FaultSwitch::new();
        orchestrator_store_faults.set_latency(Duration::from_millis(3));
        let orchestrator_store: Arc<dyn StateStore> = Arc::new(FaultyStore::new(
            store.clone(),
            orchestrator_store_faults.clone(),
        ));
        // The checker is the consumer: it sees every confirmed publish, so the broker behind
        // the fault switch only confirms (keeping every message would cost memory per seed).
        let publisher = Arc::new(FaultyPublisher::new(
            ConfirmingBroker,
            broker_faults.clone(),
        ));
        let per_processor = Resources::new(500, 256);
        let capacity = Resources::new(
            per_processor.cpu_millis * config.processors as u64,
            per_processor.memory_mib * config.processors as u64,
        );
        let mut nodes = Vec::new();
        let mut edge = Vec::new();
        for i in 0..config.cloud_nodes {
            nodes.push(Node::new(format!("cloud-{i}"), Site::Cloud, capacity));
        }
        for i in 0..config.edge_nodes {
            let node = Node::new(format!("edge-{i}"), Site::Edge, capacity);
            edge.push(node.id.clone());
            nodes.push(node);
        }
        let start = clock.now();
        for node in &mut nodes {
            node.ready_since = start;
        }
        let checkpoint_steps =
            (config.checkpoint_interval.as_millis() / config.step.as_millis().max(1)) as u64;
        let checker = Arc::new(Mutex::new(Checker::new(checkpoint_steps + 2)));
        let cluster = Arc::new(
            SimCluster::new(
                nodes,
                clock.clone(),
                faulty_store.clone(),
                Arc::new(store.clone()),
                publisher,
                checker.clone(),
                config.timing.clone(),
            )
            .with_latency_seed(seed)
            .with_precopy(config.precopy),
        );
        let mut specs = Vec::new();
        for i in 0..config.processors {
            let mut spec = ProcessorSpec::new(
                ProcessorId::new(format!("p{i:03}")).expect("valid processor id"),
            );
            spec.resources = per_processor;
            spec.checkpoint_interval = config.checkpoint_interval;
            spec.site = match i % 4 {
                0 => SitePreference::Edge,
                1 => SitePreference::Cloud,
                _ => SitePreference::Any,
            };
            specs.push(spec);
        }
        let config_source: Arc<dyn ConfigSource> = match &config.config_source {
            Some(factory) => (factory.0)(specs),
            None => Arc::new(MemoryConfig::with_processors(specs)),
        };
        Simulation {
            rng: SimRng::new(seed),
            seed,
            config,
            clock,
            store,
            store_faults,
            orchestrator_store_faults,
            orchestrator_store,
            broker_faults,
            config_source,
            status: Arc::new(MemoryStatus::new()),
            cluster,
            checker,
            recoveries: BTreeMap::new(),
            trace: Vec::new(),
            hasher_input: Vec::new(),
            faults: 0,
            moves: 0,
            orchestrators: Vec::new(),
            events: Vec::new(),
            edge,
        }
    }

    fn record(&mut self, line: String) {
        self.hasher_input.extend_from_slice(line.as_bytes());
        self.hasher_input.push(b'\n');
        if self.config.keep_trace {
            self.trace.push(line);
        }
    }

    fn start_orchestrator(&mut self) {
        let leadership = Arc::new(MemoryLeadership::new(&self.store));
        let orchestrator = Orchestrator::builder(
            self.config_source.clone(),
            self.cluster.clone(),
            self.cluster.clone(),
            self.orchestrator_store.clone(),
            leadership.clone() as Arc<dyn Leadership>,
        )
        .status_sink(self.status.clone())
        .clock(self.clock.clone())
        .settings(self.config.settings.clone())
        .planted_fault(self.config.planted)
        .build();
        self.events.push(orchestrator.handle().events());
        let handle = tokio::spawn(async move {
            let _ = orchestrator.run_until(std::future::pending()).await;
        });
        self.orchestrators.push((leadership, handle));
    }

    fn kill_orchestrator(&mut self) {
        for (leadership, handle) in self.orchestrators.drain(..) {
            handle.abort();
            // The dead leader's lock goes with its session, as a Postgres advisory lock or a
            // Kubernetes Lease would after it lapses.
            leadership.depose();
        }
    }

    /// The leader loses its lock (a network partition between it and the store) but keeps
    /// running: its operations in flight go on until it notices, while a new orchestrator
    /// takes over. Returns false when no orchestrator led.
    fn partition_leader(&mut self) -> bool {
        let Some((leadership, _)) = self.orchestrators.iter().find(|(l, _)| l.leads()) else {
            return false;
        };
        leadership.depose();
        self.start_orchestrator();
        true
    }

    fn drain_events(&mut self) {
        let mut lines = Vec::new();
        for (n, events) in self.events.iter_mut().enumerate() {
            loop {
                match events.try_recv() {
                    Ok(event) => {
                        if matches!(event.kind, dory_core::orchestrator::EventKind::Moved { .. }) {
                            self.moves += 1;
                        }
                        lines.push(format!("o{n} {event}"));
                    }
                    Err(tokio::sync::broadcast::error::TryRecvError::Lagged(missed)) => {
                        lines.push(format!("o{n} {missed} events missed"));
                    }
                    Err(_) => break,
                }
            }
        }
        for line in lines {
            self.record(line);
        }
        for line in self.cluster.drain_trace() {
            self.record(line);
        }
    }

    async fn run(mut self) -> SimReport {
        self.start_orchestrator();
        let fault_steps = self.config.steps.saturating_sub(self.config.quiet_steps);
        for step in 0..self.config.steps {
            if step < fault_steps && self.rng.chance(self.config.fault_rate) {
                self.inject(step);
            }
            if step == fault_steps {
                self.heal_all();
            }
            if let Some(recoveries) = self.recoveries.remove(&step) {
                for r in recoveries {
                    self.recover(r);
                }
            }
            self.cluster.tick().await;
            self.check_commits().await;
            tokio::time::sleep(self.config.step).await;
            self.drain_events();
        }
        self.check_convergence().await;
        self.kill_orchestrator();
        self.drain_events();
        let checker = self.checker.lock().unwrap_or_else(|e| e.into_inner());
        let violations = checker.violations().to_vec();
        let stats = checker.stats();
        drop(checker);
        SimReport {
            seed: self.seed,
            planted: self.config.planted,
            trace_hash: xxhash_rust::xxh3::xxh3_64(&self.hasher_input),
            violations,
            faults: self.faults,
            stats,
            moves: self.moves,
            precopy: self.cluster.precopy_stats(),
            trace: self.trace,
        }
    }

    async fn check_commits(&self) {
        let now = self.clock.now();
        if let Ok(rows) = self.store.ownerships().await {
            let mut checker = self.checker.lock().unwrap_or_else(|e| e.into_inner());
            for row in rows {
                if let Some(c) = row.committed {
                    checker.on_committed(&row.processor, c, now);
                }
            }
        }
    }

    fn schedule(&mut self, step: u64, recovery: Recovery) {
        self.recoveries.entry(step).or_default().push(recovery);
    }

    fn steps_for(&self, d: Duration) -> u64 {
        (d.as_millis() / self.config.step.as_millis().max(1)) as u64
    }

    /// Nodes that are fine right now; faults keep at least two of them so that the
    /// processors always fit somewhere.
    fn healthy_nodes(&self) -> Vec<NodeId> {
        let pending: Vec<&NodeId> = self
            .recoveries
            .values()
            .flatten()
            .filter_map(|r| match r {
                Recovery::Uncordon(n) | Recovery::RestoreNode(n) | Recovery::CrashNode(n) => {
                    Some(n)
                }
                _ => None,
            })
            .collect();
        self.cluster
            .node_ids()
            .into_iter()
            .filter(|n| !pending.contains(&n))
            .collect()
    }

    fn inject(&mut self, step: u64) {
        let mix = self.config.faults.clone();
        let weights = [
            mix.drain,
            mix.spot_notice,
            mix.node_crash,
            mix.partition,
            mix.edge_outage,
            mix.instance_crash,
            mix.hang,
            mix.control_failure,
            mix.orchestrator_restart,
            mix.store_outage,
            mix.broker_outage,
        ];
        let total: u64 = weights.iter().map(|w| *w as u64).sum();
        if total == 0 {
            return;
        }
        let mut roll = self.rng.below(total);
        let mut kind = 0;
        for (i, w) in weights.iter().enumerate() {
            if roll < *w as u64 {
                kind = i;
                break;
            }
            roll -= *w as u64;
        }
        let healthy = self.healthy_nodes();
        let node_fault_ok = healthy.len() > 2;
        let now = self.clock.now();
        let secs = |rng: &mut SimRng, lo: u64, hi: u64| {
            Duration::from_millis(rng.between(lo * 1000, hi * 1000))
        };
        let step_ms = self.config.step.as_millis().max(1) as u64;
        // A random span of `lo..=hi` seconds, in steps.
        let span = |rng: &mut SimRng, lo: u64, hi: u64| rng.between(lo * 1000, hi * 1000) / step_ms;
        match kind {
            0 if node_fault_ok => {
                let Some(node) = self.rng.pick(&healthy).cloned() else {
                    return;
                };
                self.cluster.drain(&node);
                let d = secs(&mut self.rng, 5, 20);
                let at = step + self.steps_for(d);
                self.schedule(at, Recovery::Uncordon(node));
            }
            1 if node_fault_ok => {
                let Some(node) = self.rng.pick(&healthy).cloned() else {
                    return;
                };
                let notice = secs(&mut self.rng, 1, 8);
                self.cluster.spot_notice(&node, now.plus(notice));
                let dies = step + self.steps_for(notice);
                self.schedule(dies, Recovery::CrashNode(node.clone()));
                let back = dies + span(&mut self.rng, 5, 15);
                self.schedule(back, Recovery::RestoreNode(node));
            }
            2 if node_fault_ok => {
                let Some(node) = self.rng.pick(&healthy).cloned() else {
                    return;
                };
                self.cluster.crash_node(&node);
                let back = step + span(&mut self.rng, 5, 20);
                self.schedule(back, Recovery::RestoreNode(node));
            }
            3 if node_fault_ok => {
                let Some(node) = self.rng.pick(&healthy).cloned() else {
                    return;
                };
                self.cluster.partition(&node);
                let back = step + span(&mut self.rng, 3, 20);
                self.schedule(back, Recovery::RestoreNode(node));
            }
            4 if healthy.len() >= self.edge.len() + 2
                && self.edge.iter().all(|e| healthy.contains(e)) =>
            {
                let back = step + span(&mut self.rng, 10, 30);
                for node in self.edge.clone() {
                    self.cluster.partition(&node);
                    self.schedule(back, Recovery::RestoreNode(node));
                }
            }
            5 => {
                let running = self.cluster.running();
                if let Some((p, e)) = self.rng.pick(&running).cloned() {
                    self.cluster.crash_instance(&p, e);
                }
            }
            6 => {
                let running = self.cluster.alive();
                if let Some((p, e)) = self.rng.pick(&running).cloned() {
                    let d = Duration::from_millis(self.rng.between(300, 4000));
                    self.cluster.hang_instance(&p, e, now.plus(d));
                }
            }
            7 => {
                if self.rng.chance(0.5) {
                    let n = self.rng.between(1, 3) as u32;
                    self.cluster.fail_control_calls(n);
                } else {
                    let d = secs(&mut self.rng, 1, 6);
                    self.cluster.flaky_control(now.plus(d), 30);
                }
            }
            8 => {
                // At most three orchestrators at once; past that, a restart of them all.
                if self.orchestrators.len() < 3 && self.rng.chance(0.5) {
                    if !self.partition_leader() {
                        return;
                    }
                    self.record(format!("{} fault leader-partition", now.0));
                } else {
                    self.record(format!("{} fault orchestrator-restart", now.0));
                    self.kill_orchestrator();
                    self.start_orchestrator();
                }
            }
            9 if !self.store_faults.outage() => {
                if self.rng.chance(0.5) {
                    self.store_faults.set_outage(true);
                    self.orchestrator_store_faults.set_outage(true);
                    self.record(format!("{} fault store-outage", now.0));
                    let back = step + span(&mut self.rng, 1, 5);
                    self.schedule(back, Recovery::StoreUp);
                } else {
                    // The call takes effect but its answer is lost: the ambiguity every
                    // claim, commit and checkpoint must survive.
                    let n = self.rng.between(1, 3);
                    let side = if self.rng.chance(0.5) {
                        self.orchestrator_store_faults.lose_next_replies(n);
                        "orchestrator"
                    } else {
                        self.store_faults.lose_next_replies(n);
                        "instances"
                    };
                    self.record(format!("{} fault store-lost-replies {n} ({side})", now.0));
                }
            }
            10 if !self.broker_faults.outage() => {
                self.broker_faults.set_outage(true);
                self.record(format!("{} fault broker-outage", now.0));
                let back = step + span(&mut self.rng, 1, 5);
                self.schedule(back, Recovery::BrokerUp);
            }
            _ => return,
        }
        self.faults += 1;
    }

    fn recover(&mut self, recovery: Recovery) {
        match recovery {
            Recovery::Uncordon(n) => self.cluster.uncordon(&n),
            Recovery::RestoreNode(n) => self.cluster.restore_node(&n),
            Recovery::CrashNode(n) => self.cluster.crash_node(&n),
            Recovery::StoreUp => {
                self.store_faults.set_outage(false);
                self.orchestrator_store_faults.set_outage(false);
            }
            Recovery::BrokerUp => self.broker_faults.set_outage(false),
        }
    }

    /// The end of the fault phase: every pending recovery happens now.
    fn heal_all(&mut self) {
        let pending: Vec<Recovery> = std::mem::take(&mut self.recoveries)
            .into_values()
            .flatten()
            .collect();
        for r in pending {
            match r {
                // A node due to die is spared: the faults have stopped.
                Recovery::CrashNode(n) => self.cluster.uncordon(&n),
                r => self.recover(r),
            }
        }
        for node in self.cluster.node_ids() {
            self.cluster.restore_node(&node);
            self.cluster.uncordon(&node);
        }
        let now = self.clock.now();
        self.record(format!("{} faults stop", now.0));
    }

    async fn check_convergence(&mut self) {
        let now = self.clock.now();
        let desired = match self.config_source.desired().await {
            Ok(d) => d,
            Err(e) => {
                self.fail(now, format!("cannot read desired state: {e}"));
                return;
            }
        };
        let failed: Vec<String> = dory_core::StatusSink::read(&*self.status)
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.phase == "failed")
            .map(|s| s.processor)
            .collect();
        let instances = self.cluster.instance_records();
        let owners: BTreeMap<ProcessorId, Option<Epoch>> = self
            .store
            .ownerships()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|o| (o.processor, o.owner))
            .collect();
        for spec in &desired.processors {
            if failed.contains(&spec.id.to_string()) {
                continue;
            }
            let alive: Vec<_> = instances
                .iter()
                .filter(|i| i.processor == spec.id && i.phase.is_alive())
                .collect();
            let owner = owners.get(&spec.id).copied().flatten();
            let ok = alive.len() == 1
                && alive[0].phase == Phase::Running
                && Some(alive[0].epoch) == owner;
            if !ok {
                let seen: Vec<String> = alive
                    .iter()
                    .map(|i| format!("{} {} on {}", i.epoch, i.phase, i.node))
                    .collect();
                self.fail(
                    now,
                    format!(
                        "{} did not converge to one running owner after the faults stopped: owner {owner:?}, alive [{}]",
                        spec.id,
                        seen.join(", ")
                    ),
                );
            }
        }
    }

    fn fail(&self, now: Timestamp, what: String) {
        self.checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fail(now, what);
    }
}

/// Runs `seeds`, stopping early after `stop_after_failures` failures; returns every report.
pub fn run_seeds(
    config: &SimConfig,
    seeds: std::ops::Range<u64>,
    stop_after_failures: usize,
) -> Vec<SimReport> {
    let mut reports = Vec::new();
    let mut failures = 0;
    for seed in seeds {
        let report = run_seed(config, seed);
        if !report.passed() {
            failures += 1;
        }
        reports.push(report);
        if failures >= stop_after_failures {
            break;
        }
    }
    reports
}
