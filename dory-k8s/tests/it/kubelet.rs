//! A stand-in for the kubelets of the fake API server's nodes: every pod the scheduler bound
//! to a node becomes a real processor process (the counter example) on a loopback address of
//! its own, so the orchestrator's moves carry real state between real processes.
//!
//! What it does, as a kubelet does:
//! - starts a bound pod's container once its environment resolves (a `secretKeyRef` waits
//!   for its Secret, as a pod waits in `ContainerCreating`), with the pod's `env`, plus
//!   `DORY_HOST` (the pod's own `127.x.y.z` address, its pod IP) so every instance binds the
//!   same SDK port on its own address;
//! - reports the pod `Running` with that IP, and its `Ready` condition as the process's
//!   `/readyz` answers (the pod's readiness probe);
//! - on a graceful delete sends SIGTERM, SIGKILL once the pod's grace period is over, and
//!   confirms the deletion once the process has exited;
//! - reports a process that ended by itself as the container's termination (exit code, the
//!   pod `Succeeded` or `Failed`; `restartPolicy: Never`).
//!
//! [`Kubelet::kill_node`] plays a machine that dies: every process of the node gets SIGKILL
//! and the node's pods are left as they are (nothing reports for a dead node). Dropping the
//! kubelet kills every process it started.
//!
//! It looks at the store directly (no API requests), so the fake's request counts are the
//! placement's alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dory_k8s_fake::{FakeApiServer, PodReport};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Pod, Secret,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::support::next_ip;

/// How often the kubelet looks at its pods and probes their readiness.
const TICK: Duration = Duration::from_millis(50);

/// The counter binary every pod runs (`DORY_COUNTER_BIN`; `scripts/test.sh` builds it).
/// `None` skips a test outside CI; under `CI=true` a missing binary fails it.
pub(crate) fn counter_bin() -> Option<PathBuf> {
    match std::env::var_os("DORY_COUNTER_BIN") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        other => {
            let why = match other {
                Some(p) => format!("DORY_COUNTER_BIN={} is not a file", Path::new(&p).display()),
                None => "DORY_COUNTER_BIN is not set".to_string(),
            };
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why} (build it: cargo build -p dory-example-counter)");
            }
            eprintln!("skipped: {why} (build it: cargo build -p dory-example-counter)");
            None
        }
    }
}

/// One container the kubelet runs.
struct Container {
    uid: String,
    node: String,
    ip: Ipv4Addr,
    port: u16,
    child: Child,
    /// When SIGTERM was sent, and when SIGKILL follows.
    stopping: Option<Instant>,
    kill_at: Option<Instant>,
    /// The readiness last reported.
    ready: Option<bool>,
}

#[derive(Default)]
struct State {
    /// By pod name.
    running: BTreeMap<String, Container>,
    /// Pods (by uid) whose container ended: never started again.
    ended: BTreeSet<String>,
    /// Nodes that died: their pods are left alone.
    dead: BTreeSet<String>,
    /// Processes started, in order: (pod, node, address and epoch).
    started: Vec<(String, String, String)>,
}

struct Shared {
    server: Arc<FakeApiServer>,
    namespace: String,
    bin: PathBuf,
    logs: PathBuf,
    state: Mutex<State>,
}

/// The kubelets of every node of a fake API server. See the [module docs](self).
pub(crate) struct Kubelet {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Kubelet {
    /// Starts running the pods of `namespace` with `bin`, writing each process's output to
    /// `<logs>/<pod>.log`.
    pub(crate) fn start(
        server: Arc<FakeApiServer>,
        namespace: &str,
        bin: &Path,
        logs: &Path,
    ) -> Kubelet {
        std::fs::create_dir_all(logs).expect("the kubelet's log directory");
        let shared = Arc::new(Shared {
            server,
            namespace: namespace.into(),
            bin: bin.into(),
            logs: logs.into(),
            state: Mutex::new(State::default()),
        });
        let task = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move {
                loop {
                    shared.tick().await;
                    tokio::time::sleep(TICK).await;
                }
            }
        });
        Kubelet { shared, task }
    }

    /// The machine under `node` dies: SIGKILL to every process of its pods, and nothing is
    /// reported for the node's pods any more (the test marks the node not ready).
    pub(crate) fn kill_node(&self, node: &str) {
        let mut state = lock(&self.shared.state);
        state.dead.insert(node.into());
        let names: Vec<String> = state
            .running
            .iter()
            .filter(|(_, c)| c.node == node)
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Some(mut c) = state.running.remove(&name) {
                let _ = c.child.start_kill();
                state.ended.insert(c.uid);
            }
        }
    }

    /// The node is back (rebooted): its kubelet reports again, and confirms the deletion of
    /// pods whose processes died with it. Nothing that ran there starts again.
    pub(crate) fn revive_node(&self, node: &str) {
        lock(&self.shared.state).dead.remove(node);
    }

    /// Pods whose process runs now, with their node.
    pub(crate) fn running(&self) -> BTreeMap<String, String> {
        lock(&self.shared.state)
            .running
            .iter()
            .map(|(n, c)| (n.clone(), c.node.clone()))
            .collect()
    }

    /// Every process started so far: (pod, node, address and epoch).
    pub(crate) fn started(&self) -> Vec<(String, String, String)> {
        lock(&self.shared.state).started.clone()
    }

    /// The last lines of every process's output, for failure messages.
    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.shared.logs)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        for path in entries {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!("--- {}\n", path.display()));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        let mut state = lock(&self.shared.state);
        for (_, mut c) in std::mem::take(&mut state.running) {
            let _ = c.child.start_kill();
        }
    }
}

/// What the kubelet does about one pod after a look.
enum Step {
    Start(Box<Pod>),
    Confirm(String),
    Report(String, PodReport),
    Ended(String, ExitStatus, bool),
    Signal(String),
}

impl Shared {
    async fn tick(&self) {
        let pods: Vec<Pod> = match self.server.list(Some(&self.namespace)) {
            Ok(pods) => pods,
            Err(e) => {
                eprintln!("kubelet: listing pods: {e}");
                return;
            }
        };
        let by_name: BTreeMap<String, &Pod> = pods
            .iter()
            .filter_map(|p| Some((p.metadata.name.clone()?, p)))
            .collect();
        let mut steps = Vec::new();
        let mut probes = Vec::new();
        {
            let mut state = lock(&self.state);
            // A pod removed from the store (a forced delete, a namespace cleanup) takes its
            // container with it.
            let gone: Vec<String> = state
                .running
                .iter()
                .filter(|(name, c)| {
                    by_name.get(*name).and_then(|p| p.metadata.uid.as_ref()) != Some(&c.uid)
                })
                .map(|(n, _)| n.clone())
                .collect();
            for name in gone {
                if let Some(mut c) = state.running.remove(&name) {
                    let _ = c.child.start_kill();
                    state.ended.insert(c.uid);
                }
            }
            let now = Instant::now();
            for pod in &pods {
                let (Some(name), Some(uid)) = (&pod.metadata.name, &pod.metadata.uid) else {
                    continue;
                };
                let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                    continue;
                };
                if state.dead.contains(&node) {
                    continue;
                }
                let terminating = pod.metadata.deletion_timestamp.is_some();
                let Some(c) = state.running.get_mut(name) else {
                    if terminating {
                        // Its container is not running (it ended, or died with its node).
                        steps.push(Step::Confirm(name.clone()));
                    } else if !state.ended.contains(uid) && !finished(pod) {
                        steps.push(Step::Start(Box::new(pod.clone())));
                    }
                    continue;
                };
                match c.child.try_wait() {
                    Ok(Some(status)) => {
                        steps.push(Step::Ended(name.clone(), status, terminating));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => eprintln!("kubelet: waiting for {name}: {e}"),
                }
                if terminating {
                    if c.stopping.is_none() {
                        let grace = pod
                            .metadata
                            .deletion_grace_period_seconds
                            .unwrap_or(30)
                            .max(0) as u64;
                        c.stopping = Some(now);
                        c.kill_at = Some(now + Duration::from_secs(grace));
                        steps.push(Step::Signal(name.clone()));
                    } else if c.kill_at.is_some_and(|at| now >= at) {
                        let _ = c.child.start_kill();
                        c.kill_at = None;
                    }
                    continue;
                }
                probes.push((name.clone(), c.ip, c.port, c.ready));
            }
        }
        for (name, ip, port, last) in probes {
            let ready = readyz(ip, port).await;
            if last != Some(ready) {
                let mut report = PodReport::running(&ip.to_string());
                if !ready {
                    report = report.not_ready();
                }
                steps.push(Step::Report(name.clone(), report));
                if let Some(c) = lock(&self.state).running.get_mut(&name) {
                    c.ready = Some(ready);
                }
            }
        }
        for step in steps {
            self.apply(step);
        }
    }

    fn apply(&self, step: Step) {
        let ns = self.namespace.as_str();
        match step {
            Step::Start(pod) => self.start(&pod),
            Step::Confirm(name) => {
                if let Err(e) = self.server.confirm_pod_deletion(ns, &name) {
                    eprintln!("kubelet: confirming the deletion of {name}: {e}");
                }
            }
            Step::Report(name, report) => {
                if let Err(e) = self.server.report_pod(ns, &name, &report) {
                    eprintln!("kubelet: reporting {name}: {e}");
                }
            }
            Step::Signal(name) => {
                let state = lock(&self.state);
                if let Some(pid) = state.running.get(&name).and_then(|c| c.child.id()) {
                    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            Step::Ended(name, status, terminating) => {
                let uid = {
                    let mut state = lock(&self.state);
                    let Some(c) = state.running.remove(&name) else {
                        return;
                    };
                    state.ended.insert(c.uid.clone());
                    c.uid
                };
                if terminating {
                    self.apply(Step::Confirm(name));
                    return;
                }
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
                let result = self.server.modify::<Pod>(Some(ns), &name, |pod| {
                    if pod.metadata.uid.as_deref() != Some(uid.as_str()) {
                        return;
                    }
                    let status = pod.status.get_or_insert_with(Default::default);
                    status.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
                    status.container_statuses = Some(vec![ContainerStatus {
                        name: dory_k8s::CONTAINER.into(),
                        state: Some(ContainerState {
                            terminated: Some(ContainerStateTerminated {
                                exit_code: code,
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]);
                });
                if let Err(e) = result {
                    eprintln!("kubelet: reporting the end of {name}: {e}");
                }
            }
        }
    }

    /// Starts a pod's container, if its environment resolves (else tried again next tick).
    fn start(&self, pod: &Pod) {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let Some(container) = pod.spec.as_ref().and_then(|s| {
            s.containers
                .iter()
                .find(|c| c.name == dory_k8s::CONTAINER)
                .or(s.containers.first())
        }) else {
            return;
        };
        let mut env = BTreeMap::new();
        for var in container.env.as_deref().unwrap_or_default() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let Some(r) = &from.secret_key_ref else {
                        eprintln!("kubelet: {name}: only secretKeyRef sources are supported");
                        return;
                    };
                    let secret = self
                        .server
                        .get::<Secret>(Some(&self.namespace), &r.name)
                        .ok()
                        .flatten();
                    let value = secret
                        .and_then(|s| s.data)
                        .and_then(|d| d.get(&r.key).cloned())
                        .and_then(|b| String::from_utf8(b.0).ok());
                    match value {
                        Some(v) => v,
                        // `ContainerCreating` until the Secret is there.
                        None => return,
                    }
                }
                (None, None) => String::new(),
            };
            env.insert(var.name.clone(), value);
        }
        let port = container
            .ports
            .as_deref()
            .and_then(|p| p.first())
            .map(|p| p.container_port as u16)
            .or_else(|| env.get(dory_core::env::PORT).and_then(|p| p.parse().ok()))
            .expect("the pod names the SDK port");
        let ip = next_ip();
        env.insert(dory_core::env::HOST.into(), ip.to_string());
        let log = self.logs.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("a process log");
        let err = out.try_clone().expect("a process log");
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .envs(&env)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => panic!("kubelet: starting {}: {e}", self.bin.display()),
        };
        let epoch = env.get(dory_core::env::EPOCH).cloned().unwrap_or_default();
        let mut state = lock(&self.state);
        state.started.push((
            name.clone(),
            node.clone(),
            format!("{ip}:{port} epoch {epoch}"),
        ));
        state.running.insert(
            name.clone(),
            Container {
                uid,
                node,
                ip,
                port,
                child,
                stopping: None,
                kill_at: None,
                ready: None,
            },
        );
        drop(state);
        // Running, not yet ready: the container runs, its probe has not passed.
        if let Err(e) = self.server.report_pod(
            &self.namespace,
            &name,
            &PodReport::running(&ip.to_string()).not_ready(),
        ) {
            eprintln!("kubelet: reporting {name}: {e}");
        }
        if let Some(c) = lock(&self.state).running.get_mut(&name) {
            c.ready = Some(false);
        }
    }
}

/// Whether the pod has ended (`Succeeded` or `Failed`).
fn finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The readiness probe: `GET /readyz` answers 200.
async fn readyz(ip: Ipv4Addr, port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let request =
            format!("GET /readyz HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_millis(500), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
