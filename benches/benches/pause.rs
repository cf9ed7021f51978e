//! The pause a processor sees when it moves: from its last step on the old instance to its
//! first step on the new one, through freeze → fetch → load → commit → resume over real
//! loopback HTTP (the processor runtime serving `dory-control`'s router, `HttpControl`
//! calling it), for a state of 1 KiB, 1 MiB and 64 MiB of random (incompressible) bytes.
//!
//! Three set-ups, measured by the same code ([`World::measure`] and [`World::move_once`]):
//!
//! - **Rust, memory store** (always): `dory-runtime` in this process, on the in-memory store,
//!   so the commit costs what the protocol costs, not a database's fsync. The processor
//!   records when it steps; the pause is its last step on the old instance to its first on
//!   the new one.
//! - **Rust, Postgres** and **Python, Postgres** (when `DORY_BENCH_PYTHON` names a Python
//!   with the `dory` wheel installed): the same Rust processor, and
//!   `python -m dory run benches/python/pause_holder.py:Holder` as real child processes, on
//!   a Postgres store in a schema of the run's own (`DORY_TEST_DATABASE_URL`), so the commit
//!   is a real transaction writing the snapshot. The Python instances also connect a
//!   publisher to the local RabbitMQ (`DORY_TEST_AMQP_URL`; it never publishes). This
//!   process plays the orchestrator: it holds the leadership term (`PgLeadership`), claims
//!   the epochs and commits the moves (`PgStore`). The Python processor keeps the monotonic
//!   time of its last step in its state; the new instance prints the difference at its first
//!   step, so its pause is what the processor saw, as for Rust (both processes read the
//!   machine's one monotonic clock). A new instance is a new process for every move; its
//!   start-up is outside the measurement.
//!
//! Each move also records its steps as the orchestrator sees them: freeze, fetch, load,
//! commit, resume (the request until its answer), then the first step of the processor after
//! the resume answer, and the control window from the freeze request to the resume answer.
//!
//! The floor, measured in the same run on the same number of bytes: encode and compress the
//! state (`Encoder::encode_state`), send it in one loopback HTTP request (`PUT /state`
//! through the same client and router), and decode it on the other side (`decode_state`):
//! what any hand-over of this state must do at the least. The ratio printed is floor / pause
//! (1.0: the move costs nothing beyond the floor; the goal is at least 0.5, the pause within
//! 2× of it).
//!
//! The replacement is started in standby before the freeze, as the orchestrator does (make
//! before break), so its start-up is not part of the pause.
//!
//! Every size is measured twice, on a processor of its own: the whole state at the freeze,
//! and **pre-copy** (the rows marked so), as the orchestrator moves: before the freeze the old
//! instance stores a full checkpoint while it keeps stepping (`POST /state/precopy`) and the
//! replacement loads it, outside the pause; the freeze then sends, loads and commits only the
//! 4 KiB chunks that changed since (here the step counter's, the random bytes stay put). The
//! floor stays the whole state's: it is what a hand-over of this state costs without Dory.
//!
//! `cargo bench -p dory-benches --bench pause`, with `DORY_BENCH_PYTHON=/path/to/python` for
//! the Postgres rows (Rust and Python). Without `--bench` (as under `cargo test --benches`) it makes a few small
//! moves as a smoke test.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use dory_benches::{BenchSchema, BoxError, ms, percentiles, random_bytes};
use dory_control::{HttpControl, InstanceEndpoint, ServerSettings, router};
use dory_core::snapshot::{Encoder, Limits, decode_state};
use dory_core::{
    ControlEndpoint, Epoch, Health, Input, Instance, InstanceControl, InstanceEnv, LaunchMode,
    Leadership, NodeId, Phase, ProcessorId, Publisher, Sequence, SnapshotMeta, StateStore,
    StoredSnapshot, SystemClock, Term, Timestamp,
};
use dory_mock::{MemoryLeadership, MemoryPublisher, MemoryStore};
use dory_pg::PgLeadership;
use dory_runtime::{Context, Exit, Processor, Runtime, Settings, StepError};
use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;

type Result<T> = std::result::Result<T, BoxError>;

const TOKEN: &str = "pause-bench-token";
/// Long enough that neither a lease nor a periodic checkpoint lands inside a measurement.
const LONG: Duration = Duration::from_secs(3600);
/// How long an instance may take to start, stand by or step.
const PATIENCE: Duration = Duration::from_secs(120);
/// The Python processor, relative to this crate.
const PYTHON_PROCESSOR: &str = "python/pause_holder.py:Holder";
/// The broker when `DORY_TEST_AMQP_URL` is not set.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The state: bytes serialized as one byte string, not element by element.
#[derive(Default)]
struct Blob(Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Blob, D::Error> {
        struct BlobVisitor;
        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> std::result::Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(
                self,
                v: Vec<u8>,
            ) -> std::result::Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(BlobVisitor)
    }
}

/// When each epoch stepped first and last.
#[derive(Default)]
struct Timeline {
    first: HashMap<Epoch, Instant>,
    last: HashMap<Epoch, Instant>,
}

/// Touches one byte of its state per step and records when it stepped.
struct Toucher {
    epoch: Epoch,
    size: usize,
    timeline: Arc<Mutex<Timeline>>,
}

#[async_trait]
impl Processor for Toucher {
    type State = Blob;

    async fn step(
        &mut self,
        state: &mut Blob,
        _ctx: &mut Context,
    ) -> std::result::Result<(), StepError> {
        let now = Instant::now();
        {
            let mut t = self.timeline.lock().unwrap_or_else(PoisonError::into_inner);
            t.first.entry(self.epoch).or_insert(now);
            t.last.insert(self.epoch, now);
        }
        if state.0.is_empty() {
            state.0 = random_bytes(self.size);
        }
        let i = (now.elapsed().subsec_nanos() as usize) % state.0.len();
        state.0[i] ^= 1;
        tokio::task::yield_now().await;
        Ok(())
    }
}

/// One running instance: its control endpoint and what its [`Fleet`] needs to watch it.
struct Running<P> {
    instance: Instance,
    process: P,
}

/// Where a processor's instances run, and how the bench sees them step.
#[async_trait]
trait Fleet: Send + Sync {
    /// What it takes to watch and stop one instance.
    type Process: Send;

    /// The processor's name in the tables.
    fn kind(&self) -> &'static str;

    /// Starts the instance of `epoch` in `mode`; returns once its endpoint is served.
    async fn start(&self, epoch: Epoch, mode: LaunchMode) -> Result<Running<Self::Process>>;

    /// Waits until the processor steps on `running`; returns when that was seen and, when
    /// the state came from another instance, the pause the processor saw since its last step
    /// there.
    async fn first_step(
        &self,
        running: &mut Running<Self::Process>,
    ) -> Result<(Instant, Option<Duration>)>;

    /// Stops an instance a move left frozen and no longer the owner; it must end that way.
    async fn retire(&self, old: Running<Self::Process>) -> Result<()>;

    /// Stops an instance at the end of a run.
    async fn stop(&self, running: Running<Self::Process>);
}

/// Rust processors in this process.
struct InProcess {
    kind: &'static str,
    processor: ProcessorId,
    store: Arc<dyn StateStore>,
    timeline: Arc<Mutex<Timeline>>,
    size: usize,
}

impl InProcess {
    /// A processor of `size` bytes, named `kind` in the tables, on `store`.
    fn new(
        kind: &'static str,
        store: &Arc<dyn StateStore>,
        processor: ProcessorId,
        size: usize,
    ) -> Self {
        InProcess {
            kind,
            processor,
            store: Arc::clone(store),
            timeline: Arc::default(),
            size,
        }
    }
}

/// An in-process instance's run loop and how to stop it.
struct Task {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::result::Result<Exit, dory_runtime::RuntimeError>>,
}

#[async_trait]
impl Fleet for InProcess {
    type Process = Task;

    fn kind(&self) -> &'static str {
        self.kind
    }

    async fn start(&self, epoch: Epoch, mode: LaunchMode) -> Result<Running<Task>> {
        let env = environment(&self.processor, epoch, mode, "memory://".into(), None, None);
        let store = Arc::clone(&self.store);
        let publisher: Arc<dyn Publisher> = Arc::new(MemoryPublisher::new());
        let processor = Toucher {
            epoch,
            size: self.size,
            timeline: Arc::clone(&self.timeline),
        };
        let runtime = Runtime::bind(
            env,
            processor,
            store,
            publisher,
            None::<Arc<dyn Input>>,
            Settings::default().with_bind_host("127.0.0.1"),
        )
        .await?;
        let address = runtime.local_addr().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run_until(async move {
            let _ = stopped.await;
        }));
        Ok(Running {
            instance: instance(&self.processor, epoch, address),
            process: Task { stop, task },
        })
    }

    async fn first_step(&self, running: &mut Running<Task>) -> Result<(Instant, Option<Duration>)> {
        let epoch = running.instance.epoch;
        let deadline = Instant::now() + PATIENCE;
        loop {
            {
                let t = self.timeline.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(&first) = t.first.get(&epoch) {
                    // The previous epoch that stepped is the one the state came from.
                    let before = t
                        .last
                        .iter()
                        .filter(|(e, _)| **e < epoch)
                        .max_by_key(|(e, _)| **e)
                        .map(|(_, &last)| first.duration_since(last));
                    return Ok((first, before));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("epoch {epoch} did not step within {PATIENCE:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn retire(&self, old: Running<Task>) -> Result<()> {
        let _ = old.process.stop.send(());
        match old.process.task.await? {
            Ok(Exit::NotOwner) => Ok(()),
            other => Err(format!("the old instance ended with {other:?}").into()),
        }
    }

    async fn stop(&self, running: Running<Task>) {
        let _ = running.process.stop.send(());
        let _ = running.process.task.await;
    }
}

/// Python processors as `python -m dory run` child processes, on a Postgres store.
struct Processes {
    python: PathBuf,
    processor: ProcessorId,
    store_url: String,
    publisher_url: String,
    size: usize,
}

/// A child process and the lines of its stdout, each with when it was read.
struct Child {
    child: tokio::process::Child,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
}

impl Child {
    /// The next stdout line, or an error once the process has ended or `PATIENCE` passed.
    async fn line(&mut self, what: &str) -> Result<(Instant, String)> {
        match tokio::time::timeout(PATIENCE, self.lines.recv()).await {
            Ok(Some(line)) if line.1.starts_with("exit: ") => {
                Err(format!("waiting for {what}, the instance ended: {}", line.1).into())
            }
            Ok(Some(line)) => Ok(line),
            Ok(None) => Err(format!("waiting for {what}, the instance's stdout closed").into()),
            Err(_) => Err(format!("no {what} within {PATIENCE:?}").into()),
        }
    }

    /// Sends SIGTERM, as a placement backend stops an instance.
    async fn terminate(&mut self) -> Result<()> {
        let Some(pid) = self.child.id() else {
            return Ok(()); // already ended
        };
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !status.success() {
            return Err(format!("kill -TERM {pid}: {status}").into());
        }
        Ok(())
    }
}

#[async_trait]
impl Fleet for Processes {
    type Process = Child;

    fn kind(&self) -> &'static str {
        "Python, Postgres"
    }

    async fn start(&self, epoch: Epoch, mode: LaunchMode) -> Result<Running<Child>> {
        let env = environment(
            &self.processor,
            epoch,
            mode,
            self.store_url.clone(),
            Some(self.publisher_url.clone()),
            Some(serde_json::json!({ "size": self.size })),
        );
        let mut child = tokio::process::Command::new(&self.python)
            .args(["-m", "dory", "run", PYTHON_PROCESSOR])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env.to_vars())
            .env("RUST_LOG", "warn")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.python.display()))?;
        let stdout = child.stdout.take().ok_or("the child has no stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let mut child = Child { child, lines };
        let address = loop {
            let (_, line) = child.line("`listening on <address>`").await?;
            if let Some(address) = line.strip_prefix("listening on ") {
                break address.to_string();
            }
        };
        Ok(Running {
            instance: instance(&self.processor, epoch, address),
            process: child,
        })
    }

    async fn first_step(
        &self,
        running: &mut Running<Child>,
    ) -> Result<(Instant, Option<Duration>)> {
        loop {
            let (at, line) = running.process.line("the first step").await?;
            if line == "stepping" {
                return Ok((at, None));
            }
            if let Some(seconds) = line.strip_prefix("resumed after ") {
                let seconds: f64 = seconds
                    .parse()
                    .map_err(|e| format!("{line:?}: not seconds: {e}"))?;
                return Ok((at, Some(Duration::from_secs_f64(seconds))));
            }
        }
    }

    async fn retire(&self, mut old: Running<Child>) -> Result<()> {
        old.process.terminate().await?;
        let ending = loop {
            match old.process.lines.recv().await {
                Some((_, line)) if line.starts_with("exit: ") => break line,
                Some(_) => {}
                None => break "no exit line".to_string(),
            }
        };
        let status = old.process.child.wait().await?;
        if ending != "exit: not-owner" {
            return Err(format!("the old instance ended with {ending:?} ({status})").into());
        }
        if !status.success() {
            // After the move and outside the measurement; not the bench's business to fail on.
            eprintln!(
                "note: the old instance said {ending:?}, then its process ended with {status}"
            );
        }
        Ok(())
    }

    async fn stop(&self, mut running: Running<Child>) {
        let _ = running.process.child.kill().await;
    }
}

/// What one move cost, as the processor and the orchestrator saw it.
struct Sample {
    /// The processor's last step on the old instance to its first on the new one.
    pause: Duration,
    /// Freeze, fetch, load, commit and resume (request to answer; the load and the commit
    /// run at once, both from the fetch's answer), then the resume answer to the first step
    /// seen.
    steps: [Duration; 6],
    /// The freeze request to the resume answer.
    window: Duration,
    snapshot_bytes: usize,
}

/// A processor, its store and leadership term, and where its instances run.
struct World<'a, F> {
    processor: ProcessorId,
    store: &'a dyn StateStore,
    term: Term,
    control: HttpControl,
    fleet: F,
    /// Pre-copy before the freeze, as the orchestrator does: the old instance stores a full
    /// checkpoint while it runs, the replacement loads it, and the freeze sends a delta.
    precopy: bool,
}

impl<F: Fleet> World<'_, F> {
    async fn claim(&self, owner: bool) -> Result<Epoch> {
        let epoch = self.store.claim_epoch(&self.processor, self.term).await?;
        if owner {
            self.store
                .assign_owner(&self.processor, None, epoch, LONG, self.term)
                .await?;
        }
        Ok(epoch)
    }

    /// One move of the running `old` to a new instance.
    async fn move_once(&self, old: Running<F::Process>) -> Result<(Running<F::Process>, Sample)> {
        let new_epoch = self.claim(false).await?;
        let mut new = self.fleet.start(new_epoch, LaunchMode::Standby).await?;
        let deadline = Instant::now() + PATIENCE;
        while self
            .control
            .health(&new.instance)
            .await
            .map(|h| h.phase)
            .ok()
            != Some(Phase::Standby)
        {
            if Instant::now() > deadline {
                return Err("the replacement never stood by".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if self.precopy {
            // Outside the pause: the old instance keeps stepping meanwhile.
            let base = self
                .control
                .precopy(&old.instance, Duration::from_secs(60))
                .await?;
            self.control.load(&new.instance, &base).await?;
        }

        let started = Instant::now();
        self.control
            .freeze(&old.instance, Duration::from_secs(60))
            .await?;
        let frozen = Instant::now();
        let bytes = self.control.fetch(&old.instance).await?;
        let fetched = Instant::now();
        let snapshot_bytes = bytes.len();
        // The load and the commit at once, as the orchestrator does when both instances run
        // the same revision; the resume names what was committed.
        let load = async {
            self.control.load(&new.instance, &bytes).await?;
            Ok::<_, dory_core::Error>(Instant::now())
        };
        let commit = async {
            let mut snapshot = StoredSnapshot::from_encoded(bytes.clone(), Timestamp(0))?;
            snapshot.meta.epoch = new_epoch;
            self.store
                .commit_move(old.instance.epoch, &snapshot, LONG, self.term)
                .await?;
            Ok((Instant::now(), snapshot.meta.sequence))
        };
        let (loaded, (committed, sequence)) = tokio::try_join!(load, commit)?;
        let handed = loaded.max(committed);
        self.control
            .resume_committed(&new.instance, sequence)
            .await?;
        let resumed = Instant::now();
        let (stepped, pause) = self.fleet.first_step(&mut new).await?;
        let pause = pause.ok_or("the new instance did not take over a state")?;

        self.fleet.retire(old).await?;
        let sample = Sample {
            pause,
            steps: [
                frozen - started,
                fetched - frozen,
                loaded - fetched,
                committed - fetched,
                resumed - handed,
                stepped.saturating_duration_since(resumed),
            ],
            window: resumed - started,
            snapshot_bytes,
        };
        Ok((new, sample))
    }

    /// `moves` moves of a `size`-byte state, each beside a floor measurement; prints the
    /// table row and returns the row of the step table.
    async fn measure(&self, label: &str, size: usize, moves: usize) -> Result<String> {
        let first = self.claim(true).await?;
        let mut running = self.fleet.start(first, LaunchMode::Restore).await?;
        self.fleet.first_step(&mut running).await?;
        let mut floors = Vec::with_capacity(moves);
        let mut samples = Vec::with_capacity(moves);
        for _ in 0..moves {
            // Interleaved, so load from other work on the machine falls on both alike.
            floors.extend(floor(size, 1).await?);
            let (next, sample) = self.move_once(running).await?;
            running = next;
            samples.push(sample);
        }
        self.fleet.stop(running).await;
        let median =
            |f: &dyn Fn(&Sample) -> Duration| ms(percentiles(samples.iter().map(f).collect()).0);
        let (p50, p99, _) = percentiles(samples.iter().map(|s| s.pause).collect());
        let (f50, f99, _) = percentiles(floors);
        let kind = self.fleet.kind();
        let label = if self.precopy {
            format!("{label}, pre-copy")
        } else {
            label.to_string()
        };
        println!(
            "| {kind} | {label} | {moves} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            ms(p50),
            ms(p99),
            ms(f50),
            ms(f99),
            f50.as_secs_f64() / p50.as_secs_f64(),
            f99.as_secs_f64() / p99.as_secs_f64(),
            samples.last().map_or(0, |s| s.snapshot_bytes),
        );
        let steps: Vec<String> = (0..6)
            .map(|i| format!("{:.2}", median(&|s| s.steps[i])))
            .collect();
        Ok(format!(
            "| {kind} | {label} | {} | {:.2} |",
            steps.join(" | "),
            median(&|s| s.window)
        ))
    }
}

/// The environment of the instance of `epoch`: the port picked at bind, no input, a lease and
/// a checkpoint interval of [`LONG`].
fn environment(
    processor: &ProcessorId,
    epoch: Epoch,
    mode: LaunchMode,
    store_url: String,
    publisher_url: Option<String>,
    config: Option<serde_json::Value>,
) -> InstanceEnv {
    InstanceEnv {
        processor: processor.clone(),
        epoch,
        mode,
        token: TOKEN.into(),
        port: 0,
        address_file: None,
        store_url,
        publisher_url,
        input_url: None,
        lease: LONG,
        checkpoint_interval: LONG,
        config: config.unwrap_or_default(),
    }
}

fn instance(processor: &ProcessorId, epoch: Epoch, address: String) -> Instance {
    Instance {
        processor: processor.clone(),
        epoch,
        node: NodeId::new("bench"),
        phase: Phase::Running,
        revision: 0,
        started_at: Timestamp(0),
        endpoint: Some(ControlEndpoint {
            address,
            token: TOKEN.into(),
        }),
    }
}

/// The floor's receiving side: `PUT /state` decodes the snapshot and nothing else.
struct Floor;

#[async_trait]
impl InstanceEndpoint for Floor {
    fn health(&self) -> Health {
        Health {
            phase: Phase::Standby,
            epoch: Epoch(1),
            sequence: Sequence(0),
            protocol: dory_core::CONTROL_PROTOCOL,
        }
    }
    fn ready(&self) -> dory_core::Result<()> {
        Ok(())
    }
    fn metrics(&self) -> String {
        String::new()
    }
    async fn freeze(&self, _: Duration) -> dory_core::Result<SnapshotMeta> {
        Err(dory_core::Error::conflict("the floor does not freeze"))
    }
    async fn snapshot(&self) -> dory_core::Result<Bytes> {
        Err(dory_core::Error::conflict("the floor holds no snapshot"))
    }
    async fn load(&self, snapshot: Bytes) -> dory_core::Result<()> {
        let (_, state) = decode_state::<Blob>(&snapshot, &Limits::default())?;
        std::hint::black_box(state);
        Ok(())
    }
    async fn resume(&self, _committed: Option<dory_core::Sequence>) -> dory_core::Result<()> {
        Ok(())
    }
}

/// Encode + one loopback transfer + decode of a `size`-byte state, `n` times.
async fn floor(size: usize, n: usize) -> Result<Vec<Duration>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let app = router(Arc::new(Floor), ServerSettings::new(TOKEN));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let control = HttpControl::new();
    let target = instance(&ProcessorId::new("floor")?, Epoch(2), address);
    let state = Blob(random_bytes(size));
    let processor = ProcessorId::new("floor")?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let bytes = Encoder::default().encode_state(
            &processor,
            Epoch(1),
            Sequence(i as u64 + 1),
            &state,
        )?;
        control.load(&target, &bytes).await?;
        times.push(started.elapsed());
    }
    server.abort();
    Ok(times)
}

/// The sizes, and how many moves each of a Rust and a Python processor (fewer: each
/// Python move starts a process).
fn plans(full: bool) -> &'static [(&'static str, usize, usize, usize)] {
    if full {
        &[
            ("1 KiB", 1 << 10, 60, 30),
            ("1 MiB", 1 << 20, 40, 20),
            ("64 MiB", 64 << 20, 8, 5),
        ]
    } else {
        &[("1 KiB", 1 << 10, 3, 2), ("1 MiB", 1 << 20, 2, 2)]
    }
}

/// One row per plan, each size with a processor of its own (`name`-`size`), its instances
/// from `fleet`.
async fn rows<F: Fleet>(
    store: &dyn StateStore,
    term: Term,
    name: &str,
    plans: &[(&'static str, usize, usize)],
    fleet: impl Fn(ProcessorId, usize) -> F,
    steps: &mut Vec<String>,
) -> Result<()> {
    for &(label, size, moves) in plans {
        for precopy in [false, true] {
            let tag = if precopy { "-pc" } else { "" };
            let processor = ProcessorId::new(format!("{name}-{size}{tag}"))?;
            let world = World {
                processor: processor.clone(),
                store,
                term,
                control: HttpControl::new(),
                fleet: fleet(processor, size),
                precopy,
            };
            steps.push(world.measure(label, size, moves).await?);
        }
    }
    Ok(())
}

/// The Rust processor on the in-memory store.
async fn memory_rows(full: bool, steps: &mut Vec<String>) -> Result<()> {
    let store = MemoryStore::new(Arc::new(SystemClock));
    let leadership = MemoryLeadership::new(&store);
    let term = leadership.acquire().await?;
    let shared: Arc<dyn StateStore> = Arc::new(store.clone());
    let plans: Vec<_> = plans(full).iter().map(|p| (p.0, p.1, p.2)).collect();
    let fleet = |processor, size| InProcess::new("Rust, memory store", &shared, processor, size);
    rows(&store, term, "pause", &plans, fleet, steps).await
}

/// The Rust and the Python processor on Postgres, in a schema of the run's own, this process
/// holding the leadership.
async fn postgres_rows(python: PathBuf, full: bool, steps: &mut Vec<String>) -> Result<()> {
    let Some(db) = BenchSchema::open("pause", Duration::from_secs(300)).await? else {
        return Ok(());
    };
    let result = async {
        let schema = db.store.schema().to_string();
        let separator = if db.url.contains('?') { '&' } else { '?' };
        let store_url = format!("{}{separator}schema={schema}", db.url);
        let amqp = std::env::var("DORY_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into());
        let separator = if amqp.contains('?') { '&' } else { '?' };
        let publisher_url =
            format!("{amqp}{separator}exchange=amq.topic&routing_key=dory-bench-pause");
        let leadership = PgLeadership::new(&db.store, "dory-bench-pause");
        let term = leadership.acquire().await?;
        let result = async {
            let shared: Arc<dyn StateStore> = Arc::new(db.store.clone());
            let rust: Vec<_> = plans(full).iter().map(|p| (p.0, p.1, p.2)).collect();
            let in_process =
                |processor, size| InProcess::new("Rust, Postgres", &shared, processor, size);
            rows(&db.store, term, "pause-pg", &rust, in_process, steps).await?;
            let python_plans: Vec<_> = plans(full).iter().map(|p| (p.0, p.1, p.3)).collect();
            let processes = |processor, size| Processes {
                python: python.clone(),
                processor,
                store_url: store_url.clone(),
                publisher_url: publisher_url.clone(),
                size,
            };
            rows(&db.store, term, "pause-py", &python_plans, processes, steps).await
        }
        .await;
        leadership.resign(term).await?;
        result
    }
    .await;
    db.close(result).await
}

async fn bench(full: bool) -> Result<()> {
    println!(
        "| processor | state | moves | pause p50 ms | p99 ms | floor p50 ms | p99 ms | floor/pause p50 | p99 | snapshot bytes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut steps = Vec::new();
    memory_rows(full, &mut steps).await?;
    if let Some(python) = std::env::var_os("DORY_BENCH_PYTHON") {
        postgres_rows(PathBuf::from(python), full, &mut steps).await?;
    }
    println!();
    println!("Steps of a move (p50 ms):");
    println!();
    println!(
        "| processor | state | freeze | fetch | load | commit | resume | first step after resume | freeze request to resume answer |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in steps {
        println!("{row}");
    }
    Ok(())
}

fn main() {
    dory_benches::run_server_bench("pause", bench);
}
