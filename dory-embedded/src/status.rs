//! [`EmbeddedStatus`]: observed processor status in the embedded database's `status` table.

use async_trait::async_trait;
use dory_core::{Error, ProcessorStatus, Result, StatusSink};

use crate::db::{EmbeddedDb, db, logged};
use crate::error::sql;

/// A [`StatusSink`] writing one row per processor into the `status` table of an
/// [`EmbeddedDb`] (never into the user's TOML file).
///
/// The `body` column holds the whole [`ProcessorStatus`] as JSON and is what
/// [`read`](StatusSink::read) returns; `phase`, `node`, `site`, `epoch`, `last_error` and
/// `updated_at` (milliseconds since the Unix epoch) repeat the fields users query most, e.g.
/// `sqlite3 .dory/dory.db "SELECT processor, phase, node, last_error FROM status"`.
///
/// It is a cheap handle sharing the database's connection pool.
#[derive(Clone, Debug)]
pub struct EmbeddedStatus {
    db: EmbeddedDb,
}

impl EmbeddedStatus {
    /// A status sink in `db`.
    pub fn new(db: &EmbeddedDb) -> Self {
        EmbeddedStatus { db: db.clone() }
    }
}

#[async_trait]
impl StatusSink for EmbeddedStatus {
    async fn upsert(&self, statuses: &[ProcessorStatus]) -> Result<()> {
        if statuses.is_empty() {
            return Ok(());
        }
        let what = format!("upsert of {} statuses", statuses.len());
        logged(&what, async {
            // Encode everything before taking the write lock, so the lock is held only for
            // the writes.
            let mut rows = Vec::with_capacity(statuses.len());
            for status in statuses {
                let row = format!("{what}: status of {:?}", status.processor);
                let body = serde_json::to_string(status)
                    .map_err(|e| Error::invalid(format!("{row}: {e}")))?;
                let epoch = status.epoch.map(|e| db(e.0, &row)).transpose()?;
                let updated_at = db(status.updated_at.0, &row)?;
                rows.push((status, body, epoch, updated_at, row));
            }
            let mut tx = self.db.begin_write(&what).await?;
            for (status, body, epoch, updated_at, row) in rows {
                sqlx::query(
                    "INSERT INTO status (processor, phase, node, site, epoch, last_error, updated_at, body) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                     ON CONFLICT (processor) DO UPDATE SET \
                         phase = excluded.phase, node = excluded.node, site = excluded.site, \
                         epoch = excluded.epoch, last_error = excluded.last_error, \
                         updated_at = excluded.updated_at, body = excluded.body",
                )
                .bind(&status.processor)
                .bind(&status.phase)
                .bind(status.node.as_ref().map(|n| n.as_str()))
                .bind(status.site.map(|s| s.to_string()))
                .bind(epoch)
                .bind(status.last_error.as_deref())
                .bind(updated_at)
                .bind(body)
                .execute(&mut *tx)
                .await
                .map_err(sql(&row))?;
            }
            tx.commit().await.map_err(sql(&what))
        })
        .await
    }

    async fn remove(&self, processors: &[String]) -> Result<()> {
        if processors.is_empty() {
            return Ok(());
        }
        let what = format!("remove of {} statuses", processors.len());
        logged(&what, async {
            let mut tx = self.db.begin_write(&what).await?;
            for processor in processors {
                sqlx::query("DELETE FROM status WHERE processor = ?1")
                    .bind(processor)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql(&what))?;
            }
            tx.commit().await.map_err(sql(&what))
        })
        .await
    }

    async fn read(&self) -> Result<Vec<ProcessorStatus>> {
        let what = "read of statuses";
        logged(what, async {
            // BINARY collation: byte-wise, as Rust compares strings.
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT processor, body FROM status ORDER BY processor")
                    .fetch_all(self.db.pool())
                    .await
                    .map_err(sql(what))?;
            rows.into_iter()
                .map(|(processor, body)| ProcessorStatus::from_stored_body(processor, &body, what))
                .collect()
        })
        .await
    }
}
