//! [`EmbeddedStore`]: the fenced state store in the embedded SQLite database.

use std::time::Duration;

use async_trait::async_trait;
use dory_core::columns::{count, timestamp};
use dory_core::ownership::{self, OwnershipColumns, OwnershipRules, RulesColumns};
use dory_core::snapshot::{DeltaBase, MetaColumns};
use dory_core::{
    Epoch, Error, Ownership, ProcessorId, Result, Sequence, SnapshotMeta, StateStore,
    StoredSnapshot, Term, Timestamp,
};
use sqlx::SqliteConnection;

use crate::db::{EmbeddedDb, db, logged, now_ms};
use crate::error::sql;

/// The longest lease granted: a longer one is as good as forever, and milliseconds since the
/// epoch must stay inside an `INTEGER`.
const MAX_LEASE_MS: u128 = 100 * 365 * 24 * 3600 * 1000;

/// A [`StateStore`] in the embedded SQLite database, shared by the orchestrator and every
/// instance process on the machine.
///
/// Every write is one `BEGIN IMMEDIATE` transaction: it holds the file's write lock from its
/// first statement, reads the ownership row (and, for orchestrator writes, the leadership
/// term), decides with [`OwnershipRules`] exactly as the Postgres store does, writes and
/// commits. SQLite admits one writer per file at a time, so concurrent writers in any number
/// of processes serialise on that lock, and each decides on the row as the previous one left
/// it. Leases and timestamps are wall-clock milliseconds, taken once the lock is held (so a
/// write that waited grants its lease from when it decided). Snapshots are verified with
/// [`snapshot::verify`](dory_core::snapshot::verify) before they are stored and after they are read.
///
/// It is a cheap handle: clones share the database's connection pool.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    db: EmbeddedDb,
}

impl EmbeddedStore {
    /// The state store in `db`.
    pub fn new(db: &EmbeddedDb) -> Self {
        EmbeddedStore { db: db.clone() }
    }

    /// The database it keeps its rows in.
    pub fn db(&self) -> &EmbeddedDb {
        &self.db
    }
}

fn lease_ms(lease: Duration) -> i64 {
    i64::try_from(lease.as_millis().min(MAX_LEASE_MS)).unwrap_or(i64::MAX)
}

/// Reads the ownership row of `processor` inside a write transaction, as the shared rules see
/// it; `now` is the decision's time in the store's clock.
async fn fetch_row(
    tx: &mut SqliteConnection,
    processor: &ProcessorId,
    now: i64,
    what: &str,
) -> Result<Option<OwnershipRules>> {
    let row: Option<RulesColumns> = sqlx::query_as(
        "SELECT owner, highest, newest_owner, COALESCE(lease_expires > ?2, 0), \
                committed_epoch, committed_seq \
         FROM ownership WHERE processor = ?1",
    )
    .bind(processor.as_str())
    .bind(now)
    .fetch_optional(&mut *tx)
    .await
    .map_err(sql(what))?;
    row.map(|r| OwnershipRules::from_columns(r, what))
        .transpose()
}

/// Refuses an orchestrator write unless `term` is the current leadership term. Read inside
/// the write transaction, so a new leader's increment (itself a write) comes either before it
/// (and is seen) or after it has committed.
async fn check_term(tx: &mut SqliteConnection, term: Term, what: &str) -> Result<()> {
    let current: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1")
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

/// Grants `lease` from `now` and returns the expiry.
async fn grant(
    tx: &mut SqliteConnection,
    processor: &ProcessorId,
    lease: Duration,
    now: i64,
    what: &str,
) -> Result<Timestamp> {
    let expires = now.saturating_add(lease_ms(lease));
    sqlx::query("UPDATE ownership SET lease_expires = ?2 WHERE processor = ?1")
        .bind(processor.as_str())
        .bind(expires)
        .execute(&mut *tx)
        .await
        .map_err(sql(what))?;
    Ok(timestamp(expires))
}

/// Stores `snapshot` under its metadata's key and makes it the committed checkpoint; a delta
/// is stored only beside its base (`base`, from the snapshot), which it names.
async fn store_checkpoint(
    tx: &mut SqliteConnection,
    snapshot: &StoredSnapshot,
    base: Option<DeltaBase>,
    now: i64,
    what: &str,
) -> Result<()> {
    let meta = &snapshot.meta;
    let (epoch, sequence) = (db(meta.epoch.0, what)?, db(meta.sequence.0, what)?);
    let base = match base {
        Some(base) => {
            let key = (db(base.epoch.0, what)?, db(base.sequence.0, what)?);
            let stored: Option<i64> = sqlx::query_scalar(
                "SELECT 1 FROM snapshots WHERE processor = ?1 AND epoch = ?2 AND sequence = ?3",
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
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .bind(meta.processor.as_str())
    .bind(epoch)
    .bind(sequence)
    .bind(db(snapshot.bytes.len() as u64, what)?)
    .bind(now)
    .bind(snapshot.bytes.as_slice())
    .bind(base.map(|b| b.0))
    .bind(base.map(|b| b.1))
    .execute(&mut *tx)
    .await
    .map_err(sql(what))?;
    sqlx::query(
        "UPDATE ownership SET committed_epoch = ?2, committed_seq = ?3, committed_at = ?4 \
         WHERE processor = ?1",
    )
    .bind(meta.processor.as_str())
    .bind(epoch)
    .bind(sequence)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(sql(what))?;
    Ok(())
}

/// Makes `epoch` the owner (and the newest owner).
async fn set_owner(
    tx: &mut SqliteConnection,
    processor: &ProcessorId,
    epoch: Epoch,
    what: &str,
) -> Result<()> {
    sqlx::query("UPDATE ownership SET owner = ?2, newest_owner = ?2 WHERE processor = ?1")
        .bind(processor.as_str())
        .bind(db(epoch.0, what)?)
        .execute(&mut *tx)
        .await
        .map_err(sql(what))?;
    Ok(())
}

const OWNERSHIP_COLUMNS: &str = "processor, owner, highest, lease_expires, \
     committed_epoch, committed_seq, committed_at";

#[async_trait]
impl StateStore for EmbeddedStore {
    async fn claim_epoch(&self, processor: &ProcessorId, term: Term) -> Result<Epoch> {
        let what = format!("claim_epoch of {processor}");
        logged(&what, async {
            let mut tx = self.db.begin_write(&what).await?;
            check_term(&mut tx, term, &what).await?;
            let highest: i64 = sqlx::query_scalar(
                "INSERT INTO ownership (processor, highest) VALUES (?1, 1) \
                 ON CONFLICT (processor) DO UPDATE SET highest = highest + 1 \
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
            let mut tx = self.db.begin_write(&what).await?;
            let now = now_ms();
            check_term(&mut tx, term, &what).await?;
            let row = fetch_row(&mut tx, processor, now, &what)
                .await?
                .ok_or_else(|| Error::invalid(format!("{what}: no epoch was ever claimed")))?;
            // Decided under the file's write lock and in the store's clock.
            row.check_assign(&what, expected, epoch)?;
            set_owner(&mut tx, processor, epoch, &what).await?;
            grant(&mut tx, processor, lease, now, &what).await?;
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
            let mut tx = self.db.begin_write(&what).await?;
            let now = now_ms();
            check_term(&mut tx, term, &what).await?;
            let row = fetch_row(&mut tx, processor, now, &what)
                .await?
                .ok_or_else(|| Error::not_found(format!("{what}: no ownership row")))?;
            row.check_commit(&what, from, to, sequence)?;
            set_owner(&mut tx, processor, to, &what).await?;
            store_checkpoint(&mut tx, snapshot, base, now, &what).await?;
            grant(&mut tx, processor, lease, now, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(())
        })
        .await
    }

    async fn release(&self, processor: &ProcessorId, epoch: Epoch, term: Term) -> Result<()> {
        let what = format!("release of {processor} from {epoch}");
        logged(&what, async {
            let mut tx = self.db.begin_write(&what).await?;
            let now = now_ms();
            check_term(&mut tx, term, &what).await?;
            let row = fetch_row(&mut tx, processor, now, &what)
                .await?
                .ok_or_else(|| Error::not_found(format!("{what}: no ownership row")))?;
            if !ownership::check_release(&what, row.owner, epoch)? {
                return Ok(());
            }
            sqlx::query(
                "UPDATE ownership SET owner = NULL, lease_expires = NULL WHERE processor = ?1",
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
            let mut tx = self.db.begin_write(&what).await?;
            let now = now_ms();
            let row = fetch_row(&mut tx, processor, now, &what)
                .await?
                .ok_or_else(|| Error::fenced(format!("{what}: no epoch owns the processor")))?;
            row.check_owner(&what, epoch)?;
            // A retry of the committed checkpoint (its answer was lost) succeeds again and
            // renews the lease: refusing it would fence a legitimate owner.
            if row.committed == Some((epoch, sequence)) {
                let same: Option<bool> = sqlx::query_scalar(
                    "SELECT body = ?4 FROM snapshots \
                     WHERE processor = ?1 AND epoch = ?2 AND sequence = ?3",
                )
                .bind(processor.as_str())
                .bind(db(epoch.0, &what)?)
                .bind(db(sequence.0, &what)?)
                .bind(snapshot.bytes.as_slice())
                .fetch_optional(&mut *tx)
                .await
                .map_err(sql(&what))?;
                if same == Some(true) {
                    let expires = grant(&mut tx, processor, lease, now, &what).await?;
                    tx.commit().await.map_err(sql(&what))?;
                    return Ok(expires);
                }
            }
            row.check_above_committed(&what, sequence)?;
            store_checkpoint(&mut tx, snapshot, None, now, &what).await?;
            let expires = grant(&mut tx, processor, lease, now, &what).await?;
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
            let mut tx = self.db.begin_write(&what).await?;
            let now = now_ms();
            let row = fetch_row(&mut tx, processor, now, &what)
                .await?
                .ok_or_else(|| Error::fenced(format!("{what}: no epoch owns the processor")))?;
            row.check_owner(&what, epoch)?;
            let expires = grant(&mut tx, processor, lease, now, &what).await?;
            tx.commit().await.map_err(sql(&what))?;
            Ok(expires)
        })
        .await
    }

    async fn ownership(&self, processor: &ProcessorId) -> Result<Option<Ownership>> {
        let what = format!("ownership of {processor}");
        let query = format!("SELECT {OWNERSHIP_COLUMNS} FROM ownership WHERE processor = ?1");
        let row: Option<OwnershipColumns> = sqlx::query_as(sqlx::AssertSqlSafe(query))
            .bind(processor.as_str())
            .fetch_optional(self.db.pool())
            .await
            .map_err(sql(&what))?;
        row.map(|r| Ownership::from_columns(r, &what)).transpose()
    }

    async fn ownerships(&self) -> Result<Vec<Ownership>> {
        let what = "ownerships";
        // SQLite's default BINARY collation compares UTF-8 bytes, as `ProcessorId`'s `Ord`.
        let query = format!("SELECT {OWNERSHIP_COLUMNS} FROM ownership ORDER BY processor");
        let rows: Vec<OwnershipColumns> = sqlx::query_as(sqlx::AssertSqlSafe(query))
            .fetch_all(self.db.pool())
            .await
            .map_err(sql(what))?;
        rows.into_iter()
            .map(|r| Ownership::from_columns(r, what))
            .collect()
    }

    async fn latest(&self, processor: &ProcessorId) -> Result<Option<StoredSnapshot>> {
        let what = format!("latest snapshot of {processor}");
        type Row = (i64, i64, Option<i64>, Option<i64>, Option<Vec<u8>>);
        // One statement, so one read snapshot of the file: the row and its body agree.
        let row: Option<Row> = sqlx::query_as(
            "SELECT o.committed_epoch, o.committed_seq, s.size, s.created_at, s.body \
             FROM ownership o \
             LEFT JOIN snapshots s ON s.processor = o.processor \
                  AND s.epoch = o.committed_epoch AND s.sequence = o.committed_seq \
             WHERE o.processor = ?1 AND o.committed_epoch IS NOT NULL",
        )
        .bind(processor.as_str())
        .fetch_optional(self.db.pool())
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
        // Keys beyond an INTEGER were never stored.
        let (Ok(e), Ok(s)) = (i64::try_from(epoch.0), i64::try_from(sequence.0)) else {
            return Ok(None);
        };
        let row: Option<(i64, i64, i64, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT epoch, sequence, size, created_at, body \
             FROM snapshots WHERE processor = ?1 AND epoch = ?2 AND sequence = ?3",
        )
        .bind(processor.as_str())
        .bind(e)
        .bind(s)
        .fetch_optional(self.db.pool())
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
            "SELECT epoch, sequence, size, created_at \
             FROM snapshots WHERE processor = ?1 ORDER BY epoch DESC, sequence DESC",
        )
        .bind(processor.as_str())
        .fetch_all(self.db.pool())
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
            // Under the write lock, so the newest snapshots counted here are the newest there
            // are and the committed one cannot change meanwhile.
            let mut tx = self.db.begin_write(&what).await?;
            let deleted = sqlx::query(
                "DELETE FROM snapshots \
                 WHERE processor = ?1 \
                   AND (epoch, sequence) NOT IN ( \
                       SELECT epoch, sequence FROM snapshots WHERE processor = ?1 \
                       ORDER BY epoch DESC, sequence DESC LIMIT ?2) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM ownership o WHERE o.processor = ?1 \
                       AND o.committed_epoch = snapshots.epoch \
                       AND o.committed_seq = snapshots.sequence) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM snapshots d WHERE d.processor = ?1 \
                       AND d.base_epoch = snapshots.epoch \
                       AND d.base_sequence = snapshots.sequence)",
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
