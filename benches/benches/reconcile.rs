//! Reconciling 10,000 processors on 500 nodes on Kubernetes: the real orchestrator and
//! `dory-k8s` against the fake API server (`dory-k8s-fake`) through the real `kube::Client`.
//!
//! - **Cold start**: the orchestrator (default settings) with [`KubePlacement`], its
//!   [`KubeControl`], `dory-mock`'s in-memory store, config, status and leadership, the
//!   leadership wrapped in a [`LeaseLeadership`] as in production, so the Lease renewals are
//!   among the requests. Timed from before `KubePlacement::start` to every pod created and
//!   seen by the placement, then to every instance `Running` as the placement reports it.
//! - **Steady state**: with nothing changing, the API requests over a window, split into
//!   watches, Lease requests and anything else (the goal: nothing else).
//! - **Memory**: the fake API server, its scheduler and a stand-in kubelet run in a child
//!   process (this binary re-executed with `DORY_RECONCILE_SERVER=1`), so this process's
//!   `VmRSS` and `VmHWM` are the orchestrator's. The kubelet marks every bound pod running
//!   at an address of its own on 127/8, and one HTTP responder answers `/healthz` for every
//!   such address (it tells the pod by the `Host` header) with `Running` and the pod's epoch:
//!   the placement's health check is the only call it makes to an instance here.
//! - **Baseline**: the same pods and Secrets created by a plain `kube::Client` loop (no
//!   orchestrator, no rate limit, as many at once as the orchestrator's move bound) against the
//!   same fake, in another namespace; the ratio is orchestrator / baseline.
//! - **PodDisruptionBudgets**: one budget over every Dory pod (what `dory-k8s` does) against
//!   one per processor, over as many running, ready pods in a namespace of their own: the
//!   requests and time to create them, what a client watching them receives, and the
//!   eviction path, which reads every budget of the namespace to find the pod's.
//!
//! `cargo bench -p dory-benches --bench reconcile`. `DORY_BENCH_PROCESSORS`,
//! `DORY_BENCH_NODES` and `DORY_BENCH_STEADY_SECS` change the scale and the window. Without
//! `--bench` (as under `cargo test --benches`) it runs 200 processors on 10 nodes with a short
//! window as a smoke test.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dory_benches::{Background, BoxError, load_average, ms, percentiles};
use dory_core::orchestrator::{Orchestrator, Settings};
use dory_core::{
    Epoch, Health, Phase, Placement, ProcessorId, ProcessorSpec, Resources, Sequence, SystemClock,
};
use dory_k8s::{KubeConfig, KubePlacement, LeaseConfig, LeaseLeadership, WriteLimits};
use dory_k8s_fake::{FakeApiServer, PodReport};
use dory_mock::{MemoryConfig, MemoryLeadership, MemoryStatus, MemoryStore};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStdin, ChildStdout};

type Result<T> = std::result::Result<T, BoxError>;

/// Set in the child's environment: run as the fake API server.
const SERVER_ROLE: &str = "DORY_RECONCILE_SERVER";
/// Dory's namespace, the baseline's and the PodDisruptionBudget phase's.
const NS: &str = "dory";
const NS_BASELINE: &str = "dory-baseline";
const NS_PDB: &str = "dory-pdb";
/// The Lease the orchestrator holds (in Dory's namespace).
const LEASE: &str = "dory-orchestrator";
/// How many pods the PDB phase evicts with each kind of budget.
const EVICTIONS: usize = 200;
/// How long any one wait may take before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(900);

/// The scale of a run.
#[derive(Clone, Copy)]
struct Scale {
    processors: usize,
    nodes: usize,
    steady: Duration,
}

impl Scale {
    fn from_env(full: bool) -> Scale {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Scale {
            processors: var("DORY_BENCH_PROCESSORS", if full { 10_000 } else { 200 }) as usize,
            nodes: var("DORY_BENCH_NODES", if full { 500 } else { 10 }) as usize,
            steady: Duration::from_secs(var("DORY_BENCH_STEADY_SECS", if full { 60 } else { 3 })),
        }
    }
}

fn processor_name(i: usize) -> String {
    format!("p{i:05}")
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

// ---------------------------------------------------------------------------- memory

/// `VmRSS` and `VmHWM` of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------------------- the child

/// The child: the fake API server, its scheduler, a stand-in kubelet and the instances'
/// health responder, driven by one command per line on stdin, each answered by one line on
/// stdout.
fn server_main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(serve()) {
        eprintln!("reconcile bench server failed: {e}");
        std::process::exit(1);
    }
}

/// Pod addresses (their 127/8 address) to epochs, for the health responder.
type Addresses = Arc<Mutex<HashMap<Ipv4Addr, u64>>>;

async fn serve() -> Result<()> {
    let nodes: usize = std::env::var("DORY_BENCH_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let server = Arc::new(
        FakeApiServer::builder()
            .namespace(NS)
            .namespace(NS_BASELINE)
            .namespace(NS_PDB)
            .scheduler(true)
            // As the real server (about once a minute); bookmarks are not requests.
            .bookmark_interval(Duration::from_secs(60))
            // A cold start writes about three changes per pod; a watch that reconnects
            // within it resumes instead of listing again, as it would from etcd's history.
            .history_limit(200_000)
            .start()
            .await?,
    );
    for i in 0..nodes {
        let name = node_name(i);
        server.add_node(&name, &[])?;
        server.modify_value(&dory_k8s_fake::ResourceId::nodes(), None, &name, |n| {
            let capacity = json!({ "cpu": "16", "memory": "64Gi", "pods": "110" });
            n["status"]["capacity"] = capacity.clone();
            n["status"]["allocatable"] = capacity;
        })?;
    }

    let addresses = Addresses::default();
    // Bound on every address: pod addresses are spread over 127/8, and a socket bound to one
    // loopback address does not take another's connections.
    let health = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let sdk_port = health.local_addr()?.port();
    tokio::spawn(health_responder(health, Arc::clone(&addresses)));
    let kubelet = tokio::spawn(kubelet(Arc::clone(&server), Arc::clone(&addresses)));

    // Plain std stdin and stdout (the workspace's tokio has no `io-std`): a thread reads
    // the commands, answers are a line each.
    let (commands, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if commands.send(line).is_err() {
                break;
            }
        }
    });
    let say = |line: &str| -> Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        Ok(())
    };
    say(&format!("ready {} {sdk_port}", server.url()))?;

    let mut marks = Vec::new();
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["mark"] => {
                marks.push(server.mark());
                format!("{}", marks.len() - 1)
            }
            ["since", i] => {
                let mark = marks[i.parse::<usize>()?];
                let mut counts: BTreeMap<(String, String, String), u64> = BTreeMap::new();
                for mut r in server.requests_since(mark) {
                    let ns = r.namespace.unwrap_or_else(|| "-".into());
                    // Failed answers are told apart: `get secrets [404]`.
                    if !(200..300).contains(&r.code) {
                        r.resource = format!("{} [{}]", r.resource, r.code);
                    }
                    *counts
                        .entry((r.verb.to_string(), r.resource, ns))
                        .or_default() += 1;
                }
                let rows: Vec<Value> = counts
                    .into_iter()
                    .map(|((verb, resource, ns), n)| json!([verb, resource, ns, n]))
                    .collect();
                Value::Array(rows).to_string()
            }
            ["memory"] => {
                let (rss, hwm) = memory();
                format!("{rss:.1} {hwm:.1}")
            }
            ["seed", ns, n] => {
                seed_pods(&server, ns, n.parse()?, nodes)?;
                "ok".into()
            }
            ["stop"] => break,
            _ => format!("error: unknown command {line:?}"),
        };
        say(&answer)?;
    }
    kubelet.abort();
    Ok(())
}

/// Plays the kubelet of every node: a bound pod is reported running and ready at an
/// address of its own, a terminating one is confirmed gone. It follows pods through a
/// cluster-wide watch (the orchestrator's is namespaced), so its requests are told apart.
async fn kubelet(server: Arc<FakeApiServer>, addresses: Addresses) -> Result<()> {
    let pods: Api<Pod> = Api::all(server.client()?);
    let mut stream = std::pin::pin!(watcher(pods, watcher::Config::default()));
    let mut next: u32 = 0;
    while let Some(event) = stream.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(_) => continue,
            Err(e) => {
                eprintln!("kubelet watch: {e}");
                continue;
            }
        };
        let (Some(ns), Some(name)) = (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = server.confirm_pod_deletion(&ns, &name);
            continue;
        }
        let bound = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_some();
        let status = pod.status.as_ref();
        let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
        if !bound || running {
            continue;
        }
        next += 1;
        let ip = Ipv4Addr::new(
            127,
            20 + (next / 62_500) as u8,
            ((next / 250) % 250) as u8 + 1,
            (next % 250) as u8 + 1,
        );
        let epoch = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(dory_k8s::LABEL_EPOCH))
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(ip, epoch);
        server.report_pod(&ns, &name, &PodReport::running(&ip.to_string()))?;
    }
    Ok(())
}

/// Answers `GET /healthz` for every pod address as a running instance of the pod's epoch
/// would (the SDK needs no token there), telling the pod by the `Host` the client sent.
async fn health_responder(listener: tokio::net::TcpListener, addresses: Addresses) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;

    async fn healthz(State(addresses): State<Addresses>, headers: HeaderMap) -> impl IntoResponse {
        let ip = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split(':').next())
            .and_then(|h| h.parse::<Ipv4Addr>().ok());
        let epoch = ip.and_then(|ip| {
            addresses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&ip)
                .copied()
        });
        match epoch {
            Some(epoch) => {
                let health = Health {
                    phase: Phase::Running,
                    epoch: Epoch(epoch),
                    sequence: Sequence(0),
                    protocol: dory_core::CONTROL_PROTOCOL,
                };
                let body = serde_json::to_vec(&health).unwrap_or_default();
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
            }
            None => (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "application/json")],
                b"{}".to_vec(),
            ),
        }
    }

    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(|| async { "{}" }))
        .with_state(addresses);
    let _ = axum::serve(listener, app).await;
}

/// Puts `n` running, ready pods labelled as Dory's into `ns`, straight into the store (no
/// requests): the pods the PodDisruptionBudget phase protects.
fn seed_pods(server: &FakeApiServer, ns: &str, n: usize, nodes: usize) -> Result<()> {
    for i in 0..n {
        let name = format!("{}-1", processor_name(i));
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": {
                    (dory_k8s::LABEL_PROCESSOR): processor_name(i),
                    (dory_k8s::LABEL_EPOCH): "1",
                    (dory_k8s::LABEL_MANAGED_BY): dory_k8s::MANAGED_BY,
                },
            },
            "spec": {
                "nodeName": node_name(i % nodes.max(1)),
                "containers": [{ "name": "processor", "image": "dory/bench:1" }],
            },
            "status": { "phase": "Pending" },
        });
        server.put_value(&dory_k8s_fake::ResourceId::pods(), pod)?;
        server.report_pod(ns, &name, &PodReport::running("10.0.0.1"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------- the parent

/// The child process and its command channel.
struct ServerProcess {
    child: tokio::process::Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    url: String,
    sdk_port: u16,
}

/// Requests counted from the fake's log, by (verb, resource, namespace or `-`).
#[derive(Default)]
struct Counts(Vec<(String, String, String, u64)>);

impl Counts {
    fn sum(&self, pick: impl Fn(&str, &str, &str) -> bool) -> u64 {
        self.0
            .iter()
            .filter(|(v, r, ns, _)| pick(v, r, ns))
            .map(|(_, _, _, n)| n)
            .sum()
    }

    /// The orchestrator's requests: everything but the stand-in kubelet's cluster-wide pod
    /// watch and list.
    fn orchestrator(&self) -> Counts {
        Counts(
            self.0
                .iter()
                .filter(|(_, r, ns, _)| !(r == "pods" && ns == "-"))
                .cloned()
                .collect(),
        )
    }

    fn of_namespace(&self, namespace: &str) -> Counts {
        Counts(
            self.0
                .iter()
                .filter(|(_, _, ns, _)| ns == namespace)
                .cloned()
                .collect(),
        )
    }

    fn watches(&self) -> u64 {
        self.sum(|v, _, _| v == "watch")
    }

    fn leases(&self) -> u64 {
        self.sum(|v, r, _| v != "watch" && r == "leases")
    }

    fn other(&self) -> u64 {
        self.sum(|v, r, _| v != "watch" && r != "leases")
    }

    fn total(&self) -> u64 {
        self.sum(|_, _, _| true)
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(v, r, ns, n)| format!("{v} {r} ({ns}): {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ServerProcess {
    async fn spawn(scale: Scale) -> Result<ServerProcess> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .env(SERVER_ROLE, "1")
            .env("DORY_BENCH_NODES", scale.nodes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let line = stdout
            .next_line()
            .await?
            .ok_or("the server process ended before it was ready")?;
        let mut words = line.split_whitespace();
        let (Some("ready"), Some(url), Some(port)) = (words.next(), words.next(), words.next())
        else {
            return Err(format!("unexpected first line from the server: {line:?}").into());
        };
        Ok(ServerProcess {
            url: url.to_string(),
            sdk_port: port.parse()?,
            child,
            stdin,
            stdout,
        })
    }

    async fn ask(&mut self, command: &str) -> Result<String> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = self
            .stdout
            .next_line()
            .await?
            .ok_or("the server process ended")?;
        if line.starts_with("error") {
            return Err(line.into());
        }
        Ok(line)
    }

    async fn mark(&mut self) -> Result<String> {
        self.ask("mark").await
    }

    async fn since(&mut self, mark: &str) -> Result<Counts> {
        let line = self.ask(&format!("since {mark}")).await?;
        let rows: Vec<(String, String, String, u64)> = serde_json::from_str(&line)?;
        Ok(Counts(rows))
    }

    async fn memory(&mut self) -> Result<(f64, f64)> {
        let line = self.ask("memory").await?;
        let mut words = line.split_whitespace();
        let mut next = || -> Result<f64> { Ok(words.next().ok_or("memory")?.parse()?) };
        Ok((next()?, next()?))
    }

    fn client(&self, retries: bool) -> Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse()?);
        config.default_retry = retries;
        Ok(kube::Client::try_from(config)?)
    }

    async fn stop(mut self) {
        let _ = self.ask("stop").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// Polls `check` every `every` until it returns true, for at most [`PATIENCE`].
async fn until<F, Fut>(what: &str, every: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await? {
        if Instant::now() > deadline {
            return Err(format!("gave up waiting until {what}").into());
        }
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// What the orchestrated run measured.
struct Orchestrated {
    created: Duration,
    running: Duration,
    cold: Counts,
    steady: Counts,
    steady_window: Duration,
    rounds: usize,
    round_p50: Duration,
    round_max: Duration,
    memory_start: (f64, f64),
    memory_running: (f64, f64),
    memory_steady: (f64, f64),
    server_memory: (f64, f64),
    write_limits: WriteLimits,
}

/// The specs: every processor the same size, so 500 nodes of 16 cores hold them easily.
fn specs(n: usize) -> Vec<ProcessorSpec> {
    (0..n)
        .map(|i| {
            let mut spec = ProcessorSpec::new(ProcessorId::new(processor_name(i)).expect("an id"));
            spec.resources = Resources::new(100, 256);
            spec
        })
        .collect()
}

async fn orchestrated(server: &mut ServerProcess, scale: Scale) -> Result<Orchestrated> {
    let memory_start = memory();
    let client = server.client(true)?;
    let store = Arc::new(MemoryStore::new(Arc::new(SystemClock)));
    let leadership = LeaseLeadership::new(
        client.clone(),
        LeaseConfig {
            namespace: NS.into(),
            name: LEASE.into(),
            holder: "reconcile-bench".into(),
            ..LeaseConfig::default()
        },
        MemoryLeadership::new(&store),
    )?;
    let config = Arc::new(MemoryConfig::with_processors(specs(scale.processors)));
    // The default rate of 20 writes a second would make the cold start a wait of
    // 2 writes (pod, Secret) x processors / 20 s: the bench lifts it to measure the
    // orchestrator and the API, and the report states the floor the default sets.
    let write_limits = WriteLimits {
        per_second: 1e6,
        burst: 1_000_000,
        ..WriteLimits::default()
    };
    let mut kube_config = KubeConfig {
        namespace: NS.into(),
        default_image: Some("dory/bench:1".into()),
        sdk_port: server.sdk_port,
        writes: write_limits.clone(),
        ..KubeConfig::default()
    };
    kube_config.instance.store_url = "postgres://dory@postgres.dory/dory".into();

    let cold_mark = server.mark().await?;
    let began = Instant::now();
    let placement = Arc::new(KubePlacement::start(client, kube_config).await?);
    let control = Arc::new(placement.control());
    let orchestrator = Orchestrator::builder(
        config,
        placement.clone(),
        control,
        store,
        Arc::new(leadership),
    )
    .status_sink(Arc::new(MemoryStatus::new()))
    .settings(Settings::default())
    .build();
    let handle = orchestrator.handle();
    let running = Background::run(orchestrator);

    let n = scale.processors;
    let mut created = None;
    let mut last_report = Instant::now();
    loop {
        let instances = placement.instances().await?;
        if created.is_none() && instances.len() >= n {
            created = Some(began.elapsed());
        }
        let up = instances
            .iter()
            .filter(|i| i.phase == Phase::Running)
            .count();
        if up >= n {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "  {:.0} s: {} pods, {up} running; load average {}",
                began.elapsed().as_secs_f64(),
                instances.len(),
                load_average()
            );
        }
        if began.elapsed() > PATIENCE {
            return Err(format!("{up} of {n} instances running after {PATIENCE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let running_after = began.elapsed();
    let created = created.unwrap_or(running_after);
    let cold = server.since(&cold_mark).await?;
    let memory_running = memory();

    // Settled: the plan is empty (no action, nothing waiting) for a few rounds in a row.
    until("the plan is empty", Duration::from_millis(200), || {
        let view = handle.view();
        async move {
            Ok(view.plan.actions.is_empty()
                && view.observed.instances.len() >= n
                && view.status.len() >= n)
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let rounds = Arc::new(Mutex::new(Vec::new()));
    let counting = {
        let rounds = Arc::clone(&rounds);
        let mut views = handle.clone();
        tokio::spawn(async move {
            loop {
                let view = views.next_view().await;
                rounds
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(view.reconcile);
            }
        })
    };
    let steady_mark = server.mark().await?;
    let window_began = Instant::now();
    tokio::time::sleep(scale.steady).await;
    let steady = server.since(&steady_mark).await?;
    let steady_window = window_began.elapsed();
    counting.abort();
    let memory_steady = memory();
    let server_memory = server.memory().await?;
    let rounds = std::mem::take(&mut *rounds.lock().unwrap_or_else(PoisonError::into_inner));
    let (round_p50, _, round_max) = if rounds.is_empty() {
        (Duration::ZERO, Duration::ZERO, Duration::ZERO)
    } else {
        percentiles(rounds.clone())
    };

    running.stop().await;
    drop(placement);
    Ok(Orchestrated {
        created,
        running: running_after,
        cold,
        steady,
        steady_window,
        rounds: rounds.len(),
        round_p50,
        round_max,
        memory_start,
        memory_running,
        memory_steady,
        server_memory,
        write_limits,
    })
}

/// What the baseline measured.
struct Baseline {
    /// The orchestrator's pods, serialized as JSON: what its pod reflector holds.
    pod_json_bytes: usize,
    created: Duration,
    running: Duration,
    requests: Counts,
}

/// The orchestrator's pods and Secrets, re-created in the baseline's namespace by a plain
/// client loop, as many at once as the orchestrator's move bound allows starts.
async fn baseline(server: &mut ServerProcess, scale: Scale) -> Result<Baseline> {
    let client = server.client(true)?;
    let source_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let source_secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let mut tokens: HashMap<String, Secret> = source_secrets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| Some((s.metadata.name.clone()?, s)))
        .collect();
    let mut work: Vec<(Pod, Secret)> = Vec::new();
    let listed = source_pods.list(&ListParams::default()).await?.items;
    let pod_json_bytes = listed
        .iter()
        .map(|p| serde_json::to_vec(p).map_or(0, |b| b.len()))
        .sum();
    for pod in listed {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        let Some(secret) = tokens.remove(&name) else {
            continue;
        };
        let fresh = Pod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(NS_BASELINE.into()),
                labels: pod.metadata.labels.clone(),
                annotations: pod.metadata.annotations.clone(),
                ..ObjectMeta::default()
            },
            spec: pod.spec.clone().map(|mut s| {
                // Pinned by affinity as Dory pins it, not bound.
                s.node_name = None;
                s
            }),
            status: None,
        };
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(NS_BASELINE.into()),
                labels: secret.metadata.labels.clone(),
                ..ObjectMeta::default()
            },
            data: secret.data.clone(),
            immutable: secret.immutable,
            type_: secret.type_.clone(),
            ..Secret::default()
        };
        work.push((fresh, secret));
    }
    if work.len() < scale.processors {
        return Err(format!(
            "only {} of {} pods and Secrets to copy",
            work.len(),
            scale.processors
        )
        .into());
    }

    // Followed as the placement follows Dory's: a namespaced watch of the pods.
    let running = Arc::new(AtomicUsize::new(0));
    let follow = {
        let running = Arc::clone(&running);
        let api: Api<Pod> = Api::namespaced(client.clone(), NS_BASELINE);
        tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(Ok(event)) = stream.next().await {
                if let watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) = event {
                    let up =
                        pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if up && seen.insert(pod.metadata.name.clone().unwrap_or_default()) {
                        running.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
    };
    let mark = server.mark().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS_BASELINE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS_BASELINE);
    let began = Instant::now();
    let bound = Settings::default().planner.max_concurrent_moves;
    let results: Vec<Result<()>> = futures::stream::iter(work)
        .map(|(pod, mut secret)| {
            let (pods, secrets) = (pods.clone(), secrets.clone());
            async move {
                let pp = PostParams::default();
                let created = pods.create(&pp, &pod).await?;
                // Owned by its pod, as Dory's are.
                secret.metadata.owner_references = Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Pod".into(),
                    name: created.metadata.name.clone().unwrap_or_default(),
                    uid: created.metadata.uid.clone().unwrap_or_default(),
                    ..OwnerReference::default()
                }]);
                secrets.create(&pp, &secret).await?;
                Ok(())
            }
        })
        .buffer_unordered(bound)
        .collect()
        .await;
    let created = began.elapsed();
    for r in results {
        r?;
    }
    let n = scale.processors;
    until("the baseline's pods run", Duration::from_millis(20), || {
        let up = running.load(Ordering::SeqCst);
        async move { Ok(up >= n) }
    })
    .await?;
    let running_after = began.elapsed();
    follow.abort();
    let requests = server.since(&mark).await?.of_namespace(NS_BASELINE);
    Ok(Baseline {
        pod_json_bytes,
        created,
        running: running_after,
        requests,
    })
}

/// What one kind of PodDisruptionBudget cost.
struct PdbCost {
    budgets: usize,
    create: Duration,
    requests: u64,
    events: u64,
    event_bytes: u64,
    list: Duration,
    list_bytes: usize,
    eviction_p50: Duration,
    eviction_p99: Duration,
    eviction_codes: BTreeMap<u16, usize>,
}

fn pdb(name: &str, labels: BTreeMap<String, String>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS_PDB.into()),
            labels: Some(BTreeMap::from([(
                dory_k8s::LABEL_MANAGED_BY.to_string(),
                dory_k8s::MANAGED_BY.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(0)),
            min_available: None,
            selector: Some(LabelSelector {
                match_labels: Some(labels),
                match_expressions: None,
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
        }),
        status: None,
    }
}

/// Creates `budgets` (as many at once as the orchestrator's move bound), followed by a
/// watch into a reflector as `dory-k8s` would follow them, then evicts [`EVICTIONS`] pods.
async fn pdb_cost(
    server: &mut ServerProcess,
    scale: Scale,
    budgets: Vec<PodDisruptionBudget>,
) -> Result<PdbCost> {
    let client = server.client(true)?;
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS_PDB);
    let (reader, writer) = reflector::store::<PodDisruptionBudget>();
    let events = Arc::new(AtomicU64::new(0));
    let event_bytes = Arc::new(AtomicU64::new(0));
    let follow = {
        let (events, event_bytes) = (Arc::clone(&events), Arc::clone(&event_bytes));
        let stream = watcher(api.clone(), watcher::Config::default()).reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(event)) = stream.next().await {
                if let watcher::Event::Apply(p) | watcher::Event::Delete(p) = &event {
                    events.fetch_add(1, Ordering::SeqCst);
                    let size = serde_json::to_vec(p).map_or(0, |b| b.len());
                    event_bytes.fetch_add(size as u64, Ordering::SeqCst);
                }
            }
        })
    };
    reader.wait_until_ready().await?;

    let count = budgets.len();
    let mark = server.mark().await?;
    let began = Instant::now();
    let bound = Settings::default().planner.max_concurrent_moves;
    let results: Vec<std::result::Result<PodDisruptionBudget, kube::Error>> =
        futures::stream::iter(budgets)
            .map(|b| {
                let api = api.clone();
                async move { api.create(&PostParams::default(), &b).await }
            })
            .buffer_unordered(bound)
            .collect()
            .await;
    let create = began.elapsed();
    for r in results {
        r?;
    }
    let requests = server.since(&mark).await?.of_namespace(NS_PDB);
    let requests = requests.sum(|v, r, _| v != "watch" && r == "poddisruptionbudgets");
    until(
        "the watch has every budget",
        Duration::from_millis(20),
        || {
            let seen = reader.len();
            async move { Ok(seen >= count) }
        },
    )
    .await?;

    // A re-list, as after a `410 Gone`.
    let began = Instant::now();
    let listed = api.list(&ListParams::default()).await?;
    let list = began.elapsed();
    let list_bytes = serde_json::to_vec(&listed)?.len();
    drop(listed);

    // Evictions of running, ready pods: each must be refused (429) by its budget.
    let evict: Api<Pod> = Api::namespaced(server.client(false)?, NS_PDB);
    let mut times = Vec::new();
    let mut codes = BTreeMap::new();
    let step = (scale.processors / EVICTIONS).max(1);
    for i in (0..scale.processors).step_by(step).take(EVICTIONS) {
        let name = format!("{}-1", processor_name(i));
        let began = Instant::now();
        let code = match evict.evict(&name, &EvictParams::default()).await {
            Ok(_) => 201,
            Err(kube::Error::Api(s)) => s.code,
            Err(e) => return Err(e.into()),
        };
        times.push(began.elapsed());
        *codes.entry(code).or_default() += 1;
    }
    let (eviction_p50, eviction_p99, _) = percentiles(times);
    follow.abort();
    Ok(PdbCost {
        budgets: count,
        create,
        requests,
        events: events.load(Ordering::SeqCst),
        event_bytes: event_bytes.load(Ordering::SeqCst),
        list,
        list_bytes,
        eviction_p50,
        eviction_p99,
        eviction_codes: codes,
    })
}

async fn pdb_phase(server: &mut ServerProcess, scale: Scale) -> Result<(PdbCost, PdbCost)> {
    server
        .ask(&format!("seed {NS_PDB} {}", scale.processors))
        .await?;
    let one = vec![pdb(
        "dory-processors",
        BTreeMap::from([(
            dory_k8s::LABEL_MANAGED_BY.to_string(),
            dory_k8s::MANAGED_BY.to_string(),
        )]),
    )];
    let one = pdb_cost(server, scale, one).await?;
    let api: Api<PodDisruptionBudget> = Api::namespaced(server.client(true)?, NS_PDB);
    api.delete("dory-processors", &DeleteParams::default())
        .await?;
    let each = (0..scale.processors)
        .map(|i| {
            pdb(
                &format!("dory-{}", processor_name(i)),
                BTreeMap::from([(dory_k8s::LABEL_PROCESSOR.to_string(), processor_name(i))]),
            )
        })
        .collect();
    let each = pdb_cost(server, scale, each).await?;
    Ok((one, each))
}

fn per_minute(n: u64, window: Duration) -> f64 {
    n as f64 * 60.0 / window.as_secs_f64().max(1e-9)
}

fn report(scale: Scale, dory: &Orchestrated, base: &Baseline, pdbs: &(PdbCost, PdbCost)) {
    let n = scale.processors;
    let cold = dory.cold.orchestrator();
    println!();
    println!(
        "reconcile: {n} processors on {} nodes (fake API server in a child process)",
        scale.nodes
    );
    println!(
        "| | all pods created s | all running s | requests | pods/s created |\n|---|---:|---:|---:|---:|"
    );
    println!(
        "| orchestrator (cold start) | {:.2} | {:.2} | {} | {:.0} |",
        dory.created.as_secs_f64(),
        dory.running.as_secs_f64(),
        cold.total(),
        n as f64 / dory.created.as_secs_f64()
    );
    println!(
        "| baseline (kube::Client loop, {} at once) | {:.2} | {:.2} | {} | {:.0} |",
        Settings::default().planner.max_concurrent_moves,
        base.created.as_secs_f64(),
        base.running.as_secs_f64(),
        base.requests.total(),
        n as f64 / base.created.as_secs_f64()
    );
    println!(
        "| orchestrator / baseline | {:.2} | {:.2} | {:.2} | |",
        dory.created.as_secs_f64() / base.created.as_secs_f64(),
        dory.running.as_secs_f64() / base.running.as_secs_f64(),
        cold.total() as f64 / base.requests.total().max(1) as f64
    );
    println!("cold start requests (orchestrator): {}", cold.describe());
    println!("baseline requests: {}", base.requests.describe());
    println!(
        "write limits lifted to {}/s (default 20/s, burst 40): at the default, {} writes take at least {:.0} s",
        dory.write_limits.per_second,
        cold.sum(|v, _, _| matches!(v, "create" | "update" | "patch" | "delete")),
        cold.sum(|v, _, _| matches!(v, "create" | "update" | "patch" | "delete")) as f64 / 20.0
    );
    let steady = dory.steady.orchestrator();
    let w = dory.steady_window;
    println!(
        "steady state over {:.0} s: watches {} ({:.1}/min), Lease {} ({:.1}/min), other {} ({:.1}/min)",
        w.as_secs_f64(),
        steady.watches(),
        per_minute(steady.watches(), w),
        steady.leases(),
        per_minute(steady.leases(), w),
        steady.other(),
        per_minute(steady.other(), w)
    );
    println!("steady requests: {}", steady.describe());
    println!(
        "stand-in kubelet (excluded above): cold {}, steady {}",
        dory.cold.total() - cold.total(),
        dory.steady.total() - steady.total()
    );
    println!(
        "rounds in the window: {} (reconcile p50 {:.1} ms, max {:.1} ms)",
        dory.rounds,
        ms(dory.round_p50),
        ms(dory.round_max)
    );
    println!(
        "memory (MiB): bench process before {:.1} (peak {:.1}); all running {:.1} (peak {:.1}); after the window {:.1} (peak {:.1}); fake server process {:.1} (peak {:.1})",
        dory.memory_start.0,
        dory.memory_start.1,
        dory.memory_running.0,
        dory.memory_running.1,
        dory.memory_steady.0,
        dory.memory_steady.1,
        dory.server_memory.0,
        dory.server_memory.1
    );
    println!(
        "bench process growth per processor: {:.1} KiB at all running, {:.1} KiB after the window; Dory's pods as JSON {:.1} MiB ({:.0} B each)",
        (dory.memory_running.0 - dory.memory_start.0) * 1024.0 / n as f64,
        (dory.memory_steady.0 - dory.memory_start.0) * 1024.0 / n as f64,
        base.pod_json_bytes as f64 / (1024.0 * 1024.0),
        base.pod_json_bytes as f64 / n as f64
    );
    println!();
    println!(
        "PodDisruptionBudgets over {n} running, ready pods\n| | budgets | create s | write requests | watch events | event KiB | re-list ms | list KiB | eviction p50 ms | p99 ms | answers |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for (label, c) in [("one over all", &pdbs.0), ("one per processor", &pdbs.1)] {
        println!(
            "| {label} | {} | {:.3} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
            c.budgets,
            c.create.as_secs_f64(),
            c.requests,
            c.events,
            c.event_bytes as f64 / 1024.0,
            ms(c.list),
            c.list_bytes as f64 / 1024.0,
            ms(c.eviction_p50),
            ms(c.eviction_p99),
            c.eviction_codes
                .iter()
                .map(|(code, k)| format!("{k}x{code}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
}

async fn bench(full: bool) -> Result<()> {
    let scale = Scale::from_env(full);
    println!(
        "reconcile: {} processors, {} nodes, steady window {:?}; load average {}",
        scale.processors,
        scale.nodes,
        scale.steady,
        load_average()
    );
    let mut server = ServerProcess::spawn(scale).await?;
    let result = async {
        let dory = orchestrated(&mut server, scale).await?;
        println!("orchestrated run done; load average {}", load_average());
        let base = baseline(&mut server, scale).await?;
        println!("baseline done; load average {}", load_average());
        let pdbs = pdb_phase(&mut server, scale).await?;
        println!("PDB phase done; load average {}", load_average());
        report(scale, &dory, &base, &pdbs);
        Ok::<(), BoxError>(())
    }
    .await;
    server.stop().await;
    result
}

fn main() {
    if std::env::var_os(SERVER_ROLE).is_some() {
        server_main();
        return;
    }
    dory_benches::run_server_bench("reconcile", bench);
}
