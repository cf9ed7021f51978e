//! [`KubePlacement`]: the [`Placement`] of a Kubernetes cluster, and [`KubeControl`], the
//! instance control channel that keeps its phases exact.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dory_control::{ClientSettings, HttpControl};
use dory_core::{
    ChangeNotifier, Changes, Clock, ControlEndpoint, Epoch, Health, Instance, InstanceControl,
    LaunchRequest, Node, NodeId, Phase, Placement, ProcessorId, SnapshotMeta, SystemClock,
    Timestamp,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, Secret};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::KubeConfig;
use crate::error::KubeError;
use crate::nodes;
use crate::pods::{self, PodState, PodView};
use crate::writes::Writes;

type Key = (ProcessorId, Epoch);

/// How long `instances()` and `nodes()` wait for the watches' first full list and the first
/// look at adopted instances.
const SYNC_WAIT: Duration = Duration::from_secs(30);
/// How long a launch waits for its pod to show up in the watch, so the next `instances()`
/// lists it.
const LAUNCH_VISIBLE_WAIT: Duration = Duration::from_secs(10);
/// The longest pause between retries of a failing health check or token read of one pod.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What the placement knows of one instance beyond its pod object.
#[derive(Clone, Debug, Default)]
struct Tracked {
    /// The pod's uid when last seen: another uid is another pod (never with Dory's names, but
    /// a hand-made one) and starts over.
    uid: Option<String>,
    /// The bearer token, from the launch or read from the instance's Secret.
    token: Option<String>,
    /// What the instance last said about its phase.
    health: Option<Phase>,
    /// The answer stands until the pod changes: set for `Running`, which only a control call
    /// (seen by [`KubeControl`]) or the instance itself (its readiness drops) changes.
    settled: bool,
    /// The pod state the answer was given under.
    seen: Option<PodState>,
    /// Bumped by every direct change (launch, terminate, control call), so a check that
    /// started before it does not overwrite it.
    generation: u64,
    /// Asked to terminate by this placement (the watch shows it a moment later).
    terminating: bool,
    /// Failed checks in a row, and when the next may run.
    failures: u32,
    retry_at: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct State {
    tracked: BTreeMap<Key, Tracked>,
    /// When each signal taint without a `timeAdded` was first seen, by (node, key), so its
    /// deadline does not slide.
    first_seen: BTreeMap<(String, String), Timestamp>,
    /// What `instances()` and `nodes()` answer.
    instances: Vec<Instance>,
    nodes: Vec<Node>,
    next_generation: u64,
    /// Instances a launch is creating: the launch itself records their token once their
    /// Secret is written, so a pass that sees the pod first does not read the Secret (at
    /// scale, most launched pods reach the watch before their Secret exists).
    launching: BTreeSet<Key>,
}

/// Marks an instance as being launched for as long as it lives; when it goes (the launch
/// returned, failed or was dropped), the next pass looks at the instance.
struct Launching<'a> {
    inner: &'a Inner,
    key: Key,
}

impl<'a> Launching<'a> {
    fn new(inner: &'a Inner, key: Key) -> Self {
        lock(&inner.state).launching.insert(key.clone());
        Launching { inner, key }
    }
}

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        lock(&self.inner.state).launching.remove(&self.key);
        self.inner.poke.notify_one();
    }
}

struct Inner {
    config: KubeConfig,
    clock: Arc<dyn Clock>,
    pods: Api<Pod>,
    secrets: Api<Secret>,
    pdbs: Api<PodDisruptionBudget>,
    pod_store: Store<Pod>,
    node_store: Store<KubeNode>,
    writes: Writes,
    control: HttpControl,
    notifier: ChangeNotifier,
    state: Mutex<State>,
    /// Wakes the background pass (a watch event, a direct change).
    poke: Notify,
    /// Bumped on every pod watch event, for a launch waiting to see its pod.
    pod_events: watch::Sender<u64>,
    /// Set once the first pass after both initial lists is done.
    synced: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The [`Placement`] of a Kubernetes cluster: one pod per instance, pinned to the node the
/// planner chose.
///
/// **Observation is by watch, never by polling the API.** Pods (selected by
/// `app.kubernetes.io/managed-by=dory`), nodes and the PodDisruptionBudget are followed
/// through kube-runtime watchers into reflector stores, which re-list by themselves after a
/// `410 Gone`; [`instances`](Placement::instances) and [`nodes`](Placement::nodes) answer from
/// them (the first answer waits for the initial lists).
///
/// **Phases.** The pod tells `Starting` (pending, pulling, no IP), `Terminating`
/// (`deletionTimestamp`) and the end (`Exited` with the container's exit code, `Failed` with
/// the pod's reason, or `Failed` when its node object is gone). A live pod's readiness cannot
/// tell `Standby`, `Running` and `Frozen` apart (`/readyz` passes for all three), so the
/// instance's own `GET /healthz` does, but only while the phase is unsettled: a pod not seen
/// before (a launch, or every pod once after an orchestrator restart), one whose status
/// changed (readiness dropped when the instance froze itself, a new IP), or one the
/// orchestrator just froze, loaded or resumed through [`KubeControl`]. A `Running` answer
/// settles it. With every instance running and nothing changing, the placement makes no
/// request at all beyond its watches.
///
/// **Writes** (pods, Secrets, the PDB) go through one token bucket and are retried with
/// backoff on `429`, `5xx` and lost answers; a `409` is never overwritten: a pod create that
/// meets one is a [`Conflict`](dory_core::Error::Conflict) (unless the pod is its own earlier
/// attempt), and the PDB is re-read and replaced with its `resourceVersion`.
///
/// **Tokens** never appear in a pod spec: each instance's token is in a Secret of the pod's
/// name that the pod owns (created right after the pod, with the pod's uid, so a crash in
/// between leaves no orphan Secret; the pod waits for it in `ContainerCreating`). A restarted
/// orchestrator reads the token back from the Secret.
pub struct KubePlacement {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubePlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubePlacement")
            .field("namespace", &self.inner.config.namespace)
            .finish_non_exhaustive()
    }
}

impl Drop for KubePlacement {
    fn drop(&mut self) {
        for task in lock(&self.inner.tasks).drain(..) {
            task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KubePlacement {
    /// Starts the placement on the current tokio runtime: ensures the PodDisruptionBudget
    /// exists, then starts the pod, node and PDB watches and the background pass. Instances
    /// already running (launched by an earlier orchestrator) are adopted from the first pod
    /// list.
    pub async fn start(client: Client, config: KubeConfig) -> Result<KubePlacement, KubeError> {
        KubePlacement::start_with_clock(client, config, Arc::new(SystemClock)).await
    }

    /// [`start`](KubePlacement::start) with the clock that stamps first sightings of signal
    /// taints.
    pub async fn start_with_clock(
        client: Client,
        config: KubeConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<KubePlacement, KubeError> {
        if config.namespace.is_empty() {
            return Err(KubeError::Config("`namespace` is empty".into()));
        }
        if config.instance.store_url.is_empty() {
            return Err(KubeError::Config(
                "`instance.store_url` is empty: instances need their state store".into(),
            ));
        }
        let ns = config.namespace.as_str();
        let control = HttpControl::with_settings(
            ClientSettings::default()
                .with_timeout(config.health.timeout)
                .with_connect_timeout(config.health.timeout),
        );
        let (pod_store, pod_writer) = reflector::store::<Pod>();
        let (node_store, node_writer) = reflector::store::<KubeNode>();
        let inner = Arc::new(Inner {
            pods: Api::namespaced(client.clone(), ns),
            secrets: Api::namespaced(client.clone(), ns),
            pdbs: Api::namespaced(client.clone(), ns),
            writes: Writes::new(config.writes.clone()),
            config,
            clock,
            pod_store,
            node_store,
            control,
            notifier: ChangeNotifier::new(),
            state: Mutex::new(State::default()),
            poke: Notify::new(),
            pod_events: watch::channel(0).0,
            synced: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        });
        inner.ensure_pdb().await?;
        let pod_watch = {
            let weak = Arc::downgrade(&inner);
            let stream = watcher(
                inner.pods.clone(),
                watcher::Config::default().labels(&pods::managed_selector()),
            )
            // Managed fields are a large part of every object and never read.
            .modify(|p| p.managed_fields_mut().clear())
            .default_backoff()
            .reflect(pod_writer);
            follow("pods", stream, move || {
                if let Some(inner) = weak.upgrade() {
                    inner.pod_events.send_modify(|n| *n = n.wrapping_add(1));
                    inner.poke.notify_one();
                }
            })
        };
        let node_watch = {
            let weak = Arc::downgrade(&inner);
            let stream = watcher(Api::<KubeNode>::all(client), watcher::Config::default())
                .modify(|n| {
                    n.managed_fields_mut().clear();
                    // The image list is the bulk of a node's status and never read.
                    if let Some(status) = n.status.as_mut() {
                        status.images = None;
                    }
                })
                .default_backoff()
                .reflect(node_writer);
            follow("nodes", stream, move || {
                if let Some(inner) = weak.upgrade() {
                    inner.poke.notify_one();
                }
            })
        };
        let pdb_watch = pdb_guard(Arc::downgrade(&inner));
        let pass = pass_loop(Arc::downgrade(&inner));
        let span = tracing::info_span!(target: "dory::k8s", "k8s_placement", namespace = %inner.config.namespace);
        {
            let mut tasks = lock(&inner.tasks);
            for task in [
                tokio::spawn(pod_watch.instrument(span.clone())),
                tokio::spawn(node_watch.instrument(span.clone())),
                tokio::spawn(pdb_watch.instrument(span.clone())),
                tokio::spawn(pass.instrument(span)),
            ] {
                tasks.push(task);
            }
        }
        tracing::info!(target: "dory::k8s", namespace = %inner.config.namespace, "kubernetes placement started");
        Ok(KubePlacement { inner })
    }

    /// The configuration.
    pub fn config(&self) -> &KubeConfig {
        &self.inner.config
    }

    /// The instance control channel to use with this placement: [`HttpControl`] reaching
    /// each pod at its IP and the SDK port, which also tells the placement when a call may
    /// have changed an instance's phase, so the phase is checked again instead of trusted.
    pub fn control(&self) -> KubeControl {
        KubeControl {
            http: HttpControl::new(),
            placement: Arc::downgrade(&self.inner),
        }
    }

    /// Waits until the watches have listed and the first look at every instance is done
    /// (what `instances()` waits for, bounded).
    pub async fn synced(&self) {
        let mut synced = self.inner.synced.subscribe();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Looks at every pod now instead of waiting for the next pass.
    pub fn refresh(&self) {
        self.inner.poke.notify_one();
    }

    async fn wait_synced(&self, what: &'static str) -> Result<(), KubeError> {
        match tokio::time::timeout(SYNC_WAIT, self.synced()).await {
            Ok(()) => Ok(()),
            Err(_) => Err(KubeError::NotSynced { what }),
        }
    }
}

/// Drives a reflected watch stream, calling `changed` after every event; errors are logged
/// (the stream backs off and re-lists by itself).
async fn follow<S, K>(what: &'static str, stream: S, changed: impl Fn())
where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    tracing::info!(target: "dory::k8s", what, "watch resumed");
                    failing = false;
                }
                if !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    changed();
                }
            }
            Err(e) => {
                // A `410 Gone` is not an error for the caller: the watcher re-lists and the
                // reflector replaces its store, so the next look is whole again.
                tracing::warn!(target: "dory::k8s", what, "watch error (it backs off and re-lists): {e}");
                failing = true;
            }
        }
    }
}

/// Keeps the PodDisruptionBudget in place: watches it and re-creates it when it is deleted.
async fn pdb_guard(inner: Weak<Inner>) {
    let Some(strong) = inner.upgrade() else {
        return;
    };
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", strong.config.pdb_name));
    let stream = watcher(strong.pdbs.clone(), config).default_backoff();
    drop(strong);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    while let Some(event) = stream.next().await {
        let missing = match event {
            Ok(watcher::Event::Delete(_)) => true,
            Ok(watcher::Event::Init) => {
                listed = false;
                false
            }
            Ok(watcher::Event::InitApply(_) | watcher::Event::Apply(_)) => {
                listed = true;
                false
            }
            Ok(watcher::Event::InitDone) => !listed,
            Err(_) => false,
        };
        if missing {
            let Some(inner) = inner.upgrade() else { return };
            tracing::warn!(target: "dory::k8s", pdb = %inner.config.pdb_name, "the PodDisruptionBudget is gone: creating it again");
            if let Err(e) = inner.ensure_pdb().await {
                tracing::warn!(target: "dory::k8s", "{e}");
            }
        }
    }
}

/// The background pass: after both initial lists, on every watch event and direct change,
/// and every `health.interval` while an instance's phase is unsettled.
async fn pass_loop(inner: Weak<Inner>) {
    {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let (pods, nodes) = (strong.pod_store.clone(), strong.node_store.clone());
        drop(strong);
        if pods.wait_until_ready().await.is_err() || nodes.wait_until_ready().await.is_err() {
            return;
        }
    }
    loop {
        let Some(inner) = inner.upgrade() else { return };
        let unsettled = inner.pass().await;
        inner.synced.send_replace(true);
        let interval = inner.config.health.interval;
        // The strong reference is held while waiting: the task is aborted when the
        // placement is dropped.
        let poke = inner.poke.notified();
        if unsettled {
            tokio::select! {
                () = poke => {}
                () = tokio::time::sleep(interval) => {}
            }
        } else {
            poke.await;
        }
    }
}

/// One thing to find out about an instance.
enum Check {
    Health {
        key: Key,
        generation: u64,
        instance: Instance,
    },
    Token {
        key: Key,
        generation: u64,
        pod: String,
    },
}

enum Answer {
    Health(Key, u64, dory_core::Result<Health>),
    Token(Key, u64, Result<Option<String>, KubeError>),
}

impl Inner {
    fn generation(state: &mut State) -> u64 {
        state.next_generation += 1;
        state.next_generation
    }

    /// One look: the stores against what is tracked, the checks that are due, then the
    /// published view. Returns whether an instance is still unsettled.
    async fn pass(&self) -> bool {
        let (checks, pending) = self.due_checks();
        if !checks.is_empty() {
            let answers: Vec<Answer> = futures::stream::iter(checks)
                .map(|check| self.run_check(check))
                .buffer_unordered(self.config.health.concurrency.max(1))
                .collect()
                .await;
            self.apply_answers(answers);
        }
        let mut state = lock(&self.state);
        self.publish(&mut state);
        pending
    }

    fn pod_views(&self) -> BTreeMap<Key, PodView> {
        self.pod_store
            .state()
            .iter()
            .filter_map(|p| pods::view(p))
            .map(|v| ((v.processor.clone(), v.epoch), v))
            .collect()
    }

    fn ready_nodes(&self) -> BTreeSet<NodeId> {
        let state = lock(&self.state);
        state
            .nodes
            .iter()
            .filter(|n| n.ready)
            .map(|n| n.id.clone())
            .collect()
    }

    /// Brings the tracked entries in line with the pod store and lists the checks due now;
    /// also says whether any instance still waits for one (now or after a backoff).
    fn due_checks(&self) -> (Vec<Check>, bool) {
        let views = self.pod_views();
        let ready_nodes = self.ready_nodes();
        let now = tokio::time::Instant::now();
        let mut state = lock(&self.state);
        // Only what is gone from the pod store goes: `views` may predate a pod a launch has
        // just recorded (with its token), and a launch in flight keeps what it recorded.
        let State {
            tracked, launching, ..
        } = &mut *state;
        tracked.retain(|k, _| {
            views.contains_key(k)
                || launching.contains(k)
                || self
                    .pod_store
                    .get(&ObjectRef::new(&pods::pod_name(&k.0, k.1)).within(&self.config.namespace))
                    .is_some()
        });
        let mut checks = Vec::new();
        let mut deferred = false;
        for (key, view) in &views {
            let fresh = Inner::generation(&mut state);
            let launching = state.launching.contains(key);
            let t = state.tracked.entry(key.clone()).or_default();
            if t.uid.is_some() && t.uid != view.uid {
                // Another pod under the same name: nothing known carries over.
                *t = Tracked::default();
            }
            if t.uid.is_none() {
                t.uid = view.uid.clone();
                t.generation = fresh;
            }
            if t.seen.as_ref() != Some(&view.state) {
                t.settled = false;
                t.failures = 0;
                t.retry_at = None;
                t.seen = Some(view.state.clone());
            }
            if matches!(view.state, PodState::Ended(_)) {
                continue;
            }
            let needs_token = t.token.is_none() && !launching;
            let needs_health = matches!(view.state, PodState::Alive { .. })
                && !t.settled
                && !t.terminating
                // An unreachable node's pods cannot answer; their last phase stands until
                // the node's watch event brings it back.
                && ready_nodes.contains(&view.node);
            if !(needs_token || needs_health) {
                continue;
            }
            if t.retry_at.is_some_and(|at| at > now) {
                deferred = true;
                continue;
            }
            if needs_token {
                checks.push(Check::Token {
                    key: key.clone(),
                    generation: t.generation,
                    pod: view.name.clone(),
                });
                continue;
            }
            if let PodState::Alive { ip, .. } = &view.state {
                let instance = instance_of(view, t, &self.config);
                if let Some(mut instance) = instance {
                    instance.endpoint = Some(ControlEndpoint {
                        address: address(ip, self.config.sdk_port),
                        token: t.token.clone().unwrap_or_default(),
                    });
                    checks.push(Check::Health {
                        key: key.clone(),
                        generation: t.generation,
                        instance,
                    });
                }
            }
        }
        let pending = deferred || !checks.is_empty();
        (checks, pending)
    }

    async fn run_check(&self, check: Check) -> Answer {
        match check {
            Check::Health {
                key,
                generation,
                instance,
            } => {
                let answer = self.control.health(&instance).await;
                Answer::Health(key, generation, answer)
            }
            Check::Token {
                key,
                generation,
                pod,
            } => {
                let answer = self
                    .secrets
                    .get_opt(&pod)
                    .await
                    .map(|s| s.as_ref().and_then(pods::secret_token))
                    .map_err(|e| KubeError::api(format!("read secret {pod}"), e));
                Answer::Token(key, generation, answer)
            }
        }
    }

    fn apply_answers(&self, answers: Vec<Answer>) {
        let now = tokio::time::Instant::now();
        let interval = self.config.health.interval;
        let mut state = lock(&self.state);
        for answer in answers {
            let (key, generation) = match &answer {
                Answer::Health(k, g, _) | Answer::Token(k, g, _) => (k.clone(), *g),
            };
            let Some(t) = state.tracked.get_mut(&key) else {
                continue;
            };
            if t.generation != generation {
                continue;
            }
            let ok = match answer {
                // An address answering for another epoch is not this instance.
                Answer::Health(_, _, Ok(h)) if h.epoch == key.1 && !h.phase.is_gone() => {
                    t.settled = h.phase == Phase::Running;
                    t.health = Some(h.phase);
                    true
                }
                Answer::Health(_, _, Ok(h)) => {
                    tracing::warn!(target: "dory::k8s", epoch = (key.1).0, processor.id = %key.0, answered = h.epoch.0, "the pod's address answers for another epoch");
                    false
                }
                Answer::Health(_, _, Err(e)) => {
                    tracing::debug!(target: "dory::k8s", epoch = (key.1).0, processor.id = %key.0, "health check failed: {e}");
                    false
                }
                Answer::Token(_, _, Ok(Some(token))) => {
                    t.token = Some(token);
                    true
                }
                Answer::Token(_, _, Ok(None)) => {
                    // Created by a launch interrupted before its Secret: the pod never starts
                    // and the planner terminates it as a non-owner.
                    tracing::warn!(target: "dory::k8s", epoch = (key.1).0, processor.id = %key.0, "the instance's Secret is missing or holds no token");
                    false
                }
                Answer::Token(_, _, Err(e)) => {
                    tracing::warn!(target: "dory::k8s", epoch = (key.1).0, processor.id = %key.0, "{e}");
                    false
                }
            };
            if ok {
                t.failures = 0;
                t.retry_at = None;
            } else {
                t.failures = t.failures.saturating_add(1);
                let backoff = interval
                    .saturating_mul(1 << t.failures.min(8))
                    .min(RETRY_MAX);
                t.retry_at = Some(now + backoff);
            }
        }
    }

    /// Recomputes the view from the stores and nudges subscribers if it changed.
    fn publish(&self, state: &mut State) {
        let nodes = self.node_view(state);
        let known: BTreeSet<&NodeId> = nodes.iter().map(|n| &n.id).collect();
        let mut instances: Vec<Instance> = Vec::new();
        for (key, view) in self.pod_views() {
            let Some(t) = state.tracked.get(&key) else {
                continue;
            };
            let Some(mut instance) = instance_of(&view, t, &self.config) else {
                continue;
            };
            if !instance.phase.is_gone() && !known.contains(&view.node) {
                instance.phase = Phase::Failed {
                    reason: format!("node {} is gone", view.node),
                };
            }
            instances.push(instance);
        }
        let changed = state.instances != instances || state.nodes != nodes;
        state.instances = instances;
        state.nodes = nodes;
        if changed {
            self.notifier.notify();
        }
    }

    fn node_view(&self, state: &mut State) -> Vec<Node> {
        let now = self.clock.now();
        let keys: BTreeSet<&str> = self
            .config
            .signals
            .taints
            .iter()
            .map(|s| s.key.as_str())
            .collect();
        let mut seen_now = BTreeSet::new();
        let mut nodes = Vec::new();
        for node in self.node_store.state() {
            let name = node.name_any();
            for taint in node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_deref())
                .unwrap_or_default()
            {
                if taint.time_added.is_none() && keys.contains(taint.key.as_str()) {
                    let k = (name.clone(), taint.key.clone());
                    state.first_seen.entry(k.clone()).or_insert(now);
                    seen_now.insert(k);
                }
            }
            let first_seen = &state.first_seen;
            if let Some(n) = nodes::to_model(&node, &self.config, |key| {
                first_seen
                    .get(&(name.clone(), key.to_string()))
                    .copied()
                    .unwrap_or(now)
            }) {
                nodes.push(n);
            }
        }
        state.first_seen.retain(|k, _| seen_now.contains(k));
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    async fn ensure_pdb(&self) -> Result<(), KubeError> {
        let name = self.config.pdb_name.clone();
        let wanted = pods::pdb_manifest(&name, &self.config.namespace);
        let pp = PostParams::default();
        let created = self
            .writes
            .run(&format!("create poddisruptionbudget {name}"), |_| {
                self.pdbs.create(&pp, &wanted)
            })
            .await;
        match created {
            Ok(_) => {
                tracing::info!(target: "dory::k8s", pdb = %name, "PodDisruptionBudget created");
                return Ok(());
            }
            Err(e) if e.status_code() != Some(409) => return Err(e),
            Err(_) => {}
        }
        // It exists: re-read and correct it only if it differs, replacing with its
        // resourceVersion; a 409 means someone changed it meanwhile, so read again.
        for _ in 0..5 {
            let current = self
                .pdbs
                .get(&name)
                .await
                .map_err(|e| KubeError::api(format!("read poddisruptionbudget {name}"), e))?;
            if current.spec.as_ref() == Some(&pods::pdb_spec()) {
                return Ok(());
            }
            let mut fixed = current.clone();
            fixed.spec = Some(pods::pdb_spec());
            fixed.status = None;
            match self
                .writes
                .run(&format!("replace poddisruptionbudget {name}"), |_| {
                    self.pdbs.replace(&name, &pp, &fixed)
                })
                .await
            {
                Ok(_) => {
                    tracing::warn!(target: "dory::k8s", pdb = %name, "PodDisruptionBudget differed from Dory's: corrected");
                    return Ok(());
                }
                Err(e) if e.status_code() == Some(409) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KubeError::Config(format!(
            "poddisruptionbudget {name} keeps changing under Dory"
        )))
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Instance, KubeError> {
        let spec = &request.spec;
        let (processor, epoch) = (&spec.id, request.epoch);
        let name = pods::pod_name(processor, epoch);
        let _launching = Launching::new(self, (processor.clone(), epoch));
        let nonce = pods::new_token()?;
        let manifests = pods::pod_manifest(request, &self.config, pods::new_token()?, &nonce)?;
        let pp = PostParams::default();
        let created = self
            .writes
            .run(&format!("create pod {name}"), |_| {
                self.pods.create(&pp, &manifests.pod)
            })
            .await;
        let pod = match created {
            Ok(pod) => pod,
            Err(e) if e.status_code() == Some(409) => {
                // Our own earlier attempt whose answer was lost, or a real duplicate.
                let existing = self.pods.get_opt(&name).await.ok().flatten();
                let ours = existing
                    .as_ref()
                    .is_some_and(|p| p.annotations().get(pods::ANNOTATION_LAUNCH) == Some(&nonce));
                match existing {
                    Some(pod) if ours => pod,
                    _ => {
                        return Err(KubeError::AlreadyExists {
                            processor: processor.clone(),
                            epoch,
                            pod: name,
                        });
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            return Err(KubeError::Config(format!(
                "the API server returned pod {name} without a uid"
            )));
        };
        let secret = pods::secret_manifest(
            processor,
            epoch,
            &self.config.namespace,
            &uid,
            &manifests.token,
        );
        let token = match self
            .writes
            .run(&format!("create secret {name}"), |_| {
                self.secrets.create(&pp, &secret)
            })
            .await
        {
            Ok(_) => manifests.token.clone(),
            // An earlier attempt's answer was lost: the Secret holds what the pod will read.
            Err(e) if e.status_code() == Some(409) => self
                .secrets
                .get(&name)
                .await
                .ok()
                .as_ref()
                .and_then(pods::secret_token)
                .ok_or(e)?,
            Err(e) => {
                // Without its Secret the pod never starts: take it back now rather than
                // leave it for the planner.
                let _ = self
                    .pods
                    .delete(&name, &DeleteParams::background().grace_period(0))
                    .await;
                return Err(e);
            }
        };
        tracing::info!(target: "dory::k8s", epoch = epoch.0, processor.id = %processor, node = %request.node, mode = %request.mode, pod = %name, "instance launched");
        {
            let mut state = lock(&self.state);
            let generation = Inner::generation(&mut state);
            let t = state.tracked.entry((processor.clone(), epoch)).or_default();
            *t = Tracked {
                uid: Some(uid.clone()),
                token: Some(token),
                generation,
                ..Tracked::default()
            };
        }
        // Returned once the watch has it, so the very next `instances()` lists it.
        let mut events = self.pod_events.subscribe();
        let key = ObjectRef::<Pod>::new(&name).within(&self.config.namespace);
        let visible = tokio::time::timeout(
            LAUNCH_VISIBLE_WAIT,
            events.wait_for(|_| self.pod_store.get(&key).is_some()),
        )
        .await;
        if visible.is_err() {
            tracing::warn!(target: "dory::k8s", pod = %name, "the launched pod has not shown up in the watch yet");
        }
        self.poke.notify_one();
        let view = pods::view(&pod).ok_or_else(|| {
            KubeError::Config(format!(
                "the API server returned pod {name} without its labels"
            ))
        })?;
        let state = lock(&self.state);
        let t = state
            .tracked
            .get(&(processor.clone(), epoch))
            .cloned()
            .unwrap_or_default();
        instance_of(&view, &t, &self.config)
            .ok_or_else(|| KubeError::Config(format!("pod {name} does not describe an instance")))
    }

    async fn terminate(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> Result<(), KubeError> {
        let name = pods::pod_name(processor, epoch);
        // Rounded up: a grace of 0 asks for an immediate kill, which a sub-second grace is
        // not.
        let seconds = u32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(u32::MAX);
        let params = DeleteParams {
            grace_period_seconds: Some(seconds),
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let deleted = self
            .writes
            .run(&format!("delete pod {name}"), |_| {
                self.pods.delete(&name, &params)
            })
            .await;
        match deleted {
            Ok(_) => {
                tracing::info!(target: "dory::k8s", epoch = epoch.0, processor.id = %processor, ?grace, pod = %name, "terminating instance");
            }
            // Already gone: terminate is idempotent.
            Err(e) if e.status_code() == Some(404) => {}
            Err(e) => return Err(e),
        }
        let mut state = lock(&self.state);
        let generation = Inner::generation(&mut state);
        if let Some(t) = state.tracked.get_mut(&(processor.clone(), epoch)) {
            t.terminating = true;
            t.generation = generation;
        }
        self.publish(&mut state);
        Ok(())
    }

    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> Result<(), KubeError> {
        let key = (processor.clone(), epoch);
        let current = {
            let state = lock(&self.state);
            state
                .instances
                .iter()
                .find(|i| (&i.processor, i.epoch) == (processor, epoch))
                .cloned()
        };
        let Some(instance) = current else {
            return Ok(());
        };
        if !instance.phase.is_gone() {
            return Err(KubeError::NotEnded {
                processor: processor.clone(),
                epoch,
                phase: instance.phase.to_string(),
            });
        }
        let name = pods::pod_name(processor, epoch);
        let now = DeleteParams::background().grace_period(0);
        match self
            .writes
            .run(&format!("delete pod {name}"), |_| {
                self.pods.delete(&name, &now)
            })
            .await
        {
            Ok(_) => {}
            Err(e) if e.status_code() == Some(404) => {}
            Err(e) => return Err(e),
        }
        tracing::debug!(target: "dory::k8s", epoch = epoch.0, processor.id = %processor, "instance forgotten");
        let mut state = lock(&self.state);
        state.tracked.remove(&key);
        state
            .instances
            .retain(|i| (&i.processor, i.epoch) != (processor, epoch));
        Ok(())
    }

    /// After a control call: the phase the call implies, if it implies one, and in any case
    /// a fresh check, because the call may have changed it.
    fn after_control(&self, instance: &Instance, implied: Option<Phase>) {
        let mut state = lock(&self.state);
        let generation = Inner::generation(&mut state);
        let Some(t) = state
            .tracked
            .get_mut(&(instance.processor.clone(), instance.epoch))
        else {
            return;
        };
        t.settled = false;
        t.failures = 0;
        t.retry_at = None;
        t.generation = generation;
        if let Some(phase) = implied {
            t.health = Some(phase);
        }
        self.publish(&mut state);
        drop(state);
        self.poke.notify_one();
    }
}

/// `ip:port`, bracketed for IPv6.
fn address(ip: &str, port: u16) -> String {
    match ip.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{ip}:{port}"),
    }
}

/// The instance a pod and what is tracked of it describe.
fn instance_of(view: &PodView, t: &Tracked, config: &KubeConfig) -> Option<Instance> {
    let (phase, endpoint) = match &view.state {
        PodState::Ended(phase) => (phase.clone(), None),
        PodState::Terminating => (Phase::Terminating, None),
        _ if t.terminating => (Phase::Terminating, None),
        PodState::Starting => (Phase::Starting, None),
        PodState::Alive { ip, .. } => {
            let phase = t
                .health
                .clone()
                .filter(|p| !p.is_gone())
                .unwrap_or(Phase::Starting);
            let endpoint = t.token.as_ref().map(|token| ControlEndpoint {
                address: address(ip, config.sdk_port),
                token: token.clone(),
            });
            (phase, endpoint)
        }
    };
    Some(Instance {
        processor: view.processor.clone(),
        epoch: view.epoch,
        node: view.node.clone(),
        phase,
        revision: view.revision,
        started_at: view.started_at,
        endpoint,
    })
}

#[async_trait]
impl Placement for KubePlacement {
    async fn nodes(&self) -> dory_core::Result<Vec<Node>> {
        self.wait_synced("nodes").await?;
        Ok(lock(&self.inner.state).nodes.clone())
    }

    async fn instances(&self) -> dory_core::Result<Vec<Instance>> {
        self.wait_synced("pods").await?;
        Ok(lock(&self.inner.state).instances.clone())
    }

    async fn launch(&self, request: &LaunchRequest) -> dory_core::Result<Instance> {
        let span = tracing::info_span!(target: "dory::k8s", "launch", processor.id = %request.spec.id, epoch = request.epoch.0, node = %request.node);
        Ok(self.inner.launch(request).instrument(span).await?)
    }

    async fn terminate(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> dory_core::Result<()> {
        Ok(self.inner.terminate(processor, epoch, grace).await?)
    }

    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> dory_core::Result<()> {
        Ok(self.inner.forget(processor, epoch).await?)
    }

    fn changes(&self) -> Changes {
        self.inner.notifier.subscribe()
    }
}

/// The [`InstanceControl`] of the Kubernetes placement: [`HttpControl`] (pods are reached at
/// their IP and the SDK port, the address [`KubePlacement`] puts in each instance's
/// endpoint), telling the placement after every call that may change an instance's phase, so
/// the phase it reports is checked again rather than trusted. Get it from
/// [`KubePlacement::control`].
#[derive(Clone)]
pub struct KubeControl {
    http: HttpControl,
    placement: Weak<Inner>,
}

impl std::fmt::Debug for KubeControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeControl").finish_non_exhaustive()
    }
}

impl KubeControl {
    fn changed(&self, instance: &Instance, implied: Option<Phase>) {
        if let Some(inner) = self.placement.upgrade() {
            inner.after_control(instance, implied);
        }
    }
}

#[async_trait]
impl InstanceControl for KubeControl {
    async fn health(&self, instance: &Instance) -> dory_core::Result<Health> {
        self.http.health(instance).await
    }

    async fn freeze(
        &self,
        instance: &Instance,
        timeout: Duration,
    ) -> dory_core::Result<SnapshotMeta> {
        let result = self.http.freeze(instance, timeout).await;
        self.changed(instance, result.is_ok().then_some(Phase::Frozen));
        result
    }

    async fn fetch(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.http.fetch(instance).await
    }

    async fn fetch_full(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.http.fetch_full(instance).await
    }

    async fn precopy(
        &self,
        instance: &Instance,
        timeout: std::time::Duration,
    ) -> dory_core::Result<Vec<u8>> {
        self.http.precopy(instance, timeout).await
    }

    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> dory_core::Result<()> {
        let result = self.http.load(instance, snapshot).await;
        self.changed(instance, None);
        result
    }

    async fn resume(&self, instance: &Instance) -> dory_core::Result<()> {
        let result = self.http.resume(instance).await;
        self.changed(instance, None);
        result
    }

    async fn resume_committed(
        &self,
        instance: &Instance,
        committed: dory_core::Sequence,
    ) -> dory_core::Result<()> {
        let result = self.http.resume_committed(instance, committed).await;
        self.changed(instance, None);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_bracket_ipv6() {
        assert_eq!(address("10.1.2.3", 8080), "10.1.2.3:8080");
        assert_eq!(address("fd00::7", 8080), "[fd00::7]:8080");
    }
}
