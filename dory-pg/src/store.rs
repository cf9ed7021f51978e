//! [`PgStore`]: the fenced state store in Postgres.

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dory_core::columns::{count, timestamp};
use dory_core::ownership::{self, OwnershipColumns, OwnershipRules, RulesColumns};
use dory_core::snapshot::{DeltaBase, MetaColumns};
use dory_core::{
    Epoch, Error, Ownership, ProcessorId, Result, Sequence, SnapshotMeta, StateStore,
    StoredSnapshot, Term, Timestamp,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};

use crate::config::{PgConfig, validate_schema};
use crate::error::{Error as SetupError, sql};

/// The tracing target every log line of this crate uses.
pub(crate) const TARGET: &str = "dory::pg";

/// Operations slower than this are logged at `warn` rather than `debug`.
const SLOW: Duration = Duration::from_millis(500);

/// The longest lease granted: a longer one is as good as forever, and Postgres intervals
/// overflow long before `Duration::MAX`.
const MAX_LEASE_MS: u128 = 100 * 365 * 24 * 3600 * 1000;

/// The migrations in `migrations/`, embedded at build time.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// What a store and the leadership participants made from it share. Not `Debug`: the
/// connect options hold the password.
pub(crate) struct Shared {
    pub(crate) options: PgConnectOptions,
    pub(crate) schema: String,
    pub(crate) statement_timeout: Duration,
    pub(crate) connect_timeout: Duration,
}

/// Points a fresh connection at `schema` and sets its statement timeout. Binds, not string
/// splicing: `set_config` takes the values as parameters.
pub(crate) async fn prepare(
    conn: &mut PgConnection,
    schema: &str,
    statement_timeout: Duration,
) -> std::result::Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT set_config('search_path', $1, false), set_config('statement_timeout', $2, false)",
    )
    .bind(format!("\"{schema}\""))
    .bind(format!("{}ms", statement_timeout.as_millis()))
    .execute(conn)
    .await
    .map(drop)
}

/// A [`StateStore`] in Postgres: ownership rows, snapshots and the leadership term in one
/// schema, every write one transaction.
///
/// Writes lock the processor's `ownership` row (`SELECT ... FOR UPDATE`) and decide under that
/// lock, so concurrent writers of one processor serialise while different processors never
/// wait for each other. A new checkpoint from the owner, the write instances make most often,
/// is one conditional statement that locks the same row; anything else (a retry, a refusal)
/// goes the locked way, so every case keeps its answer. Orchestrator writes also read the
/// `leadership` row `FOR SHARE` and compare the term, so a new leader's increment waits for
/// them and every later one sees it.
/// Leases and timestamps come from the database clock, so every participant measures leases
/// on one clock. Snapshots are verified with [`snapshot::verify`](dory_core::snapshot::verify) before they are stored and
/// after they are read.
///
/// It is a cheap handle: clones share one connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgStore {
    // Only what is safe to log: the connect options would show the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.shared.schema)
            .field("pool_size", &self.pool.size())
            .finish()
    }
}

impl PgStore {
    /// Connects, creates the schema if missing and applies the migrations (idempotent: safe
    /// to run from every process at start-up; concurrent runs wait for each other).
    pub async fn connect(config: &PgConfig) -> std::result::Result<PgStore, SetupError> {
        validate_schema(&config.schema)?;
        let options = PgConnectOptions::from_str(&config.url).map_err(SetupError::InvalidUrl)?;
        let shared = Arc::new(Shared {
            options,
            schema: config.schema.clone(),
            statement_timeout: config.statement_timeout,
            connect_timeout: config.connect_timeout,
        });
        migrate(&shared).await?;

        let for_hook = shared.clone();
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size.max(1))
            .acquire_timeout(config.connect_timeout)
            // Every pooled connection works in the configured schema, so deployments (and
            // parallel tests) sharing a database never see each other's rows.
            .after_connect(move |conn, _meta| {
                let shared = for_hook.clone();
                Box::pin(
                    async move { prepare(conn, &shared.schema, shared.statement_timeout).await },
                )
            })
            .connect_with(shared.options.clone().application_name("dory-pg"))
            .await
            .map_err(SetupError::Connect)?;
        tracing::info!(target: TARGET, schema = %shared.schema, "state store ready");
        Ok(PgStore { pool, shared })
    }

    /// The connection pool, for diagnostics and tests that need to look below the API.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema holding this store's tables.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    async fn begin(&self, what: &str) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(sql(what))
    }
}

/// Creates the schema if missing and applies the migrations in it (sqlx's
/// `_sqlx_migrations` table included). Idempotent; concurrent runs wait for each other on
/// sqlx's migration lock.
async fn migrate(shared: &Shared) -> std::result::Result<(), SetupError> {
    let schema = shared.schema.clone();
    // One plain connection first: it reports an unreachable database with its real cause
    // (refused, unknown host, bad password) within the connect timeout.
    let mut conn = connect_once(&shared.options, shared.connect_timeout)
        .await
        .map_err(SetupError::Connect)?;
    // The name was validated as a plain identifier, so splicing it is safe; DDL takes no binds.
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    let created = sqlx::query(AssertSqlSafe(create)).execute(&mut conn).await;
    let _ = conn.close().await;
    if let Err(e) = created {
        // Two processes creating the schema at once: the loser's IF NOT EXISTS can still hit
        // the catalog's unique index. The schema exists either way.
        let raced =
            matches!(&e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"));
        if !raced {
            return Err(SetupError::CreateSchema { schema, source: e });
        }
    }
    // Migrations run without the statement timeout: waiting for another process's
    // migrations, or one long migration, is not a stuck statement. A one-connection pool,
    // because the migrator takes a pool (or a connection only through a hidden API).
    let hook_schema = schema.clone();
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(shared.connect_timeout)
        .after_connect(move |conn, _meta| {
            let schema = hook_schema.clone();
            Box::pin(async move { prepare(conn, &schema, Duration::ZERO).await })
        })
        .connect_with(
            shared
                .options
                .clone()
                .application_name("dory-pg migrations"),
        )
        .await
        .map_err(SetupError::Connect)?;
    let migrated = MIGRATOR.run(&pool).await;
    pool.close().await;
    migrated.map_err(|source| SetupError::Migrate { schema, source })
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

/// A number for a `bigint` column; values above `i64::MAX` cannot be stored.
fn db(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{what}: {v} does not fit in a bigint")))
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis().min(MAX_LEASE_MS)).unwrap_or(i64::MAX)
}

/// Reads and locks the ownership row of `processor` until the transaction ends, as the
/// shared ownership rules see it.
async fn fetch_locked(
    tx: &mut PgConnection,
    processor: &ProcessorId,
    what: &str,
) -> Result<Option<OwnershipRules>> {
    let row: Option<RulesColumns> = sqlx::query_as(
        "SELECT owner, highest, newest_owner, \
                COALESCE(lease_expires > clock_timestamp(), false), \
                committed_epoch, committed_seq \
         FROM ownership WHERE processor = $1 FOR UPDATE",
    )
    .bind(processor.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(sql(what))?;
    row.map(|r| OwnershipRules::from_columns(r, what))
        .transpose()
}

/// Refuses an orchestrator write unless `term` is the current leadership term. The row is
/// read `FOR SHARE`, so a new leader's increment waits until this transaction ends and every
/// transaction after it sees the new term.
async fn check_term(tx: &mut PgConnection, term: Term, what: &str) -> Result<()> {
    let current: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1 FOR SHARE")
        .fetch_one(&mut *tx)
        .await
        .map_err(sql(what))?;
    if term.0 == 0 || i64::try_from(term.0) != Ok(current) {
        return Err(Error::fenced(format!(
            "{what}: leadership term {term} is not current (t{current} is)"
        )));
    }
    Ok(())
}

/// Grants `lease` from now (the transaction's start, so a write that waited for a lock
/// grants a little less, never more) and returns the expiry.
async fn grant(
    tx: &mut PgConnection,
    processor: &ProcessorId,
    lease: Duration,
    what: &str,
) -> Result<Timestamp> {
    let expires: i64 = sqlx::query_scalar(
        "UPDATE ownership \
         SET lease_expires = date_trunc('milliseconds', now() + $2::float8 * interval '1 millisecond') \
         WHERE processor = $1 \
         RETURNING floor(extract(epoch from lease_expires) * 1000)::bigint",
    )
    .bind(processor.as_str())
    .bind(lease_ms(lease))
    .fetch_one(&mut *tx)
    .await
    .map_err(sql(what))?;
    Ok(timestamp(expires))
}

/// Stores `snapshot` under its metadata's key and makes it the committed checkpoint; a delta
/// is stored only beside its base (`base`, from the snapshot), which it names.
async fn store_checkpoint(
    tx: &mut PgConnection,
    snapshot: &StoredSnapshot,
    base: Option<DeltaBase>,
    what: &str,
) -> Result<()> {
    let meta = &snapshot.meta;
    let (epoch, sequence) = (db(meta.epoch.0, what)?, db(meta.sequence.0, what)?);
    let base = match base {
        Some(base) => {
            let key = (db(base.epoch.0, what)?, db(base.sequence.0, what)?);
            let stored: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM snapshots WHERE processor = $1 AND epoch = $2 AND sequence = $3",
            )
            .bind(meta.processor.as_str())
            .bind(key.0)
            .bind(key.1)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql(what))?;
            stored.ok_or_else(|| base.missing(what))?;
            Some(key)
        }
        None => None,
    };
    sqlx::query(
        "INSERT INTO snapshots \
         (processor, epoch, sequence, size, created_at, body, base_epoch, base_sequence) \
         VALUES ($1, $2, $3, $4, date_trunc('milliseconds', now()), $5, $6, $7)",
    )
    .bind(meta.processor.as_str())
    .bind(epoch)
    .bind(sequence)
    .bind(db(snapshot.bytes.len() as u64, what)?)
    .bind(snapshot.bytes.as_slice())
    .bind(base.map(|b| b.0))
    .bind(base.map(|b| b.1))
    .execute(&mut *tx)
    .await
    .map_err(sql(what))?;
    sqlx::query(
        "UPDATE ownership SET committed_epoch = $2, committed_seq = $3, \
                committed_at = date_trunc('milliseconds', now()) \
         WHERE processor = $1",
    )
    .bind(meta.processor.as_str())
    .bind(epoch)
    .bind(sequence)
    .execute(&mut *tx)
    .await
    .map_err(sql(what))?;
    Ok(())
}

/// A new checkpoint from the owner, the common case, in one statement: the update of the
/// ownership row, conditional on `epoch` owning and `sequence` being above the committed one,
/// records the checkpoint and renews the lease, and the snapshot is inserted only if it did.
/// One autocommit statement is one transaction, and the update locks the row (`FOR NO KEY
/// UPDATE`, which conflicts with the `FOR UPDATE` of every other write) and, when it had to
/// wait for the lock, re-checks the condition against the row's newest version: this is the
/// locked transaction's write in one statement instead of six.
///
/// `None` when it changed nothing (no row, another owner, a sequence not above the committed
/// one, a retry of the committed checkpoint, or keys beyond a bigint): the caller then decides
/// under the row lock, which names the reason.
async fn put_new_checkpoint(
    pool: &PgPool,
    snapshot: &StoredSnapshot,
    lease: Duration,
    what: &str,
) -> Result<Option<Timestamp>> {
    let meta = &snapshot.meta;
    let (Ok(epoch), Ok(sequence), Ok(size)) = (
        i64::try_from(meta.epoch.0),
        i64::try_from(meta.sequence.0),
        i64::try_from(snapshot.bytes.len()),
    ) else {
        return Ok(None);
    };
    let expires: Option<i64> = sqlx::query_scalar(
        "WITH renewed AS ( \
             UPDATE ownership \
             SET committed_epoch = $2, committed_seq = $3, \
                 committed_at = date_trunc('milliseconds', now()), \
                 lease_expires = date_trunc('milliseconds', now() + $6::float8 * interval '1 millisecond') \
             WHERE processor = $1 AND owner = $2 \
               AND (committed_seq IS NULL OR committed_seq < $3) \
             RETURNING lease_expires), \
         stored AS ( \
             INSERT INTO snapshots (processor, epoch, sequence, size, created_at, body) \
             SELECT $1, $2, $3, $4, date_trunc('milliseconds', now()), $5 FROM renewed) \
         SELECT floor(extract(epoch from lease_expires) * 1000)::bigint FROM renewed",
    )
    .bind(meta.processor.as_str())
    .bind(epoch)
    .bind(sequence)
    .bind(size)
    .bind(snapshot.bytes.as_slice())
    .bind(lease_ms(lease))
    .fetch_optional(pool)
    .await
    .map_err(sql(what))?;
    Ok(expires.map(timestamp))
}

const OWNERSHIP_COLUMNS: &str = "processor, owner, highest, \
     floor(extract(epoch from lease_expires) * 1000)::bigint, \
     committed_epoch, committed_seq, \
     floor(extract(epoch from committed_at) * 1000)::bigint";

#[async_trait]
impl StateStore for PgStore {
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> Result<Epoch> {
        let what = format!("claim_epoch of {processor}");
        logged(&what, async {
            let mut tx = self.begin(&what).await?;
            check_term(&mut tx, term, &what).await?;
            // The upsert locks the row, so concurrent claims serialise and each gets its own
            // highest + 1.
            let highest: i64 = sqlx::query_scalar(
                "INSERT INTO ownership (processor, highest) VALUES ($1, 1) \
                 ON CONFLICT (processor) DO UPDATE SET highest = ownership.highest + 1 \
                 RETURNING highest",
            )
            .bind(processor.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(sql(&what))?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(Epoch(count(highest, &what)?))
        })
        .await
    }

    async fn assign_owner(
        &self,
        processor: &ProcessorId,
        expected: Option<Epoch>,
        epoch: Epoch,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let what = format!(
            "assign_owner of {processor} from {} to {epoch}",
            dory_core::ownership::show(expected)
        );
        logged(&what, async {
            let mut tx = self.begin(&what).await?;
            check_term(&mut tx, term, &what).await?;
            let row = fetch_locked(&mut tx, processor, &what)
                .await?
                .ok_or_else(|| Error::invalid(format!("{what}: no epoch was ever claimed")))?;
            // Checked under the row lock and in the database clock.
            row.check_assign(&what, expected, epoch)?;
            let e = db(epoch.0, &what)?;
            sqlx::query("UPDATE ownership SET owner = $2, newest_owner = $2 WHERE processor = $1")
                .bind(processor.as_str())
                .bind(e)
                .execute(&mut *tx)
                .await
                .map_err(sql(&what))?;
            grant(&mut tx, processor, lease, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(())
        })
        .await
    }

    async fn commit_move(
        &self,
        from: Epoch,
        snapshot: &StoredSnapshot,
        lease: Duration,
        term: Term,
    ) -> Result<()> {
        let (processor, to, sequence) = (
            &snapshot.meta.processor,
            snapshot.meta.epoch,
            snapshot.meta.sequence,
        );
        let what = format!("commit_move of {processor} from {from} to {to} at {sequence}");
        logged(&what, async {
            snapshot.check_incoming(from, &what)?;
            let base = snapshot.delta_base()?;
            let mut tx = self.begin(&what).await?;
            check_term(&mut tx, term, &what).await?;
            let row = fetch_locked(&mut tx, processor, &what)
                .await?
                .ok_or_else(|| Error::not_found(format!("{what}: no ownership row")))?;
            row.check_commit(&what, from, to, sequence)?;
            sqlx::query("UPDATE ownership SET owner = $2, newest_owner = $2 WHERE processor = $1")
                .bind(processor.as_str())
                .bind(db(to.0, &what)?)
                .execute(&mut *tx)
                .await
                .map_err(sql(&what))?;
            store_checkpoint(&mut tx, snapshot, base, &what).await?;
            grant(&mut tx, processor, lease, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(())
        })
        .await
    }

    async fn release(&self, processor: &ProcessorId, epoch: Epoch, term: Term) -> Result<()> {
        let what = format!("release of {processor} from {epoch}");
        logged(&what, async {
            let mut tx = self.begin(&what).await?;
            check_term(&mut tx, term, &what).await?;
            let row = fetch_locked(&mut tx, processor, &what)
                .await?
                .ok_or_else(|| Error::not_found(format!("{what}: no ownership row")))?;
            if !ownership::check_release(&what, row.owner, epoch)? {
                return Ok(());
            }
            sqlx::query(
                "UPDATE ownership SET owner = NULL, lease_expires = NULL WHERE processor = $1",
            )
            .bind(processor.as_str())
            .execute(&mut *tx)
            .await
            .map_err(sql(&what))?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(())
        })
        .await
    }

    async fn put_checkpoint(
        &self,
        snapshot: &StoredSnapshot,
        lease: Duration,
    ) -> Result<Timestamp> {
        let (processor, epoch, sequence) = (
            &snapshot.meta.processor,
            snapshot.meta.epoch,
            snapshot.meta.sequence,
        );
        let what = format!("put_checkpoint of {processor} {epoch} {sequence}");
        logged(&what, async {
            snapshot.check_checkpoint(&what)?;
            if let Some(expires) = put_new_checkpoint(&self.pool, snapshot, lease, &what).await? {
                return Ok(expires);
            }
            // Nothing was written: a retry of the committed checkpoint, or a refusal. Decide
            // under the row lock, as before the fast path, so each case keeps its answer.
            let mut tx = self.begin(&what).await?;
            let row = fetch_locked(&mut tx, processor, &what)
                .await?
                .ok_or_else(|| Error::fenced(format!("{what}: no epoch owns the processor")))?;
            row.check_owner(&what, epoch)?;
            // A retry of the committed checkpoint (its answer was lost) succeeds again and
            // renews the lease: refusing it would fence a legitimate owner.
            if row.committed == Some((epoch, sequence)) {
                let same: Option<bool> = sqlx::query_scalar(
                    "SELECT body = $4 FROM snapshots \
                     WHERE processor = $1 AND epoch = $2 AND sequence = $3",
                )
                .bind(processor.as_str())
                .bind(db(epoch.0, &what)?)
                .bind(db(sequence.0, &what)?)
                .bind(snapshot.bytes.as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql(&what))?;
                if same == Some(true) {
                    let expires = grant(&mut tx, processor, lease, &what).await?;
                    tx.commit().await.map_err(sql(&what))?;
                    return Ok(expires);
                }
            }
            row.check_above_committed(&what, sequence)?;
            store_checkpoint(&mut tx, snapshot, None, &what).await?;
            let expires = grant(&mut tx, processor, lease, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(expires)
        })
        .await
    }

    async fn renew_lease(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        lease: Duration,
    ) -> Result<Timestamp> {
        let what = format!("renew_lease of {processor} {epoch}");
        logged(&what, async {
            let mut tx = self.begin(&what).await?;
            let row = fetch_locked(&mut tx, processor, &what)
                .await?
                .ok_or_else(|| Error::fenced(format!("{what}: no epoch owns the processor")))?;
            row.check_owner(&what, epoch)?;
            let expires = grant(&mut tx, processor, lease, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(expires)
        })
        .await
    }

    async fn ownership(&self, processor: &ProcessorId) -> Result<Option<Ownership>> {
        let what = format!("ownership of {processor}");
        let query = format!("SELECT {OWNERSHIP_COLUMNS} FROM ownership WHERE processor = $1");
        let row: Option<OwnershipColumns> = sqlx::query_as(AssertSqlSafe(query))
            .bind(processor.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(sql(&what))?;
        row.map(|r| Ownership::from_columns(r, &what)).transpose()
    }

    async fn ownerships(&self) -> Result<Vec<Ownership>> {
        let what = "ownerships";
        // Byte-wise order, whatever the database's collation, to match `ProcessorId`'s `Ord`.
        let query =
            format!("SELECT {OWNERSHIP_COLUMNS} FROM ownership ORDER BY processor COLLATE \"C\"");
        let rows: Vec<OwnershipColumns> = sqlx::query_as(AssertSqlSafe(query))
            .fetch_all(&self.pool)
            .await
            .map_err(sql(what))?;
        rows.into_iter()
            .map(|r| Ownership::from_columns(r, what))
            .collect()
    }

    async fn latest(&self, processor: &ProcessorId) -> Result<Option<StoredSnapshot>> {
        let what = format!("latest snapshot of {processor}");
        type Row = (i64, i64, Option<i64>, Option<i64>, Option<Vec<u8>>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT o.committed_epoch, o.committed_seq, s.size, \
                    floor(extract(epoch from s.created_at) * 1000)::bigint, s.body \
             FROM ownership o \
             LEFT JOIN snapshots s ON s.processor = o.processor \
                  AND s.epoch = o.committed_epoch AND s.sequence = o.committed_seq \
             WHERE o.processor = $1 AND o.committed_epoch IS NOT NULL",
        )
        .bind(processor.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(sql(&what))?;
        match row {
            None => Ok(None),
            Some((epoch, sequence, Some(size), Some(created_at), Some(body))) => {
                StoredSnapshot::from_columns(processor, (epoch, sequence, size, created_at), body)
                    .map(Some)
            }
            Some((epoch, sequence, ..)) => Err(Error::not_found(format!(
                "{what}: the committed snapshot epoch {epoch} sequence {sequence} is missing"
            ))),
        }
    }

    async fn get(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<Option<StoredSnapshot>> {
        let what = format!("get snapshot of {processor} {epoch} {sequence}");
        // Keys beyond a bigint were never stored.
        let (Ok(e), Ok(s)) = (i64::try_from(epoch.0), i64::try_from(sequence.0)) else {
            return Ok(None);
        };
        let row: Option<(i64, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT epoch, sequence, size, \
                    floor(extract(epoch from created_at) * 1000)::bigint, body \
             FROM snapshots WHERE processor = $1 AND epoch = $2 AND sequence = $3",
        )
        .bind(processor.as_str())
        .bind(e)
        .bind(s)
        .fetch_optional(&self.pool)
        .await
        .map_err(sql(&what))?;
        row.map(|(e, s, size, at, body)| {
            StoredSnapshot::from_columns(processor, (e, s, size, at), body)
        })
        .transpose()
    }

    async fn history(&self, processor: &ProcessorId) -> Result<Vec<SnapshotMeta>> {
        let what = format!("history of {processor}");
        let rows: Vec<MetaColumns> = sqlx::query_as(
            "SELECT epoch, sequence, size, \
                    floor(extract(epoch from created_at) * 1000)::bigint \
             FROM snapshots WHERE processor = $1 ORDER BY epoch DESC, sequence DESC",
        )
        .bind(processor.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(sql(&what))?;
        rows.into_iter()
            .map(|row| SnapshotMeta::from_columns(processor, row, &what))
            .collect()
    }

    async fn prune(&self, processor: &ProcessorId, keep: usize) -> Result<usize> {
        let what = format!("prune of {processor} keeping {keep}");
        logged(&what, async {
            let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
            let mut tx = self.begin(&what).await?;
            // Serialise with checkpoints and moves of this processor, so the newest snapshots
            // counted here are the newest there are.
            fetch_locked(&mut tx, processor, &what).await?;
            let deleted = sqlx::query(
                "DELETE FROM snapshots d \
                 WHERE d.processor = $1 \
                   AND (d.epoch, d.sequence) NOT IN ( \
                       SELECT epoch, sequence FROM snapshots WHERE processor = $1 \
                       ORDER BY epoch DESC, sequence DESC LIMIT $2) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM ownership o WHERE o.processor = $1 \
                       AND o.committed_epoch = d.epoch AND o.committed_seq = d.sequence) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM snapshots delta WHERE delta.processor = $1 \
                       AND delta.base_epoch = d.epoch AND delta.base_sequence = d.sequence)",
            )
            .bind(processor.as_str())
            .bind(keep)
            .execute(&mut *tx)
            .await
            .map_err(sql(&what))?
            .rows_affected();
            tx.commit().await.map_err(sql(&what))?;
            Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
        })
        .await
    }
}

/// One connection, given up after `timeout` (reported as a timed-out I/O error, which maps
/// to unavailable).
async fn connect_once(
    options: &PgConnectOptions,
    timeout: Duration,
) -> std::result::Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout:?}"),
        ))),
    }
}

/// Opens a connection outside the pool (the leadership lock needs a session of its own) and
/// prepares it like a pooled one.
pub(crate) async fn dedicated(
    shared: &Shared,
    application_name: &str,
) -> std::result::Result<PgConnection, sqlx::Error> {
    let options = shared.options.clone().application_name(application_name);
    let mut conn = connect_once(&options, shared.connect_timeout).await?;
    if let Err(e) = prepare(&mut conn, &shared.schema, shared.statement_timeout).await {
        let _ = conn.close().await;
        return Err(e);
    }
    Ok(conn)
}
