//! Two real orchestrators competing for one database: only the leader acts; when its lock
//! session is terminated the other takes over and carries on; the deposed one's late writes
//! are refused by the store, and once it competes again it waits as a follower.
//!
//! Each orchestrator is wired as a separate process would be: its own pool, `PgLeadership`,
//! `PgConfigSource` and `PgStatus` over one schema. Both drive one simulated cluster
//! (`dory_mock::sim::SimCluster`) whose instances checkpoint into the same Postgres store, so
//! every epoch, ownership change and checkpoint goes through real fencing. Time is the wall
//! clock, with short settings, so the whole scenario takes a few seconds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::orchestrator::{Event, EventKind, Orchestrator, OrchestratorHandle, Settings};
use dory_core::planner::{PlannerConfig, StartReason};
use dory_core::testing::{test_move_snapshot, unique_name};
use dory_core::{
    Changes, Clock, ConfigSource, Epoch, Error, Health, Instance, InstanceControl, LaunchRequest,
    Leadership, Node, NodeId, Phase, Placement, ProcessorId, ProcessorSpec, Resources, Sequence,
    Site, SnapshotMeta, StateStore, SystemClock, Term,
};
use dory_mock::MemoryPublisher;
use dory_mock::sim::{Checker, InstanceTiming, SimCluster};
use dory_pg::{PgConfigSource, PgLeadership, PgStatus, PgStore};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::test_db;

const PROCESSORS: usize = 3;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const LEASE: Duration = Duration::from_secs(2);
/// How often the instances take a step.
const STEP: Duration = Duration::from_millis(50);
/// How often the test looks at the state it waits for.
const POLL: Duration = Duration::from_millis(50);
/// The most any single phase of the scenario may take before the test fails; they take well
/// under a second or two each on an idle machine.
const PHASE_DEADLINE: Duration = Duration::from_secs(15);

/// Short settings for wall-clock time: rounds every half second at the latest, a 2 s lease.
fn settings() -> Settings {
    Settings {
        planner: PlannerConfig {
            lease: LEASE,
            lease_margin: Duration::from_millis(500),
            node_lost_grace: Duration::from_secs(5),
            stabilisation: Duration::from_secs(30),
            max_concurrent_moves: 4,
            min_move_time: Duration::from_secs(2),
        },
        resync_interval: Duration::from_millis(500),
        freeze_timeout: Duration::from_secs(2),
        call_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(10),
        stop_grace: Duration::from_secs(1),
        poll_interval: Duration::from_millis(50),
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(2),
        load_while_committing: true,
    }
}

fn processor(i: usize) -> ProcessorId {
    ProcessorId::new(format!("p{i}")).expect("valid processor id")
}

/// Writes the desired processors as users do: rows of `processors`, the spec as jsonb.
async fn insert_processors(store: &PgStore) {
    for i in 0..PROCESSORS {
        let mut spec = ProcessorSpec::new(processor(i));
        spec.resources = Resources::new(100, 100);
        spec.checkpoint_interval = Duration::from_millis(500);
        let mut json = serde_json::to_value(&spec).expect("spec as json");
        json.as_object_mut()
            .expect("spec is an object")
            .remove("id");
        sqlx::query("INSERT INTO processors (id, spec) VALUES ($1, $2::jsonb)")
            .bind(spec.id.as_str())
            .bind(json.to_string())
            .execute(store.pool())
            .await
            .unwrap_or_else(|e| panic!("inserting processor {}: {e}", spec.id));
    }
}

/// The real `PgLeadership`, except that once it has led, its next `acquire` waits until the
/// test lets it compete again. A deposed leader otherwise re-enters the race for the freed
/// lock at once, and which of the two wins it is a matter of milliseconds; the scenario is
/// "the other takes over", and the test lets the deposed one back in afterwards to check it
/// then waits as a follower.
struct Contender {
    inner: PgLeadership,
    has_led: AtomicBool,
    rejoin: watch::Receiver<bool>,
}

#[async_trait]
impl Leadership for Contender {
    async fn acquire(&self) -> dory_core::Result<Term> {
        if self.has_led.load(Ordering::SeqCst) {
            let mut rejoin = self.rejoin.clone();
            // A dropped sender means the test is over: compete then.
            let _ = rejoin.wait_for(|allowed| *allowed).await;
        }
        let term = self.inner.acquire().await?;
        self.has_led.store(true, Ordering::SeqCst);
        Ok(term)
    }

    async fn check(&self, term: Term) -> dory_core::Result<()> {
        self.inner.check(term).await
    }

    async fn resign(&self, term: Term) -> dory_core::Result<()> {
        self.inner.resign(term).await
    }
}

/// A call that changes the cluster, as one orchestrator made it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Call {
    kind: &'static str,
    processor: ProcessorId,
    epoch: Epoch,
}

/// One orchestrator's hands on the shared cluster: it records every call that changes
/// something, so the test knows which orchestrator acted. Control calls and instance steps
/// take turns (`steps`), as a real runtime only freezes, loads or resumes at a safe point
/// between steps. The simulated instances assume a store that answers without yielding (as
/// the simulator's in-memory one does): across a Postgres round trip a step could straddle a
/// freeze, and the step a resume takes at once could overlap the ticker's step of the same
/// instance, both showing up as duplicated output that no orchestrator caused.
struct Hands {
    cluster: Arc<SimCluster>,
    steps: Arc<tokio::sync::Mutex<()>>,
    calls: Mutex<Vec<Call>>,
}

impl Hands {
    fn record(&self, kind: &'static str, processor: &ProcessorId, epoch: Epoch) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                kind,
                processor: processor.clone(),
                epoch,
            });
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[async_trait]
impl Placement for Hands {
    async fn nodes(&self) -> dory_core::Result<Vec<Node>> {
        self.cluster.nodes().await
    }

    async fn instances(&self) -> dory_core::Result<Vec<Instance>> {
        self.cluster.instances().await
    }

    async fn launch(&self, request: &LaunchRequest) -> dory_core::Result<Instance> {
        self.record("launch", &request.spec.id, request.epoch);
        self.cluster.launch(request).await
    }

    async fn terminate(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> dory_core::Result<()> {
        self.record("terminate", processor, epoch);
        self.cluster.terminate(processor, epoch, grace).await
    }

    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> dory_core::Result<()> {
        self.record("forget", processor, epoch);
        self.cluster.forget(processor, epoch).await
    }

    fn changes(&self) -> Changes {
        self.cluster.changes()
    }
}

#[async_trait]
impl InstanceControl for Hands {
    async fn health(&self, instance: &Instance) -> dory_core::Result<Health> {
        self.cluster.health(instance).await
    }

    async fn freeze(
        &self,
        instance: &Instance,
        timeout: Duration,
    ) -> dory_core::Result<SnapshotMeta> {
        self.record("freeze", &instance.processor, instance.epoch);
        let _turn = self.steps.lock().await;
        self.cluster.freeze(instance, timeout).await
    }

    async fn fetch(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.record("fetch", &instance.processor, instance.epoch);
        let _turn = self.steps.lock().await;
        self.cluster.fetch(instance).await
    }

    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> dory_core::Result<()> {
        self.record("load", &instance.processor, instance.epoch);
        let _turn = self.steps.lock().await;
        self.cluster.load(instance, snapshot).await
    }

    async fn resume(&self, instance: &Instance) -> dory_core::Result<()> {
        self.record("resume", &instance.processor, instance.epoch);
        let _turn = self.steps.lock().await;
        self.cluster.resume(instance).await
    }

    async fn resume_committed(
        &self,
        instance: &Instance,
        committed: dory_core::Sequence,
    ) -> dory_core::Result<()> {
        self.record("resume", &instance.processor, instance.epoch);
        let _turn = self.steps.lock().await;
        self.cluster.resume_committed(instance, committed).await
    }
}

/// One orchestrator process.
struct Contestant {
    name: &'static str,
    store: PgStore,
    leadership: Arc<Contender>,
    hands: Arc<Hands>,
    handle: OrchestratorHandle,
    events: Arc<Mutex<Vec<Event>>>,
    /// Set if the event log missed events (it would make the checks on it meaningless).
    lagged: Arc<AtomicBool>,
    rejoin: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<dory_core::Result<()>>>,
}

impl Contestant {
    async fn start(
        name: &'static str,
        store: PgStore,
        cluster: &Arc<SimCluster>,
        steps: &Arc<tokio::sync::Mutex<()>>,
    ) -> Contestant {
        let (rejoin, rejoin_rx) = watch::channel(false);
        let leadership = Arc::new(Contender {
            inner: PgLeadership::new(&store, unique_name(name))
                .with_poll_interval(Duration::from_millis(50)),
            has_led: AtomicBool::new(false),
            rejoin: rejoin_rx,
        });
        let config = PgConfigSource::new(&store)
            .await
            .unwrap_or_else(|e| panic!("{name}: config source: {e}"));
        let hands = Arc::new(Hands {
            cluster: cluster.clone(),
            steps: steps.clone(),
            calls: Mutex::new(Vec::new()),
        });
        let orchestrator = Orchestrator::builder(
            Arc::new(config) as Arc<dyn ConfigSource>,
            hands.clone(),
            hands.clone(),
            Arc::new(store.clone()) as Arc<dyn StateStore>,
            leadership.clone() as Arc<dyn Leadership>,
        )
        .status_sink(Arc::new(PgStatus::new(&store)))
        .settings(settings())
        .build();
        let handle = orchestrator.handle();
        let events = Arc::new(Mutex::new(Vec::new()));
        // Subscribed before the orchestrator runs, so no event is missed.
        let mut rx = handle.events();
        let log = events.clone();
        let lagged = Arc::new(AtomicBool::new(false));
        let lost = lagged.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => log.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        lost.store(true, Ordering::SeqCst);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            orchestrator
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
        });
        Contestant {
            name,
            store,
            leadership,
            hands,
            handle,
            events,
            lagged,
            rejoin,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn events(&self) -> Vec<Event> {
        assert!(
            !self.lagged.load(Ordering::SeqCst),
            "{}: the event log missed events",
            self.name
        );
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn terms_led(&self) -> Vec<Term> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Leading { term } => Some(term),
                _ => None,
            })
            .collect()
    }

    fn deposed(&self) -> Vec<Term> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Deposed { term } => Some(term),
                _ => None,
            })
            .collect()
    }

    fn launches(&self) -> Vec<Call> {
        self.hands
            .calls()
            .into_iter()
            .filter(|c| c.kind == "launch")
            .collect()
    }

    /// Waits for `rounds` more reconcile rounds of this orchestrator (it must be leading).
    async fn rounds(&mut self, rounds: usize) {
        for _ in 0..rounds {
            tokio::time::timeout(PHASE_DEADLINE, self.handle.next_view())
                .await
                .unwrap_or_else(|_| panic!("{}: no reconcile round in time", self.name));
        }
    }

    async fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let ended = tokio::time::timeout(PHASE_DEADLINE, task)
                .await
                .unwrap_or_else(|_| panic!("{}: did not stop in time", self.name));
            ended
                .unwrap_or_else(|e| panic!("{}: task failed: {e}", self.name))
                .unwrap_or_else(|e| panic!("{}: run_until failed: {e}", self.name));
        }
    }
}

impl Drop for Contestant {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Polls `probe` until it succeeds; panics with its last answer after `within`.
async fn until<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(t) => return t,
            Err(why) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}: {why}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// Every processor has exactly one alive instance, it runs, it owns the processor in the
/// store, and it is not on `avoid`. Returns each processor's owner and node.
async fn converged(
    cluster: &SimCluster,
    store: &PgStore,
    avoid: Option<&NodeId>,
) -> Result<BTreeMap<ProcessorId, (Epoch, NodeId)>, String> {
    let rows = store.ownerships().await.map_err(|e| e.to_string())?;
    let owners: BTreeMap<_, _> = rows.iter().map(|r| (&r.processor, r.owner)).collect();
    let records = cluster.instance_records();
    let mut out = BTreeMap::new();
    for i in 0..PROCESSORS {
        let p = processor(i);
        let alive: Vec<&Instance> = records
            .iter()
            .filter(|r| r.processor == p && r.phase.is_alive())
            .collect();
        let owner = owners.get(&p).copied().flatten();
        match alive.as_slice() {
            [one]
                if one.phase == Phase::Running
                    && Some(one.epoch) == owner
                    && Some(&one.node) != avoid =>
            {
                out.insert(p, (one.epoch, one.node.clone()));
            }
            _ => return Err(format!("{p}: owner {owner:?}, alive {alive:?}")),
        }
    }
    Ok(out)
}

/// (owner, highest claimed epoch) of every ownership row.
async fn ownership_rows(store: &PgStore) -> BTreeMap<ProcessorId, (Option<Epoch>, Epoch)> {
    store
        .ownerships()
        .await
        .expect("read ownership rows")
        .into_iter()
        .map(|r| (r.processor, (r.owner, r.highest_epoch)))
        .collect()
}

fn fenced<T: std::fmt::Debug>(what: &str, r: dory_core::Result<T>) {
    assert!(
        matches!(r, Err(Error::Fenced(_))),
        "{what} must be Fenced, got {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_one_leads_a_terminated_leader_is_replaced_and_fenced() {
    let Some(db) = test_db("orchestrators").await else {
        return;
    };
    settings()
        .validate()
        .expect("the test's settings are valid");
    insert_processors(&db.store).await;
    let all: BTreeSet<ProcessorId> = (0..PROCESSORS).map(processor).collect();

    // The cluster: its instances checkpoint and renew their leases in this schema through a
    // pool of their own, as processes on the nodes would.
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let nodes = NODES
        .iter()
        .map(|id| {
            let mut n = Node::new(*id, Site::Cloud, Resources::new(10_000, 10_000));
            n.ready_since = clock.now();
            n
        })
        .collect();
    let instances_store: Arc<dyn StateStore> = Arc::new(db.store.clone());
    let cluster = Arc::new(SimCluster::new(
        nodes,
        clock.clone(),
        instances_store.clone(),
        instances_store,
        Arc::new(MemoryPublisher::new()),
        Arc::new(Mutex::new(Checker::new(100))),
        InstanceTiming {
            start_delay: Duration::from_millis(200),
            stop_delay: Duration::from_millis(100),
            control_latency: Duration::from_millis(20),
            lease: LEASE,
        },
    ));
    let steps = Arc::new(tokio::sync::Mutex::new(()));
    // Instances step on their own; the ticker also watches that no processor ever has two
    // running instances.
    let doubles = Arc::new(Mutex::new(Vec::<String>::new()));
    let ticker = {
        let (cluster, steps, doubles) = (cluster.clone(), steps.clone(), doubles.clone());
        tokio::spawn(async move {
            loop {
                {
                    let _turn = steps.lock().await;
                    cluster.tick().await;
                }
                let mut running: BTreeMap<ProcessorId, Vec<Epoch>> = BTreeMap::new();
                for r in cluster.instance_records() {
                    if r.phase == Phase::Running {
                        running.entry(r.processor).or_default().push(r.epoch);
                    }
                }
                for (p, epochs) in running.into_iter().filter(|(_, e)| e.len() > 1) {
                    doubles
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{p} runs {epochs:?} at once"));
                }
                tokio::time::sleep(STEP).await;
            }
        })
    };

    // Two orchestrator processes, each with its own pool, started together.
    let store_b = db.another_store().await;
    let store_a = db.another_store().await;
    let a = Contestant::start("orch-a", store_a, &cluster, &steps).await;
    let b = Contestant::start("orch-b", store_b, &cluster, &steps).await;
    let started = Instant::now();

    // 1. Only one acts.
    let first = until("one orchestrator leads", PHASE_DEADLINE, async || {
        match (a.terms_led().is_empty(), b.terms_led().is_empty()) {
            (false, true) => Ok(0),
            (true, false) => Ok(1),
            (true, true) => Err("nobody leads yet".to_string()),
            (false, false) => Err("both lead".to_string()),
        }
    })
    .await;
    let (mut leader, mut follower) = if first == 0 { (a, b) } else { (b, a) };
    let owners = until("every processor runs", PHASE_DEADLINE, async || {
        converged(&cluster, &leader.store, None).await
    })
    .await;
    let converged_in = started.elapsed();
    // A few more rounds of the leader, so the follower had every chance to act wrongly.
    leader.rounds(3).await;
    let ta = match leader.terms_led().as_slice() {
        [t] => *t,
        other => panic!("{} led with terms {other:?}", leader.name),
    };
    assert!(
        follower.events().is_empty(),
        "{} follows, yet emitted {:?}",
        follower.name,
        follower.events()
    );
    assert!(
        follower.hands.calls().is_empty(),
        "{} follows, yet acted on the cluster: {:?}",
        follower.name,
        follower.hands.calls()
    );
    assert_eq!(
        follower.handle.view().term,
        None,
        "{} must not have run a round",
        follower.name
    );
    let started_by_leader: Vec<ProcessorId> = leader
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Started {
                reason: StartReason::New,
                ..
            } => e.processor,
            _ => None,
        })
        .collect();
    assert_eq!(
        started_by_leader.iter().cloned().collect::<BTreeSet<_>>(),
        all,
        "the leader starts every processor"
    );
    assert_eq!(
        started_by_leader.len(),
        PROCESSORS,
        "each processor started once: {started_by_leader:?}"
    );
    let mut launched: Vec<(ProcessorId, Epoch)> = leader
        .launches()
        .into_iter()
        .map(|c| (c.processor, c.epoch))
        .collect();
    launched.sort();
    let expected: Vec<(ProcessorId, Epoch)> =
        owners.iter().map(|(p, (e, _))| (p.clone(), *e)).collect();
    assert_eq!(
        launched, expected,
        "one launch per processor, of the instance that owns it"
    );

    // 2. Terminate the leader's lock session, as a network cut or an administrator would.
    let leader_calls = leader.hands.calls().len();
    let killed_at = Instant::now();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(leader.leadership.inner.application_name())
    .fetch_all(db.store.pool())
    .await
    .expect("terminate the leader's session");
    assert_eq!(
        killed,
        vec![true],
        "exactly the leader's lock session is terminated"
    );
    let tb = until(
        "the follower takes over",
        PHASE_DEADLINE,
        async || match follower.terms_led().as_slice() {
            [] => Err("not leading".to_string()),
            [t] => Ok(*t),
            more => Err(format!("led {} times: {more:?}", more.len())),
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    assert!(tb > ta, "the new term {tb} must be above the old {ta}");
    until(
        "the old leader notices",
        PHASE_DEADLINE,
        async || match leader.deposed().as_slice() {
            [t] if *t == ta => Ok(()),
            other => Err(format!("deposed {other:?}")),
        },
    )
    .await;
    until(
        "the new leader's first round",
        PHASE_DEADLINE,
        async || match follower.handle.view().term {
            Some(t) if t == tb => Ok(()),
            other => Err(format!("view term {other:?}")),
        },
    )
    .await;
    let unchanged = converged(&cluster, &follower.store, None)
        .await
        .unwrap_or_else(|e| panic!("the takeover disturbed the processors: {e}"));
    assert_eq!(
        unchanged, owners,
        "the new leader keeps the running instances"
    );
    assert!(
        follower.hands.calls().is_empty(),
        "nothing to do after the takeover, yet the new leader made {:?}",
        follower.hands.calls()
    );

    // The new leader acts: a drain of the busiest node is carried out by it alone.
    let mut per_node: BTreeMap<&NodeId, Vec<(&ProcessorId, Epoch)>> = BTreeMap::new();
    for (p, (e, n)) in &owners {
        per_node.entry(n).or_default().push((p, *e));
    }
    let (drained, on_it) = per_node
        .into_iter()
        .max_by_key(|(_, on)| on.len())
        .expect("a node runs processors");
    let drained = drained.clone();
    let on_it: BTreeMap<ProcessorId, Epoch> =
        on_it.into_iter().map(|(p, e)| (p.clone(), e)).collect();
    let drain_at = Instant::now();
    cluster.drain(&drained);
    let moved_owners = until(
        "the new leader moves everything off the drained node",
        PHASE_DEADLINE,
        async || {
            let owners = converged(&cluster, &follower.store, Some(&drained)).await?;
            let moved: BTreeMap<ProcessorId, Epoch> = follower
                .events()
                .into_iter()
                .filter_map(|e| match e.kind {
                    EventKind::Moved { from, .. } => e.processor.map(|p| (p, from)),
                    _ => None,
                })
                .collect();
            if moved == on_it {
                Ok(owners)
            } else {
                Err(format!("moved {moved:?} of {on_it:?}"))
            }
        },
    )
    .await;
    let drain_took = drain_at.elapsed();
    let relaunched: BTreeSet<ProcessorId> = follower
        .launches()
        .into_iter()
        .map(|c| c.processor)
        .collect();
    assert_eq!(
        relaunched,
        on_it.keys().cloned().collect(),
        "the new leader launches one replacement per moved processor"
    );
    assert_eq!(
        follower.launches().len(),
        on_it.len(),
        "{:?}",
        follower.launches()
    );
    assert_eq!(
        leader.hands.calls().len(),
        leader_calls,
        "the deposed leader acted after losing its session: {:?}",
        &leader.hands.calls()[leader_calls..]
    );
    assert_eq!(
        leader.events().last().map(|e| &e.kind),
        Some(&EventKind::Deposed { term: ta }),
        "the deposed leader must stay silent"
    );

    // 3. The old leader's late writes, under its term and through its own pool, are refused
    // by the store, and change nothing.
    let before = ownership_rows(&leader.store).await;
    assert_eq!(before.len(), PROCESSORS, "{before:?}");
    for (p, (owner, highest)) in &before {
        let owner = owner.unwrap_or_else(|| panic!("{p} has no owner"));
        let next = Epoch(highest.0 + 1);
        fenced(
            "claim_epoch under the old term",
            leader.store.claim_epoch(p, ta).await,
        );
        fenced(
            "assign_owner under the old term",
            leader
                .store
                .assign_owner(p, Some(owner), *highest, LEASE, ta)
                .await,
        );
        let snap = test_move_snapshot(p, owner, next, Sequence(1), b"late move");
        fenced(
            "commit_move under the old term",
            leader.store.commit_move(owner, &snap, LEASE, ta).await,
        );
        fenced(
            "release under the old term",
            leader.store.release(p, owner, ta).await,
        );
    }
    let after = ownership_rows(&leader.store).await;
    assert_eq!(after, before, "refused writes change nothing");
    for (p, (e, _)) in &moved_owners {
        assert_eq!(
            after[p].0,
            Some(*e),
            "{p} is owned by its one running instance"
        );
    }
    fenced(
        "the old leader's check of its term",
        leader.leadership.check(ta).await,
    );

    // The deposed orchestrator competes again: it waits, as a follower, while the new
    // leader keeps leading.
    let old_app = leader.leadership.inner.application_name();
    leader.rejoin.send_replace(true);
    until(
        "the deposed orchestrator tries for the lock again",
        PHASE_DEADLINE,
        async || {
            let sessions: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&old_app)
            .fetch_one(db.store.pool())
            .await
            .map_err(|e| e.to_string())?;
            if sessions == 1 {
                Ok(())
            } else {
                Err(format!("{sessions} sessions named {old_app:?}"))
            }
        },
    )
    .await;
    follower.rounds(3).await;
    assert_eq!(
        leader.terms_led(),
        vec![ta],
        "the old leader must wait while the new one leads"
    );
    assert_eq!(leader.hands.calls().len(), leader_calls);
    assert_eq!(follower.terms_led(), vec![tb]);
    let still = converged(&cluster, &follower.store, Some(&drained))
        .await
        .unwrap_or_else(|e| panic!("after the old leader rejoined: {e}"));
    assert_eq!(still, moved_owners);

    leader.shut_down().await;
    follower.shut_down().await;
    ticker.abort();
    let violations = cluster.violations();
    assert!(violations.is_empty(), "{violations:#?}");
    let doubles = doubles.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(doubles.is_empty(), "two running instances: {doubles:#?}");
    assert!(cluster.publishes() > 0, "the processors made progress");
    eprintln!(
        "orchestrators: converged in {converged_in:?}, takeover in {takeover:?}, drain of {} processor(s) in {drain_took:?}, {:?} in all",
        on_it.len(),
        started.elapsed()
    );
}
