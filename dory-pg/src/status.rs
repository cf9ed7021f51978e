//! [`PgStatus`]: observed processor status in the `status` table, where users can read it.

use async_trait::async_trait;
use dory_core::{Error, ProcessorStatus, Result, StatusSink};
use sqlx::postgres::PgPool;

use crate::error::sql;
use crate::store::{PgStore, logged};

/// A [`StatusSink`] writing one row per processor into the `status` table of a
/// [`PgStore`]'s schema.
///
/// The `body` column holds the whole [`ProcessorStatus`] as JSON and is what
/// [`read`](StatusSink::read) returns; `phase`, `node`, `site`, `epoch`, `last_error` and
/// `updated_at` repeat the fields users query most, e.g.
/// `SELECT processor, phase, node, last_error FROM status WHERE phase <> 'running'`.
///
/// It is a cheap handle sharing the store's connection pool.
#[derive(Clone)]
pub struct PgStatus {
    pool: PgPool,
    schema: String,
}

impl std::fmt::Debug for PgStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStatus")
            .field("schema", &self.schema)
            .finish()
    }
}

impl PgStatus {
    /// A status sink in `store`'s schema, sharing its connection pool.
    pub fn new(store: &PgStore) -> Self {
        PgStatus {
            pool: store.pool().clone(),
            schema: store.schema().to_string(),
        }
    }
}

/// A number for a `bigint` column.
fn bigint(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(format!("{what}: {v} does not fit in a bigint")))
}

#[async_trait]
impl StatusSink for PgStatus {
    async fn upsert(&self, statuses: &[ProcessorStatus]) -> Result<()> {
        if statuses.is_empty() {
            return Ok(());
        }
        let what = format!("upsert of {} statuses", statuses.len());
        logged(&what, async {
            // Rows are written in processor order, so two concurrent upserts of overlapping
            // sets lock them in the same order and never deadlock.
            let mut sorted: Vec<&ProcessorStatus> = statuses.iter().collect();
            sorted.sort_by(|a, b| a.processor.cmp(&b.processor));
            let mut tx = self.pool.begin().await.map_err(sql(&what))?;
            for status in sorted {
                let row = format!("{what}: status of {:?}", status.processor);
                let body = serde_json::to_string(status)
                    .map_err(|e| Error::invalid(format!("{row}: {e}")))?;
                let epoch = status.epoch.map(|e| bigint(e.0, &row)).transpose()?;
                let updated_at = bigint(status.updated_at.0, &row)?;
                sqlx::query(
                    "INSERT INTO status (processor, phase, node, site, epoch, last_error, updated_at, body) \
                     VALUES ($1, $2, $3, $4, $5, $6, \
                             timestamptz 'epoch' + $7 * interval '1 millisecond', $8::jsonb) \
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
            sqlx::query("DELETE FROM status WHERE processor = ANY($1)")
                .bind(processors)
                .execute(&self.pool)
                .await
                .map_err(sql(&what))?;
            Ok(())
        })
        .await
    }

    async fn read(&self) -> Result<Vec<ProcessorStatus>> {
        let what = "read of statuses";
        logged(what, async {
            // Byte-wise order, as Rust compares strings, whatever the database's collation.
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT processor, body::text FROM status ORDER BY processor COLLATE \"C\"",
            )
            .fetch_all(&self.pool)
            .await
            .map_err(sql(what))?;
            rows.into_iter()
                .map(|(processor, body)| ProcessorStatus::from_stored_body(processor, &body, what))
                .collect()
        })
        .await
    }
}
