//! The pause a processor sees in a planned move, orchestrated end to end on the embedded
//! default, against what users have without Dory, measured in the same run.
//!
//! Both sides run the same processor binary (`move_pause_processor`, a real process on
//! `dory-runtime` wired from its `DORY_*` environment by `dory-connect`): its state is
//! `size` random bytes plus a step counter, and each step publishes the wall-clock time it
//! began (ns since the Unix epoch, one clock for every process on the machine) to the
//! JSON-lines output (`FilePublisher`), then sleeps about 1 ms. The pause is the time in the
//! first output of the new instance minus the time in the last output of the old one, read
//! back with `read_output`.
//!
//! - **Dory**: the real [`Orchestrator`] (library) with [`LocalPlacement`] (two virtual
//!   nodes, every instance started through the same binary as supervisor), [`HttpControl`],
//!   [`EmbeddedStore`], [`EmbeddedStatus`], [`EmbeddedLeadership`] and [`FileConfig`] on a
//!   TOML file the bench writes. Each move is an operator pin to the other node
//!   (`record_intent(Intent::Pin)`), awaited through the orchestrator's `Moved` event, whose
//!   `pause_ms` (freeze request to resume answer) is recorded beside the processor's pause.
//!   The orchestrator pre-copies (its `PreCopy` step, before the freeze, while the old
//!   instance runs), so the freeze sends, loads and commits a delta of the changed chunks.
//! - **Baseline**: what users have without Dory. SIGTERM the running process (the runtime
//!   stores a final checkpoint and exits), hand ownership to a new epoch (`release` the old,
//!   `assign_owner` the new: no lease to wait for, the epoch claimed before the stop), start a
//!   new process in `restore` mode (it loads the latest snapshot from the store), first output.
//!   Same binary, same store implementation (an [`EmbeddedStore`] in a SQLite file of its own
//!   beside the orchestrator's, same settings, same disk): the orchestrator's leader lock
//!   (`flock`) on its file keeps the bench from taking a fencing term there, and the
//!   orchestrator releases the ownership of any processor its config does not list.
//!
//! Both processors run side by side the whole time, and a move and a restart alternate (the
//! order flipping every round), so machine load falls on both alike. Snapshots are pruned
//! between rounds (nothing in Dory prunes them yet); the checkpoint interval is an hour, so
//! no periodic checkpoint lands in a measurement.
//!
//! `cargo bench -p dory-benches --bench move_pause` (`DORY_BENCH_SIZES=1MiB` for one size;
//! `DORY_BENCH_LOAD_WHILE_COMMITTING=false` to load before the commit; the orchestrator's
//! warnings go to stderr, `RUST_LOG=dory::orchestrator=debug` for more).
//! Without `--bench` (as under `cargo test --benches`) it makes two moves and two restarts of
//! 1 KiB as a smoke test.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dory_benches::{Background, BoxError, load_average, ms, percentiles};
use dory_control::HttpControl;
use dory_core::orchestrator::{Event, EventKind, Orchestrator, OrchestratorHandle, Settings};
use dory_core::{
    ConfigSource, Epoch, Health, Instance, InstanceControl, InstanceEnv, Intent, LaunchMode,
    Leadership, NodeId, Ownership, Placement, ProcessorId, Resources, Sequence, Site, SnapshotMeta,
    StateStore, StoredSnapshot, Term, Timestamp,
};
use dory_embedded::{
    EmbeddedDb, EmbeddedLeadership, EmbeddedStatus, EmbeddedStore, FileConfig, read_output,
};
use dory_local::{InstanceSettings, LocalConfig, LocalNode, LocalPlacement};
use serde::Deserialize;
use tokio::sync::broadcast;

type Result<T> = std::result::Result<T, BoxError>;

/// The processor binary, also the local placement's supervisor.
const PROCESSOR_BIN: &str = env!("CARGO_BIN_EXE_move_pause_processor");
/// The virtual nodes; each move pins the processor to the one it is not on.
const NODES: [&str; 2] = ["node-a", "node-b"];
/// Long enough that no periodic checkpoint lands inside a measurement.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a start, a move or a restart may take before the bench gives up.
const PATIENCE: Duration = Duration::from_secs(120);
/// How often the bench looks for a new output line.
const POLL: Duration = Duration::from_millis(1);
/// Snapshots kept per processor when pruning between rounds.
const KEEP: usize = 2;
/// The bearer token of the baseline's instances (nobody calls their endpoints).
const BASELINE_TOKEN: &str = "move-pause-baseline";

/// What one step published.
#[derive(Deserialize)]
struct Stamp {
    /// Wall-clock ns since the Unix epoch when the step began.
    t_ns: u64,
}

/// One output line: which instance wrote it and when its step began.
struct Output {
    epoch: Epoch,
    t_ns: u64,
}

/// Every output of `processor` in `dir`, in file order.
fn outputs(dir: &Path, processor: &ProcessorId) -> Result<Vec<Output>> {
    let log = read_output(dir, processor)?;
    log.messages
        .iter()
        .map(|m| {
            let stamp: Stamp = serde_json::from_slice(&m.payload)
                .map_err(|e| format!("output {} of {processor}: {e}", m.sequence))?;
            Ok(Output {
                epoch: m.epoch,
                t_ns: stamp.t_ns,
            })
        })
        .collect()
}

/// The time of `epoch`'s last output, or of its first with `first`.
fn stamp_of(outputs: &[Output], epoch: Epoch, first: bool) -> Option<u64> {
    let mut of_epoch = outputs.iter().filter(|o| o.epoch == epoch);
    if first {
        of_epoch.next().map(|o| o.t_ns)
    } else {
        of_epoch.next_back().map(|o| o.t_ns)
    }
}

/// Waits until `epoch` has published, then returns the outputs. Only `stat`s the file until
/// it has grown past `size_before` (when given), so that waiting costs the machine nothing
/// while a measured process starts.
async fn await_output(
    dir: &Path,
    processor: &ProcessorId,
    epoch: Epoch,
    size_before: Option<u64>,
) -> Result<Vec<Output>> {
    let deadline = Instant::now() + PATIENCE;
    let path = dory_embedded::output_path(dir, processor);
    loop {
        let grown = match size_before {
            Some(before) => std::fs::metadata(&path).map_or(0, |m| m.len()) > before,
            None => true,
        };
        if grown {
            let outputs = outputs(dir, processor)?;
            if stamp_of(&outputs, epoch, true).is_some() {
                return Ok(outputs);
            }
        }
        if Instant::now() > deadline {
            return Err(
                format!("{processor} epoch {epoch} published nothing within {PATIENCE:?}").into(),
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wall-clock ns since the Unix epoch, the clock the processor stamps its outputs with.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `later - earlier` of two wall-clock stamps (zero if the clock stepped back).
fn between(earlier: u64, later: u64) -> Duration {
    Duration::from_nanos(later.saturating_sub(earlier))
}

/// The p50 of the gaps between consecutive outputs of one instance: what a step costs when
/// nothing moves (the 1 ms sleep, the publish with its `fsync`, the step itself).
fn step_interval(outputs: &[Output]) -> Option<Duration> {
    let gaps: Vec<Duration> = outputs
        .windows(2)
        .filter(|w| w[0].epoch == w[1].epoch)
        .map(|w| between(w[0].t_ns, w[1].t_ns))
        .collect();
    (!gaps.is_empty()).then(|| percentiles(gaps).0)
}

/// When one call began and answered (wall-clock ns).
type Span = Option<(u64, u64)>;

/// The orchestrator's calls in the move in flight (only the bench's one processor moves).
#[derive(Clone, Copy, Default)]
struct Steps {
    freeze: Span,
    fetch: Span,
    load: Span,
    commit: Span,
    resume: Span,
    snapshot_bytes: usize,
}

/// Where the timing wrappers write.
type StepLog = Arc<Mutex<Steps>>;

/// Runs `call`, recording when it began and answered into the field `pick` chooses.
async fn timed<T>(
    log: &StepLog,
    pick: fn(&mut Steps) -> &mut Span,
    call: impl Future<Output = dory_core::Result<T>>,
) -> dory_core::Result<T> {
    let began = now_ns();
    let result = call.await;
    let answered = now_ns();
    *pick(&mut log.lock().unwrap_or_else(PoisonError::into_inner)) = Some((began, answered));
    result
}

/// The orchestrator's [`HttpControl`], timing each state call of a move (a clock read before
/// and after: nothing the move would notice).
struct TimedControl {
    inner: HttpControl,
    log: StepLog,
}

#[async_trait]
impl InstanceControl for TimedControl {
    async fn health(&self, instance: &Instance) -> dory_core::Result<Health> {
        self.inner.health(instance).await
    }
    async fn freeze(
        &self,
        instance: &Instance,
        timeout: Duration,
    ) -> dory_core::Result<SnapshotMeta> {
        timed(
            &self.log,
            |s| &mut s.freeze,
            self.inner.freeze(instance, timeout),
        )
        .await
    }
    async fn fetch(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.timed_fetch(self.inner.fetch(instance)).await
    }
    async fn load(&self, instance: &Instance, snapshot: &[u8]) -> dory_core::Result<()> {
        timed(
            &self.log,
            |s| &mut s.load,
            self.inner.load(instance, snapshot),
        )
        .await
    }
    async fn resume(&self, instance: &Instance) -> dory_core::Result<()> {
        timed(&self.log, |s| &mut s.resume, self.inner.resume(instance)).await
    }
    async fn resume_committed(
        &self,
        instance: &Instance,
        committed: dory_core::Sequence,
    ) -> dory_core::Result<()> {
        timed(
            &self.log,
            |s| &mut s.resume,
            self.inner.resume_committed(instance, committed),
        )
        .await
    }
    // Outside the pause (the old instance runs meanwhile), so not timed; its `load` of the
    // pre-copied base comes before the move's own load, which is what the table shows.
    async fn precopy(&self, instance: &Instance, timeout: Duration) -> dory_core::Result<Vec<u8>> {
        self.inner.precopy(instance, timeout).await
    }
    async fn fetch_full(&self, instance: &Instance) -> dory_core::Result<Vec<u8>> {
        self.timed_fetch(self.inner.fetch_full(instance)).await
    }
}

impl TimedControl {
    /// A fetch (of the frozen snapshot, or of the whole state after a refused delta), timed as
    /// the move's fetch, with the size of what it brought.
    async fn timed_fetch(
        &self,
        fetch: impl Future<Output = dory_core::Result<Vec<u8>>>,
    ) -> dory_core::Result<Vec<u8>> {
        let bytes = timed(&self.log, |s| &mut s.fetch, fetch).await?;
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot_bytes = bytes.len();
        Ok(bytes)
    }
}

/// The orchestrator's [`EmbeddedStore`], timing `commit_move`; everything else passes through.
struct TimedStore {
    inner: EmbeddedStore,
    log: StepLog,
}

#[async_trait]
impl StateStore for TimedStore {
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> dory_core::Result<Epoch> {
        self.inner.claim_epoch(processor, term).await
    }
    async fn assign_owner(
        &self,
        processor: &ProcessorId,
        expected: Option<Epoch>,
        epoch: Epoch,
        lease: Duration,
        term: Term,
    ) -> dory_core::Result<()> {
        self.inner
            .assign_owner(processor, expected, epoch, lease, term)
            .await
    }
    async fn commit_move(
        &self,
        from: Epoch,
        snapshot: &StoredSnapshot,
        lease: Duration,
        term: Term,
    ) -> dory_core::Result<()> {
        timed(
            &self.log,
            |s| &mut s.commit,
            self.inner.commit_move(from, snapshot, lease, term),
        )
        .await
    }
    async fn release(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        term: Term,
    ) -> dory_core::Result<()> {
        self.inner.release(processor, epoch, term).await
    }
    async fn put_checkpoint(
        &self,
        snapshot: &StoredSnapshot,
        lease: Duration,
    ) -> dory_core::Result<Timestamp> {
        self.inner.put_checkpoint(snapshot, lease).await
    }
    async fn renew_lease(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lease: Duration,
    ) -> dory_core::Result<Timestamp> {
        self.inner.renew_lease(processor, epoch, lease).await
    }
    async fn ownership(&self, processor: &ProcessorId) -> dory_core::Result<Option<Ownership>> {
        self.inner.ownership(processor).await
    }
    async fn ownerships(&self) -> dory_core::Result<Vec<Ownership>> {
        self.inner.ownerships().await
    }
    async fn latest(&self, processor: &ProcessorId) -> dory_core::Result<Option<StoredSnapshot>> {
        self.inner.latest(processor).await
    }
    async fn get(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> dory_core::Result<Option<StoredSnapshot>> {
        self.inner.get(processor, epoch, sequence).await
    }
    async fn history(&self, processor: &ProcessorId) -> dory_core::Result<Vec<SnapshotMeta>> {
        self.inner.history(processor).await
    }
    async fn prune(&self, processor: &ProcessorId, keep: usize) -> dory_core::Result<usize> {
        self.inner.prune(processor, keep).await
    }
}

/// One Dory move as the processor and the orchestrator saw it.
struct MoveSample {
    /// Last output of the old epoch to the first of the new one.
    pause: Duration,
    /// The orchestrator's `pause_ms`: freeze request to resume answer.
    orchestrator: Duration,
    /// Its calls, for where the time went.
    steps: Steps,
    /// The time of the old epoch's last output and the new one's first.
    last: u64,
    first: u64,
}

/// One baseline restart, with where its time went.
struct RestartSample {
    /// Last output of the old process to the first of the new one.
    pause: Duration,
    /// Last output to SIGTERM sent (the old process steps until the signal comes).
    to_signal: Duration,
    /// SIGTERM to the old process's exit seen (final checkpoint, exit).
    stop: Duration,
    /// `release` + `assign_owner` in the store.
    handover: Duration,
    /// Spawning the new process to its `main`.
    exec: Duration,
    /// `main` to the store and publisher open.
    connect: Duration,
    /// Open to the first output: bind, restore (read, verify, decode, lease renewal), step.
    restore: Duration,
}

/// The processors file with `processor` alone (or nothing).
fn processors_toml(processor: Option<(&ProcessorId, usize)>) -> String {
    let Some((id, size)) = processor else {
        return "[processors]\n".into();
    };
    format!(
        "[processors.\"{id}\"]\n\
         checkpoint_interval = {}\n\
         workload = {{ command = [{:?}] }}\n\
         config = {{ size = {size} }}\n",
        CHECKPOINT_INTERVAL.as_millis(),
        PROCESSOR_BIN,
    )
}

/// `sqlite://` or `file://` URL of an absolute path (the temporary directory's name needs no
/// percent-encoding).
fn url(scheme: &str, path: &Path) -> String {
    format!("{scheme}://{}", path.display())
}

/// The orchestrated side: the orchestrator and what the bench needs to drive and watch it.
struct Dory {
    config_path: PathBuf,
    config: Arc<FileConfig>,
    placement: Arc<LocalPlacement>,
    store: Arc<TimedStore>,
    handle: OrchestratorHandle,
    out: PathBuf,
    log: StepLog,
}

impl Dory {
    /// Lists `processor` (alone) in the config and waits for its first output; returns the
    /// node it runs on.
    async fn start(&self, processor: &ProcessorId, size: usize) -> Result<NodeId> {
        let mut events = self.handle.events();
        std::fs::write(&self.config_path, processors_toml(Some((processor, size))))?;
        let (epoch, node) = loop {
            match next_event(&mut events, processor).await? {
                EventKind::Started { epoch, node, .. } => break (epoch, node),
                EventKind::Failed { operation, error } => {
                    eprintln!("note: {processor}: {operation} failed: {error}");
                }
                _ => {}
            }
        };
        await_output(&self.out, processor, epoch, None).await?;
        Ok(node)
    }

    /// One move of `processor` from `node` to the other node.
    async fn move_once(
        &self,
        processor: &ProcessorId,
        node: &NodeId,
    ) -> Result<(NodeId, MoveSample)> {
        let target = NodeId::new(if node.as_str() == NODES[0] {
            NODES[1]
        } else {
            NODES[0]
        });
        let mut events = self.handle.events();
        *self.log.lock().unwrap_or_else(PoisonError::into_inner) = Steps::default();
        self.config
            .record_intent(&Intent::Pin {
                processor: processor.clone(),
                node: Some(target),
            })
            .await?;
        let (from, to, node, pause_ms) = loop {
            match next_event(&mut events, processor).await? {
                EventKind::Moved {
                    from,
                    to,
                    node,
                    pause_ms,
                } => break (from, to, node, pause_ms),
                kind @ (EventKind::RolledBack { .. } | EventKind::Failed { .. }) => {
                    eprintln!("note: {processor}: {kind:?}");
                }
                _ => {}
            }
        };
        let outputs = await_output(&self.out, processor, to, None).await?;
        let last = stamp_of(&outputs, from, false)
            .ok_or_else(|| format!("{processor} epoch {from} published nothing"))?;
        let first = stamp_of(&outputs, to, true).ok_or("no first output")?;
        let sample = MoveSample {
            pause: between(last, first),
            orchestrator: Duration::from_millis(pause_ms),
            steps: *self.log.lock().unwrap_or_else(PoisonError::into_inner),
            last,
            first,
        };
        Ok((node, sample))
    }

    /// Waits until `processor` has at most `alive` instances that have not ended (after a
    /// move: the old one has exited), so one operation's tail does not load the next.
    async fn settle(&self, processor: &ProcessorId, alive: usize) -> Result<()> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let running = self
                .placement
                .instances()
                .await?
                .iter()
                .filter(|i| &i.processor == processor && !i.phase.is_gone())
                .count();
            if running <= alive {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{processor}: {running} instances still alive").into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The next event about `processor`.
async fn next_event(
    events: &mut broadcast::Receiver<Event>,
    processor: &ProcessorId,
) -> Result<EventKind> {
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Ok(event)) if event.processor.as_ref() == Some(processor) => return Ok(event.kind),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => {
                return Err("the orchestrator stopped".into());
            }
            Err(_) => {
                return Err(format!("{processor}: nothing happened within {PATIENCE:?}").into());
            }
        }
    }
}

/// The side without Dory: processes the bench starts and stops itself.
struct Baseline {
    store: EmbeddedStore,
    term: Term,
    store_url: String,
    out: PathBuf,
    logs: PathBuf,
    lease: Duration,
}

/// A running baseline process.
struct BaselineProcess {
    child: tokio::process::Child,
    epoch: Epoch,
}

impl Baseline {
    /// The log (stdout and stderr) of `epoch`'s process.
    fn log_path(&self, processor: &ProcessorId, epoch: Epoch) -> PathBuf {
        self.logs.join(format!("{processor}-{}.log", epoch.0))
    }

    /// Starts `epoch` in `restore` mode, its output in the shared directory, its logs in a
    /// file of its own.
    fn spawn(&self, processor: &ProcessorId, size: usize, epoch: Epoch) -> Result<BaselineProcess> {
        let env = InstanceEnv {
            processor: processor.clone(),
            epoch,
            mode: LaunchMode::Restore,
            token: BASELINE_TOKEN.into(),
            port: 0,
            address_file: None,
            store_url: self.store_url.clone(),
            publisher_url: Some(url("file", &self.out)),
            input_url: None,
            lease: self.lease,
            checkpoint_interval: CHECKPOINT_INTERVAL,
            config: serde_json::json!({ "size": size }),
        };
        let log = std::fs::File::create(self.log_path(processor, epoch))?;
        let child = tokio::process::Command::new(PROCESSOR_BIN)
            .envs(env.to_vars())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;
        Ok(BaselineProcess { child, epoch })
    }

    /// Claims the first epoch, makes it the owner, starts it and waits for its first output.
    async fn start(&self, processor: &ProcessorId, size: usize) -> Result<BaselineProcess> {
        let epoch = self.store.claim_epoch(processor, self.term).await?;
        let owner = self.store.ownership(processor).await?.and_then(|o| o.owner);
        self.store
            .assign_owner(processor, owner, epoch, self.lease, self.term)
            .await?;
        let process = self.spawn(processor, size, epoch)?;
        await_output(&self.out, processor, epoch, None).await?;
        Ok(process)
    }

    /// SIGTERM, and waits for the exit; it must have ended cleanly (final checkpoint saved).
    async fn stop(process: &mut BaselineProcess) -> Result<()> {
        let pid = process
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(rustix::process::Pid::from_raw)
            .ok_or("the baseline process has already been reaped")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let status = tokio::time::timeout(PATIENCE, process.child.wait()).await??;
        if !status.success() {
            return Err(format!(
                "baseline epoch {} ended with {status} (see its log)",
                process.epoch
            )
            .into());
        }
        Ok(())
    }

    /// One restart of `current`: stop with a final checkpoint, hand ownership on, start a
    /// new process restoring from the store, which becomes `current`.
    async fn restart(
        &self,
        processor: &ProcessorId,
        size: usize,
        current: &mut BaselineProcess,
    ) -> Result<RestartSample> {
        // Claimed while the old process runs: allocating a number is not part of the stop.
        let next = self.store.claim_epoch(processor, self.term).await?;
        let signalled = now_ns();
        Baseline::stop(current).await?;
        let exited = now_ns();
        let size_before =
            std::fs::metadata(dory_embedded::output_path(&self.out, processor))?.len();
        self.store
            .release(processor, current.epoch, self.term)
            .await?;
        self.store
            .assign_owner(processor, None, next, self.lease, self.term)
            .await?;
        let handed = now_ns();
        let old = std::mem::replace(current, self.spawn(processor, size, next)?);
        let outputs = await_output(&self.out, processor, next, Some(size_before)).await?;
        let last = stamp_of(&outputs, old.epoch, false)
            .ok_or_else(|| format!("{processor} epoch {} published nothing", old.epoch))?;
        let first = stamp_of(&outputs, next, true).ok_or("no first output")?;
        let log = std::fs::read_to_string(self.log_path(processor, next))?;
        let stamp = |what: &str| {
            log.lines()
                .find_map(|l| l.strip_prefix(what)?.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("no `{what}` line in the log of epoch {next}"))
        };
        let (main, connected) = (stamp("started ")?, stamp("connected ")?);
        Ok(RestartSample {
            pause: between(last, first),
            to_signal: between(last, signalled),
            stop: between(signalled, exited),
            handover: between(exited, handed),
            exec: between(handed, main),
            connect: between(main, connected),
            restore: between(connected, first),
        })
    }
}

/// One size's measurements.
struct Row {
    /// The state's size, for the tables.
    label: &'static str,
    moves: Vec<MoveSample>,
    restarts: Vec<RestartSample>,
    /// The p50 gap between two outputs of one instance, over both processors.
    step_interval: Option<Duration>,
    /// How long the row took, start-ups included.
    seconds: f64,
}

/// The sizes and how many moves (and as many restarts) each.
/// `DORY_BENCH_SIZES` (labels without spaces, comma-separated: `1MiB,64MiB`) keeps only
/// those sizes of a full run; a label that is none of them is an error.
fn plans(full: bool) -> Result<Vec<(&'static str, usize, usize)>> {
    if !full {
        return Ok(vec![("1 KiB", 1 << 10, 2)]);
    }
    let all = [
        ("1 KiB", 1 << 10, 100),
        ("1 MiB", 1 << 20, 100),
        ("64 MiB", 64 << 20, 30),
    ];
    let Ok(only) = std::env::var("DORY_BENCH_SIZES") else {
        return Ok(all.to_vec());
    };
    let label = |l: &str| l.replace(' ', "");
    let wanted: Vec<&str> = only.split(',').map(str::trim).collect();
    if let Some(unknown) = wanted
        .iter()
        .find(|w| !all.iter().any(|(l, _, _)| label(l) == **w))
    {
        return Err(format!(
            "DORY_BENCH_SIZES: {unknown:?} is not one of {}",
            all.map(|(l, _, _)| label(l)).join(", ")
        )
        .into());
    }
    Ok(all
        .into_iter()
        .filter(|(l, _, _)| wanted.contains(&label(l).as_str()))
        .collect())
}

/// `rounds` moves and restarts of a `size`-byte state, alternating.
async fn measure(
    dory: &Dory,
    baseline: &Baseline,
    label: &'static str,
    size: usize,
    rounds: usize,
) -> Result<Row> {
    let started = Instant::now();
    let dory_id = ProcessorId::new(format!("dory-{size}"))?;
    let base_id = ProcessorId::new(format!("base-{size}"))?;
    let mut node = dory.start(&dory_id, size).await?;
    let mut process = baseline.start(&base_id, size).await?;
    let mut row = Row {
        label,
        moves: Vec::with_capacity(rounds),
        restarts: Vec::with_capacity(rounds),
        step_interval: None,
        seconds: 0.0,
    };
    let result = async {
        for round in 0..rounds {
            // Flipped every round, so neither side always follows the other.
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let (at, sample) = dory.move_once(&dory_id, &node).await?;
                    dory.settle(&dory_id, 1).await?;
                    node = at;
                    row.moves.push(sample);
                } else {
                    let sample = baseline.restart(&base_id, size, &mut process).await?;
                    row.restarts.push(sample);
                }
                // Between rounds, outside every measurement: keep the database small.
                dory.store.prune(&dory_id, KEEP).await?;
                baseline.store.prune(&base_id, KEEP).await?;
            }
        }
        Ok::<(), BoxError>(())
    }
    .await;
    // Both processors stop: the next size runs alone.
    let stopped = Baseline::stop(&mut process).await;
    std::fs::write(&dory.config_path, processors_toml(None))?;
    dory.settle(&dory_id, 0).await?;
    result?;
    stopped?;
    let mut all = outputs(&dory.out, &dory_id)?;
    all.extend(outputs(&dory.out, &base_id)?);
    row.step_interval = step_interval(&all);
    row.seconds = started.elapsed().as_secs_f64();
    Ok(row)
}

/// The p50 of `values` in ms.
fn p50(values: impl Iterator<Item = Duration>) -> f64 {
    ms(percentiles(values.collect()).0)
}

/// The length of a recorded call (zero if it was not seen).
fn span(s: Span) -> Duration {
    s.map_or(Duration::ZERO, |(began, answered)| between(began, answered))
}

/// Prints the tables and the reading against the goal.
fn report(rows: &[Row]) {
    println!();
    println!(
        "| state | n | Dory pause p50 ms | p99 ms | orchestrator pause_ms p50 | baseline p50 ms | p99 ms | baseline / Dory p50 | p99 | snapshot bytes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let (d50, d99, _) = percentiles(row.moves.iter().map(|s| s.pause).collect());
        let (b50, b99, _) = percentiles(row.restarts.iter().map(|s| s.pause).collect());
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} | {} |",
            row.label,
            row.moves.len().min(row.restarts.len()),
            ms(d50),
            ms(d99),
            p50(row.moves.iter().map(|s| s.orchestrator)),
            ms(b50),
            ms(b99),
            b50.as_secs_f64() / d50.as_secs_f64(),
            b99.as_secs_f64() / d99.as_secs_f64(),
            row.moves.last().map_or(0, |s| s.steps.snapshot_bytes),
        );
    }

    println!();
    println!(
        "Dory's pause, step by step (p50 ms; each call from request to answer, as the orchestrator made it):"
    );
    println!();
    println!(
        "| state | last output to freeze request | freeze | fetch | load | commit (SQLite) | resume | between the calls | resume answer to first output | freeze request to resume answer |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let m = &row.moves;
        let window = |s: &MoveSample| match (s.steps.freeze, s.steps.resume) {
            (Some((began, _)), Some((_, answered))) => between(began, answered),
            _ => Duration::ZERO,
        };
        let calls = |s: &MoveSample| {
            let t = &s.steps;
            span(t.freeze) + span(t.fetch) + span(t.load) + span(t.commit) + span(t.resume)
        };
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            row.label,
            p50(m.iter().map(|s| {
                s.steps
                    .freeze
                    .map_or(Duration::ZERO, |(began, _)| between(s.last, began))
            })),
            p50(m.iter().map(|s| span(s.steps.freeze))),
            p50(m.iter().map(|s| span(s.steps.fetch))),
            p50(m.iter().map(|s| span(s.steps.load))),
            p50(m.iter().map(|s| span(s.steps.commit))),
            p50(m.iter().map(|s| span(s.steps.resume))),
            p50(m.iter().map(|s| window(s).saturating_sub(calls(s)))),
            p50(m.iter().map(|s| {
                s.steps
                    .resume
                    .map_or(Duration::ZERO, |(_, answered)| between(answered, s.first))
            })),
            p50(m.iter().map(window)),
        );
    }

    println!();
    println!("The baseline's pause, part by part (p50 ms):");
    println!();
    println!(
        "| state | last output to SIGTERM | SIGTERM to exit (final checkpoint) | release + assign | spawn to main | main to store and publisher open | open to first output (restore, first step) | step interval | seconds for the row |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        let r = &row.restarts;
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            row.label,
            p50(r.iter().map(|s| s.to_signal)),
            p50(r.iter().map(|s| s.stop)),
            p50(r.iter().map(|s| s.handover)),
            p50(r.iter().map(|s| s.exec)),
            p50(r.iter().map(|s| s.connect)),
            p50(r.iter().map(|s| s.restore)),
            row.step_interval.map_or(f64::NAN, ms),
            row.seconds,
        );
    }

    if let Some(row) = rows.iter().find(|r| r.label == "1 MiB") {
        let (d50, d99, _) = percentiles(row.moves.iter().map(|s| s.pause).collect());
        let (b50, b99, _) = percentiles(row.restarts.iter().map(|s| s.pause).collect());
        let (r50, r99) = (
            b50.as_secs_f64() / d50.as_secs_f64(),
            b99.as_secs_f64() / d99.as_secs_f64(),
        );
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        println!();
        println!(
            "Goal at 1 MiB: the pause at least 10x shorter than the baseline: p50 {r50:.1}x, p99 {r99:.1}x ({}); p99 under 50 ms: {:.2} ms ({})",
            verdict(r50 >= 10.0 && r99 >= 10.0),
            ms(d99),
            verdict(d99 < Duration::from_millis(50)),
        );
    }
}

async fn bench(full: bool) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("dory-move-pause")
        .tempdir()?;
    let root = dir.path().to_path_buf();
    let out = root.join("out");
    let logs = root.join("baseline-logs");
    std::fs::create_dir_all(&out)?;
    std::fs::create_dir_all(&logs)?;
    let settings = Settings {
        // For a comparison in one sitting: `DORY_BENCH_LOAD_WHILE_COMMITTING=false` loads the
        // replacement before the commit, as moves did before the two ran at once.
        load_while_committing: match std::env::var("DORY_BENCH_LOAD_WHILE_COMMITTING").as_deref() {
            Err(_) | Ok("true") => true,
            Ok("false") => false,
            Ok(other) => {
                return Err(format!(
                    "DORY_BENCH_LOAD_WHILE_COMMITTING: {other:?} is not true or false"
                )
                .into());
            }
        },
        ..Settings::default()
    };
    eprintln!("load while committing: {}", settings.load_while_committing);
    let lease = settings.planner.lease;

    let db_path = root.join("dory.db");
    let db = EmbeddedDb::open(&db_path).await?;
    let log = StepLog::default();
    let store = Arc::new(TimedStore {
        inner: EmbeddedStore::new(&db),
        log: log.clone(),
    });
    let config_path = root.join("processors.toml");
    std::fs::write(&config_path, processors_toml(None))?;
    let config = Arc::new(FileConfig::open(&config_path, &db)?);
    let placement = Arc::new(LocalPlacement::open(LocalConfig {
        state_dir: root.join("local"),
        nodes: NODES
            .iter()
            .map(|id| LocalNode {
                id: NodeId::new(*id),
                site: Site::Cloud,
                capacity: Resources::new(2000, 4096),
                exec_prefix: vec![],
                store_url: None,
                publisher_url: None,
                reach_host: None,
            })
            .collect(),
        supervisor: vec![PROCESSOR_BIN.into(), "supervise".into()],
        instance: InstanceSettings {
            store_url: url("sqlite", &db_path),
            publisher_url: Some(url("file", &out)),
            input_url: None,
            lease,
        },
    })?);
    let orchestrator = Orchestrator::builder(
        config.clone(),
        placement.clone(),
        Arc::new(TimedControl {
            inner: HttpControl::new(),
            log: log.clone(),
        }),
        store.clone(),
        Arc::new(EmbeddedLeadership::new(&db, "move-pause-bench")),
    )
    .status_sink(Arc::new(EmbeddedStatus::new(&db)))
    .settings(settings)
    .build();
    let handle = orchestrator.handle();
    let running = Background::run(orchestrator);

    let base_path = root.join("baseline.db");
    let base_db = EmbeddedDb::open(&base_path).await?;
    let base_leadership = EmbeddedLeadership::new(&base_db, "move-pause-baseline");
    let term = base_leadership.acquire().await?;
    let baseline = Baseline {
        store: EmbeddedStore::new(&base_db),
        term,
        store_url: url("sqlite", &base_path),
        out: out.clone(),
        logs,
        lease,
    };
    let dory = Dory {
        config_path,
        config,
        placement: placement.clone(),
        store,
        handle,
        out,
        log,
    };

    println!("load average before: {}", load_average());
    let mut rows = Vec::new();
    let result = async {
        for (label, size, rounds) in plans(full)? {
            let row = measure(&dory, &baseline, label, size, rounds).await?;
            println!(
                "{label}: {} moves, {} restarts in {:.0} s; load average {}",
                row.moves.len(),
                row.restarts.len(),
                row.seconds,
                load_average()
            );
            print_tails(&row);
            rows.push(row);
        }
        Ok::<(), BoxError>(())
    }
    .await;

    // Whatever happened: the orchestrator stops, then every instance it left is killed (they
    // run in sessions of their own and would outlive the bench).
    running.stop().await;
    for node in NODES {
        let _ = placement.kill_node(&NodeId::new(node));
    }
    let _ = base_leadership.resign(term).await;
    if let Err(e) = &result {
        // Kept for a look at the instances' logs.
        return Err(format!("{e} (files kept in {})", dir.keep().display()).into());
    }
    report(&rows);
    Ok(())
}

/// The three slowest pauses of each side, and the steps of Dory's slowest move: what makes
/// the p99.
fn print_tails(row: &Row) {
    let slowest = |mut values: Vec<Duration>| {
        values.sort_unstable_by(|a, b| b.cmp(a));
        values
            .iter()
            .take(3)
            .map(|d| format!("{:.1}", ms(*d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "  slowest pauses, ms: Dory {}; baseline {}",
        slowest(row.moves.iter().map(|s| s.pause).collect()),
        slowest(row.restarts.iter().map(|s| s.pause).collect()),
    );
    if let Some(s) = row.moves.iter().max_by_key(|s| s.pause) {
        let t = &s.steps;
        println!(
            "  Dory's slowest move, ms: last output to freeze {:.1}, freeze {:.1}, fetch {:.1}, load {:.1}, commit {:.1}, resume {:.1}, resume answer to first output {:.1}",
            t.freeze
                .map_or(0.0, |(began, _)| ms(between(s.last, began))),
            ms(span(t.freeze)),
            ms(span(t.fetch)),
            ms(span(t.load)),
            ms(span(t.commit)),
            ms(span(t.resume)),
            t.resume
                .map_or(0.0, |(_, answered)| ms(between(answered, s.first))),
        );
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    dory_benches::run_server_bench("move_pause", bench);
}
