//! The server handle: start and stop, clients, test hooks and direct store access.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::hooks::{Fault, Hooks, RecordedRequest, RequestMark, Verb};
use crate::http::{Shared, router};
use crate::resources::{ResourceDef, ResourceId};
use crate::store::{
    DeleteOpts, Deleted, Mode, PodTermination, Settings, Store, Work, labels_object,
};
use crate::util::{meta_str, now, set_condition};

/// Options for [`FakeApiServer`]; start with [`FakeApiServer::builder`].
#[derive(Clone, Debug)]
pub struct FakeApiServerBuilder {
    resources: Vec<ResourceDef>,
    namespaces: Vec<String>,
    history: usize,
    pod_termination: PodTermination,
    scheduler: bool,
    bookmark_interval: Duration,
    latency: Duration,
}

impl Default for FakeApiServerBuilder {
    fn default() -> Self {
        Self {
            resources: ResourceDef::builtins(),
            namespaces: ["default", "kube-system", "kube-public", "kube-node-lease"]
                .map(String::from)
                .to_vec(),
            history: 10_000,
            pod_termination: PodTermination::AwaitKubelet,
            scheduler: false,
            bookmark_interval: Duration::from_secs(1),
            latency: Duration::ZERO,
        }
    }
}

impl FakeApiServerBuilder {
    /// Serves one more resource (a CRD, `apps/v1` deployments, …) with generic semantics.
    #[must_use]
    pub fn resource(mut self, def: ResourceDef) -> Self {
        self.resources.retain(|d| d.id != def.id);
        self.resources.push(def);
        self
    }

    /// Creates this namespace at start (besides `default`, `kube-system`, `kube-public` and
    /// `kube-node-lease`). Objects can only be created in namespaces that exist.
    #[must_use]
    pub fn namespace(mut self, name: &str) -> Self {
        if !self.namespaces.iter().any(|n| n == name) {
            self.namespaces.push(name.into());
        }
        self
    }

    /// How many changes the history keeps for resuming watches (default 10,000, all
    /// resources together); a watch from before the oldest one gets `410 Expired`.
    #[must_use]
    pub fn history_limit(mut self, changes: usize) -> Self {
        self.history = changes.max(1);
        self
    }

    /// How pods leave after a graceful delete (default [`PodTermination::AwaitKubelet`]).
    #[must_use]
    pub fn pod_termination(mut self, mode: PodTermination) -> Self {
        self.pod_termination = mode;
        self
    }

    /// Runs the minimal scheduler (default off): a pod created without `spec.nodeName` whose
    /// required node affinity names one node by `kubernetes.io/hostname` (or
    /// `metadata.name`, or a `kubernetes.io/hostname` node selector) is bound to it; when
    /// that node is missing, cordoned or tainted against the pod, the pod stays `Pending`
    /// with `PodScheduled=False` (`Unschedulable`) and is retried when the node changes.
    /// Pods without such a pin are left alone.
    #[must_use]
    pub fn scheduler(mut self, on: bool) -> Self {
        self.scheduler = on;
        self
    }

    /// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (default 1 s; the
    /// real server sends one about every minute).
    #[must_use]
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = every.max(Duration::from_millis(1));
        self
    }

    /// Delays every request by this much before it is served.
    #[must_use]
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving. Must run inside a tokio runtime.
    pub async fn start(self) -> Result<FakeApiServer, Error> {
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let settings = Settings {
            history: self.history,
            pod_termination: self.pod_termination,
            scheduler: self.scheduler,
        };
        let mut store = Store::new(
            self.resources,
            settings,
            work_tx.clone(),
            Arc::clone(&pending),
        );
        let namespaces = store
            .resource("", "v1", "namespaces")
            .ok_or_else(|| Error::UnknownResource("v1/namespaces".into()))?;
        for ns in &self.namespaces {
            store.create(
                namespaces,
                None,
                json!({ "metadata": { "name": ns } }),
                Mode::Main,
                false,
            )?;
        }
        let mut hooks = Hooks::default();
        hooks.latency = self.latency;
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            hooks: Mutex::new(hooks),
            bookmark_interval: self.bookmark_interval,
        });
        let settled = Arc::new(Notify::new());
        let controller = tokio::spawn(controller(
            Arc::clone(&shared),
            work_rx,
            work_tx,
            Arc::clone(&pending),
            Arc::clone(&settled),
        ));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let app = router(Arc::clone(&shared));
        let serve = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(target: "dory::k8s_fake", error = %e, "fake API server stopped");
            }
        });
        tracing::debug!(target: "dory::k8s_fake", %addr, "fake API server listening");
        Ok(FakeApiServer {
            shared,
            addr,
            stop: Some(stop_tx),
            serve: Some(serve),
            controller,
            pending,
            settled,
        })
    }
}

/// Runs the background work: garbage collection, scheduling, namespace cleanup, grace
/// period timers.
async fn controller(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Work>,
    tx: mpsc::UnboundedSender<Work>,
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
) {
    while let Some(work) = rx.recv().await {
        match work {
            Work::Collect { owner_uid, orphan } => shared.store().collect(&owner_uid, orphan),
            Work::CheckOwners { resource, key } => {
                shared.store().collect_object(resource, &key, None)
            }
            Work::Schedule { key } => shared.store().schedule(&key),
            Work::NodeChanged { node } => shared.store().node_changed(&node),
            Work::CleanNamespace { name } => {
                if !shared.store().clean_namespace(&name) {
                    // Pods are still terminating: look again shortly. Counted as pending
                    // until then, so `settle` waits for the namespace to go.
                    pending.fetch_add(1, Ordering::SeqCst);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = tx.send(Work::CleanNamespace { name });
                    });
                }
            }
            Work::GraceTimer { key, uid, after } => {
                let weak = Arc::downgrade(&shared);
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    if let Some(shared) = weak.upgrade() {
                        shared.store().grace_expired(&key, &uid);
                    }
                });
            }
        }
        pending.fetch_sub(1, Ordering::SeqCst);
        settled.notify_waiters();
    }
}

/// An in-process fake Kubernetes API server. See the [crate docs](crate).
///
/// Dropping it stops the server: open watch streams end and new connections are refused.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<()>>,
    controller: JoinHandle<()>,
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApiServer {
    /// Starts a server with the default options.
    pub async fn start() -> Result<Self, Error> {
        Self::builder().start().await
    }

    /// Options for a server.
    pub fn builder() -> FakeApiServerBuilder {
        FakeApiServerBuilder::default()
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A `kube::Config` for the server: plain HTTP, no credentials, default namespace
    /// `default`, kube's defaults otherwise (including retries of 429, 503 and 504).
    pub fn config(&self) -> kube::Config {
        let uri = self
            .url()
            .parse()
            .expect("a socket address makes a valid URI");
        kube::Config::new(uri)
    }

    /// A client with kube's defaults, as production code builds one: it retries 429, 503 and
    /// 504 answers by itself (up to 15 times, with backoff), so a test that expects to see a
    /// 429 (an eviction a PodDisruptionBudget refuses) wants
    /// [`client_without_retries`](Self::client_without_retries).
    pub fn client(&self) -> Result<kube::Client, Error> {
        Ok(kube::Client::try_from(self.config())?)
    }

    /// A client that hands every answer back as it came.
    pub fn client_without_retries(&self) -> Result<kube::Client, Error> {
        let mut config = self.config();
        config.default_retry = false;
        Ok(kube::Client::try_from(config)?)
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) {
        self.stop_now();
        if let Some(serve) = self.serve.take() {
            // Keep-alive connections end at their next request; do not wait on them forever.
            if tokio::time::timeout(Duration::from_secs(5), serve)
                .await
                .is_err()
            {
                tracing::debug!(target: "dory::k8s_fake", "connections still open at shutdown");
            }
        }
    }

    fn stop_now(&mut self) {
        self.shared.store().close_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.controller.abort();
    }

    /// Waits until the background work queued so far (garbage collection, scheduling,
    /// namespace cleanup, and what it queued in turn) is done. Grace period timers
    /// ([`PodTermination::AfterGracePeriod`]) are not waited for.
    pub async fn settle(&self) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    // ------------------------------------------------------------------ request log

    /// Every request answered since start (or since [`clear_requests`](Self::clear_requests)).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.hooks().log.all()
    }

    /// A point in the request log, for [`requests_since`](Self::requests_since).
    pub fn mark(&self) -> RequestMark {
        self.shared.hooks().log.mark()
    }

    /// The requests answered after `mark`.
    pub fn requests_since(&self, mark: RequestMark) -> Vec<RecordedRequest> {
        self.shared.hooks().log.since(mark)
    }

    /// The requests answered after `mark` that are not watches: in a steady state with
    /// nothing changing, what a controller should keep to its lease renewals.
    pub fn non_watch_requests_since(&self, mark: RequestMark) -> Vec<RecordedRequest> {
        self.requests_since(mark)
            .into_iter()
            .filter(|r| !r.is_watch())
            .collect()
    }

    /// How many requests were answered per verb and resource (`(Verb::List, "pods")`).
    pub fn request_counts(&self) -> BTreeMap<(Verb, String), u64> {
        self.shared.hooks().log.counts()
    }

    /// How many requests with this verb on this resource were answered.
    pub fn request_count(&self, verb: Verb, resource: &str) -> u64 {
        self.request_counts()
            .get(&(verb, resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Empties the request log and the counts.
    pub fn clear_requests(&self) {
        self.shared.hooks().log.clear();
    }

    // ------------------------------------------------------------------ faults

    /// Injects a fault: matching requests are answered with its status until it is used up.
    pub fn inject(&self, fault: Fault) {
        self.shared.hooks().inject(fault);
    }

    /// Fails the next `times` requests with `verb` on `resource` with HTTP `code`.
    pub fn fail_next(&self, verb: Verb, resource: &str, code: u16, times: u32) {
        self.inject(Fault::new(code).verb(verb).resource(resource).times(times));
    }

    /// Removes every injected fault not yet used up.
    pub fn clear_faults(&self) {
        self.shared.hooks().clear_faults();
    }

    /// Delays every later request by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.shared.hooks().latency = latency;
    }

    // ------------------------------------------------------------------ watches

    /// Compacts the history: a watch resumed from any resourceVersion issued so far gets a
    /// `410 Expired` ERROR event, as after an etcd compaction. Open watches go on.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Ends every open watch stream cleanly; clients resume from their last version.
    pub fn close_watches(&self) {
        self.shared.store().close_watches();
    }

    /// [`compact`](Self::compact) and [`close_watches`](Self::close_watches): every watcher
    /// resumes, gets `410 Expired`, and must list again.
    pub fn expire_watches(&self) {
        let mut store = self.shared.store();
        store.compact();
        store.close_watches();
    }

    /// How many watch streams are open.
    pub fn open_watches(&self) -> usize {
        self.shared.store().open_watches()
    }

    /// The store's current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    // ------------------------------------------------------------------ store access

    fn index(store: &Store, resource: &ResourceId) -> Result<usize, Error> {
        store
            .resource(&resource.group, &resource.version, &resource.plural)
            .ok_or_else(|| Error::UnknownResource(resource.to_string()))
    }

    /// Creates or replaces an object as given, status included, with no resourceVersion
    /// check: what a test playing a kubelet or an operator writes. Watchers see the change.
    /// A namespaced object without a namespace goes to `default`.
    pub fn put_value(&self, resource: &ResourceId, obj: Value) -> Result<Value, Error> {
        let mut store = self.shared.store();
        let r = Self::index(&store, resource)?;
        let ns = store
            .def(r)
            .namespaced
            .then(|| meta_str(&obj, "namespace").unwrap_or("default").to_string());
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        let stored = store.update(r, ns.as_deref(), &name, obj, Mode::Direct, false)?;
        Ok((*stored).clone())
    }

    /// An object, if it exists.
    pub fn get_value(
        &self,
        resource: &ResourceId,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let store = self.shared.store();
        let r = Self::index(&store, resource).ok()?;
        store.get(r, namespace, name).ok().map(|v| (*v).clone())
    }

    /// Every object of a resource, in one namespace or (`None`) in all.
    pub fn list_values(&self, resource: &ResourceId, namespace: Option<&str>) -> Vec<Value> {
        let store = self.shared.store();
        Self::index(&store, resource)
            .map(|r| {
                store
                    .all(r, namespace)
                    .iter()
                    .map(|v| (**v).clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes an object in place, atomically (status included); a no-op change writes
    /// nothing.
    pub fn modify_value(
        &self,
        resource: &ResourceId,
        namespace: Option<&str>,
        name: &str,
        change: impl FnOnce(&mut Value),
    ) -> Result<Value, Error> {
        let mut store = self.shared.store();
        let r = Self::index(&store, resource)?;
        let mut obj = (*store.get(r, namespace, name)?).clone();
        change(&mut obj);
        let stored = store.update(r, namespace, name, obj, Mode::Direct, false)?;
        Ok((*stored).clone())
    }

    /// Removes an object now, as a delete with grace period 0 (a kubelet's confirmation, a
    /// forced delete); objects with finalizers wait for them. Its dependents are garbage
    /// collected.
    pub fn delete_value(
        &self,
        resource: &ResourceId,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), Error> {
        let mut store = self.shared.store();
        let r = Self::index(&store, resource)?;
        let opts = DeleteOpts {
            grace: Some(0),
            ..DeleteOpts::default()
        };
        store.delete(r, namespace, name, &opts)?;
        Ok(())
    }

    /// [`put_value`](Self::put_value) for a typed object.
    pub fn put<K>(&self, obj: &K) -> Result<K, Error>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let value = self.put_value(&ResourceId::of::<K>(), serde_json::to_value(obj)?)?;
        Ok(serde_json::from_value(value)?)
    }

    /// [`get_value`](Self::get_value) for a typed object.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Result<Option<K>, Error>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.get_value(&ResourceId::of::<K>(), namespace, name)
            .map(serde_json::from_value)
            .transpose()
            .map_err(Error::from)
    }

    /// [`list_values`](Self::list_values) for a typed object.
    pub fn list<K>(&self, namespace: Option<&str>) -> Result<Vec<K>, Error>
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned,
    {
        self.list_values(&ResourceId::of::<K>(), namespace)
            .into_iter()
            .map(|v| serde_json::from_value(v).map_err(Error::from))
            .collect()
    }

    /// [`modify_value`](Self::modify_value) for a typed object.
    pub fn modify<K>(
        &self,
        namespace: Option<&str>,
        name: &str,
        change: impl FnOnce(&mut K),
    ) -> Result<K, Error>
    where
        K: kube::Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let mut failure = None;
        let value = self.modify_value(&ResourceId::of::<K>(), namespace, name, |v| {
            match serde_json::from_value::<K>(v.clone()) {
                Ok(mut typed) => {
                    change(&mut typed);
                    match serde_json::to_value(&typed) {
                        Ok(new) => *v = new,
                        Err(e) => failure = Some(e),
                    }
                }
                Err(e) => failure = Some(e),
            }
        })?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        Ok(serde_json::from_value(value)?)
    }

    /// [`delete_value`](Self::delete_value) for a typed object.
    pub fn delete<K>(&self, namespace: Option<&str>, name: &str) -> Result<(), Error>
    where
        K: kube::Resource<DynamicType = ()>,
    {
        self.delete_value(&ResourceId::of::<K>(), namespace, name)
    }

    // ------------------------------------------------------------------ kubelet helpers

    /// Sets what a kubelet reports for a pod: phase, pod IP, and the `Ready` and
    /// `ContainersReady` conditions (with `Initialized` true once it runs).
    pub fn report_pod(&self, namespace: &str, name: &str, report: &PodReport) -> Result<(), Error> {
        self.modify_value(&ResourceId::pods(), Some(namespace), name, |pod| {
            let status = &mut pod["status"];
            if !status.is_object() {
                *status = json!({});
            }
            status["phase"] = report.phase.clone().into();
            if let Some(ip) = &report.pod_ip {
                status["podIP"] = ip.clone().into();
                status["podIPs"] = json!([{ "ip": ip }]);
            }
            if status.get("startTime").is_none() && report.phase != "Pending" {
                status["startTime"] = now().into();
            }
            let ready = if report.ready { "True" } else { "False" };
            if report.phase != "Pending" {
                set_condition(pod, "Initialized", "True", None, None);
            }
            set_condition(pod, "ContainersReady", ready, None, None);
            set_condition(pod, "Ready", ready, None, None);
        })?;
        Ok(())
    }

    /// A kubelet's confirmation that a terminating pod's containers are gone: removes a pod
    /// that has a `deletionTimestamp` (as a delete with grace period 0). `Ok(false)` when the
    /// pod is not terminating (nothing is done).
    pub fn confirm_pod_deletion(&self, namespace: &str, name: &str) -> Result<bool, Error> {
        let mut store = self.shared.store();
        let pods = store.pods();
        let pod = store.get(pods, Some(namespace), name)?;
        let terminating = pod
            .get("metadata")
            .and_then(|m| m.get("deletionTimestamp"))
            .is_some_and(|v| !v.is_null());
        if !terminating {
            return Ok(false);
        }
        let opts = DeleteOpts {
            grace: Some(0),
            ..DeleteOpts::default()
        };
        Ok(matches!(
            store.delete(pods, Some(namespace), name, &opts)?,
            Deleted::Gone(_) | Deleted::Pending(_)
        ))
    }

    /// Registers a ready node labelled `kubernetes.io/hostname=<name>` plus `labels`.
    pub fn add_node(&self, name: &str, labels: &[(&str, &str)]) -> Result<(), Error> {
        let mut all: Vec<(&str, &str)> = vec![("kubernetes.io/hostname", name)];
        all.extend_from_slice(labels);
        let mut node = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": labels_object(&all) },
            "spec": {},
            "status": {},
        });
        set_condition(
            &mut node,
            "Ready",
            "True",
            Some("KubeletReady"),
            Some("kubelet is posting ready status"),
        );
        let mut store = self.shared.store();
        let nodes = store.nodes();
        store.create(nodes, None, node, Mode::Direct, false)?;
        Ok(())
    }

    /// Sets a node's `Ready` condition: `"True"`, `"False"` (the kubelet says not ready) or
    /// `"Unknown"` (the node controller lost the kubelet).
    pub fn set_node_ready(&self, name: &str, status: &str) -> Result<(), Error> {
        let reason = match status {
            "True" => "KubeletReady",
            "False" => "KubeletNotReady",
            _ => "NodeStatusUnknown",
        };
        self.modify_value(&ResourceId::nodes(), None, name, |node| {
            set_condition(node, "Ready", status, Some(reason), None);
        })?;
        Ok(())
    }

    /// Cordons (`spec.unschedulable: true`) or uncordons a node, as `kubectl cordon` does.
    pub fn cordon_node(&self, name: &str, cordoned: bool) -> Result<(), Error> {
        self.modify_value(&ResourceId::nodes(), None, name, |node| {
            if cordoned {
                node["spec"]["unschedulable"] = true.into();
            } else if let Some(spec) = node.get_mut("spec").and_then(Value::as_object_mut) {
                spec.remove("unschedulable");
            }
        })?;
        Ok(())
    }

    /// Adds a taint to a node, replacing one with the same key and effect.
    pub fn taint_node(
        &self,
        name: &str,
        key: &str,
        value: Option<&str>,
        effect: &str,
    ) -> Result<(), Error> {
        self.modify_value(&ResourceId::nodes(), None, name, |node| {
            let mut taint = json!({ "key": key, "effect": effect });
            if let Some(v) = value {
                taint["value"] = v.into();
            }
            if effect == "NoExecute" {
                taint["timeAdded"] = now().into();
            }
            let spec = &mut node["spec"];
            if !spec.is_object() {
                *spec = json!({});
            }
            let taints = spec["taints"].as_array().cloned().unwrap_or_default();
            let mut taints: Vec<Value> = taints
                .into_iter()
                .filter(|t| {
                    !(t.get("key") == Some(&Value::from(key))
                        && t.get("effect") == Some(&Value::from(effect)))
                })
                .collect();
            taints.push(taint);
            spec["taints"] = Value::Array(taints);
        })?;
        Ok(())
    }

    /// Removes every taint with this key from a node.
    pub fn untaint_node(&self, name: &str, key: &str) -> Result<(), Error> {
        self.modify_value(&ResourceId::nodes(), None, name, |node| {
            if let Some(spec) = node.get_mut("spec").and_then(Value::as_object_mut) {
                let keep: Vec<Value> = spec
                    .get("taints")
                    .and_then(Value::as_array)
                    .map(|ts| {
                        ts.iter()
                            .filter(|t| t.get("key") != Some(&Value::from(key)))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                if keep.is_empty() {
                    spec.remove("taints");
                } else {
                    spec.insert("taints".into(), Value::Array(keep));
                }
            }
        })?;
        Ok(())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// What a kubelet reports about a pod, for [`FakeApiServer::report_pod`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodReport {
    /// `status.phase`: `Pending`, `Running`, `Succeeded`, `Failed`.
    pub phase: String,
    /// `status.podIP`, if assigned.
    pub pod_ip: Option<String>,
    /// Whether the `Ready` (and `ContainersReady`) condition is true.
    pub ready: bool,
}

impl PodReport {
    /// Running and ready at `pod_ip`.
    pub fn running(pod_ip: &str) -> Self {
        Self {
            phase: "Running".into(),
            pod_ip: Some(pod_ip.into()),
            ready: true,
        }
    }

    /// The same, not ready (a failing readiness probe).
    #[must_use]
    pub fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }

    /// Any phase, not ready, no IP.
    pub fn phase(phase: &str) -> Self {
        Self {
            phase: phase.into(),
            pod_ip: None,
            ready: false,
        }
    }
}
