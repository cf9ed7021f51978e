//! [`EmbeddedDb`]: the SQLite file every embedded backend keeps its rows in.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dory_core::{Error, Result};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, Sqlite, Transaction};

use crate::error::{Error as SetupError, sql};

/// The tracing target every log line of this crate uses.
pub(crate) const TARGET: &str = "dory::embedded";

/// Operations slower than this are logged at `warn` rather than `debug`.
const SLOW: Duration = Duration::from_millis(500);

/// How long a statement waits for another process's write transaction before giving up with
/// SQLITE_BUSY (then [`Error::Unavailable`]). Write transactions are short (a checkpoint is
/// one row and one blob), so waiting this long means something is stuck.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The connections each [`EmbeddedDb`] keeps: SQLite has one writer at a time per file, so
/// more would only queue on its lock; readers run beside the writer in WAL mode.
const POOL_SIZE: u32 = 4;

/// The migrations in `migrations/`, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// The embedded database: one SQLite file holding ownership rows, snapshots, the leadership
/// term, operator intents and status, shared by the orchestrator and every instance process
/// on the machine.
///
/// The file is opened in WAL mode (readers never wait for the writer) with
/// `synchronous=FULL` (a commit is on disk when it returns, so a checkpoint that returned
/// survives a power cut) and a [`BUSY_TIMEOUT`]. Every write that decides something (a fenced
/// checkpoint, a claim, a move's commit, a new term) runs in a `BEGIN IMMEDIATE` transaction:
/// it takes the file's write lock before reading, so two processes never both read, decide
/// and then fail to upgrade (SQLITE_BUSY without waiting), and SQLite's single writer makes
/// every such decision atomic across processes.
///
/// It is a cheap handle: clones share one connection pool. Backends are built from it:
/// [`EmbeddedStore`](crate::EmbeddedStore), [`EmbeddedStatus`](crate::EmbeddedStatus),
/// [`EmbeddedLeadership`](crate::EmbeddedLeadership), [`FileConfig`](crate::FileConfig).
#[derive(Clone)]
pub struct EmbeddedDb {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDb")
            .field("path", &self.inner.path)
            .field("pool_size", &self.inner.pool.size())
            .finish()
    }
}

impl EmbeddedDb {
    /// Opens the database file at `path`, creating it (not its directory) if missing, and
    /// applies the embedded migrations (`migrations/`, embedded with `sqlx::migrate!`). Safe
    /// to run from many processes at once: migrations run inside one `BEGIN IMMEDIATE`
    /// transaction, so a second process waits for the first and then finds them applied. The
    /// schema version is kept in SQLite's `user_version`; a file written by a newer release is
    /// refused.
    pub async fn open(path: impl AsRef<Path>) -> std::result::Result<EmbeddedDb, SetupError> {
        // Absolute, so the lock file beside it and log lines name one place whatever the
        // working directory later is.
        let path = std::path::absolute(path.as_ref()).map_err(|source| SetupError::Io {
            what: "resolve the database path",
            path: path.as_ref().to_path_buf(),
            source,
        })?;
        // No `journal_mode` here: sqlx would run `PRAGMA journal_mode = WAL` on every new
        // connection, and on a file not yet in WAL (a fresh one) that is a read that upgrades
        // to a write, which SQLite refuses with SQLITE_BUSY at once, without the busy handler,
        // when another process has the file open. WAL is kept in the file's header, so it is
        // set once below ([`set_wal`]) and every later connection opens in WAL by itself.
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let open_err = |source| SetupError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(open_err)?;
        if let Err(e) = set_wal(&mut conn).await {
            let _ = conn.close().await;
            return Err(match e {
                WalError::Sql(source) => open_err(source),
                WalError::Refused(mode) => SetupError::NoWal {
                    path: path.clone(),
                    mode,
                },
            });
        }
        let migrated = migrate(&mut conn).await;
        let _ = conn.close().await;
        migrated.map_err(|(version, source)| SetupError::Migrate {
            path: path.clone(),
            version,
            source,
        })?;
        let pool = SqlitePoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        tracing::info!(target: TARGET, path = %path.display(), "embedded database ready");
        Ok(EmbeddedDb {
            inner: Arc::new(Inner { pool, path }),
        })
    }

    /// The connection pool, for diagnostics and tests that need to look below the API.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }

    /// The database file (absolute).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The leadership lock file beside the database: `<database>-leader.lock`.
    pub fn leader_lock_path(&self) -> PathBuf {
        let mut name = self.inner.path.as_os_str().to_owned();
        name.push("-leader.lock");
        PathBuf::from(name)
    }

    /// Starts a write transaction holding the file's write lock from its first statement, so
    /// what it reads stays true until it commits.
    pub(crate) async fn begin_write(&self, what: &str) -> Result<Transaction<'static, Sqlite>> {
        self.inner
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(sql(what))
    }
}

/// Why [`set_wal`] failed.
enum WalError {
    /// SQLite's error (SQLITE_BUSY only once [`BUSY_TIMEOUT`] has passed).
    Sql(sqlx::Error),
    /// SQLite kept this other journal mode (a VFS without shared memory cannot do WAL).
    Refused(String),
}

/// Puts the file in WAL mode (a no-op once it is: the mode is kept in the file's header).
///
/// Switching a file into WAL rewrites its header: the statement reads the header under a
/// shared lock and then needs the write lock. When another connection holds a shared lock
/// (another process opening the same fresh file, reading it, or switching it too), SQLite
/// returns SQLITE_BUSY at once instead of calling the busy handler, since waiting while
/// holding a shared lock could deadlock (<https://www.sqlite.org/c3ref/busy_handler.html>).
/// The failed statement drops its shared lock, so the other connection can finish; this one
/// tries again, with backoff, until [`BUSY_TIMEOUT`] has passed, like the busy handler
/// would have. Usually the retry then finds the file already in WAL.
async fn set_wal(conn: &mut SqliteConnection) -> std::result::Result<(), WalError> {
    let deadline = Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        match sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => return Err(WalError::Refused(mode)),
            Err(e) if is_busy(&e) && Instant::now() + pause < deadline => {
                tracing::debug!(target: TARGET, error = %e, ?pause, "switching to WAL: busy, trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_WAL_PAUSE);
            }
            Err(e) => return Err(WalError::Sql(e)),
        }
    }
}

/// The longest pause between [`set_wal`]'s attempts: SQLite's own busy handler sleeps at
/// most 100 ms between tries too.
const MAX_WAL_PAUSE: Duration = Duration::from_millis(100);

/// Whether SQLite answered SQLITE_BUSY (any extended code of it: its low byte is 5).
fn is_busy(e: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    e.as_database_error()
        .and_then(|db| db.code())
        .and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| code & 0xff == SQLITE_BUSY)
}

/// Applies the embedded migrations inside one `BEGIN IMMEDIATE` transaction, so processes
/// opening the file at once serialise and the later ones find everything applied. The schema
/// version is SQLite's `user_version` (transactional, in the file header): sqlx's own migrator
/// takes no lock on SQLite, and its future over a transaction cannot be proved `Send`.
async fn migrate(conn: &mut SqliteConnection) -> std::result::Result<(), (i64, sqlx::Error)> {
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(|e| (0, e))?;
    let current: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| (0, e))?;
    let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    if current > known {
        return Err((
            current,
            sqlx::Error::Protocol(format!(
                "the database's schema version {current} is newer than this Dory knows                  ({known}): it was written by a newer release"
            )),
        ));
    }
    for migration in MIGRATOR.iter().filter(|m| {
        m.version > current
            && !matches!(
                m.migration_type,
                sqlx::migrate::MigrationType::ReversibleDown
            )
    }) {
        let version = migration.version;
        sqlx::raw_sql(migration.sql.clone())
            .execute(&mut *tx)
            .await
            .map_err(|e| (version, e))?;
        // A plain number, not user input: PRAGMA takes no binds.
        let set = format!("PRAGMA user_version = {version}");
        sqlx::query(sqlx::AssertSqlSafe(set))
            .execute(&mut *tx)
            .await
            .map_err(|e| (version, e))?;
        tracing::info!(target: TARGET, version, description = %migration.description, "migration applied");
    }
    tx.commit().await.map_err(|e| (known, e))
}

/// The wall clock in milliseconds since the Unix epoch: the store's clock. Every process
/// using the file runs on this machine, so they all read the same clock.
pub(crate) fn now_ms() -> i64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// Runs one store operation, logging its outcome under [`TARGET`]: slow ones and
/// unavailability at `warn`, the rest at `debug`.
pub(crate) async fn logged<T>(what: &str, op: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = op.await;
    let elapsed = started.elapsed();
    match &result {
        Err(e @ Error::Unavailable(_)) => {
            tracing::warn!(target: TARGET, op = what, ?elapsed, error = %e, "store operation failed");
        }
        Err(e) => {
            tracing::debug!(target: TARGET, op = what, ?elapsed, error = %e, "store operation refused")
        }
        Ok(_) if elapsed > SLOW => {
            tracing::warn!(target: TARGET, op = what, ?elapsed, "slow store operation");
        }
        Ok(_) => tracing::debug!(target: TARGET, op = what, ?elapsed, "store operation"),
    }
    result
}

/// A number for an `INTEGER` column; values above `i64::MAX` cannot be stored.
pub(crate) fn db(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{what}: {v} does not fit in an INTEGER")))
}
