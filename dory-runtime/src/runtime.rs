//! [`Runtime`]: the lifecycle of one instance: restore or stand by, run the processor
//! between safe points, checkpoint and heartbeat, freeze, resume and shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use dory_control::{ServerSettings, router};
use dory_core::snapshot::{self, Base, Codec, Encoder, Limits, SnapshotKind};
use dory_core::{
    Clock, Error, Input, InputPosition, InstanceEnv, LaunchMode, Phase, Publisher, Sequence,
    SnapshotMeta, StateStore, StoredSnapshot, SystemClock,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::endpoint::{Endpoint, Envelope, Loaded, decode_envelope, serialize_envelope};
use crate::error::RuntimeError;
use crate::processor::{Context, Processor};
use crate::shared::{Frozen, PreCopied, Shared, SpareBody, room_for};

/// How a runtime behaves beyond what the instance environment says.
#[derive(Clone)]
#[non_exhaustive]
pub struct Settings {
    /// The host the endpoint server binds (with the environment's port). Default `DORY_HOST`
    /// when set ([`dory_core::env::HOST`]), else `0.0.0.0`.
    pub bind_host: String,
    /// How long a shutdown may wait for the step in progress and the final save. Default 25 s
    /// (inside Kubernetes' default 30 s grace period).
    pub grace: Duration,
    /// Bounds on decoding loaded and restored snapshots.
    pub limits: Limits,
    /// The largest `PUT /state` body accepted.
    pub body_limit: usize,
    /// The pause before a failed step, checkpoint or restore is tried again. Default 200 ms.
    pub retry: Duration,
    /// The clock snapshot timestamps are taken from.
    pub clock: Arc<dyn Clock>,
    /// How many of the newest snapshots the store keeps of this processor: older ones are
    /// pruned every [`PRUNE_EVERY`] committed checkpoints. Default 5 (at least 1 is kept).
    pub keep_snapshots: usize,
}

/// How many committed checkpoints pass between two prunes of old snapshots: one cheap delete
/// now and then, instead of a second write with every checkpoint.
pub const PRUNE_EVERY: u64 = 16;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind_host: dory_core::env::bind_host(|k| std::env::var(k).ok()),
            grace: Duration::from_secs(25),
            limits: Limits::default(),
            body_limit: dory_control::wire::DEFAULT_BODY_LIMIT,
            retry: Duration::from_millis(200),
            clock: Arc::new(SystemClock),
            keep_snapshots: 5,
        }
    }
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("bind_host", &self.bind_host)
            .field("grace", &self.grace)
            .field("limits", &self.limits)
            .field("body_limit", &self.body_limit)
            .field("retry", &self.retry)
            .field("keep_snapshots", &self.keep_snapshots)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The same settings with snapshot timestamps from `clock`.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The same settings binding another host (e.g. `127.0.0.1` in tests).
    pub fn with_bind_host(mut self, host: impl Into<String>) -> Self {
        self.bind_host = host.into();
        self
    }

    /// The same settings with another shutdown grace period.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The same settings with another limit on `PUT /state` bodies.
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// The same settings with another retry pause.
    pub fn with_retry(mut self, retry: Duration) -> Self {
        self.retry = retry;
        self
    }
}

/// How a run ended; a binary maps it to its exit code.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// Shut down cleanly; the final state is committed at this snapshot sequence (the state's
    /// version; `None` when there was nothing to save: a standby instance, or no step since
    /// the last checkpoint).
    Saved {
        /// The sequence of the final checkpoint, if one was written.
        sequence: Option<Sequence>,
    },
    /// Shut down while frozen after ownership moved to another epoch: exited without saving,
    /// as a move's old instance must.
    NotOwner,
    /// The store fenced this instance off; nothing was saved after that.
    Fenced {
        /// What the store said.
        reason: String,
    },
    /// The grace period ran out before the step in progress returned; nothing was saved.
    GraceExceeded,
    /// The final checkpoint could not be stored: the state since the last committed one is
    /// lost (its output was published; the next instance publishes it again from there).
    SaveFailed {
        /// The version of the last committed checkpoint.
        last_committed: Sequence,
    },
}

impl Exit {
    /// The process exit code for this ending: 0 when nothing was lost (saved, or handed over
    /// as a move's old instance), non-zero otherwise, so a supervisor can tell.
    pub fn code(&self) -> i32 {
        match self {
            Exit::Saved { .. } | Exit::NotOwner => 0,
            Exit::Fenced { .. } => 3,
            Exit::GraceExceeded => 4,
            Exit::SaveFailed { .. } => 5,
        }
    }
}

/// One line for logs and for a supervisor reading stdout: `saved sequence=<n>`,
/// `saved nothing`, `not-owner`, `fenced <reason>`, `grace-exceeded`,
/// `save-failed last-committed=<n>`.
impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Saved {
                sequence: Some(sequence),
            } => write!(f, "saved sequence={}", sequence.0),
            Exit::Saved { sequence: None } => f.write_str("saved nothing"),
            Exit::NotOwner => f.write_str("not-owner"),
            Exit::Fenced { reason } => write!(f, "fenced {reason}"),
            Exit::GraceExceeded => f.write_str("grace-exceeded"),
            Exit::SaveFailed { last_committed } => {
                write!(f, "save-failed last-committed={}", last_committed.0)
            }
        }
    }
}

/// Writes `address` to `path` atomically: a temporary file in the same directory, renamed
/// over `path`, so a reader never sees a partial address.
fn write_address_file(path: &std::path::Path, address: SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, address.to_string())?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// One processor instance: its run loop, heartbeat and endpoint server.
///
/// Built from the [`InstanceEnv`] with the backends injected; [`Runtime::bind`] binds the
/// endpoint port, [`Runtime::run_until`] runs until the given shutdown future resolves (see
/// [`crate::sigterm`] for the usual one).
pub struct Runtime<P: Processor> {
    env: InstanceEnv,
    processor: P,
    store: Arc<dyn StateStore>,
    publisher: Arc<dyn Publisher>,
    input: Option<Arc<dyn Input>>,
    settings: Settings,
    shared: Arc<Shared>,
    loaded: Loaded<P::State>,
    listener: TcpListener,
    address: SocketAddr,
}

impl<P: Processor> Runtime<P> {
    /// Binds the endpoint server on the environment's port (0 picks a free one; see
    /// [`Runtime::local_addr`]). Nothing runs until [`Runtime::run_until`].
    pub async fn bind(
        env: InstanceEnv,
        processor: P,
        store: Arc<dyn StateStore>,
        publisher: Arc<dyn Publisher>,
        input: Option<Arc<dyn Input>>,
        settings: Settings,
    ) -> Result<Self, RuntimeError> {
        let address = format!("{}:{}", settings.bind_host, env.port);
        let listener = TcpListener::bind(&address)
            .await
            .map_err(|source| RuntimeError::Bind {
                address: address.clone(),
                source,
            })?;
        let address = listener
            .local_addr()
            .map_err(|source| RuntimeError::Bind { address, source })?;
        // Reported before the server answers anything, so a placement that started the
        // instance on port 0 finds it as soon as it can be health-checked.
        if let Some(path) = &env.address_file {
            write_address_file(path, address).map_err(|source| RuntimeError::AddressFile {
                path: path.clone(),
                source,
            })?;
        }
        let shared = Arc::new(Shared::new(
            env.processor.clone(),
            env.epoch,
            env.config.clone(),
            env.lease,
        ));
        Ok(Runtime {
            env,
            processor,
            store,
            publisher,
            input,
            settings,
            shared,
            loaded: Arc::new(Mutex::new(None)),
            listener,
            address,
        })
    }

    /// The address the endpoint server is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Runs the instance until `shutdown` resolves (or the run loop stops for good), then
    /// freezes at the next safe point, saves a final checkpoint and flushes the publisher
    /// within the grace period. An instance that is frozen and no longer the owner exits
    /// without saving.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Exit, RuntimeError> {
        let Runtime {
            env,
            processor,
            store,
            publisher,
            input,
            settings,
            shared,
            loaded,
            listener,
            address,
        } = self;
        let span =
            tracing::info_span!("instance", processor.id = %env.processor, epoch = env.epoch.0);
        let _entered = span.enter();
        tracing::info!(target: "dory::runtime", %address, mode = %env.mode, "instance starting");
        let standby_body = SpareBody::default();
        let endpoint = Arc::new(Endpoint::<P::State> {
            shared: shared.clone(),
            loaded: loaded.clone(),
            limits: settings.limits,
            spare_body: standby_body.clone(),
        });
        let app = router(
            endpoint,
            ServerSettings::new(env.token.clone()).with_body_limit(settings.body_limit),
        );
        let server: JoinHandle<()> = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(target: "dory::runtime", "endpoint server stopped: {e}");
            }
        });
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), store.clone()));
        let run = RunLoop {
            mode: env.mode,
            processor,
            ctx: Context {
                shared: shared.clone(),
                publisher,
                input,
                sequence: Sequence(0),
                position: InputPosition::new(),
                checkpoint_requested: false,
                checkpoint_interval: env.checkpoint_interval,
            },
            store,
            loaded,
            checkpoint_interval: env.checkpoint_interval,
            settings: settings.clone(),
            version: Sequence(0),
            checkpointed: Sequence(0),
            last_checkpoint_ms: 0,
            state: P::State::default(),
            base: None,
            checkpoint_after_step: false,
            precopy_put: None,
            spare_body: Vec::new(),
            last_body_len: 0,
            standby_body,
        };
        let mut run_task = tokio::spawn(run.run());
        tokio::pin!(shutdown);
        let exit = tokio::select! {
            finished = &mut run_task => joined(finished),
            () = &mut shutdown => {
                tracing::info!(target: "dory::runtime", "shutdown requested");
                shared.ctl.send_modify(|c| c.shutdown = true);
                match tokio::time::timeout(settings.grace, &mut run_task).await {
                    Ok(finished) => joined(finished),
                    Err(_) => {
                        tracing::error!(target: "dory::runtime", grace = ?settings.grace, "the step in progress did not return within the grace period; exiting without saving");
                        run_task.abort();
                        Exit::GraceExceeded
                    }
                }
            }
        };
        // A fenced run loop ends before any shutdown: keep answering the orchestrator (which
        // sees the instance is fenced) until it terminates the instance.
        let exit = if matches!(exit, Exit::Fenced { .. }) && !shared.ctl.borrow().shutdown {
            shutdown.await;
            exit
        } else {
            exit
        };
        shared.set_running(false);
        heartbeat.abort();
        server.abort();
        shared
            .ctl
            .send_modify(|c| c.phase = Some(Phase::Exited { code: exit.code() }));
        tracing::info!(target: "dory::runtime", ?exit, "instance stopped");
        Ok(exit)
    }
}

fn joined(finished: Result<Exit, tokio::task::JoinError>) -> Exit {
    finished.unwrap_or_else(|e| {
        // The processor panicked: nothing after its last checkpoint can be trusted.
        tracing::error!(target: "dory::runtime", "the run loop ended abnormally: {e}");
        Exit::GraceExceeded
    })
}

/// Renews the lease between checkpoints while the instance runs, so a long interval or a
/// slow step never lets it lapse; a `Fenced` answer fences the instance at once.
async fn heartbeat(shared: Arc<Shared>, store: Arc<dyn StateStore>) {
    let every = (shared.lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let running = shared.ctl.borrow().phase() == Phase::Running;
        if !running || shared.is_fenced() {
            continue;
        }
        let sent = shared.now_ms();
        match store
            .renew_lease(&shared.processor, shared.epoch, shared.lease)
            .await
        {
            Ok(_) => shared.lease_renewed(sent),
            Err(Error::Fenced(why)) => shared.fence(why),
            Err(e) => {
                tracing::warn!(target: "dory::runtime", "lease renewal failed: {e}");
            }
        }
    }
}

struct RunLoop<P: Processor> {
    mode: LaunchMode,
    processor: P,
    ctx: Context,
    store: Arc<dyn StateStore>,
    loaded: Loaded<P::State>,
    checkpoint_interval: Duration,
    settings: Settings,
    state: P::State,
    /// The state's version: one up for every step (a step may change the state without
    /// publishing); the sequence of the snapshots this instance takes.
    version: Sequence,
    /// The version of the last committed checkpoint (or the restored/loaded snapshot).
    checkpointed: Sequence,
    last_checkpoint_ms: u64,
    /// The full checkpoint a pre-copy stored: the next freeze sends only what changed since.
    base: Option<Base>,
    /// Store a full checkpoint after the next step: the state came as a delta, which the store
    /// can only read beside its base, so a full one soon frees that pair.
    checkpoint_after_step: bool,
    /// A pre-copy's checkpoint being stored in the background: its version, and how it went.
    precopy_put: Option<(Sequence, oneshot::Receiver<PreCopyWrite>)>,
    /// The buffer the state is serialized into, kept between snapshots: a fresh state-sized
    /// allocation is page-faulted in at every write, which costs more than the copy (at 1 MiB,
    /// 0.26 ms against 0.07 ms here). A pre-copy keeps its body as the base and its background
    /// write prepares the next one, so the freeze that follows serializes into warm memory.
    spare_body: Vec<u8>,
    /// The length of the last serialized body.
    last_body_len: usize,
    /// The endpoint's buffer of a standby's loads: taken over as `spare_body` at the resume.
    standby_body: SpareBody,
}

/// How a pre-copy's background write went.
struct PreCopyWrite {
    /// Whether the checkpoint was stored.
    stored: bool,
    /// A buffer the size of the base with its pages touched, for the freeze's body.
    spare_body: Vec<u8>,
}

impl PreCopyWrite {
    /// The write's task ended without an answer.
    fn lost() -> Self {
        PreCopyWrite {
            stored: false,
            spare_body: Vec::new(),
        }
    }
}

/// A pre-copy's full checkpoint on its way to the store.
struct StoredBase {
    bytes: Vec<u8>,
    /// The length of the serialized state (the base's body).
    body_len: usize,
    created_at: dory_core::Timestamp,
    version: Sequence,
    request: u64,
}

/// Stores a pre-copy's checkpoint (renewing the lease, as every checkpoint does) and answers
/// the requests that asked for it with the stored bytes.
async fn store_precopy(
    shared: Arc<Shared>,
    store: Arc<dyn StateStore>,
    base: StoredBase,
    stored: oneshot::Sender<PreCopyWrite>,
) {
    let sent = shared.now_ms();
    let body_len = base.body_len;
    let outcome = match StoredSnapshot::from_encoded(base.bytes, base.created_at) {
        Ok(snapshot) => store
            .put_checkpoint(&snapshot, shared.lease)
            .await
            .map(|_| Bytes::from(snapshot.bytes)),
        Err(e) => Err(e),
    };
    match &outcome {
        Ok(_) => {
            shared.lease_renewed(sent);
            shared.metrics.precopies.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "dory::runtime", version = base.version.0, "pre-copied a full checkpoint");
        }
        Err(Error::Fenced(why)) => shared.fence(why.clone()),
        Err(e) => {
            tracing::warn!(target: "dory::runtime", "pre-copy failed; the move sends the whole state: {e}")
        }
    }
    let spare_body = if outcome.is_ok() {
        // Off the run loop: touching a large state's worth of pages takes a while. Before the
        // answer, not after: the orchestrator freezes as soon as it has loaded the answer, and
        // a freeze waits for this task (`finish_precopy`), so it must be done by then.
        tokio::task::spawn_blocking(move || crate::shared::warm_buffer(body_len))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let _ = stored.send(PreCopyWrite {
        stored: outcome.is_ok(),
        spare_body,
    });
    shared.ctl.send_modify(|c| {
        c.precopied = Some(PreCopied {
            request: base.request,
            outcome,
        });
    });
}

/// What a safe point decided.
enum Next {
    Step,
    Stop(Exit),
}

impl<P: Processor> RunLoop<P> {
    fn shared(&self) -> &Arc<Shared> {
        &self.ctx.shared
    }

    async fn run(mut self) -> Exit {
        let start = match self.mode {
            LaunchMode::Restore => self.restore(None).await,
            LaunchMode::Standby => self.stand_by().await,
        };
        if let Some(exit) = start {
            return exit;
        }
        loop {
            match self.safe_point().await {
                Next::Stop(exit) => return exit,
                Next::Step => {}
            }
            if let Err(why) = self.shared().can_step() {
                self.pause(why.to_string()).await;
                continue;
            }
            self.clear_pause();
            let stepped = self.processor.step(&mut self.state, &mut self.ctx).await;
            // Failed or not, the step had the state to change.
            self.version = Sequence(self.version.0 + 1);
            match stepped {
                Ok(()) => {
                    self.shared()
                        .metrics
                        .iterations
                        .fetch_add(1, Ordering::Relaxed);
                    if std::mem::take(&mut self.checkpoint_after_step) {
                        self.ctx.checkpoint_requested = true;
                    }
                }
                Err(e) => {
                    if let Some(Error::Fenced(why)) = e.downcast_ref::<Error>() {
                        self.shared().fence(why.clone());
                        continue;
                    }
                    self.shared()
                        .metrics
                        .step_errors
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "dory::runtime", "step failed, trying again: {e}");
                    self.wait_or_safe_point(self.settings.retry).await;
                }
            }
        }
    }

    /// Mode `restore`: the latest committed snapshot, or `Default` when there is none; then
    /// confirm ownership by renewing the lease. With `committed` (a standby told what its
    /// move committed), a latest snapshot older than that is not taken: the store is read
    /// again until it shows it.
    async fn restore(&mut self, committed: Option<Sequence>) -> Option<Exit> {
        let shared = self.shared().clone();
        let started = tokio::time::Instant::now();
        loop {
            if let Some(exit) = self.stop_requested() {
                return Some(exit);
            }
            let latest = match self.store.latest(&shared.processor).await {
                Ok(latest) => latest,
                Err(e) => {
                    tracing::warn!(target: "dory::runtime", "cannot read the latest snapshot yet: {e}");
                    self.wait_or_safe_point(self.settings.retry).await;
                    continue;
                }
            };
            let found = latest.as_ref().map(|s| s.meta.sequence);
            if let Some(committed) = committed
                && found.is_none_or(|found| found < committed)
            {
                tracing::warn!(target: "dory::runtime", committed = committed.0, found = found.map(|s| s.0), "the store's latest snapshot is older than the committed one; reading again");
                self.wait_or_safe_point(self.settings.retry).await;
                continue;
            }
            if let Some(stored) = latest {
                let size = stored.bytes.len() as u64;
                let delta = snapshot::decode_header(&stored.bytes)
                    .is_ok_and(|h| h.kind == SnapshotKind::Delta);
                match self.read_stored(stored.bytes).await {
                    Ok((header, envelope)) => {
                        self.adopt(envelope);
                        // As after loading a delta: a full checkpoint follows the first step,
                        // so the store need not keep reading this one beside its base.
                        self.checkpoint_after_step = delta;
                        self.shared()
                            .metrics
                            .snapshot_bytes
                            .store(size, Ordering::Relaxed);
                        tracing::info!(target: "dory::runtime", from_epoch = header.epoch.0, sequence = header.sequence.0, "restored the latest snapshot");
                    }
                    Err(e) => {
                        // Never run from a state that is not the committed one.
                        tracing::error!(target: "dory::runtime", "cannot restore: {e}");
                        self.wait_or_safe_point(self.settings.retry).await;
                        continue;
                    }
                }
            } else {
                tracing::info!(target: "dory::runtime", "no snapshot stored: starting fresh");
            }
            let sent = shared.now_ms();
            match self
                .store
                .renew_lease(&shared.processor, shared.epoch, shared.lease)
                .await
            {
                Ok(_) => shared.lease_renewed(sent),
                Err(Error::Fenced(why)) => {
                    shared.fence(why.clone());
                    return Some(Exit::Fenced { reason: why });
                }
                Err(e) => {
                    tracing::warn!(target: "dory::runtime", "cannot confirm ownership yet: {e}");
                    self.wait_or_safe_point(self.settings.retry).await;
                    continue;
                }
            }
            shared
                .metrics
                .restore_ms
                .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            self.last_checkpoint_ms = shared.now_ms();
            self.set_running();
            return None;
        }
    }

    /// Mode `standby`: healthy, waiting for a loaded snapshot and a resume.
    async fn stand_by(&mut self) -> Option<Exit> {
        let shared = self.shared().clone();
        shared.ctl.send_modify(|c| c.phase = Some(Phase::Standby));
        let mut rx = shared.ctl.subscribe();
        let _ = rx.wait_for(|c| c.resume_requested || c.shutdown).await;
        if shared.ctl.borrow().shutdown {
            return Some(Exit::Saved { sequence: None });
        }
        let envelope = self
            .loaded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let committed = shared.ctl.borrow().resume_committed;
        let standby_body = self.standby_body.close();
        self.recycle(standby_body);
        match (envelope, committed) {
            (envelope, Some(committed))
                if envelope.as_ref().is_none_or(|e| e.version != committed.0) =>
            {
                // Nothing loaded, a pre-copy's base, or a load that lost its race with the
                // commit: never run from a state that is not the committed one.
                let loaded = envelope.map(|e| e.version);
                tracing::warn!(target: "dory::runtime", ?loaded, committed = committed.0, "the loaded snapshot is not the committed one; restoring that from the store");
                return self.restore_committed(committed).await;
            }
            (Some(envelope), _) => self.adopt(envelope),
            (None, _) => {}
        }
        let loaded_delta = shared
            .ctl
            .borrow()
            .loaded
            .as_ref()
            .is_some_and(|(_, _, bytes)| {
                snapshot::decode_header(bytes).is_ok_and(|h| h.kind == SnapshotKind::Delta)
            });
        self.checkpoint_after_step = loaded_delta;
        // What the standby kept to check repeated loads is a state's worth of memory, and a
        // running instance takes no load.
        shared.ctl.send_modify(|c| {
            c.loaded_full = None;
            if let Some((_, _, bytes)) = &mut c.loaded {
                *bytes = Bytes::new();
            }
        });
        // A fresh owner trusts the orchestrator's commit for its first lease; the heartbeat
        // renews it (or finds it fenced) right after.
        shared.lease_renewed(shared.now_ms());
        self.last_checkpoint_ms = shared.now_ms();
        self.set_running();
        None
    }

    /// A standby told to resume with a snapshot it does not hold: what it kept as a standby
    /// goes, and it restores as mode `restore` does.
    async fn restore_committed(&mut self, committed: Sequence) -> Option<Exit> {
        self.shared().ctl.send_modify(|c| {
            c.loaded = None;
            c.loaded_full = None;
        });
        self.restore(Some(committed)).await
    }

    fn adopt(&mut self, envelope: Envelope<P::State>) {
        self.state = envelope.state;
        self.ctx.sequence = Sequence(envelope.sequence);
        self.ctx.position = envelope.position;
        self.version = Sequence(envelope.version);
        self.checkpointed = self.version;
        self.shared()
            .metrics
            .sequence
            .store(envelope.sequence, Ordering::Relaxed);
    }

    fn set_running(&self) {
        self.shared().set_running(true);
        self.shared().ctl.send_modify(|c| {
            c.phase = Some(Phase::Running);
            c.resume_requested = false;
            c.resume_committed = None;
            c.frozen = Frozen::No;
            c.delivered = false;
        });
    }

    fn clear_pause(&self) {
        self.shared()
            .ctl
            .send_if_modified(|c| c.paused.take().is_some());
    }

    async fn pause(&mut self, why: String) {
        let changed = self.shared().ctl.send_if_modified(|c| {
            let new = c.paused.as_deref() != Some(why.as_str());
            c.paused = Some(why.clone());
            new
        });
        if changed {
            tracing::warn!(target: "dory::runtime", "frozen in place: {why}");
        }
        self.wait_or_safe_point(self.settings.retry).await;
    }

    fn stop_requested(&self) -> Option<Exit> {
        let c = self.shared().ctl.borrow();
        if let Some(why) = &c.fenced {
            return Some(Exit::Fenced {
                reason: why.clone(),
            });
        }
        c.shutdown.then_some(Exit::Saved { sequence: None })
    }

    /// Sleeps `pause`, or less when the run loop is wanted at a safe point. Owns what it
    /// needs, so the run loop's future stays `Send` without `RunLoop` being `Sync`.
    fn wait_or_safe_point(&self, pause: Duration) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared().clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shared.wants_safe_point() => {}
            }
        }
    }

    /// Between two steps: fenced, shutdown, freeze and checkpoints are handled here only.
    async fn safe_point(&mut self) -> Next {
        let (fenced, shutdown, freeze, precopy) = {
            let c = self.shared().ctl.borrow();
            (
                c.fenced.clone(),
                c.shutdown,
                c.freeze_waiters > 0,
                c.precopy_wanted(),
            )
        };
        if let Some(reason) = fenced {
            self.shared().set_running(false);
            return Next::Stop(Exit::Fenced { reason });
        }
        if shutdown {
            self.finish_precopy().await;
            return Next::Stop(self.final_save().await);
        }
        if freeze {
            self.finish_precopy().await;
            return self.freeze().await;
        }
        self.poll_precopy();
        if precopy {
            self.precopy();
        }
        let due = self
            .shared()
            .now_ms()
            .saturating_sub(self.last_checkpoint_ms)
            >= self.checkpoint_interval.as_millis() as u64;
        // Not beside a pre-copy's write: a newer checkpoint landing first would refuse it.
        if (due || self.ctx.checkpoint_requested) && self.precopy_put.is_none() {
            self.checkpoint().await;
        }
        Next::Step
    }

    /// The state with the runtime's part of it, serialized into the spare buffer: the body of
    /// a snapshot. A caller done with the body hands it back with [`Self::recycle`].
    fn serialize(&mut self) -> Result<Vec<u8>, Error> {
        let mut body = std::mem::take(&mut self.spare_body);
        // Room for the last body and a little growth, reserved exactly: growing by doubling
        // would copy the body several times and leave up to twice its size allocated.
        body.clear();
        body.reserve_exact(room_for(self.last_body_len));
        let shared = self.shared();
        serialize_envelope(
            &shared.processor,
            shared.epoch,
            self.version.0,
            self.ctx.sequence.0,
            &self.ctx.position,
            &self.state,
            &mut body,
        )?;
        self.last_body_len = body.len();
        Ok(body)
    }

    /// Keeps a body no longer needed as the buffer of the next [`Self::serialize`]: the
    /// runtime holds one such buffer, about the size of the serialized state, for good. One
    /// much larger than the state now is (a state that shrank) is cut down first.
    fn recycle(&mut self, mut body: Vec<u8>) {
        let room = room_for(self.last_body_len);
        if body.capacity() > 2 * room {
            body.clear();
            body.shrink_to(room);
        }
        if body.capacity() >= self.spare_body.capacity() {
            self.spare_body = body;
        }
    }

    /// A full snapshot of `body` at the current version.
    fn encode_full(&self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let shared = self.shared();
        let bytes = Encoder::default().encode_body(
            &shared.processor,
            shared.epoch,
            self.version,
            Codec::Bincode,
            body,
        )?;
        shared
            .metrics
            .snapshot_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// A stored snapshot's state: a delta (a move's commit) is read beside its base. Owns
    /// what it needs, so the run loop's future stays `Send` without `RunLoop` being `Sync`.
    fn read_stored(
        &self,
        bytes: Vec<u8>,
    ) -> impl Future<Output = Result<(snapshot::SnapshotHeader, Envelope<P::State>), Error>>
    + Send
    + 'static {
        let store = self.store.clone();
        let processor = self.shared().processor.clone();
        let limits = self.settings.limits;
        async move {
            let Some(base) = snapshot::delta_base(&bytes)? else {
                let (header, body) = snapshot::decode_body(&bytes, &limits)?;
                let envelope = decode_envelope::<P::State>(&header, &body)?;
                return Ok((header, envelope));
            };
            let full = store
                .get(&processor, base.epoch, base.sequence)
                .await?
                .ok_or_else(|| base.missing(&format!("restore of {processor}")))?;
            let (header, body) = snapshot::apply_delta(&full.bytes, &bytes, &limits)?;
            let envelope = decode_envelope::<P::State>(&header, &body)?;
            Ok((header, envelope))
        }
    }

    /// Answers the pre-copy requests waiting: encodes a full checkpoint here, keeps its body
    /// as the base the freeze's delta is taken against, and stores it in the background, so
    /// the processor keeps stepping during the durable write; the answer follows the write.
    fn precopy(&mut self) {
        let shared = self.shared().clone();
        // Taken now: a request made while this one is stored waits for the next.
        let request = shared.ctl.borrow().precopy_requested;
        let answer = |outcome: Result<Bytes, Error>| {
            shared.ctl.send_modify(|c| {
                c.precopied = Some(PreCopied { request, outcome });
            });
        };
        if self.precopy_put.is_some() {
            // Its write answers the requests it took; later ones get the next pre-copy.
            return;
        }
        shared.ctl.send_modify(|c| c.precopy_taken = request);
        if self.version <= self.checkpointed {
            // The store takes only newer sequences; the run loop steps between safe points,
            // so this is a retry right after a checkpoint: the next request gets one.
            return answer(Err(Error::conflict(
                "no step since the last checkpoint; ask again after the next step",
            )));
        }
        let encoded = self.serialize().and_then(|body| {
            let bytes = self.encode_full(&body)?;
            // Just encoded: its header is read, not its checksum verified again (the store
            // verifies the bytes once, in the background).
            let base = Base::of_decoded(&snapshot::decode_header(&bytes)?, body)?;
            Ok((bytes, base))
        });
        let (bytes, base) = match encoded {
            Ok(encoded) => encoded,
            Err(e) => {
                tracing::warn!(target: "dory::runtime", "pre-copy failed; the move sends the whole state: {e}");
                return answer(Err(e));
            }
        };
        let body_len = base.body.len();
        self.base = Some(base);
        let (stored, settled) = oneshot::channel();
        self.precopy_put = Some((self.version, settled));
        tokio::spawn(store_precopy(
            shared.clone(),
            self.store.clone(),
            StoredBase {
                bytes,
                body_len,
                created_at: self.settings.clock.now(),
                version: self.version,
                request,
            },
            stored,
        ));
    }

    /// Takes the outcome of a pre-copy's background write if it is in: a stored base counts
    /// as committed state; a failed one is dropped (the freeze then sends the whole state).
    fn settle_precopy(&mut self, write: PreCopyWrite) {
        if let Some((version, _)) = self.precopy_put.take() {
            if write.stored {
                self.checkpointed = self.checkpointed.max(version);
                self.recycle(write.spare_body);
            } else {
                self.base = None;
            }
        }
    }

    /// [`Self::settle_precopy`] when the write has answered, without waiting.
    fn poll_precopy(&mut self) {
        let polled = match &mut self.precopy_put {
            Some((_, settled)) => settled.try_recv(),
            None => return,
        };
        match polled {
            Ok(write) => self.settle_precopy(write),
            Err(oneshot::error::TryRecvError::Closed) => self.settle_precopy(PreCopyWrite::lost()),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
    }

    /// Waits for a pre-copy's background write (a freeze or the final save must not race it).
    async fn finish_precopy(&mut self) {
        if let Some((_, settled)) = &mut self.precopy_put {
            let write = settled.await.unwrap_or_else(|_| PreCopyWrite::lost());
            self.settle_precopy(write);
        }
    }

    /// Stores a checkpoint when a step ran since the last one (the store only takes sequences
    /// above the committed one); otherwise the heartbeat keeps the lease.
    async fn checkpoint(&mut self) {
        let shared = self.shared().clone();
        self.ctx.checkpoint_requested = false;
        if self.version <= self.checkpointed {
            self.last_checkpoint_ms = shared.now_ms();
            shared.set_checkpoint_failing(false);
            return;
        }
        self.store_checkpoint().await;
    }

    /// Stores a full checkpoint of the current version and does its bookkeeping (lease,
    /// metrics, pruning, input release).
    async fn store_checkpoint(&mut self) {
        let shared = self.shared().clone();
        let mark = self.ctx.input.as_ref().map(|i| i.mark());
        let sent = shared.now_ms();
        let encoded = self.serialize().and_then(|body| {
            let bytes = self.encode_full(&body);
            self.recycle(body);
            bytes
        });
        let result = match encoded
            .and_then(|bytes| StoredSnapshot::from_encoded(bytes, self.settings.clock.now()))
        {
            Ok(snapshot) => self.store.put_checkpoint(&snapshot, shared.lease).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                shared.lease_renewed(sent);
                shared.set_checkpoint_failing(false);
                self.checkpointed = self.version;
                self.last_checkpoint_ms = sent;
                let committed = shared.metrics.checkpoints.fetch_add(1, Ordering::Relaxed) + 1;
                shared
                    .metrics
                    .last_checkpoint_ms
                    .store(sent, Ordering::Relaxed);
                if committed % PRUNE_EVERY == 1 {
                    // Every checkpoint (and every move) stores a whole snapshot; without this
                    // the store grows by one state's size per checkpoint forever. Off the step
                    // path: a failed prune only leaves old snapshots for the next one.
                    let store = self.store.clone();
                    let processor = shared.processor.clone();
                    let keep = self.settings.keep_snapshots.max(1);
                    tokio::spawn(async move {
                        match store.prune(&processor, keep).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::debug!(target: "dory::runtime", pruned = n, "old snapshots pruned")
                            }
                            Err(e) => {
                                tracing::warn!(target: "dory::runtime", "cannot prune old snapshots: {e}")
                            }
                        }
                    });
                }
                tracing::debug!(target: "dory::runtime", sequence = self.checkpointed.0, "checkpoint committed");
                if let (Some(input), Some(mark)) = (&self.ctx.input, mark)
                    && let Err(e) = input.release(mark).await
                {
                    tracing::warn!(target: "dory::runtime", "cannot release input after the checkpoint: {e}");
                }
            }
            Err(Error::Fenced(why)) => shared.fence(why),
            Err(e) => {
                shared
                    .metrics
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                shared.set_checkpoint_failing(true);
                tracing::warn!(target: "dory::runtime", "checkpoint failed; not publishing until one is stored: {e}");
            }
        }
    }

    /// Freezes for a request: flush, pause the input, snapshot, then wait for a resume, a
    /// withdrawal (the request was dropped before it was answered) or a shutdown.
    async fn freeze(&mut self) -> Next {
        let shared = self.shared().clone();
        let started = tokio::time::Instant::now();
        if let Err(e) = self.ctx.publisher.flush().await {
            tracing::warn!(target: "dory::runtime", "cannot freeze yet, the publisher did not flush: {e}");
            self.wait_or_safe_point(self.settings.retry).await;
            return Next::Step;
        }
        if let Some(input) = &self.ctx.input
            && let Err(e) = input.pause().await
        {
            tracing::warn!(target: "dory::runtime", "cannot pause the input: {e}");
        }
        let (bytes, full_body) = match self.encode_frozen() {
            Ok(encoded) => encoded,
            Err(e) => {
                tracing::error!(target: "dory::runtime", "cannot snapshot the state: {e}");
                self.wait_or_safe_point(self.settings.retry).await;
                return Next::Step;
            }
        };
        let meta = SnapshotMeta {
            processor: shared.processor.clone(),
            epoch: shared.epoch,
            sequence: self.version,
            size: bytes.len() as u64,
            created_at: self.settings.clock.now(),
        };
        shared.set_running(false);
        shared.ctl.send_modify(|c| {
            c.phase = Some(Phase::Frozen);
            c.frozen = Frozen::ForRequest {
                bytes,
                meta,
                full_body,
            };
        });
        shared.metrics.freezes.fetch_add(1, Ordering::Relaxed);
        shared
            .metrics
            .freeze_ms
            .store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        tracing::info!(target: "dory::runtime", version = self.version.0, output = self.ctx.sequence.0, "frozen");
        let mut rx = shared.ctl.subscribe();
        let _ = rx
            .wait_for(|c| {
                c.resume_requested
                    || c.shutdown
                    || c.fenced.is_some()
                    || (c.freeze_waiters == 0 && !c.delivered)
            })
            .await;
        let (resume, shutdown) = {
            let c = shared.ctl.borrow();
            (
                c.resume_requested || (c.freeze_waiters == 0 && !c.delivered),
                c.shutdown,
            )
        };
        if shutdown {
            return Next::Stop(self.final_save().await);
        }
        if resume && !shared.is_fenced() {
            tracing::info!(target: "dory::runtime", "resumed");
            // The move this base was for did not happen; the next one pre-copies again.
            self.base = None;
            self.set_running();
        }
        Next::Step
    }

    /// The frozen snapshot: a delta against the pre-copied base when there is one and the
    /// state stepped since (with the body kept, for a full snapshot on demand), else full.
    fn encode_frozen(&mut self) -> Result<(Bytes, Option<Bytes>), Error> {
        let body = self.serialize()?;
        match &self.base {
            Some(base) if self.version > base.id.sequence => {
                let shared = self.shared();
                let bytes = Encoder::default().encode_delta(
                    &shared.processor,
                    shared.epoch,
                    self.version,
                    base,
                    &body,
                )?;
                shared
                    .metrics
                    .snapshot_bytes
                    .store(bytes.len() as u64, Ordering::Relaxed);
                Ok((Bytes::from(bytes), Some(Bytes::from(body))))
            }
            _ => {
                let bytes = self.encode_full(&body);
                self.recycle(body);
                Ok((Bytes::from(bytes?), None))
            }
        }
    }

    /// The shutdown path: a frozen instance that no longer owns the processor exits without
    /// saving; otherwise flush, store a final checkpoint, exit.
    async fn final_save(&mut self) -> Exit {
        let shared = self.shared().clone();
        let phase = shared.ctl.borrow().phase();
        shared.set_running(false);
        if let Some(why) = shared.ctl.borrow().fenced.clone() {
            return Exit::Fenced { reason: why };
        }
        if phase == Phase::Frozen {
            match self.store.ownership(&shared.processor).await {
                Ok(Some(row)) if row.owner != Some(shared.epoch) => {
                    tracing::info!(target: "dory::runtime", "frozen and no longer the owner: exiting without saving");
                    return Exit::NotOwner;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(target: "dory::runtime", "cannot read ownership before the final save: {e}")
                }
            }
        }
        if let Err(e) = self.ctx.publisher.flush().await {
            tracing::warn!(target: "dory::runtime", "the publisher did not flush before exit: {e}");
        }
        if self.version <= self.checkpointed {
            return Exit::Saved { sequence: None };
        }
        let mut attempts = 0;
        loop {
            self.checkpoint().await;
            if let Some(why) = shared.ctl.borrow().fenced.clone() {
                return Exit::Fenced { reason: why };
            }
            if self.checkpointed == self.version {
                return Exit::Saved {
                    sequence: Some(self.checkpointed),
                };
            }
            attempts += 1;
            if attempts >= 3 {
                tracing::error!(target: "dory::runtime", "final checkpoint failed; exiting with the last committed one");
                return Exit::SaveFailed {
                    last_committed: self.checkpointed,
                };
            }
            tokio::time::sleep(self.settings.retry).await;
        }
    }
}

/// Resolves when the process receives SIGTERM (or SIGINT): pass it to
/// [`Runtime::run_until`]. The handlers are installed when this is called, so call it before
/// starting the runtime.
pub fn sigterm() -> Result<impl Future<Output = ()> + Send + 'static, RuntimeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|source| RuntimeError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| RuntimeError::Signal {
        signal: "SIGINT",
        source,
    })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(target: "dory::runtime", "SIGTERM received"),
            _ = int.recv() => tracing::info!(target: "dory::runtime", "SIGINT received"),
        }
    })
}
