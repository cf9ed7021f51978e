//! The state store: the shared suites, and two writers racing on one processor.

use std::time::Duration;

use async_trait::async_trait;
use dory_core::testing::{
    SnapshotCorruptor, concurrent_writers_suite, damaged_snapshot_suite, state_store_suite,
    test_snapshot, unique_name, unique_processor,
};
use dory_core::{Epoch, Error, Leadership, ProcessorId, Result, Sequence, StateStore};
use dory_pg::{PgConfig, PgLeadership, PgStore};
use sqlx::PgPool;

use crate::test_db;

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_store_suite_passes() {
    let Some(db) = test_db("suite").await else {
        return;
    };
    let leadership = PgLeadership::new(&db.store, unique_name("suite"));
    state_store_suite(&db.store, &leadership).await;
}

/// Damages stored bodies with SQL, below the store's API, as disk rot would.
struct SqlCorruptor {
    pool: PgPool,
}

#[async_trait]
impl SnapshotCorruptor for SqlCorruptor {
    async fn corrupt(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<()> {
        let done = sqlx::query(
            "UPDATE snapshots \
             SET body = set_byte(body, length(body) - 1, 255 - get_byte(body, length(body) - 1)) \
             WHERE processor = $1 AND epoch = $2 AND sequence = $3",
        )
        .bind(processor.as_str())
        .bind(i64::try_from(epoch.0).map_err(|e| Error::invalid(e.to_string()))?)
        .bind(i64::try_from(sequence.0).map_err(|e| Error::invalid(e.to_string()))?)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::unavailable(e.to_string()))?;
        if done.rows_affected() != 1 {
            return Err(Error::not_found(format!(
                "snapshot of {processor} {epoch} {sequence}"
            )));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_are_invalid_and_the_previous_stays() {
    let Some(db) = test_db("damaged").await else {
        return;
    };
    let leadership = PgLeadership::new(&db.store, unique_name("damaged"));
    let term = leadership.acquire().await.expect("acquire");
    let corruptor = SqlCorruptor {
        pool: db.store.pool().clone(),
    };
    damaged_snapshot_suite(&db.store, term, &corruptor).await;
    leadership.resign(term).await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_schema_name_is_refused_before_connecting() {
    // No database needed: the name is checked first.
    let config = PgConfig::new("postgres://nobody@127.0.0.1:1/none").with_schema("x; DROP");
    match PgStore::connect(&config).await {
        Err(e @ dory_pg::Error::InvalidSchema { .. }) => {
            assert!(!e.is_unavailable());
            assert!(matches!(dory_core::Error::from(e), Error::Invalid(_)));
        }
        other => panic!(
            "a bad schema name must be refused, got {:?}",
            other.map(drop)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent() {
    let Some(db) = test_db("migrate").await else {
        return;
    };
    // A second process starting on the same schema finds everything in place.
    let again = db.another_store().await;
    assert_eq!(again.schema(), db.store.schema());
    let p = unique_processor("migrate");
    assert_eq!(again.ownership(&p).await.expect("ownership"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_writers_only_the_owner_writes() {
    let Some(db) = test_db("writers").await else {
        return;
    };
    let leadership = PgLeadership::new(&db.store, unique_name("writers"));
    // Each writer has its own pool, as two instances on two nodes would.
    let (a, b) = (db.another_store().await, db.another_store().await);
    concurrent_writers_suite(&db.store, &a, &b, &leadership).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_is_invalid_not_unavailable() {
    let config = PgConfig::new("not a url at all");
    match PgStore::connect(&config).await {
        Err(e @ dory_pg::Error::InvalidUrl(_)) => assert!(!e.is_unavailable()),
        other => panic!("a bad URL must be InvalidUrl, got {:?}", other.map(drop)),
    }
}

#[test]
fn public_types_and_futures_are_send() {
    fn shared<T: Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}
    shared::<PgStore>();
    shared::<PgLeadership>();
    shared::<dory_pg::Error>();
    let config = PgConfig::new(crate::DEFAULT_URL);
    // Built, never polled: only its type is checked.
    send(&PgStore::connect(&config));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_work_in_the_schema_with_the_timeout() {
    let Some(db) = test_db("conn").await else {
        return;
    };
    let (schema, timeout): (String, String) =
        sqlx::query_as("SELECT current_schema()::text, current_setting('statement_timeout')")
            .fetch_one(db.store.pool())
            .await
            .expect("settings");
    assert_eq!(schema, db.config.schema);
    assert_eq!(timeout, "10s");
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = $1 ORDER BY table_name COLLATE \"C\"",
    )
    .bind(&db.config.schema)
    .fetch_all(db.store.pool())
    .await
    .expect("tables");
    assert_eq!(
        tables,
        [
            "_sqlx_migrations",
            "intents",
            "leadership",
            "ownership",
            "processors",
            "snapshots",
            "status"
        ],
        "every table, sqlx's migrations included, lives in the configured schema"
    );
}

/// A checkpoint that waits on the ownership row's lock decides on the row as the holder left
/// it, not as it was when the checkpoint started: a retry racing the original succeeds, a put
/// of other bytes at the same sequence is fenced, and so is a put from an epoch that lost
/// ownership while it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_waiting_on_the_row_lock_decides_on_the_newest_row() {
    let Some(db) = test_db("lockwait").await else {
        return;
    };
    let leadership = PgLeadership::new(&db.store, unique_name("lockwait"));
    let term = leadership.acquire().await.expect("acquire");
    let store = &db.store;
    let p = unique_processor("lockwait");
    let e1 = store.claim_epoch(&p, term).await.expect("claim e1");
    store
        .assign_owner(&p, None, e1, LEASE, term)
        .await
        .expect("assign e1");
    // How long the holder keeps the lock before committing; the puts must still be waiting.
    let hold = Duration::from_millis(300);

    // The holder commits #5 by hand, as a put whose answer was lost would have.
    let s5 = test_snapshot(&p, e1, Sequence(5), b"five");
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM ownership WHERE processor = $1 FOR UPDATE")
        .bind(p.as_str())
        .execute(&mut *tx)
        .await
        .expect("lock the row");
    sqlx::query(
        "INSERT INTO snapshots (processor, epoch, sequence, size, created_at, body) \
         VALUES ($1, $2, 5, $3, now(), $4)",
    )
    .bind(p.as_str())
    .bind(e1.0 as i64)
    .bind(s5.bytes.len() as i64)
    .bind(s5.bytes.as_slice())
    .execute(&mut *tx)
    .await
    .expect("insert #5");
    sqlx::query(
        "UPDATE ownership SET committed_epoch = $2, committed_seq = 5, committed_at = now() \
         WHERE processor = $1",
    )
    .bind(p.as_str())
    .bind(e1.0 as i64)
    .execute(&mut *tx)
    .await
    .expect("commit #5 by hand");
    let (retry, other) = {
        let (a, b) = (store.clone(), store.clone());
        let (retry, other) = (s5.clone(), test_snapshot(&p, e1, Sequence(5), b"not five"));
        (
            tokio::spawn(async move { a.put_checkpoint(&retry, LEASE).await }),
            tokio::spawn(async move { b.put_checkpoint(&other, LEASE).await }),
        )
    };
    tokio::time::sleep(hold).await;
    assert!(
        !retry.is_finished() && !other.is_finished(),
        "{p}: both puts must wait for the row lock"
    );
    tx.commit().await.expect("holder commits");
    let retry = retry.await.expect("retry task");
    assert!(
        retry.is_ok(),
        "{p}: a retry of the committed #5 must succeed: {retry:?}"
    );
    let other = other.await.expect("other task");
    assert!(
        matches!(&other, Err(Error::Fenced(m)) if m.contains("not above the committed")),
        "{p}: other bytes at the committed #5 must be Fenced: {other:?}"
    );
    let latest = store.latest(&p).await.expect("latest").map(|s| s.bytes);
    assert_eq!(latest, Some(s5.bytes), "{p}: the first #5 must stay");

    // The holder takes ownership away while a put of #6 waits.
    let mut tx = store.pool().begin().await.expect("begin");
    sqlx::query("UPDATE ownership SET owner = NULL, lease_expires = NULL WHERE processor = $1")
        .bind(p.as_str())
        .execute(&mut *tx)
        .await
        .expect("release by hand");
    let put = {
        let a = store.clone();
        let s6 = test_snapshot(&p, e1, Sequence(6), b"six");
        tokio::spawn(async move { a.put_checkpoint(&s6, LEASE).await })
    };
    tokio::time::sleep(hold).await;
    assert!(
        !put.is_finished(),
        "{p}: the put must wait for the row lock"
    );
    tx.commit().await.expect("holder commits");
    let put = put.await.expect("put task");
    assert!(
        matches!(&put, Err(Error::Fenced(m)) if m.contains("no epoch does")),
        "{p}: a put from an epoch released while it waited must be Fenced: {put:?}"
    );
    assert_eq!(
        store.get(&p, e1, Sequence(6)).await.expect("get"),
        None,
        "{p}: the fenced #6 must not be stored"
    );
    leadership.resign(term).await.expect("resign");
}
