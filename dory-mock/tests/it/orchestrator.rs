//! The real orchestrator against the simulated cluster, scenario by scenario, on paused
//! (simulated) time: drains, crashes of the orchestrator at every point of a move, failed
//! protocol steps, and a change of leader.

use std::sync::Arc;
use std::time::Duration;

use dory_core::orchestrator::{EventKind, Orchestrator, OrchestratorHandle};
use dory_core::{
    Clock, ConfigSource, Error, Health, Instance, InstanceControl, Leadership, Node, NodeId, Phase,
    ProcessorId, ProcessorSpec, Resources, Sequence, Site, SnapshotMeta, StateStore, Timestamp,
    TokioClock,
};
use dory_mock::sim::{InstanceTiming, SimCluster, SimConfig};
use dory_mock::{
    FaultSwitch, FaultyStore, MemoryConfig, MemoryLeadership, MemoryPublisher, MemoryStatus,
    MemoryStore,
};
use tokio::task::JoinHandle;

struct World {
    clock: Arc<dyn Clock>,
    store: MemoryStore,
    /// Faults of the orchestrator's view of the store only (instances reach it directly).
    store_faults: FaultSwitch,
    config: Arc<MemoryConfig>,
    cluster: Arc<SimCluster>,
}

impl World {
    fn new(processors: usize) -> World {
        let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(Timestamp(5_000_000)));
        let store = MemoryStore::new(clock.clone());
        let capacity = Resources::new(10_000, 10_000);
        let nodes = ["n1", "n2", "n3"]
            .into_iter()
            .map(|id| {
                let mut n = Node::new(id, Site::Cloud, capacity);
                n.ready_since = clock.now();
                n
            })
            .collect();
        let timing = SimConfig::default().timing;
        let cluster = Arc::new(SimCluster::standalone(
            nodes,
            clock.clone(),
            store.clone(),
            Arc::new(MemoryPublisher::new()),
            InstanceTiming { ..timing },
        ));
        let specs = (0..processors).map(|i| {
            let mut spec = ProcessorSpec::new(ProcessorId::new(format!("p{i}")).unwrap());
            spec.resources = Resources::new(100, 100);
            spec.checkpoint_interval = Duration::from_secs(1);
            spec
        });
        World {
            clock,
            store,
            store_faults: FaultSwitch::new(),
            config: Arc::new(MemoryConfig::with_processors(specs)),
            cluster,
        }
    }

    fn start(&self) -> (Arc<MemoryLeadership>, OrchestratorHandle, JoinHandle<()>) {
        self.start_with(self.cluster.clone())
    }

    /// Starts an orchestrator that calls the instances through `control`.
    fn start_with(
        &self,
        control: Arc<dyn InstanceControl>,
    ) -> (Arc<MemoryLeadership>, OrchestratorHandle, JoinHandle<()>) {
        let leadership = Arc::new(MemoryLeadership::new(&self.store));
        let store: Arc<dyn StateStore> = Arc::new(FaultyStore::new(
            self.store.clone(),
            self.store_faults.clone(),
        ));
        let orchestrator = Orchestrator::builder(
            self.config.clone() as Arc<dyn ConfigSource>,
            self.cluster.clone(),
            control,
            store,
            leadership.clone() as Arc<dyn Leadership>,
        )
        .status_sink(Arc::new(MemoryStatus::new()))
        .clock(self.clock.clone())
        .settings(SimConfig::default().settings)
        .build();
        let handle = orchestrator.handle();
        let task = tokio::spawn(async move {
            let _ = orchestrator.run_until(std::future::pending()).await;
        });
        (leadership, handle, task)
    }

    /// Lets simulated time pass, stepping the instances every 100 ms.
    async fn run_for(&self, d: Duration) {
        let steps = d.as_millis() / 100;
        for _ in 0..steps {
            self.cluster.tick().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn running_on(&self, node: &str) -> usize {
        self.cluster
            .instance_records()
            .iter()
            .filter(|i| i.phase == Phase::Running && i.node.as_str() == node)
            .count()
    }

    /// Every processor has exactly one alive instance, running, and it owns the processor.
    fn assert_converged(&self, processors: usize, context: &str) {
        let records = self.cluster.instance_records();
        for i in 0..processors {
            let p = ProcessorId::new(format!("p{i}")).unwrap();
            let alive: Vec<_> = records
                .iter()
                .filter(|r| r.processor == p && r.phase.is_alive())
                .collect();
            let owner = self.store.ownership_now(&p).and_then(|o| o.owner);
            assert!(
                alive.len() == 1
                    && alive[0].phase == Phase::Running
                    && Some(alive[0].epoch) == owner,
                "{context}: {p} has not converged: owner {owner:?}, alive {alive:?}"
            );
        }
        let violations = self.cluster.violations();
        assert!(violations.is_empty(), "{context}: {violations:#?}");
    }
}

fn kinds(
    events: &mut tokio::sync::broadcast::Receiver<dory_core::orchestrator::Event>,
) -> Vec<EventKind> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e.kind);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn a_drain_moves_every_processor_make_before_break() {
    let world = World::new(6);
    let (_leader, handle, _task) = world.start();
    let mut events = handle.events();
    world.run_for(Duration::from_secs(3)).await;
    world.assert_converged(6, "before the drain");
    let busiest = ["n1", "n2", "n3"]
        .into_iter()
        .max_by_key(|n| world.running_on(n))
        .unwrap();
    let on_it = world.running_on(busiest);
    assert!(on_it > 0);
    world.cluster.drain(&NodeId::new(busiest));
    world.run_for(Duration::from_secs(5)).await;
    assert_eq!(
        world.running_on(busiest),
        0,
        "{busiest} still runs processors"
    );
    world.assert_converged(6, "after the drain");
    let moves: Vec<u64> = kinds(&mut events)
        .into_iter()
        .filter_map(|k| match k {
            EventKind::Moved { pause_ms, .. } => Some(pause_ms),
            _ => None,
        })
        .collect();
    assert_eq!(
        moves.len(),
        on_it,
        "one move per processor on the drained node"
    );
    let view = handle.view();
    let moved = view
        .status
        .values()
        .filter(|s| s.last_move_pause_ms.is_some())
        .count();
    assert_eq!(moved, on_it, "the status reports each move's pause");
}

#[tokio::test(start_paused = true)]
async fn killing_the_orchestrator_at_any_point_of_a_move_converges() {
    // Every 7 ms of a move's life (launch, standby, pre-copy, freeze, fetch, load, commit,
    // resume, terminate) gets an orchestrator crash in one of the rounds.
    for delay_ms in (0..400).step_by(7) {
        let world = World::new(1);
        let (leader, _handle, task) = world.start();
        world.run_for(Duration::from_secs(2)).await;
        world.assert_converged(1, "before the drain");
        let node = world.cluster.instance_records()[0].node.clone();
        world.cluster.drain(&node);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        task.abort();
        leader.depose();
        let (_leader, _handle, _task) = world.start();
        world.run_for(Duration::from_secs(8)).await;
        world.assert_converged(1, &format!("killed {delay_ms} ms into the move"));
        assert_eq!(
            world.running_on(node.as_str()),
            0,
            "killed {delay_ms} ms in: still on {node}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_freeze_rolls_back_then_the_move_is_retried() {
    let world = World::new(1);
    let (_leader, handle, _task) = world.start();
    let mut events = handle.events();
    world.run_for(Duration::from_secs(2)).await;
    let node = world.cluster.instance_records()[0].node.clone();
    // The move's first control calls are the replacement's health (whose failure only keeps
    // the load before the commit), the pre-copy (whose failure only skips it) and the freeze
    // of the old instance.
    world.cluster.fail_control_calls(3);
    world.cluster.drain(&node);
    world.run_for(Duration::from_secs(6)).await;
    world.assert_converged(1, "after the retried move");
    let kinds = kinds(&mut events);
    let rolled_back = kinds
        .iter()
        .position(|k| matches!(k, EventKind::RolledBack { .. }))
        .expect("the failed freeze rolls the move back");
    let moved = kinds
        .iter()
        .position(|k| matches!(k, EventKind::Moved { .. }))
        .expect("the retried move finishes");
    assert!(rolled_back < moved);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_is_resolved_from_the_ownership_row() {
    // Lose the replies of the orchestrator's store calls for a while: a commit that took
    // effect but reported an error must roll forward, one that did not must roll back.
    for lost in 1..6 {
        let world = World::new(2);
        let (_leader, _handle, _task) = world.start();
        world.run_for(Duration::from_secs(2)).await;
        let node = world.cluster.instance_records()[0].node.clone();
        world.store_faults.lose_next_replies(lost);
        world.cluster.drain(&node);
        world.run_for(Duration::from_secs(10)).await;
        world.assert_converged(2, &format!("{lost} lost replies"));
    }
}

#[tokio::test(start_paused = true)]
async fn a_deposed_leader_stops_acting_and_the_next_one_takes_over() {
    let world = World::new(3);
    let (first, first_handle, _first_task) = world.start();
    let mut first_events = first_handle.events();
    world.run_for(Duration::from_secs(2)).await;
    world.assert_converged(3, "under the first leader");
    let (second, second_handle, _second_task) = world.start();
    let mut second_events = second_handle.events();
    world.run_for(Duration::from_secs(1)).await;
    assert!(
        !kinds(&mut second_events)
            .iter()
            .any(|k| matches!(k, EventKind::Leading { .. })),
        "the second orchestrator must wait while the first leads"
    );
    first.depose();
    world.run_for(Duration::from_secs(2)).await;
    assert!(second.leads());
    assert!(
        kinds(&mut first_events)
            .iter()
            .any(|k| matches!(k, EventKind::Deposed { .. })),
        "the first orchestrator notices it was deposed"
    );
    let node = world.cluster.instance_records()[0].node.clone();
    world.cluster.drain(&node);
    world.run_for(Duration::from_secs(5)).await;
    world.assert_converged(3, "after a drain under the second leader");
    assert_eq!(world.running_on(node.as_str()), 0);
}

/// The simulated cluster's control, except that every load after a freeze fails: the
/// replacement never takes the frozen state from the orchestrator.
struct LostLoads {
    cluster: Arc<SimCluster>,
    frozen: std::sync::atomic::AtomicBool,
    lost: std::sync::atomic::AtomicU32,
    /// The control protocol the instances say they speak.
    protocol: u32,
}

impl LostLoads {
    fn new(world: &World, protocol: u32) -> Arc<LostLoads> {
        Arc::new(LostLoads {
            cluster: world.cluster.clone(),
            frozen: Default::default(),
            lost: Default::default(),
            protocol,
        })
    }
}

#[async_trait::async_trait]
impl InstanceControl for LostLoads {
    async fn health(&self, instance: &Instance) -> dory_core::Result<Health> {
        let mut health = self.cluster.health(instance).await?;
        health.protocol = self.protocol;
        Ok(health)
    }
    async fn freeze(
        &self,
        instance: &Instance,
        timeout: Duration,
    ) -> dory_core::Result<SnapshotMeta> {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        self.cluster.freeze(instance, timeout).await
    }
    async fn fetch(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.cluster.fetch(instance).await
    }
    async fn fetch_full(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.cluster.fetch_full(instance).await
    }
    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> dory_core::Result<()> {
        if self.frozen.load(std::sync::atomic::Ordering::SeqCst) {
            self.lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::unavailable("the load was lost on the way"));
        }
        self.cluster.load(instance, snapshot).await
    }
    async fn resume(&self, instance: &Instance) -> dory_core::Result<()> {
        self.cluster.resume(instance).await
    }
    async fn resume_committed(
        &self,
        instance: &Instance,
        committed: Sequence,
    ) -> dory_core::Result<()> {
        self.cluster.resume_committed(instance, committed).await
    }
    async fn precopy(&self, instance: &Instance, timeout: Duration) -> dory_core::Result<Vec<u8>> {
        self.cluster.precopy(instance, timeout).await
    }
}

/// The load and the commit of a move run at once (both instances run the same revision). A
/// load that fails while the commit succeeds does not undo the move: the replacement, told at
/// its resume what was committed, restores that from the store and runs on from the exact
/// state (the simulator's checker sees every step kept).
#[tokio::test(start_paused = true)]
async fn a_load_lost_while_the_move_commits_is_mended_from_the_store() {
    let world = World::new(1);
    let control = LostLoads::new(&world, dory_core::CONTROL_PROTOCOL);
    let (_leader, handle, _task) = world.start_with(control.clone());
    let mut events = handle.events();
    world.run_for(Duration::from_secs(2)).await;
    world.assert_converged(1, "before the drain");
    let node = world.cluster.instance_records()[0].node.clone();
    world.cluster.drain(&node);
    world.run_for(Duration::from_secs(4)).await;
    world.assert_converged(1, "after the drain");
    assert_eq!(world.running_on(node.as_str()), 0);
    assert!(
        control.lost.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no load was lost: the test tests nothing"
    );
    let kinds = kinds(&mut events);
    assert!(
        kinds.iter().any(|k| matches!(k, EventKind::Moved { .. })),
        "{kinds:?}"
    );
    assert!(
        !kinds
            .iter()
            .any(|k| matches!(k, EventKind::RolledBack { .. })),
        "{kinds:?}"
    );
    assert!(
        world
            .cluster
            .drain_trace()
            .iter()
            .any(|line| line.contains("restoring committed")),
        "the replacement did not restore the committed snapshot"
    );
}

/// A replacement whose runtime predates the protocol (its health names none) would resume
/// with what it holds, so its move loads before it commits: the lost load rolls the move back
/// with the old instance running, and nothing restores from the store.
#[tokio::test(start_paused = true)]
async fn a_replacement_on_an_older_runtime_is_loaded_before_the_commit() {
    let world = World::new(1);
    let control = LostLoads::new(&world, 0);
    let (_leader, handle, _task) = world.start_with(control.clone());
    let mut events = handle.events();
    world.run_for(Duration::from_secs(2)).await;
    world.assert_converged(1, "before the drain");
    let owner = world.cluster.instance_records()[0].clone();
    world.cluster.drain(&owner.node);
    world.run_for(Duration::from_secs(4)).await;
    // Every load is lost, so every move rolls back (and the drain tries again): the old
    // instance still owns the processor, and nothing broke an invariant.
    let p = ProcessorId::new("p0").unwrap();
    let first = owner.epoch;
    assert_eq!(
        world.store.ownership_now(&p).and_then(|o| o.owner),
        Some(first)
    );
    let violations = world.cluster.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(control.lost.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let kinds = kinds(&mut events);
    assert!(
        kinds
            .iter()
            .any(|k| matches!(k, EventKind::RolledBack { .. })),
        "{kinds:?}"
    );
    assert!(
        !kinds.iter().any(|k| matches!(k, EventKind::Moved { .. })),
        "{kinds:?}"
    );
    assert!(
        !world
            .cluster
            .drain_trace()
            .iter()
            .any(|line| line.contains("restoring committed")),
        "a replacement restored from the store"
    );
}
