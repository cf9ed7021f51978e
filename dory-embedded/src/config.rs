//! [`FileConfig`]: the desired processors in a TOML file, operator intents in the embedded
//! database, change nudges from a file watcher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dory_core::{
    ChangeNotifier, Changes, ConfigSource, DesiredState, Error, Intent, RecordedIntents, Result,
};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::oneshot;

use crate::db::{EmbeddedDb, TARGET, logged, now_ms};
use crate::error::{Error as SetupError, map_io, sql};
use crate::spec_file;

/// A change is passed on once the file has been quiet this long, so an editor's burst of
/// writes (temporary file, rename, attributes) becomes one nudge.
const QUIET: Duration = Duration::from_millis(50);

/// The longest a burst of file events delays its nudge.
const MAX_DELAY: Duration = Duration::from_millis(250);

/// How often the intents table's version is read, to notice intents other processes record
/// (`dory move` and `dory drain` run in processes of their own).
const INTENTS_POLL: Duration = Duration::from_millis(250);

/// A [`ConfigSource`] reading the desired processors from a TOML file, with operator intents
/// (pins and cordons) and nothing else in the embedded database: Dory never writes to the
/// user's file.
///
/// # The file
///
/// Each `[processors.<id>]` table is one processor; its key is the processor id and its
/// fields are the other [`ProcessorSpec`](dory_core::ProcessorSpec) fields, exactly as the
/// Postgres config source reads them from JSON, missing ones taking their defaults
/// (durations are integer milliseconds):
///
/// ```toml
/// [processors.counter]
/// site = "edge"                 # edge, cloud or any
/// fallback = true
/// checkpoint_interval = 5000    # ms
/// workload = { command = ["counter"], env = { RUST_LOG = "info" } }
/// resources = { cpu_millis = 250, memory_mib = 64 }
/// config = { start = 1 }        # free-form, handed to the instance
///
/// [processors.counter.restart]
/// mode = "on-failure"
/// backoff_initial = 1000
/// ```
///
/// Other top-level tables in the same file (the `dory` CLI's `[orchestrator]`, `[store]`, …)
/// are not this source's and are ignored.
///
/// # Errors
///
/// An entry that does not parse or validate is listed in
/// [`DesiredState::invalid`] with an error naming the file, line, column and field (e.g.
/// `/srv/dory.toml:12:1: processor "counter": field `checkpoint_interval` must be greater
/// than zero`); the other entries are unaffected. A field that is not a processor field (a
/// typo) makes its entry invalid too, rather than being dropped without a word.
///
/// A file that is not TOML at all (or whose `processors` is not a table) makes
/// [`desired`](ConfigSource::desired) fail with [`Error::Invalid`] naming the file and line.
/// The orchestrator then treats the round as one it could not observe: it logs the error,
/// emits a `Failed` event for `observe`, changes nothing (running processors keep running,
/// none is stopped because the file momentarily lists none) and tries again after its retry
/// interval or the next nudge, i.e. once the file is fixed. A missing or unreadable file
/// fails the same way.
///
/// # Changes
///
/// A watcher on the file's directory (not the file: editors save by writing a new file and
/// renaming it over the old one) nudges subscribers 50 to 250 ms after a save (a burst of
/// events becomes one nudge once the file has been quiet for 50 ms). Intents recorded through this source nudge at once; intents
/// recorded by other processes on the same database (a `dory move` from the command line)
/// are noticed by polling the intents table's version every 250 ms.
pub struct FileConfig {
    path: PathBuf,
    db: EmbeddedDb,
    notifier: Arc<ChangeNotifier>,
    /// Watching stops when this is dropped (and with it the debounce thread).
    _watcher: notify::RecommendedWatcher,
    /// Dropping the source drops this sender, which stops the intents poller.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileConfig")
            .field("path", &self.path)
            .field("db", &self.db.path())
            .finish()
    }
}

impl FileConfig {
    /// A config source over the TOML file at `path`, keeping intents in `db`. The file must
    /// exist; it is read (and validated) on every [`desired`](ConfigSource::desired), so a
    /// broken file does not fail this call.
    ///
    /// Must be called inside a tokio runtime: the intents poller runs as a task on it. The
    /// watcher is watching when this returns.
    pub fn open(
        path: impl AsRef<Path>,
        db: &EmbeddedDb,
    ) -> std::result::Result<FileConfig, SetupError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SetupError::Io { what, path, source }
        };
        let path = std::path::absolute(path.as_ref())
            .map_err(io("resolve the processors file path", path.as_ref()))?;
        let meta = std::fs::metadata(&path).map_err(io("read the processors file", &path))?;
        if !meta.is_file() {
            return Err(SetupError::Io {
                what: "read the processors file",
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file"),
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SetupError::NoRuntime {
            what: "FileConfig::open",
        })?;
        let dir = path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
        let name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        let notifier = Arc::new(ChangeNotifier::new());

        let (events, received) = mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only once the source is dropped.
            let _ = events.send(event);
        })
        .map_err(|source| SetupError::Watch {
            path: dir.clone(),
            source,
        })?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|source| SetupError::Watch {
                path: dir.clone(),
                source,
            })?;
        let debounce = {
            let notifier = notifier.clone();
            let file = path.clone();
            move || debounce(received, &name, &file, &notifier)
        };
        std::thread::Builder::new()
            .name("dory-config-watch".into())
            .spawn(debounce)
            .map_err(io("start the watcher thread for", &path))?;

        let (stop, stopped) = oneshot::channel();
        runtime.spawn(poll_intents(db.clone(), notifier.clone(), stopped));
        tracing::info!(target: TARGET, path = %path.display(), "config source watching");
        Ok(FileConfig {
            path,
            db: db.clone(),
            notifier,
            _watcher: watcher,
            _stop: stop,
        })
    }

    /// The processors file (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read(&self, what: &str) -> Result<String> {
        tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| map_io(&e).context(format!("{what}: read {}", self.path.display())))
    }

    /// Every processor id the file lists, valid or not.
    async fn listed(&self, what: &str) -> Result<std::collections::BTreeSet<String>> {
        let text = self.read(what).await?;
        spec_file::listed(&self.path, &text).map_err(|e| e.context(what))
    }
}

/// Parses the processors of a TOML text as [`FileConfig`] does (without intents): `path`
/// only names the file in errors. For tools that check a file before using it (`dory
/// validate`); see [`FileConfig`] for the format and the errors.
pub fn parse_processors(path: &Path, text: &str) -> Result<DesiredState> {
    spec_file::parse(path, text, &BTreeMap::new())
}

/// Turns the watcher's events about `name` into nudges, one per burst; returns when the
/// watcher is dropped.
fn debounce(
    events: mpsc::Receiver<notify::Result<notify::Event>>,
    name: &std::ffi::OsStr,
    file: &Path,
    notifier: &ChangeNotifier,
) {
    let relevant = |event: &notify::Result<notify::Event>| match event {
        Ok(event) => {
            // Reading the file (ours included) is no change; every other kind may be.
            let reads = matches!(
                event.kind,
                EventKind::Access(kind) if !matches!(
                    kind,
                    notify::event::AccessKind::Close(notify::event::AccessMode::Write)
                )
            );
            !reads
                && (event.paths.is_empty()
                    || event.paths.iter().any(|p| p.file_name() == Some(name)))
        }
        // A lost event (queue overflow) may have been about the file: re-list to be sure.
        Err(e) => {
            tracing::warn!(target: TARGET, path = %file.display(), error = %e, "file watcher error");
            true
        }
    };
    while let Ok(event) = events.recv() {
        if !relevant(&event) {
            continue;
        }
        let first = Instant::now();
        loop {
            let left = MAX_DELAY.saturating_sub(first.elapsed());
            if left.is_zero() {
                break;
            }
            match events.recv_timeout(QUIET.min(left)) {
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        tracing::debug!(target: TARGET, path = %file.display(), "processors file changed");
        notifier.notify();
    }
}

/// Nudges `notifier` whenever the intents table's version moves, until `stop` fires.
async fn poll_intents(
    db: EmbeddedDb,
    notifier: Arc<ChangeNotifier>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut seen: Option<i64> = None;
    loop {
        let version =
            sqlx::query_scalar::<_, i64>("SELECT version FROM intents_version WHERE id = 1")
                .fetch_one(db.pool());
        let version = tokio::select! {
            _ = &mut stop => return,
            version = version => version,
        };
        match version {
            Ok(v) => {
                if seen.is_some_and(|s| s != v) {
                    notifier.notify();
                }
                seen = Some(v);
            }
            Err(e) => {
                // Whatever changed meanwhile is seen at the next successful read.
                tracing::debug!(target: TARGET, error = %e, "cannot read the intents version");
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(INTENTS_POLL) => {}
        }
    }
}

#[async_trait]
impl ConfigSource for FileConfig {
    async fn desired(&self) -> Result<DesiredState> {
        let what = "desired";
        logged(what, async {
            let text = self.read(what).await?;
            let intents: Vec<(String, String, Option<String>)> =
                sqlx::query_as("SELECT kind, subject, node FROM intents")
                    .fetch_all(self.db.pool())
                    .await
                    .map_err(sql(what))?;
            let RecordedIntents { pins, cordoned } = intents.into_iter().collect();
            let mut desired = spec_file::parse(&self.path, &text, &pins)?;
            desired.cordoned = cordoned;
            Ok(desired)
        })
        .await
    }

    fn changes(&self) -> Changes {
        self.notifier.subscribe()
    }

    async fn record_intent(&self, intent: &Intent) -> Result<()> {
        let what = format!("record_intent {intent:?}");
        logged(&what, async {
            intent.check(&what)?;
            match intent {
                Intent::Pin {
                    processor,
                    node: Some(node),
                } => {
                    // Only a listed processor can be pinned.
                    if !self.listed(&what).await?.contains(processor.as_str()) {
                        return Err(Error::not_found(format!(
                            "{what}: processor {processor} is not in {}",
                            self.path.display()
                        )));
                    }
                    let mut tx = self.db.begin_write(&what).await?;
                    sqlx::query(
                        "INSERT INTO intents (kind, subject, node, recorded_at) \
                         VALUES ('pin', ?1, ?2, ?3) \
                         ON CONFLICT (kind, subject) \
                         DO UPDATE SET node = excluded.node, recorded_at = excluded.recorded_at",
                    )
                    .bind(processor.as_str())
                    .bind(node.as_str())
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(sql(&what))?;
                    tx.commit().await.map_err(sql(&what))?;
                }
                Intent::Pin {
                    processor,
                    node: None,
                } => {
                    // A stale pin of a removed processor can still be cleared.
                    let deleted =
                        sqlx::query("DELETE FROM intents WHERE kind = 'pin' AND subject = ?1")
                            .bind(processor.as_str())
                            .execute(self.db.pool())
                            .await
                            .map_err(sql(&what))?
                            .rows_affected();
                    if deleted == 0 && !self.listed(&what).await?.contains(processor.as_str()) {
                        return Err(Error::not_found(format!(
                            "{what}: processor {processor} is not in {}",
                            self.path.display()
                        )));
                    }
                }
                Intent::Cordon { node } => {
                    sqlx::query(
                        "INSERT INTO intents (kind, subject, recorded_at) VALUES ('cordon', ?1, ?2) \
                         ON CONFLICT (kind, subject) DO NOTHING",
                    )
                    .bind(node.as_str())
                    .bind(now_ms())
                    .execute(self.db.pool())
                    .await
                    .map_err(sql(&what))?;
                }
                Intent::Uncordon { node } => {
                    sqlx::query("DELETE FROM intents WHERE kind = 'cordon' AND subject = ?1")
                        .bind(node.as_str())
                        .execute(self.db.pool())
                        .await
                        .map_err(sql(&what))?;
                }
            }
            // Every recorded intent nudges, a repeated one included (the contract asks it).
            self.notifier.notify();
            Ok(())
        })
        .await
    }
}
