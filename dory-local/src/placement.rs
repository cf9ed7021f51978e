//! [`LocalPlacement`]: the [`Placement`] of one machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dory_control::{ClientSettings, HttpControl};
use dory_core::env as vars;
use dory_core::{
    ChangeNotifier, Changes, Clock, ControlEndpoint, Epoch, Health, Instance, InstanceControl,
    InstanceEnv, LaunchRequest, Node, NodeId, Phase, Placement, ProcessorId, SystemClock,
    Timestamp,
};
use rustix::process::Signal;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::config::{LocalConfig, LocalNode};
use crate::error::LocalError;
use crate::nodes::{LocalNodes, NodeState, instance_dirs, kill_instance, node_killed_reason};
use crate::process::ProcessRef;
use crate::registry::{
    self, ADDRESS_FILE, EXIT_FILE, ExitRecord, ExitStatus, InstanceRecord, RECORD_FILE,
    STDERR_FILE, STDOUT_FILE, TERMINATE_FILE, TerminateRecord, instance_dir_name,
};

/// How often the placement looks at its instances and nodes.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long one health check may take; a slow instance delays only its own pass.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// An instance directory without a supervisor pid younger than this is a launch in progress
/// (in another process); older, the launch was interrupted.
const LAUNCH_WINDOW: Duration = Duration::from_secs(10);
/// How long `instances()` and `nodes()` wait for the first full look after opening.
const FIRST_POLL_WAIT: Duration = Duration::from_secs(5);

/// The `DORY_*` variables of the instance environment contract: removed from what an
/// instance inherits, so only the values of its own launch reach it.
const CONTRACT_VARS: [&str; 13] = [
    vars::PROCESSOR_ID,
    vars::EPOCH,
    vars::MODE,
    vars::TOKEN,
    vars::PORT,
    vars::STORE_URL,
    vars::PUBLISHER_URL,
    vars::INPUT_URL,
    vars::LEASE_MS,
    vars::CHECKPOINT_INTERVAL_MS,
    vars::CONFIG,
    vars::ADDRESS_FILE,
    vars::HOST,
];

type Key = (ProcessorId, Epoch);

/// What the placement knows of one instance.
#[derive(Clone, Debug)]
struct Tracked {
    dir: PathBuf,
    record: InstanceRecord,
    phase: Phase,
    address: Option<String>,
    terminate: Option<TerminateRecord>,
    /// Changed by every direct change (launch, terminate); a poll pass that started before
    /// one does not overwrite it with what it saw earlier.
    generation: u64,
}

impl Tracked {
    fn new(dir: PathBuf, record: InstanceRecord, generation: u64) -> Self {
        Tracked {
            dir,
            record,
            phase: Phase::Starting,
            address: None,
            terminate: None,
            generation,
        }
    }

    fn view(&self) -> Instance {
        Instance {
            processor: self.record.processor.clone(),
            epoch: self.record.epoch,
            node: self.record.node.clone(),
            phase: self.phase.clone(),
            revision: self.record.revision,
            started_at: self.record.started_at,
            endpoint: self.address.as_ref().map(|address| ControlEndpoint {
                address: address.clone(),
                token: self.record.token.clone(),
            }),
        }
    }
}

#[derive(Default)]
struct Cache {
    instances: BTreeMap<Key, Tracked>,
    node_states: BTreeMap<NodeId, NodeState>,
    /// Registry entries that could not be read, with why (each logged once).
    problems: BTreeMap<PathBuf, String>,
    next_generation: u64,
    /// What was last published, to nudge only on a change.
    published: Option<(Vec<Instance>, Vec<Node>)>,
}

impl Cache {
    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }
}

struct Inner {
    config: LocalConfig,
    state_dir: PathBuf,
    nodes: LocalNodes,
    clock: Arc<dyn Clock>,
    control: HttpControl,
    notifier: ChangeNotifier,
    cache: Mutex<Cache>,
    poke: Notify,
    polled: watch::Sender<bool>,
    poller: Mutex<Option<JoinHandle<()>>>,
}

/// The [`Placement`] of one machine: instances are child OS processes on named virtual nodes.
///
/// Each instance runs under a supervisor ([`crate::supervise`]) in its own session, so it
/// outlives the orchestrator; everything about it is in its directory of the on-disk
/// registry (see [`crate::registry`]), so a restarted orchestrator that opens the same
/// `state_dir` re-adopts every instance and learns the fate of those that ended meanwhile:
/// nothing is restarted, nothing is lost.
///
/// Phases come from a background poll (every 100 ms, started on the tokio runtime the
/// placement is first used on): `Starting` until the instance has written its address and
/// answers `GET /healthz`, then the phase it reports; `Terminating` once asked to stop;
/// `Exited`/`Failed` from its `exit` file (a signal is reported as `Exited` with code
/// `128 + signal`), or `Failed` when its supervisor is gone without one. Every change nudges
/// [`changes`](Placement::changes).
///
/// A registry record that cannot be read (corrupt `instance.json`) is skipped with a warning
/// naming the file, and listed by [`LocalPlacement::registry_problems`]; the other instances
/// are served as usual, and the skipped one's directory still blocks a launch of the same
/// `(processor, epoch)`.
pub struct LocalPlacement {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPlacement")
            .field("state_dir", &self.inner.state_dir)
            .field("nodes", &self.inner.config.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Drop for LocalPlacement {
    fn drop(&mut self) {
        if let Some(poller) = lock(&self.inner.poller).take() {
            poller.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalPlacement {
    /// Opens the placement on `config.state_dir` (created if missing) and re-adopts every
    /// instance recorded there. Does not block on instances; their phases are known after the
    /// first poll, which `instances()` waits for.
    pub fn open(config: LocalConfig) -> Result<LocalPlacement, LocalError> {
        if config.supervisor.is_empty() {
            return Err(LocalError::Config(
                "`supervisor` is empty: it is the command that starts each instance's supervisor"
                    .into(),
            ));
        }
        if config.nodes.is_empty() {
            return Err(LocalError::Config("no nodes are configured".into()));
        }
        let mut seen = BTreeSet::new();
        for node in &config.nodes {
            if !seen.insert(&node.id) {
                return Err(LocalError::Config(format!(
                    "node {} is configured twice",
                    node.id
                )));
            }
        }
        // Absolute, because instances get paths inside it and may run elsewhere.
        let state_dir = std::path::absolute(&config.state_dir)
            .map_err(|e| LocalError::io("resolve", &config.state_dir, e))?;
        registry::create_private_dir_all(&state_dir.join("instances"))?;
        registry::create_private_dir_all(&state_dir.join("nodes"))?;
        let control = HttpControl::with_settings(
            ClientSettings::default()
                .with_timeout(HEALTH_TIMEOUT)
                .with_connect_timeout(HEALTH_TIMEOUT),
        );
        let placement = LocalPlacement {
            inner: Arc::new(Inner {
                nodes: LocalNodes::new(&state_dir),
                state_dir,
                config,
                clock: Arc::new(SystemClock),
                control,
                notifier: ChangeNotifier::new(),
                cache: Mutex::new(Cache::default()),
                poke: Notify::new(),
                polled: watch::channel(false).0,
                poller: Mutex::new(None),
            }),
        };
        let observation = placement.inner.observe()?;
        placement.inner.apply(observation);
        let adopted = lock(&placement.inner.cache).instances.len();
        tracing::info!(
            target: "dory::local",
            state_dir = %placement.inner.state_dir.display(),
            adopted,
            "local placement opened"
        );
        placement.ensure_polling();
        Ok(placement)
    }

    /// The configuration.
    pub fn config(&self) -> &LocalConfig {
        &self.inner.config
    }

    /// The state directory, absolute.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// The registry directory of an instance (whether or not it exists).
    pub fn instance_dir(&self, processor: &ProcessorId, epoch: Epoch) -> PathBuf {
        self.inner.instance_dir(processor, epoch)
    }

    /// The node operations on this placement's state directory.
    pub fn node_ops(&self) -> &LocalNodes {
        &self.inner.nodes
    }

    /// The registry entries skipped because they could not be read, each with the file and
    /// what is wrong with it.
    pub fn registry_problems(&self) -> Vec<(PathBuf, String)> {
        lock(&self.inner.cache)
            .problems
            .iter()
            .map(|(path, why)| (path.clone(), why.clone()))
            .collect()
    }

    /// Looks at every instance and node now (health checks included) instead of waiting for
    /// the next poll.
    pub async fn poll_now(&self) -> Result<(), LocalError> {
        self.ensure_polling();
        self.inner.pass().await
    }

    /// Cordons `node` (see [`LocalNodes::cordon`]).
    pub fn cordon(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.cordon(node))
    }

    /// Uncordons `node` (see [`LocalNodes::uncordon`]).
    pub fn uncordon(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.uncordon(node))
    }

    /// Drains `node` (see [`LocalNodes::drain`]).
    pub fn drain(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.drain(node))
    }

    /// Announces a spot reclamation of `node` at `deadline` (see [`LocalNodes::spot_notice`]).
    pub fn spot_notice(&self, node: &NodeId, deadline: Timestamp) -> Result<(), LocalError> {
        self.node_op(node, |n| n.spot_notice(node, deadline))
    }

    /// Kills `node` and every instance on it (see [`LocalNodes::kill_node`]).
    pub fn kill_node(&self, node: &NodeId) -> Result<Vec<(ProcessorId, Epoch)>, LocalError> {
        self.node_op(node, |n| n.kill_node(node))
    }

    /// Brings a killed `node` back (see [`LocalNodes::revive_node`]).
    pub fn revive_node(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.revive_node(node))
    }

    /// Marks `node` cut off from the network (see [`LocalNodes::partition`]).
    pub fn partition(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.partition(node))
    }

    /// Marks `node` reachable again (see [`LocalNodes::heal`]).
    pub fn heal(&self, node: &NodeId) -> Result<(), LocalError> {
        self.node_op(node, |n| n.heal(node))
    }

    fn node_op<T>(
        &self,
        node: &NodeId,
        op: impl FnOnce(&LocalNodes) -> Result<T, LocalError>,
    ) -> Result<T, LocalError> {
        self.inner.node_config(node)?;
        let result = op(&self.inner.nodes)?;
        // Seen at once by this placement's callers, not only at the next poll.
        let observation = self.inner.observe()?;
        self.inner.apply(observation);
        self.inner.poke.notify_one();
        Ok(result)
    }

    /// Starts the background poll on the current tokio runtime, if it is not running (it
    /// stops with the runtime it was started on, and is started again on the next use).
    fn ensure_polling(&self) {
        let mut poller = lock(&self.inner.poller);
        if poller.as_ref().is_some_and(|p| !p.is_finished()) {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            *poller = Some(runtime.spawn(poll_loop(Arc::downgrade(&self.inner))));
        }
    }

    /// Waits (bounded) for the first full look, so a re-adopted instance is reported with its
    /// real phase rather than `Starting`.
    async fn first_poll(&self) {
        self.ensure_polling();
        let mut polled = self.inner.polled.subscribe();
        let _ = tokio::time::timeout(FIRST_POLL_WAIT, polled.wait_for(|done| *done)).await;
    }

    fn launch_sync(
        &self,
        request: &LaunchRequest,
    ) -> Result<(Tracked, tokio::process::Child), LocalError> {
        let inner = &self.inner;
        let spec = &request.spec;
        let (processor, epoch, node) = (&spec.id, request.epoch, &request.node);
        let node_config = inner.node_config(node)?;
        if !inner.nodes.state(node)?.is_ready() {
            return Err(LocalError::NodeDown { node: node.clone() });
        }
        if spec.workload.command.is_empty() {
            return Err(LocalError::NoCommand {
                processor: processor.clone(),
            });
        }
        let dir = inner.instance_dir(processor, epoch);
        // The atomic step: of two launches of one (processor, epoch), one creates the
        // directory and the other starts nothing.
        if let Err(e) = registry::create_private_dir(&dir) {
            return Err(if e.kind() == io::ErrorKind::AlreadyExists {
                LocalError::AlreadyExists {
                    processor: processor.clone(),
                    epoch,
                    path: dir,
                }
            } else {
                LocalError::io("create", dir, e)
            });
        }
        let started = inner.start(request, node_config, &dir);
        if let Err(e) = &started {
            // The directory stays (the epoch is used up), with the failure as its fate.
            let _ = record_fate(
                &dir,
                ExitStatus::Failed {
                    reason: format!("launch failed: {e}"),
                },
                inner.clock.now(),
            );
        }
        started
    }
}

impl Inner {
    fn instance_dir(&self, processor: &ProcessorId, epoch: Epoch) -> PathBuf {
        self.state_dir
            .join("instances")
            .join(instance_dir_name(processor, epoch))
    }

    fn node_config(&self, node: &NodeId) -> Result<&LocalNode, LocalError> {
        self.config
            .nodes
            .iter()
            .find(|n| &n.id == node)
            .ok_or_else(|| LocalError::UnknownNode { node: node.clone() })
    }

    /// Writes the record, starts the supervisor and records its pid.
    fn start(
        &self,
        request: &LaunchRequest,
        node: &LocalNode,
        dir: &Path,
    ) -> Result<(Tracked, tokio::process::Child), LocalError> {
        let spec = &request.spec;
        let mut record = InstanceRecord {
            processor: spec.id.clone(),
            epoch: request.epoch,
            node: request.node.clone(),
            mode: request.mode,
            revision: spec.revision(),
            token: registry::new_token()?,
            started_at: self.clock.now(),
            supervisor: None,
        };
        let record_path = dir.join(RECORD_FILE);
        registry::write_json(&record_path, &record)?;
        let settings = &self.config.instance;
        let env = InstanceEnv {
            processor: spec.id.clone(),
            epoch: request.epoch,
            mode: request.mode,
            token: record.token.clone(),
            // Each instance binds a free port and reports it through the address file.
            port: 0,
            store_url: node
                .store_url
                .clone()
                .unwrap_or_else(|| settings.store_url.clone()),
            publisher_url: node
                .publisher_url
                .clone()
                .or_else(|| settings.publisher_url.clone()),
            input_url: settings.input_url.clone(),
            lease: settings.lease,
            checkpoint_interval: spec.checkpoint_interval,
            config: spec.config.clone(),
            address_file: Some(dir.join(ADDRESS_FILE)),
        };
        let stdout = registry::open_log(&dir.join(STDOUT_FILE))?;
        let stderr = registry::open_log(&dir.join(STDERR_FILE))?;
        let supervisor = &self.config.supervisor;
        let mut command = tokio::process::Command::new(&supervisor[0]);
        command
            .args(&supervisor[1..])
            .arg("--dir")
            .arg(dir)
            .arg("--")
            .args(&node.exec_prefix)
            .args(&spec.workload.command);
        for var in CONTRACT_VARS {
            command.env_remove(var);
        }
        // The contract's variables last: a workload cannot override its own identity.
        command
            .envs(&spec.workload.env)
            .envs(env.to_vars())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(false);
        let spawn_error = |source| LocalError::Spawn {
            processor: spec.id.clone(),
            epoch: request.epoch,
            node: request.node.clone(),
            program: supervisor[0].clone(),
            source,
        };
        let mut child = command.spawn().map_err(spawn_error)?;
        // Read before anything waits on the child: until it is reaped its /proc entry stays,
        // even if it has already exited.
        let supervisor_ref = child
            .id()
            .and_then(|pid| ProcessRef::of(pid).ok().flatten());
        let Some(supervisor_ref) = supervisor_ref else {
            let _ = child.start_kill();
            return Err(spawn_error(io::Error::other(
                "the supervisor's pid and start time could not be read",
            )));
        };
        record.supervisor = Some(supervisor_ref);
        if let Err(e) = registry::write_json(&record_path, &record) {
            let _ = child.start_kill();
            return Err(e);
        }
        tracing::info!(
            target: "dory::local",
            epoch = request.epoch.0,
            processor.id = %spec.id,
            node = %request.node,
            mode = %request.mode,
            pid = supervisor_ref.pid,
            "instance launched"
        );
        let generation = lock(&self.cache).generation();
        Ok((Tracked::new(dir.to_path_buf(), record, generation), child))
    }

    /// Reads the node states and the registry (no health checks), enforcing what the files
    /// say is due: spot deadlines, killed nodes, terminate grace periods.
    fn observe(&self) -> Result<Observation, LocalError> {
        let now = self.clock.now();
        let (snapshot, previous_states) = {
            let cache = lock(&self.cache);
            (cache.instances.clone(), cache.node_states.clone())
        };
        let mut problems = BTreeMap::new();
        let node_states = self.observe_nodes(now, &previous_states, &mut problems)?;
        let killed: BTreeSet<&NodeId> = node_states
            .iter()
            .filter(|(_, s)| s.killed)
            .map(|(n, _)| n)
            .collect();
        let by_dir: BTreeMap<&Path, &Tracked> =
            snapshot.values().map(|t| (t.dir.as_path(), t)).collect();
        let mut observed = BTreeMap::new();
        for dir in instance_dirs(&self.state_dir)? {
            let mut tracked = match by_dir.get(dir.as_path()) {
                Some(known) => Observed {
                    tracked: (*known).clone(),
                    known: true,
                },
                None => match InstanceRecord::load(&dir) {
                    Ok(record) => Observed {
                        tracked: Tracked::new(dir.clone(), record, 0),
                        known: false,
                    },
                    Err(e) => {
                        let in_progress = matches!(&e, LocalError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
                            && modified_within(&dir, LAUNCH_WINDOW);
                        if !in_progress {
                            problems.insert(dir.join(RECORD_FILE), e.to_string());
                        }
                        continue;
                    }
                },
            };
            let node_killed = killed.contains(&tracked.tracked.record.node);
            if let Err(e) = self.observe_instance(&mut tracked.tracked, node_killed, now) {
                tracing::warn!(target: "dory::local", "{e}");
            }
            let key = (
                tracked.tracked.record.processor.clone(),
                tracked.tracked.record.epoch,
            );
            observed.insert(key, tracked);
        }
        Ok(Observation {
            snapshot: snapshot
                .into_iter()
                .map(|(k, t)| (k, t.generation))
                .collect(),
            observed,
            node_states,
            problems,
        })
    }

    fn observe_nodes(
        &self,
        now: Timestamp,
        previous: &BTreeMap<NodeId, NodeState>,
        problems: &mut BTreeMap<PathBuf, String>,
    ) -> Result<BTreeMap<NodeId, NodeState>, LocalError> {
        let mut states = BTreeMap::new();
        for (node, state) in self.nodes.states()? {
            match state {
                Ok(state) => {
                    states.insert(node, state);
                }
                Err(e) => {
                    if let LocalError::Corrupt { path, .. } = &e {
                        problems.insert(path.clone(), e.to_string());
                    }
                    // Keep what was last read rather than forget a kill or a cordon.
                    if let Some(state) = previous.get(&node) {
                        states.insert(node, state.clone());
                    }
                }
            }
        }
        let due: Vec<NodeId> = states
            .iter()
            .filter(|(_, s)| {
                !s.killed
                    && s.interruption
                        .as_ref()
                        .and_then(|i| i.deadline)
                        .is_some_and(|deadline| deadline <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for node in due {
            tracing::warn!(target: "dory::local", %node, "spot deadline reached: killing the node");
            self.nodes.kill_node(&node)?;
            states.insert(node.clone(), self.nodes.state(&node)?);
        }
        Ok(states)
    }

    /// Brings one instance's phase up to date from its files and its supervisor.
    fn observe_instance(
        &self,
        t: &mut Tracked,
        node_killed: bool,
        now: Timestamp,
    ) -> Result<(), LocalError> {
        if t.phase.is_gone() {
            return Ok(());
        }
        let exit_path = t.dir.join(EXIT_FILE);
        if let Some(fate) = registry::read_json::<ExitRecord>(&exit_path)? {
            t.phase = fate.status.phase();
            return Ok(());
        }
        if t.record.supervisor.is_none()
            && let Some(found) = crate::process::find_supervisor(&t.record.token)
        {
            // The launch started the supervisor but whoever launched it has not recorded it
            // (yet, or ever: it was killed in between). Left unrecorded, the instance would
            // be declared failed below while it runs on, unseen and out of reach of terminate
            // and of a node kill; recorded, it is watched like any other. The launcher, if it
            // is still at it, records the same process.
            tracing::info!(target: "dory::local", epoch = t.record.epoch.0, processor.id = %t.record.processor, pid = found.pid, "adopted the supervisor of an interrupted launch");
            t.record.supervisor = Some(found);
            registry::write_json(&t.dir.join(RECORD_FILE), &t.record)?;
        }
        let Some(supervisor) = t.record.supervisor else {
            if now.since(t.record.started_at) > LAUNCH_WINDOW {
                record_fate(
                    &t.dir,
                    ExitStatus::Failed {
                        reason: "the launch was interrupted before its supervisor was recorded"
                            .into(),
                    },
                    now,
                )?;
                self.read_fate(t)?;
            }
            return Ok(());
        };
        if node_killed {
            kill_instance(&t.dir, &t.record, &node_killed_reason(&t.record.node), now)?;
            return self.read_fate(t);
        }
        if !supervisor.is_alive() {
            // Whatever the supervisor left running would run unsupervised: the instance is
            // declared failed, so it must be gone.
            let _ = crate::process::kill_all(&supervisor, &t.record.token);
            // The supervisor writes the exit file before it exits, so one it wrote since the
            // read above is kept (`record_fate` writes only if there is none).
            record_fate(
                &t.dir,
                ExitStatus::Failed {
                    reason: format!(
                        "its supervisor (pid {}) ended without recording an exit status",
                        supervisor.pid
                    ),
                },
                now,
            )?;
            return self.read_fate(t);
        }
        t.terminate = registry::read_json(&t.dir.join(TERMINATE_FILE))?;
        if let Some(stop) = t.terminate {
            t.phase = Phase::Terminating;
            if now >= stop.kill_at {
                self.kill_after_grace(t, supervisor, now)?;
                return self.read_fate(t);
            }
        }
        if t.address.is_none()
            && let Some(text) = registry::read_text(&t.dir.join(ADDRESS_FILE))?
        {
            // A node no longer configured is reached where a node without a host is.
            let host = self
                .node_config(&t.record.node)
                .ok()
                .and_then(|n| n.reach_host);
            t.address = reachable_address(text.trim(), host);
        }
        Ok(())
    }

    fn read_fate(&self, t: &mut Tracked) -> Result<(), LocalError> {
        if let Some(fate) = registry::read_json::<ExitRecord>(&t.dir.join(EXIT_FILE))? {
            if !t.phase.is_gone() {
                let level_warn = matches!(fate.status, ExitStatus::Failed { .. });
                if level_warn {
                    tracing::warn!(target: "dory::local", epoch = t.record.epoch.0, processor.id = %t.record.processor, node = %t.record.node, "instance {}", fate.status);
                } else {
                    tracing::info!(target: "dory::local", epoch = t.record.epoch.0, processor.id = %t.record.processor, node = %t.record.node, "instance {}", fate.status);
                }
            }
            t.phase = fate.status.phase();
        }
        Ok(())
    }

    /// The grace period is over: SIGKILL to the whole process group. The supervisor dies with
    /// it, so the placement records the fate (the signal) itself.
    fn kill_after_grace(
        &self,
        t: &Tracked,
        supervisor: ProcessRef,
        now: Timestamp,
    ) -> Result<(), LocalError> {
        tracing::warn!(target: "dory::local", epoch = t.record.epoch.0, processor.id = %t.record.processor, pid = supervisor.pid, "grace period over: killing the instance");
        crate::process::kill_all(&supervisor, &t.record.token).map_err(|source| {
            LocalError::Signal {
                processor: t.record.processor.clone(),
                epoch: t.record.epoch,
                signal: "SIGKILL",
                target: format!("process group {}", supervisor.pid),
                source,
            }
        })?;
        record_fate(&t.dir, ExitStatus::Signaled { signal: 9 }, now)?;
        Ok(())
    }

    /// Asks every live instance with an address for its health, all at once.
    async fn check_health(&self, observation: &mut Observation) {
        let mut checks = tokio::task::JoinSet::new();
        for (key, o) in &observation.observed {
            let t = &o.tracked;
            if t.address.is_none() || t.phase.is_gone() || t.terminate.is_some() {
                continue;
            }
            let control = self.control.clone();
            let instance = t.view();
            let key = key.clone();
            checks.spawn(async move { (key, control.health(&instance).await) });
        }
        while let Some(done) = checks.join_next().await {
            let Ok((key, answer)) = done else { continue };
            let Some(o) = observation.observed.get_mut(&key) else {
                continue;
            };
            match answer {
                // An address that answers for another epoch is not this instance (its port
                // was reused): no phase from it.
                Ok(Health { phase, epoch, .. })
                    if epoch == o.tracked.record.epoch && !phase.is_gone() =>
                {
                    o.tracked.phase = phase;
                }
                // No answer: the phase stays what it was (a live supervisor says the
                // instance is there; the orchestrator's own calls find out more).
                _ => {}
            }
        }
    }

    /// One full look: files, enforcement, health, then the cache and a nudge on change.
    async fn pass(&self) -> Result<(), LocalError> {
        let mut observation = self.observe()?;
        self.check_health(&mut observation).await;
        self.apply(observation);
        Ok(())
    }

    /// Merges an observation into the cache; entries changed directly since it was taken
    /// keep the direct change.
    fn apply(&self, observation: Observation) {
        let Observation {
            snapshot,
            observed,
            node_states,
            problems,
        } = observation;
        let mut cache = lock(&self.cache);
        for (key, o) in observed {
            match (cache.instances.get(&key), snapshot.get(&key)) {
                (Some(current), Some(seen)) if o.known && current.generation == *seen => {
                    cache.instances.insert(key, o.tracked);
                }
                (None, None) if !o.known => {
                    let mut tracked = o.tracked;
                    tracked.generation = cache.generation();
                    tracing::info!(target: "dory::local", epoch = tracked.record.epoch.0, processor.id = %tracked.record.processor, node = %tracked.record.node, phase = %tracked.phase, "instance adopted");
                    cache.instances.insert(key, tracked);
                }
                _ => {}
            }
        }
        // Directories that are gone were forgotten (possibly by another process).
        let dirs_gone: Vec<Key> = cache
            .instances
            .iter()
            .filter(|(k, t)| snapshot.get(*k) == Some(&t.generation) && !t.dir.exists())
            .map(|(k, _)| k.clone())
            .collect();
        for key in dirs_gone {
            cache.instances.remove(&key);
        }
        for (path, why) in &problems {
            if !cache.problems.contains_key(path) {
                tracing::warn!(target: "dory::local", path = %path.display(), "registry entry skipped: {why}");
            }
        }
        cache.problems = problems;
        cache.node_states = node_states;
        self.publish(&mut cache);
    }

    fn node_view(&self, states: &BTreeMap<NodeId, NodeState>) -> Vec<Node> {
        let mut nodes: Vec<Node> = self
            .config
            .nodes
            .iter()
            .map(|n| {
                let state = states.get(&n.id).cloned().unwrap_or_default();
                Node {
                    id: n.id.clone(),
                    site: n.site,
                    schedulable: !state.cordoned,
                    ready: state.is_ready(),
                    ready_since: state.ready_since,
                    capacity: n.capacity,
                    interruption: state.interruption,
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// Nudges subscribers if what `instances()`/`nodes()` answer has changed.
    fn publish(&self, cache: &mut Cache) {
        let instances: Vec<Instance> = cache.instances.values().map(Tracked::view).collect();
        let nodes = self.node_view(&cache.node_states);
        let view = Some((instances, nodes));
        if cache.published != view {
            cache.published = view;
            self.notifier.notify();
        }
    }

    /// The tracked instance, from the cache or, if the poll has not seen it yet, its
    /// directory.
    fn lookup(&self, processor: &ProcessorId, epoch: Epoch) -> Result<Option<Tracked>, LocalError> {
        if let Some(t) = lock(&self.cache).instances.get(&(processor.clone(), epoch)) {
            return Ok(Some(t.clone()));
        }
        let dir = self.instance_dir(processor, epoch);
        if !dir.exists() {
            return Ok(None);
        }
        let record = InstanceRecord::load(&dir)?;
        let mut t = Tracked::new(dir, record, 0);
        let killed = self.nodes.state(&t.record.node)?.killed;
        self.observe_instance(&mut t, killed, self.clock.now())?;
        Ok(Some(t))
    }

    /// Replaces one cache entry after a direct change, and publishes.
    fn update(&self, mut t: Tracked) {
        let mut cache = lock(&self.cache);
        t.generation = cache.generation();
        cache
            .instances
            .insert((t.record.processor.clone(), t.record.epoch), t);
        self.publish(&mut cache);
    }

    fn terminate_sync(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> Result<(), LocalError> {
        let Some(mut t) = self.lookup(processor, epoch)? else {
            return Err(LocalError::UnknownInstance {
                processor: processor.clone(),
                epoch,
            });
        };
        let now = self.clock.now();
        let killed = self.nodes.state(&t.record.node)?.killed;
        self.observe_instance(&mut t, killed, now)?;
        if t.phase.is_gone() {
            return Ok(());
        }
        let asked = TerminateRecord {
            requested_at: now,
            kill_at: now.plus(grace),
        };
        let existing: Option<TerminateRecord> = registry::read_json(&t.dir.join(TERMINATE_FILE))?;
        let stop = match existing {
            // Idempotent; a second request may only shorten the grace period.
            Some(stop) if stop.kill_at <= asked.kill_at => stop,
            Some(stop) => TerminateRecord {
                kill_at: asked.kill_at,
                ..stop
            },
            None => asked,
        };
        if existing != Some(stop) {
            registry::write_json(&t.dir.join(TERMINATE_FILE), &stop)?;
        }
        t.terminate = Some(stop);
        t.phase = Phase::Terminating;
        if let Some(supervisor) = t.record.supervisor {
            if existing.is_none() {
                tracing::info!(target: "dory::local", epoch = epoch.0, processor.id = %processor, node = %t.record.node, ?grace, "terminating instance");
                // To the supervisor alone: it forwards to the program, which owns SIGTERM.
                supervisor
                    .signal(Signal::TERM)
                    .map_err(|source| LocalError::Signal {
                        processor: processor.clone(),
                        epoch,
                        signal: "SIGTERM",
                        target: format!("pid {}", supervisor.pid),
                        source,
                    })?;
            }
            if now >= stop.kill_at {
                self.kill_after_grace(&t, supervisor, now)?;
                self.read_fate(&mut t)?;
            }
        }
        self.update(t);
        Ok(())
    }

    fn forget_sync(&self, processor: &ProcessorId, epoch: Epoch) -> Result<(), LocalError> {
        let Some(mut t) = self.lookup(processor, epoch)? else {
            return Ok(());
        };
        let killed = self.nodes.state(&t.record.node)?.killed;
        self.observe_instance(&mut t, killed, self.clock.now())?;
        if !t.phase.is_gone() {
            return Err(LocalError::NotEnded {
                processor: processor.clone(),
                epoch,
                phase: t.phase.to_string(),
            });
        }
        match fs::remove_dir_all(&t.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(LocalError::io("remove", &t.dir, e)),
        }
        tracing::debug!(target: "dory::local", epoch = epoch.0, processor.id = %processor, "instance forgotten");
        let mut cache = lock(&self.cache);
        cache.instances.remove(&(processor.clone(), epoch));
        self.publish(&mut cache);
        Ok(())
    }
}

/// One instance as a poll saw it.
struct Observed {
    tracked: Tracked,
    /// It was in the cache when the poll began (else the poll found it on disk).
    known: bool,
}

/// What one poll saw.
struct Observation {
    /// The cache's entries and their generations when the poll began.
    snapshot: BTreeMap<Key, u64>,
    observed: BTreeMap<Key, Observed>,
    node_states: BTreeMap<NodeId, NodeState>,
    problems: BTreeMap<PathBuf, String>,
}

/// Records `status` as the instance's fate unless it already has one.
fn record_fate(dir: &Path, status: ExitStatus, now: Timestamp) -> Result<bool, LocalError> {
    let path = dir.join(EXIT_FILE);
    let bytes =
        serde_json::to_vec(&ExitRecord { status, at: now }).map_err(|e| LocalError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    registry::write_if_absent(&path, &bytes)
}

/// Whether `path` was modified less than `window` ago.
fn modified_within(path: &Path, window: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < window)
}

/// The address to reach an instance at: one bound to every interface (`0.0.0.0:p`, `[::]:p`)
/// is reached at the node's `reach_host`, else on loopback.
fn reachable_address(written: &str, reach_host: Option<IpAddr>) -> Option<String> {
    if written.is_empty() {
        return None;
    }
    Some(match written.parse::<SocketAddr>() {
        Ok(mut address) if address.ip().is_unspecified() => {
            address.set_ip(match (reach_host, address.ip()) {
                (Some(host), _) => host,
                (None, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                (None, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
            address.to_string()
        }
        _ => written.to_string(),
    })
}

async fn poll_loop(inner: Weak<Inner>) {
    loop {
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = inner.pass().await {
            tracing::warn!(target: "dory::local", "poll failed: {e}");
        }
        inner.polled.send_replace(true);
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            () = inner.poke.notified() => {}
        }
    }
}

#[async_trait]
impl Placement for LocalPlacement {
    async fn nodes(&self) -> dory_core::Result<Vec<Node>> {
        self.first_poll().await;
        let cache = lock(&self.inner.cache);
        Ok(self.inner.node_view(&cache.node_states))
    }

    async fn instances(&self) -> dory_core::Result<Vec<Instance>> {
        self.first_poll().await;
        Ok(lock(&self.inner.cache)
            .instances
            .values()
            .map(Tracked::view)
            .collect())
    }

    async fn launch(&self, request: &LaunchRequest) -> dory_core::Result<Instance> {
        self.ensure_polling();
        let (tracked, mut child) = self.launch_sync(request)?;
        let view = tracked.view();
        self.inner.update(tracked);
        // Reap the supervisor and look at once when it ends.
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let _ = child.wait().await;
            if let Some(inner) = inner.upgrade() {
                inner.poke.notify_one();
            }
        });
        Ok(view)
    }

    async fn terminate(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        grace: Duration,
    ) -> dory_core::Result<()> {
        self.ensure_polling();
        self.inner.terminate_sync(processor, epoch, grace)?;
        self.inner.poke.notify_one();
        Ok(())
    }

    async fn forget(&self, processor: &ProcessorId, epoch: Epoch) -> dory_core::Result<()> {
        self.ensure_polling();
        Ok(self.inner.forget_sync(processor, epoch)?)
    }

    fn changes(&self) -> Changes {
        self.ensure_polling();
        self.inner.notifier.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_bound_to_every_interface_is_reached_at_its_nodes_host() {
        assert_eq!(
            reachable_address("0.0.0.0:4000", None).as_deref(),
            Some("127.0.0.1:4000")
        );
        assert_eq!(
            reachable_address("[::]:4000", None).as_deref(),
            Some("[::1]:4000")
        );
        let host = Some(IpAddr::from([10, 200, 1, 2]));
        assert_eq!(
            reachable_address("0.0.0.0:4000", host).as_deref(),
            Some("10.200.1.2:4000")
        );
        // An address the instance chose itself is kept.
        assert_eq!(
            reachable_address("192.0.2.7:4000", host).as_deref(),
            Some("192.0.2.7:4000")
        );
        assert_eq!(reachable_address("", host), None);
    }
}
