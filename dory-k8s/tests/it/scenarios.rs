//! Scenario tests: the real orchestrator of `dory-core` with `KubePlacement`, `KubeControl`
//! and (in one scenario) `LeaseLeadership`, against the fake API server, where the test
//! [`Kubelet`] runs every bound pod as a real counter process on its own loopback address.
//! State moves between real processes through the embedded SQLite store they share with the
//! orchestrator; each counter's output (one JSON-lines file the processes append to) shows
//! whether a count was lost or repeated.
//!
//! Operator and cluster actions (cordon, taints, eviction) go through the Kubernetes API with
//! a `kube::Client`, as `kubectl` or a node termination handler would send them; only what a
//! kubelet or a machine does (run processes, report pods, die, go not ready) and the fake's
//! own faults (`410` on every watch) use the fake's hooks.
//!
//! Timings are short (a 2 s lease, a 3 s lost-node grace period) so the file runs in well
//! under two minutes; every wait is a wait for a condition with a generous timeout.
//!
//! **Against a real cluster.** With `DORY_TEST_KUBECONFIG` set, the same scenarios run
//! against that cluster (each test in a namespace of its own; pods run the image
//! `DORY_TEST_K8S_IMAGE` and share a Postgres schema with the test; see
//! `examples/kubernetes/README.md`). Skipped there, with a skip line: the node that dies and
//! fails over (killing a machine's processes and setting its Ready condition are the
//! kubelet's), the orchestrator killed after a commit (the fake's failed pod deletes hold
//! the move there), the expired watches (the fake's `410` hook), and the node dying at the
//! deadline after an evacuation. The state's continuity is then checked from the store,
//! since the pods' output stays inside them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dory_core::orchestrator::{Event, EventKind, Orchestrator, OrchestratorHandle, Settings};
use dory_core::planner::{Action, PlannerConfig, StartReason};
use dory_core::{
    Epoch, Leadership, OutputMessage, Ownership, ProcessorSpec, ProcessorStatus, Timestamp,
};
use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStatus, EmbeddedStore, OutputLog};
use dory_k8s::{KubeConfig, KubePlacement, LeaseConfig, LeaseLeadership, TaintSignal};
use dory_k8s_fake::{FakeApiServer, Fault, Verb};
use dory_mock::MemoryConfig;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use tokio::task::JoinHandle;

use crate::kubelet::{Kubelet, counter_bin};
use crate::support::{NS, config, pid};

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// The instances' ownership lease, and the planner's.
const LEASE: Duration = Duration::from_secs(2);
const NODE_LOST_GRACE: Duration = Duration::from_secs(3);

fn settings() -> Settings {
    Settings {
        planner: PlannerConfig {
            lease: LEASE,
            lease_margin: Duration::from_millis(500),
            node_lost_grace: NODE_LOST_GRACE,
            stabilisation: Duration::from_millis(500),
            max_concurrent_moves: 4,
            min_move_time: Duration::from_secs(5),
        },
        resync_interval: Duration::from_millis(500),
        freeze_timeout: Duration::from_secs(5),
        call_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(30),
        stop_grace: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        retry_initial: Duration::from_millis(200),
        retry_max: Duration::from_secs(2),
        load_while_committing: true,
    }
}

/// A counter that counts every 20 ms and checkpoints every 200 ms.
fn counter(id: &str) -> ProcessorSpec {
    let mut spec = ProcessorSpec::new(pid(id));
    spec.checkpoint_interval = Duration::from_millis(200);
    spec.config = serde_json::json!({ "interval_ms": 20 });
    spec
}

/// Wall-clock milliseconds: the clock of the orchestrator's events and the embedded store.
fn now() -> Timestamp {
    Timestamp(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    )
}

/// The fake's own parts: the in-process API server and the kubelet running its pods.
struct Fake {
    server: Arc<FakeApiServer>,
    kubelet: Kubelet,
}

/// The state store the orchestrator shares with the instances.
enum Backend {
    /// The embedded SQLite file (the fake: instances are processes of this machine).
    Embedded { db: EmbeddedDb },
    /// A Postgres schema of the test's own (a real cluster: the pods reach the database at
    /// `DORY_TEST_K8S_STORE_URL`, the test at `DORY_TEST_DATABASE_URL`).
    Postgres {
        schema: Box<dory_pg::testing::TestSchema>,
    },
}

/// The store's leadership as a sized type for [`LeaseLeadership`].
struct SharedLeadership(Arc<dyn Leadership>);

#[async_trait::async_trait]
impl Leadership for SharedLeadership {
    async fn acquire(&self) -> dory_core::Result<dory_core::Term> {
        self.0.acquire().await
    }
    async fn check(&self, term: dory_core::Term) -> dory_core::Result<()> {
        self.0.check(term).await
    }
    async fn resign(&self, term: dory_core::Term) -> dory_core::Result<()> {
        self.0.resign(term).await
    }
}

/// One test's cluster: the API server (the fake with three nodes and the kubelet, or a real
/// cluster), the shared store, the processors, and the orchestrators started on it.
struct Rig {
    dir: tempfile::TempDir,
    client: kube::Client,
    /// `None` against a real cluster.
    fake: Option<Fake>,
    backend: Backend,
    processors: Arc<MemoryConfig>,
    kube: KubeConfig,
    /// The nodes this test cordoned or tainted.
    touched: Touched,
    /// Restores a real cluster's nodes and removes the test's namespace when dropped.
    _real: Option<RealCleanup>,
}

/// An orchestrator running in a task of its own, with every event it sent.
struct Orch {
    name: String,
    task: JoinHandle<()>,
    collector: JoinHandle<()>,
    handle: OrchestratorHandle,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Drop for Orch {
    fn drop(&mut self) {
        self.task.abort();
        self.collector.abort();
    }
}

impl Orch {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The latest status of `id`, if this orchestrator leads and has written one.
    fn status(&self, id: &str) -> Option<ProcessorStatus> {
        let view = self.handle.view();
        view.term?;
        view.status.get(id).cloned()
    }

    fn leading(&self) -> bool {
        self.handle.view().term.is_some()
    }

    /// Crashes it: the task is dropped wherever it is, as a killed process stops; nothing is
    /// given back (the Lease and the instances stay as they are).
    fn crash(&self) {
        self.task.abort();
    }

    fn moved(&self, id: &str) -> Vec<(Epoch, Epoch, String, Timestamp)> {
        self.events()
            .into_iter()
            .filter(|e| e.processor.as_ref().is_some_and(|p| p.as_str() == id))
            .filter_map(|e| match e.kind {
                EventKind::Moved { from, to, node, .. } => Some((from, to, node.to_string(), e.at)),
                _ => None,
            })
            .collect()
    }
}

/// The kubeconfig of a real cluster to run against, if `DORY_TEST_KUBECONFIG` names one.
fn real_kubeconfig() -> Option<PathBuf> {
    std::env::var_os("DORY_TEST_KUBECONFIG")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

async fn real_client(path: &std::path::Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("DORY_TEST_KUBECONFIG={}: {e}", path.display()));
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("DORY_TEST_KUBECONFIG={}: {e}", path.display()));
    kube::Client::try_from(config).expect("a client for DORY_TEST_KUBECONFIG")
}

fn required_var(name: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| panic!("DORY_TEST_KUBECONFIG is set, so {name} must be too (see examples/kubernetes/README.md)"))
}

/// What a test against a real cluster changes there, undone when the test ends (even when
/// it failed): the test's namespace goes, and the nodes it cordoned or tainted are uncordoned
/// and lose the test's taints.
struct RealCleanup {
    kubeconfig: PathBuf,
    namespace: String,
    touched: Touched,
}

/// The nodes a test cordoned (`true`) or only tainted (`false`).
type Touched = Arc<Mutex<BTreeMap<String, bool>>>;

impl Drop for RealCleanup {
    fn drop(&mut self) {
        let (path, namespace) = (self.kubeconfig.clone(), self.namespace.clone());
        let touched = self.touched.lock().unwrap().clone();
        // `Drop` cannot await, and the test's runtime may be shutting down: a thread and a
        // runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let client = real_client(&path).await;
                let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
                    Api::all(client.clone());
                let _ = namespaces
                    .delete(&namespace, &kube::api::DeleteParams::default())
                    .await;
                let nodes: Api<Node> = Api::all(client);
                for (name, cordoned) in touched {
                    let Ok(node) = nodes.get(&name).await else {
                        continue;
                    };
                    let taints: Vec<_> = node
                        .spec
                        .as_ref()
                        .and_then(|s| s.taints.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|t| t.key != SPOT_TAINT && t.key != SHORT_RECLAIM_TAINT)
                        .collect();
                    let mut spec = serde_json::json!({ "taints": taints });
                    if cordoned {
                        spec["unschedulable"] = serde_json::Value::Null;
                    }
                    let _ = nodes
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(serde_json::json!({
                                "spec": spec
                            })),
                        )
                        .await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

const SPOT_TAINT: &str = "aws-node-termination-handler/spot-itn";
/// A reclaim signal of the test's own, with a deadline shorter than a move.
const SHORT_RECLAIM_TAINT: &str = "example.com/reclaim-now";

impl Rig {
    /// `None` (after a skip line) when the counter binary, or against a real cluster the
    /// test database, is missing outside CI.
    async fn new(ids: &[&str]) -> Option<Rig> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let processors = Arc::new(MemoryConfig::with_processors(
            ids.iter().map(|id| counter(id)),
        ));
        match real_kubeconfig() {
            None => Rig::fake(dir, processors).await,
            Some(path) => Rig::real(dir, processors, path, ids[0]).await,
        }
    }

    async fn fake(dir: tempfile::TempDir, processors: Arc<MemoryConfig>) -> Option<Rig> {
        let bin = counter_bin()?;
        let server = Arc::new(
            FakeApiServer::builder()
                .namespace(NS)
                .scheduler(true)
                .bookmark_interval(Duration::from_millis(500))
                .start()
                .await
                .expect("fake API server"),
        );
        for node in NODES {
            server.add_node(node, &[]).expect("a node");
        }
        let kubelet = Kubelet::start(server.clone(), NS, &bin, &dir.path().join("pods"));
        let db_path = dir.path().join("dory.db");
        let db = EmbeddedDb::open(&db_path)
            .await
            .expect("the embedded store");
        let output = dir.path().join("output");
        std::fs::create_dir_all(&output).unwrap();
        let mut kube = config();
        kube.instance.store_url = format!("sqlite://{}", db_path.display());
        kube.instance.publisher_url = Some(format!("file://{}", output.display()));
        kube.instance.lease = LEASE;
        kube.termination_grace = Duration::from_secs(5);
        Some(Rig {
            dir,
            client: server.client_without_retries().expect("a client"),
            fake: Some(Fake { server, kubelet }),
            backend: Backend::Embedded { db },
            processors,
            kube,
            touched: Touched::default(),
            _real: None,
        })
    }

    /// Against the cluster of `DORY_TEST_KUBECONFIG`: pods run the image
    /// `DORY_TEST_K8S_IMAGE` (the counter), reach the store at `DORY_TEST_K8S_STORE_URL` in a
    /// schema of this test's own and publish to a file inside the pod (only the store shows
    /// their state). The orchestrator runs in the test and reaches pods at their IPs.
    async fn real(
        dir: tempfile::TempDir,
        processors: Arc<MemoryConfig>,
        path: PathBuf,
        area: &str,
    ) -> Option<Rig> {
        let image = required_var("DORY_TEST_K8S_IMAGE");
        let store_url = required_var("DORY_TEST_K8S_STORE_URL");
        let schema = dory_pg::testing::TestSchema::create(&format!("k8s_{area}"), 4).await?;
        let client = real_client(&path).await;
        let namespace = format!("dory-it-{}-{}", area, std::process::id());
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &Default::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": { "name": namespace }
                }))
                .unwrap(),
            )
            .await
            .expect("create the test's namespace");
        let touched = Touched::default();
        let cleanup = RealCleanup {
            kubeconfig: path,
            namespace: namespace.clone(),
            touched: touched.clone(),
        };
        let mut kube = KubeConfig {
            namespace,
            default_image: Some(image),
            image_pull_policy: Some("IfNotPresent".into()),
            ..KubeConfig::default()
        };
        let sep = if store_url.contains('?') { '&' } else { '?' };
        kube.instance.store_url = format!("{store_url}{sep}schema={}", schema.config.schema);
        kube.instance.publisher_url = Some("file:///tmp/dory-output".into());
        kube.instance.lease = LEASE;
        kube.termination_grace = Duration::from_secs(5);
        kube.health.interval = Duration::from_millis(100);
        Some(Rig {
            dir,
            client,
            fake: None,
            backend: Backend::Postgres {
                schema: Box::new(schema),
            },
            processors,
            kube,
            touched,
            _real: Some(cleanup),
        })
    }

    fn ns(&self) -> &str {
        &self.kube.namespace
    }

    /// The fake's parts, or `None` after a skip line against a real cluster (`what` says
    /// what is skipped).
    fn fake_only(&self, what: &str) -> Option<&Fake> {
        if self.fake.is_none() {
            eprintln!(
                "skipped against a real cluster: {what} needs the in-test kubelet or the fake's hooks"
            );
        }
        self.fake.as_ref()
    }

    fn store(&self) -> Arc<dyn dory_core::StateStore> {
        match &self.backend {
            Backend::Embedded { db } => Arc::new(EmbeddedStore::new(db)),
            Backend::Postgres { schema } => Arc::new(schema.store.clone()),
        }
    }

    fn store_leadership(&self, name: &str) -> Arc<dyn Leadership> {
        match &self.backend {
            Backend::Embedded { db } => Arc::new(EmbeddedLeadership::new(db, name)),
            Backend::Postgres { schema } => {
                Arc::new(dory_pg::PgLeadership::new(&schema.store, name))
            }
        }
    }

    fn status_sink(&self) -> Arc<dyn dory_core::StatusSink> {
        match &self.backend {
            Backend::Embedded { db } => Arc::new(EmbeddedStatus::new(db)),
            Backend::Postgres { schema } => Arc::new(dory_pg::PgStatus::new(&schema.store)),
        }
    }

    async fn placement(&self) -> Arc<KubePlacement> {
        Arc::new(
            KubePlacement::start(self.client.clone(), self.kube.clone())
                .await
                .expect("the placement"),
        )
    }

    /// Starts an orchestrator as the `dory` daemon wires one, with its own placement (a new
    /// process would have its own) and the store's leadership.
    async fn orchestrator(&self, name: &str) -> Orch {
        self.orchestrator_with(name, self.store_leadership(name))
            .await
    }

    /// The same, leading through a Lease around the store's leadership.
    async fn orchestrator_with_lease(&self, name: &str) -> Orch {
        let lease = LeaseConfig {
            namespace: self.ns().into(),
            name: LEASE_NAME.into(),
            holder: name.into(),
            duration: Duration::from_secs(3),
            renew_every: Duration::from_millis(500),
            renew_deadline: Duration::from_secs(2),
            retry_every: Duration::from_millis(200),
        };
        let inner = SharedLeadership(self.store_leadership(name));
        let leadership =
            Arc::new(LeaseLeadership::new(self.client.clone(), lease, inner).expect("the lease"));
        self.orchestrator_with(name, leadership).await
    }

    async fn orchestrator_with(&self, name: &str, leadership: Arc<dyn Leadership>) -> Orch {
        let placement = self.placement().await;
        let control = Arc::new(placement.control());
        let orchestrator = Orchestrator::builder(
            self.processors.clone(),
            placement,
            control,
            self.store(),
            leadership,
        )
        .status_sink(self.status_sink())
        .settings(settings())
        .build();
        let handle = orchestrator.handle();
        let events = Arc::new(Mutex::new(Vec::new()));
        // Subscribed before the orchestrator runs, so its first events are not missed.
        let mut receiver = handle.events();
        let collector = tokio::spawn({
            let events = events.clone();
            let name = name.to_string();
            async move {
                while let Ok(event) = receiver.recv().await {
                    eprintln!("{name}: {event}");
                    events.lock().unwrap().push(event);
                }
            }
        });
        let task = tokio::spawn(async move {
            if let Err(e) = orchestrator.run_until(std::future::pending()).await {
                eprintln!("the orchestrator stopped: {e}");
            }
        });
        Orch {
            name: name.into(),
            task,
            collector,
            handle,
            events,
        }
    }

    async fn ownership(&self, id: &str) -> Ownership {
        self.store()
            .ownership(&pid(id))
            .await
            .expect("read the ownership row")
            .expect("an ownership row")
    }

    /// Pods of `id` by epoch: whether each is terminating, and whether it is ready. Read
    /// from the fake's store directly (no request in its log), else through the API.
    async fn pods(&self, id: &str) -> BTreeMap<u64, (bool, bool)> {
        let pods: Vec<Pod> = match &self.fake {
            Some(fake) => fake.server.list::<Pod>(Some(self.ns())).unwrap(),
            None => {
                Api::<Pod>::namespaced(self.client.clone(), self.ns())
                    .list(
                        &ListParams::default()
                            .labels(&format!("{}={id}", dory_k8s::LABEL_PROCESSOR)),
                    )
                    .await
                    .expect("list pods")
                    .items
            }
        };
        pods.into_iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(dory_k8s::LABEL_PROCESSOR))
                    .is_some_and(|p| p == id)
            })
            .filter_map(|p| {
                let epoch = p.metadata.labels.as_ref()?.get(dory_k8s::LABEL_EPOCH)?;
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .is_some_and(|c| c.status == "True");
                Some((
                    epoch.parse().ok()?,
                    (p.metadata.deletion_timestamp.is_some(), ready),
                ))
            })
            .collect()
    }

    /// Waits until `orch` reports `id` running, optionally off `node`; returns the status.
    async fn running(&self, orch: &Orch, id: &str, off: Option<&str>) -> ProcessorStatus {
        let what = match off {
            Some(node) => format!("{} reports {id} running off {node}", orch.name),
            None => format!("{} reports {id} running", orch.name),
        };
        self.wait(60, &what, || async {
            orch.status(id).filter(|s| {
                s.phase == "running"
                    && off.is_none_or(|n| s.node.as_ref().is_some_and(|x| x.as_str() != n))
            })
        })
        .await
    }

    /// Waits until only the pod of `epoch` is left of `id`'s pods, and it is not terminating.
    async fn only_pod(&self, id: &str, epoch: Epoch) {
        self.wait(
            30,
            &format!("only the pod of {id} epoch {epoch} is left"),
            || async {
                let pods = self.pods(id).await;
                (pods.len() == 1 && pods.get(&epoch.0).is_some_and(|(t, _)| !t)).then_some(())
            },
        )
        .await;
    }

    /// Polls `check` every 20 ms until it returns `Some`, for at most `secs` seconds; on a
    /// timeout, fails with the processes' logs.
    async fn wait<T, F, Fut>(&self, secs: u64, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let logs = match &self.fake {
                    Some(f) => format!(
                        "processes started: {:#?}\n{}",
                        f.kubelet.started(),
                        f.kubelet.logs()
                    ),
                    None => String::new(),
                };
                panic!("timed out waiting until {what}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets the counters count for a moment.
    async fn count_a_while(&self) {
        tokio::time::sleep(Duration::from_millis(600)).await;
    }

    /// Waits for a committed checkpoint of `id` and returns its ownership row: where its
    /// count stood before a disruption.
    async fn checkpointed(&self, id: &str) -> Ownership {
        self.wait(20, &format!("{id} has a committed checkpoint"), || async {
            let row = self.ownership(id).await;
            row.committed.map(|_| row)
        })
        .await
    }

    /// Checks that `id`'s count went on through a move from `before` (its ownership row
    /// then) to `epochs` (every epoch that counted, in order): with the fake, from the output
    /// every process wrote, every count exactly once (`exactly_once`) or at least once with
    /// no two writers; against a real cluster, whose pods write their output where the test
    /// cannot read it, from the store: the new owner's committed count is past the old one.
    async fn assert_continued(
        &self,
        id: &str,
        before: &Ownership,
        epochs: &[u64],
        exactly_once: bool,
    ) {
        if self.fake.is_some() {
            let log = dory_embedded::read_output(&self.dir.path().join("output"), &pid(id))
                .expect("the output");
            let seen = if exactly_once {
                assert_counted_exactly_once(id, &log)
            } else {
                assert_one_writer(id, &log)
            };
            assert_eq!(seen, epochs, "{id}: the epochs that counted");
            eprintln!("{id}: {} counts by epochs {seen:?}", log.messages.len());
            return;
        }
        let last = Epoch(*epochs.last().unwrap());
        let (from, counted) = before
            .committed
            .expect("a checkpoint before the disruption");
        let row = self
            .wait(
                20,
                &format!("{id} commits a checkpoint as {last}"),
                || async {
                    let row = self.ownership(id).await;
                    row.committed.is_some_and(|(e, _)| e == last).then_some(row)
                },
            )
            .await;
        let (_, now_counted) = row.committed.unwrap();
        assert_eq!(row.owner, Some(last));
        assert!(
            now_counted > counted,
            "{id}: {last} committed count {now_counted}, not past {from}'s {counted}: the state did not come along"
        );
    }
}

const LEASE_NAME: &str = "dory-orchestrator";

// ---------------------------------------------------------------- cluster actions (API)

impl Rig {
    /// `kubectl cordon`.
    async fn cordon(&self, node: &str) {
        self.touched.lock().unwrap().insert(node.into(), true);
        let nodes: Api<Node> = Api::all(self.client.clone());
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "unschedulable": true } })),
            )
            .await
            .expect("cordon the node");
    }

    /// Adds a `NoSchedule` taint, as the AWS Node Termination Handler does on a spot
    /// interruption notice.
    async fn taint(&self, node: &str, key: &str) {
        self.touched
            .lock()
            .unwrap()
            .entry(node.into())
            .or_insert(false);
        let nodes: Api<Node> = Api::all(self.client.clone());
        let current = nodes.get(node).await.expect("read the node");
        let mut taints: Vec<serde_json::Value> = current
            .spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .map(|t| serde_json::to_value(t).unwrap())
            .collect();
        taints.push(serde_json::json!({ "key": key, "value": "true", "effect": "NoSchedule" }));
        // With the node's resourceVersion: a taint someone else added meanwhile is not lost.
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": { "resourceVersion": current.metadata.resource_version },
                    "spec": { "taints": taints }
                })),
            )
            .await
            .expect("taint the node");
    }
}

// ---------------------------------------------------------------- output checks

/// Checks a counter's output: every count from 1 to the last exactly once, each payload its
/// sequence; returns the epochs in the order they wrote.
fn assert_counted_exactly_once(id: &str, log: &OutputLog) -> Vec<u64> {
    assert!(
        log.damaged.is_empty(),
        "{id}: damaged lines {:?}",
        log.damaged
    );
    assert!(!log.messages.is_empty(), "{id}: no output at all");
    let mut epochs = Vec::new();
    for (i, m) in log.messages.iter().enumerate() {
        let expected = i as u64 + 1;
        assert_eq!(
            m.sequence.0, expected,
            "{id}: message {i} has sequence {} (a gap or a repeat); epochs so far {epochs:?}",
            m.sequence.0
        );
        assert_payload(id, m);
        if epochs.last() != Some(&m.epoch.0) {
            epochs.push(m.epoch.0);
        }
    }
    epochs
}

fn assert_payload(id: &str, m: &OutputMessage) {
    assert_eq!(
        String::from_utf8_lossy(&m.payload),
        m.sequence.0.to_string(),
        "{id}: the count does not match its sequence"
    );
}

/// Checks a counter's output after a failover, where the replacement restores the last
/// checkpoint and may count again what the lost instance had counted after it: epochs never
/// interleave (once a higher epoch wrote, no lower one writes again), each epoch counts up
/// by one, and no count from 1 to the last is missing. Returns the epochs in order.
fn assert_one_writer(id: &str, log: &OutputLog) -> Vec<u64> {
    assert!(
        log.damaged.is_empty(),
        "{id}: damaged lines {:?}",
        log.damaged
    );
    let mut stretches: Vec<(u64, u64)> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in log.messages.iter().enumerate() {
        assert_payload(id, m);
        let (epoch, seq) = (m.epoch.0, m.sequence.0);
        match stretches.last_mut() {
            Some((e, last)) if *e == epoch => {
                assert_eq!(
                    seq,
                    *last + 1,
                    "{id}: message {i}: epoch {epoch} skipped or repeated a count"
                );
                *last = seq;
            }
            previous => {
                if let Some((e, _)) = previous {
                    assert!(
                        epoch > *e,
                        "{id}: message {i}: epoch {epoch} wrote after epoch {e} (two writers)"
                    );
                }
                stretches.push((epoch, seq));
            }
        }
        seen.insert(seq);
    }
    let last = seen.last().copied().unwrap_or(0);
    let missing: Vec<u64> = (1..=last).filter(|s| !seen.contains(s)).take(10).collect();
    assert!(missing.is_empty(), "{id}: counts missing: {missing:?}");
    stretches.iter().map(|(e, _)| *e).collect()
}

// ---------------------------------------------------------------- scenarios

/// `kubectl cordon` (the first step of `kubectl drain`): the processor moves make-before-break
/// to another node, the old pod goes, and the count goes on without a step lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_moves_the_processor_make_before_break_with_its_state() {
    let Some(rig) = Rig::new(&["drained"]).await else {
        return;
    };
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "drained", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("drained").await;
    rig.count_a_while().await;

    rig.cordon(node.as_str()).await;
    let after = rig.running(&orch, "drained", Some(node.as_str())).await;
    let moved = orch.moved("drained");
    let new_epoch = after.epoch.unwrap();
    assert_eq!(moved.len(), 1, "one move: {moved:?}");
    assert_eq!((moved[0].0, moved[0].1), (epoch, new_epoch));
    rig.only_pod("drained", new_epoch).await;
    if let Some(fake) = &rig.fake {
        assert!(
            !fake
                .kubelet
                .running()
                .contains_key(&format!("drained-{}", epoch.0)),
            "the old process is gone"
        );
    }
    assert_eq!(rig.ownership("drained").await.owner, Some(new_epoch));

    rig.count_a_while().await;
    rig.assert_continued("drained", &counted, &[epoch.0, new_epoch.0], true)
        .await;
}

/// The AWS Node Termination Handler's spot interruption taint: the processor is moved (a
/// full move, the deadline leaves time for one) before the two-minute deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_taint_moves_the_processor_before_the_deadline() {
    let Some(rig) = Rig::new(&["spot"]).await else {
        return;
    };
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "spot", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("spot").await;
    rig.count_a_while().await;

    rig.taint(node.as_str(), SPOT_TAINT).await;
    let interruption = rig
        .wait(10, "the orchestrator sees the interruption", || async {
            let view = orch.handle.view();
            view.observed
                .nodes
                .iter()
                .find(|n| n.id == node)
                .and_then(|n| n.interruption.clone())
        })
        .await;
    assert_eq!(
        interruption.reason,
        dory_core::InterruptionReason::SpotReclaim,
        "{interruption:?}"
    );
    let deadline = interruption.deadline.expect("a spot notice has a deadline");
    let after = rig.running(&orch, "spot", Some(node.as_str())).await;
    let new_epoch = after.epoch.unwrap();
    let moved = orch.moved("spot");
    assert_eq!(
        moved.len(),
        1,
        "one full move, not an evacuation: {moved:?}"
    );
    assert_eq!((moved[0].0, moved[0].1), (epoch, new_epoch));
    assert!(
        moved[0].3 < deadline,
        "moved at {} after the deadline {deadline}",
        moved[0].3
    );
    rig.only_pod("spot", new_epoch).await;
    rig.count_a_while().await;
    rig.assert_continued("spot", &counted, &[epoch.0, new_epoch.0], true)
        .await;
}

/// A reclaim notice whose deadline is too close for a full move (3 s, under the planner's
/// 5 s `min_move_time`): the processor is evacuated instead (frozen, its snapshot committed
/// to a new epoch, the old pod deleted, the new epoch restored on another node), and the node
/// dying at the deadline takes nothing with it: every count exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_deadline_too_short_for_a_move_evacuates_through_a_checkpoint() {
    let Some(mut rig) = Rig::new(&["evacuated"]).await else {
        return;
    };
    let deadline = Duration::from_secs(3);
    rig.kube.signals.taints.push(TaintSignal {
        key: SHORT_RECLAIM_TAINT.into(),
        reason: dory_core::InterruptionReason::SpotReclaim,
        deadline: Some(deadline),
    });
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "evacuated", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("evacuated").await;
    rig.count_a_while().await;

    rig.taint(node.as_str(), SHORT_RECLAIM_TAINT).await;
    let tainted = tokio::time::Instant::now();
    let after = rig.running(&orch, "evacuated", Some(node.as_str())).await;
    let new_epoch = after.epoch.unwrap();
    let evacuated = orch.events().iter().any(|e| {
        matches!(&e.kind, EventKind::Began { action: Action::Evacuate { from, .. } } if *from == epoch)
    });
    assert!(evacuated, "not an evacuation: {:?}", orch.events());
    assert_eq!(orch.moved("evacuated").len(), 1, "{:?}", orch.events());
    if let Some(fake) = &rig.fake {
        // The machine goes at the deadline.
        tokio::time::sleep_until(tainted + deadline).await;
        fake.kubelet.kill_node(node.as_str());
        fake.server
            .set_node_ready(node.as_str(), "Unknown")
            .unwrap();
    }
    rig.only_pod("evacuated", new_epoch).await;
    rig.count_a_while().await;
    rig.assert_continued("evacuated", &counted, &[epoch.0, new_epoch.0], true)
        .await;
}

/// A node that dies (its processes killed, its Ready condition `Unknown`): once the lost-node
/// grace period and the owner's lease are over, the processor is started elsewhere from its
/// last checkpoint; no count is missing and the lost instance never writes again. When the
/// node comes back, its stale pod is deleted.
///
/// Fake only: killing a machine's processes is the in-test kubelet's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_not_ready_fails_over_after_the_grace_period() {
    let Some(rig) = Rig::new(&["lost"]).await else {
        return;
    };
    let Some(fake) = rig.fake_only("killing a node") else {
        return;
    };
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "lost", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("lost").await;
    rig.count_a_while().await;

    fake.kubelet.kill_node(node.as_str());
    // Kubernetes condition times have one-second resolution: the node's not-ready transition
    // is stamped with the second it happened in.
    let lost_at = Timestamp(now().0 / 1000 * 1000);
    fake.server
        .set_node_ready(node.as_str(), "Unknown")
        .unwrap();
    let after = rig.running(&orch, "lost", Some(node.as_str())).await;
    let new_epoch = after.epoch.unwrap();
    let started: Vec<(Epoch, StartReason, Timestamp)> = orch
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Started { epoch, reason, .. } => Some((epoch, reason, e.at)),
            _ => None,
        })
        .collect();
    let failover = started
        .iter()
        .find(|(e, _, _)| *e == new_epoch)
        .unwrap_or_else(|| panic!("no start of {new_epoch}: {started:?}"));
    assert_eq!(failover.1, StartReason::Failover, "{started:?}");
    // A lower bound only: a slow machine makes it later, never earlier.
    assert!(
        failover.2 >= lost_at.plus(NODE_LOST_GRACE),
        "failed over at {} before the grace period after {lost_at} was over",
        failover.2
    );
    assert!(
        orch.moved("lost").is_empty(),
        "a lost node's processor is not moved"
    );
    rig.count_a_while().await;
    rig.assert_continued("lost", &counted, &[epoch.0, new_epoch.0], false)
        .await;

    // The node is back: the lost instance's pod (its process died with the machine) goes.
    fake.kubelet.revive_node(node.as_str());
    fake.server.set_node_ready(node.as_str(), "True").unwrap();
    rig.only_pod("lost", new_epoch).await;
    assert_eq!(rig.ownership("lost").await.owner, Some(new_epoch));
}

/// `kubectl drain`: cordon, then evict. The PodDisruptionBudget refuses the eviction (`429`)
/// while the pod is the processor's owner; Dory, seeing the cordon, moves the processor, and
/// once the move is done the old pod is deleted (an eviction of it then goes through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_is_refused_by_the_budget_until_the_move_is_done() {
    let Some(rig) = Rig::new(&["evicted"]).await else {
        return;
    };
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "evicted", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("evicted").await;
    rig.count_a_while().await;

    rig.cordon(node.as_str()).await;
    let pods: Api<Pod> = Api::namespaced(rig.client.clone(), rig.ns());
    let name = format!("evicted-{}", epoch.0);
    // As `kubectl drain` does: try again while the budget refuses.
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        match pods.evict(&name, &EvictParams::default()).await {
            Err(kube::Error::Api(s)) if s.code == 429 => refused += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => break "gone",
            Ok(_) => break "evicted",
            Err(e) => panic!("evict {name}: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the eviction was refused for 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Whatever let the eviction through, the processor had already moved on.
    let owner = rig.ownership("evicted").await.owner.unwrap();
    assert!(
        owner > epoch,
        "the eviction went through ({outcome}) while {epoch} still owned the processor"
    );
    assert!(refused > 0, "the budget never refused the eviction");
    let after = rig.running(&orch, "evicted", Some(node.as_str())).await;
    assert_eq!(after.epoch, Some(owner));
    let moved = orch.moved("evicted");
    assert_eq!(moved.len(), 1, "{moved:?}");
    rig.only_pod("evicted", owner).await;
    rig.count_a_while().await;
    rig.assert_continued("evicted", &counted, &[epoch.0, owner.0], true)
        .await;
}

/// Two orchestrator replicas with a Lease: one leads and acts, the other stands by; when the
/// leader dies without giving the Lease back, the other takes over once the Lease has lapsed,
/// adopts the running instance as it is, and acts on the next cordon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_takes_over_when_the_lease_lapses() {
    let Some(rig) = Rig::new(&["leased"]).await else {
        return;
    };
    let one = rig.orchestrator_with_lease("replica-1").await;
    let two = rig.orchestrator_with_lease("replica-2").await;
    let (leader, standby) = rig
        .wait(20, "one replica leads", || async {
            match (one.leading(), two.leading()) {
                (true, false) => Some((&one, &two)),
                (false, true) => Some((&two, &one)),
                _ => None,
            }
        })
        .await;
    let before = rig.running(leader, "leased", None).await;
    rig.count_a_while().await;
    assert!(!standby.leading(), "two leaders");
    let acted = |o: &Orch| {
        o.events()
            .iter()
            .any(|e| matches!(e.kind, EventKind::Leading { .. } | EventKind::Began { .. }))
    };
    assert!(!acted(standby), "the standby acted: {:?}", standby.events());

    leader.crash();
    let lease: Api<Lease> = Api::namespaced(rig.client.clone(), rig.ns());
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity);
    assert_eq!(
        holder(lease.get(LEASE_NAME).await.unwrap()).as_deref(),
        Some(leader.name.as_str()),
        "a crashed leader does not give the Lease back"
    );
    let adopted = rig.running(standby, "leased", None).await;
    assert_eq!(
        (adopted.epoch, &adopted.node),
        (before.epoch, &before.node),
        "the new leader adopts the instance as it runs"
    );
    assert_eq!(
        holder(lease.get(LEASE_NAME).await.unwrap()).as_deref(),
        Some(standby.name.as_str())
    );
    let counted = rig.checkpointed("leased").await;

    let node = before.node.unwrap();
    rig.cordon(node.as_str()).await;
    let after = rig.running(standby, "leased", Some(node.as_str())).await;
    assert_eq!(standby.moved("leased").len(), 1);
    rig.only_pod("leased", after.epoch.unwrap()).await;
    rig.count_a_while().await;
    let epochs = [before.epoch.unwrap().0, after.epoch.unwrap().0];
    rig.assert_continued("leased", &counted, &epochs, true)
        .await;
}

/// The orchestrator dies in the middle of a move (its replacement pod is up); a new one
/// rolls the move back or forward and then finishes moving off the cordoned node: one owner
/// in the end, one pod, and the count never written by two instances at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_in_the_middle_of_a_move_converges() {
    let Some(rig) = Rig::new(&["interrupted"]).await else {
        return;
    };
    let first = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&first, "interrupted", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("interrupted").await;
    rig.count_a_while().await;

    rig.cordon(node.as_str()).await;
    let replacement = epoch.0 + 1;
    rig.wait(30, "the replacement pod is ready", || async {
        rig.pods("interrupted")
            .await
            .get(&replacement)
            .is_some_and(|(_, ready)| *ready)
            .then_some(())
    })
    .await;
    let began_move = first.events().iter().any(|e| {
        matches!(&e.kind, EventKind::Began { action: Action::Move { from, .. } } if *from == epoch)
    });
    assert!(began_move, "{:?}", first.events());
    first.crash();
    drop(first);

    let second = rig.orchestrator("orchestrator-2").await;
    let after = rig
        .running(&second, "interrupted", Some(node.as_str()))
        .await;
    let owner = after.epoch.unwrap();
    rig.only_pod("interrupted", owner).await;
    assert_eq!(rig.ownership("interrupted").await.owner, Some(owner));
    rig.count_a_while().await;
    // Rolled forward, the replacement counts on; rolled back and moved again, the next
    // move's replacement does (the rolled-back one never counted). No instance crashed, so
    // nothing is counted twice either way.
    rig.assert_continued("interrupted", &counted, &[epoch.0, owner.0], true)
        .await;
}

/// The orchestrator dies right after a move's commit, before the old pod is deleted (every
/// pod delete fails with a `500` until then): a new one finds two instances whose owner is the
/// replacement, rolls the move forward (the old pod goes) and claims no further epoch.
///
/// Fake only: failing the deletes is the fake's fault injection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orchestrator_killed_after_the_commit_rolls_the_move_forward() {
    let Some(rig) = Rig::new(&["forward"]).await else {
        return;
    };
    let Some(fake) = rig.fake_only("failing pod deletes") else {
        return;
    };
    let first = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&first, "forward", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("forward").await;
    rig.count_a_while().await;

    fake.server.inject(
        Fault::new(500)
            .verb(Verb::Delete)
            .resource("pods")
            .times(u32::MAX),
    );
    rig.cordon(node.as_str()).await;
    let replacement = Epoch(epoch.0 + 1);
    rig.wait(30, "the move is committed", || async {
        (rig.ownership("forward").await.owner == Some(replacement)).then_some(())
    })
    .await;
    first.crash();
    drop(first);
    fake.server.clear_faults();
    assert_eq!(
        rig.pods("forward").await.get(&epoch.0).map(|(t, _)| *t),
        Some(false),
        "the old pod is still there when the orchestrator dies"
    );

    let second = rig.orchestrator("orchestrator-2").await;
    let after = rig.running(&second, "forward", Some(node.as_str())).await;
    assert_eq!(after.epoch, Some(replacement));
    rig.only_pod("forward", replacement).await;
    let row = rig.ownership("forward").await;
    assert_eq!(
        (row.owner, row.highest_epoch),
        (Some(replacement), replacement),
        "rolled forward, nothing claimed since"
    );
    rig.count_a_while().await;
    rig.assert_continued("forward", &counted, &[epoch.0, replacement.0], true)
        .await;
}

/// Every watch expires (`410 Gone` on resume, as after an etcd compaction), once in a quiet
/// steady state and again in the middle of a move: the placement lists again and carries on,
/// with no write in the quiet phase and exactly one pod created for the move.
///
/// Fake only: expiring every watch at once is the fake's hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_resync_without_duplicate_actions() {
    let Some(rig) = Rig::new(&["resynced"]).await else {
        return;
    };
    let Some(fake) = rig.fake_only("expiring every watch") else {
        return;
    };
    let server = &fake.server;
    let orch = rig.orchestrator("orchestrator-1").await;
    let before = rig.running(&orch, "resynced", None).await;
    let (node, epoch) = (before.node.clone().unwrap(), before.epoch.unwrap());
    let counted = rig.checkpointed("resynced").await;
    rig.count_a_while().await;

    let quiet = server.mark();
    server.expire_watches();
    rig.wait(10, "the pods are listed again", || async {
        let lists = server
            .requests_since(quiet)
            .iter()
            .filter(|r| r.verb == Verb::List && r.resource == "pods")
            .count();
        (lists > 0).then_some(())
    })
    .await;
    // A few rounds of the orchestrator on the re-listed state.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes: Vec<_> = server
        .requests_since(quiet)
        .into_iter()
        .filter(|r| !matches!(r.verb, Verb::Get | Verb::List | Verb::Watch))
        .collect();
    assert!(
        writes.is_empty(),
        "writes after a resync with nothing changed: {writes:?}"
    );
    let same = rig.running(&orch, "resynced", None).await;
    assert_eq!(same.epoch, Some(epoch), "nothing restarted");

    let moving = server.mark();
    rig.cordon(node.as_str()).await;
    rig.wait(20, "the replacement pod is created", || async {
        rig.pods("resynced")
            .await
            .contains_key(&(epoch.0 + 1))
            .then_some(())
    })
    .await;
    server.expire_watches();
    let after = rig.running(&orch, "resynced", Some(node.as_str())).await;
    let new_epoch = after.epoch.unwrap();
    rig.only_pod("resynced", new_epoch).await;
    let creates: Vec<_> = server
        .requests_since(moving)
        .into_iter()
        .filter(|r| r.verb == Verb::Create && r.resource == "pods")
        .collect();
    assert_eq!(
        creates.len(),
        1,
        "one pod created for one move: {creates:?}"
    );
    assert_eq!(creates[0].code, 201);
    assert_eq!(orch.moved("resynced").len(), 1);
    rig.count_a_while().await;
    rig.assert_continued("resynced", &counted, &[epoch.0, new_epoch.0], true)
        .await;
}
