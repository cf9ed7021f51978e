//! The state store: the shared suites, and writers in several "processes" at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dory_core::testing::{
    SnapshotCorruptor, concurrent_writers_suite, damaged_snapshot_suite, state_store_suite,
    test_move_snapshot, test_snapshot, unique_name, unique_processor,
};
use dory_core::{Epoch, Error, Leadership, ProcessorId, Result, Sequence, StateStore};
use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStore};
use sqlx::SqlitePool;

use crate::test_db;

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_store_suite_passes() {
    let t = test_db().await;
    let leadership = EmbeddedLeadership::new(&t.db, unique_name("suite"));
    state_store_suite(&EmbeddedStore::new(&t.db), &leadership).await;
}

/// Damages stored bodies with SQL, below the store's API, as disk rot would.
struct SqlCorruptor {
    pool: SqlitePool,
}

#[async_trait]
impl SnapshotCorruptor for SqlCorruptor {
    async fn corrupt(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<()> {
        let (body,): (Vec<u8>,) = sqlx::query_as(
            "SELECT body FROM snapshots WHERE processor = ?1 AND epoch = ?2 AND sequence = ?3",
        )
        .bind(processor.as_str())
        .bind(epoch.0 as i64)
        .bind(sequence.0 as i64)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| Error::not_found(e.to_string()))?;
        let mut body = body;
        let last = body.len() - 1;
        body[last] ^= 0xff;
        sqlx::query(
            "UPDATE snapshots SET body = ?4 WHERE processor = ?1 AND epoch = ?2 AND sequence = ?3",
        )
        .bind(processor.as_str())
        .bind(epoch.0 as i64)
        .bind(sequence.0 as i64)
        .bind(body)
        .execute(&self.pool)
        .await
        .map_err(|e| Error::unavailable(e.to_string()))?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_snapshots_are_invalid_and_the_previous_stays() {
    let t = test_db().await;
    let leadership = EmbeddedLeadership::new(&t.db, unique_name("damaged"));
    let term = leadership.acquire().await.expect("acquire");
    let corruptor = SqlCorruptor {
        pool: t.db.pool().clone(),
    };
    damaged_snapshot_suite(&EmbeddedStore::new(&t.db), term, &corruptor).await;
    leadership.resign(term).await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_open_a_fresh_file_at_once() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("fresh.db");
    // Eight "processes" race to create and migrate the same new file.
    let opens = (0..8).map(|_| {
        let path = path.clone();
        tokio::spawn(async move { EmbeddedDb::open(&path).await })
    });
    let mut dbs = Vec::new();
    for open in opens {
        dbs.push(open.await.expect("open task").expect("every open succeeds"));
    }
    let p = unique_processor("fresh");
    for db in &dbs {
        assert_eq!(
            EmbeddedStore::new(db).ownership(&p).await.expect("read"),
            None
        );
    }
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(dbs[0].pool())
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(dbs[0].pool())
        .await
        .expect("synchronous");
    assert_eq!(sync, 2, "synchronous=FULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_in_two_processes_only_the_owner_writes() {
    let t = test_db().await;
    let leadership = EmbeddedLeadership::new(&t.db, unique_name("writers"));
    // Each writer has its own pool on the file, as two instance processes would.
    let (a, b) = (
        EmbeddedStore::new(&t.another().await),
        EmbeddedStore::new(&t.another().await),
    );
    concurrent_writers_suite(&EmbeddedStore::new(&t.db), &a, &b, &leadership).await;
}

/// Many "processes" each owning processors checkpoint, renew and claim at once on one file:
/// nothing fails with SQLITE_BUSY, nothing deadlocks, every claim is unique.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_checkpoint_and_claim_at_once() {
    let t = test_db().await;
    let leadership = EmbeddedLeadership::new(&t.db, unique_name("many"));
    let term = leadership.acquire().await.expect("acquire");
    let orchestrator = EmbeddedStore::new(&t.db);
    const INSTANCES: usize = 6;
    const CHECKPOINTS: u64 = 30;
    let mut processors = Vec::new();
    for _ in 0..INSTANCES {
        let p = unique_processor("many");
        let e = orchestrator.claim_epoch(&p, term).await.expect("claim");
        orchestrator
            .assign_owner(&p, None, e, LEASE, term)
            .await
            .expect("assign");
        processors.push((p, e));
    }
    let mut tasks = Vec::new();
    for (p, e) in processors.clone() {
        let db = t.another().await;
        tasks.push(tokio::spawn(async move {
            let store = EmbeddedStore::new(&db);
            for s in 1..=CHECKPOINTS {
                let body = vec![s as u8; 4096];
                store
                    .put_checkpoint(&test_snapshot(&p, e, Sequence(s), &body), LEASE)
                    .await
                    .unwrap_or_else(|err| panic!("{p} checkpoint {s}: {err}"));
                store
                    .renew_lease(&p, e, LEASE)
                    .await
                    .unwrap_or_else(|err| panic!("{p} renew {s}: {err}"));
            }
        }));
    }
    // Meanwhile the orchestrator (in yet another process) claims epochs of one processor from
    // two pools at once.
    let shared = unique_processor("claims");
    let claimers: Vec<_> = [t.another().await, t.another().await]
        .into_iter()
        .map(|db| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let store = EmbeddedStore::new(&db);
                let mut got = Vec::new();
                for _ in 0..20 {
                    got.push(store.claim_epoch(&shared, term).await.expect("claim"));
                }
                got
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("instance task");
    }
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.expect("claimer task"));
    }
    claimed.sort();
    assert_eq!(
        claimed,
        (1..=40).map(Epoch).collect::<Vec<_>>(),
        "unique claims"
    );
    for (p, e) in &processors {
        let row = orchestrator.ownership(p).await.expect("row").expect("row");
        assert_eq!(row.committed, Some((*e, Sequence(CHECKPOINTS))), "{p}");
        assert_eq!(
            orchestrator.history(p).await.expect("history").len(),
            CHECKPOINTS as usize
        );
    }
    leadership.resign(term).await.expect("resign");
}

/// A write transaction of another process holds the file's write lock: a checkpoint waits for
/// it and then decides on the row as that transaction left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_waiting_for_the_write_lock_decides_on_the_newest_row() {
    let t = test_db().await;
    let leadership = EmbeddedLeadership::new(&t.db, unique_name("lockwait"));
    let term = leadership.acquire().await.expect("acquire");
    let store = Arc::new(EmbeddedStore::new(&t.db));
    let p = unique_processor("lockwait");
    let e1 = store.claim_epoch(&p, term).await.expect("claim e1");
    store
        .assign_owner(&p, None, e1, LEASE, term)
        .await
        .expect("assign e1");
    let hold = Duration::from_millis(300);

    // The other process takes ownership away inside a transaction it holds open.
    let other = t.another().await;
    let mut tx = other
        .pool()
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("begin immediate");
    sqlx::query("UPDATE ownership SET owner = NULL, lease_expires = NULL WHERE processor = ?1")
        .bind(p.as_str())
        .execute(&mut *tx)
        .await
        .expect("release by hand");
    let put = {
        let store = store.clone();
        let s1 = test_snapshot(&p, e1, Sequence(1), b"one");
        tokio::spawn(async move { store.put_checkpoint(&s1, LEASE).await })
    };
    tokio::time::sleep(hold).await;
    assert!(
        !put.is_finished(),
        "{p}: the put must wait for the write lock"
    );
    tx.commit().await.expect("holder commits");
    let put = put.await.expect("put task");
    assert!(
        matches!(&put, Err(Error::Fenced(m)) if m.contains("no epoch does")),
        "{p}: a put from an epoch released while it waited must be Fenced: {put:?}"
    );
    assert_eq!(store.get(&p, e1, Sequence(1)).await.expect("get"), None);
    leadership.resign(term).await.expect("resign");
}

/// A move's commit is one transaction: a second commit of the same move (a retry from
/// another orchestrator process with a stale term, or the same term after success) changes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_move_from_another_process_is_fenced_by_the_term() {
    let t = test_db().await;
    let a = EmbeddedLeadership::new(&t.db, "a");
    let other = t.another().await;
    let b = EmbeddedLeadership::new(&other, "b").with_poll_interval(Duration::from_millis(10));
    let store = EmbeddedStore::new(&t.db);
    let p = unique_processor("commit");
    let ta = a.acquire().await.expect("a acquires");
    let e1 = store.claim_epoch(&p, ta).await.expect("claim e1");
    store
        .assign_owner(&p, None, e1, LEASE, ta)
        .await
        .expect("assign e1");
    let e2 = store.claim_epoch(&p, ta).await.expect("claim e2");
    a.resign(ta).await.expect("a resigns");
    let tb = b.acquire().await.expect("b acquires");
    let snap = test_move_snapshot(&p, e1, e2, Sequence(3), b"moved");
    let late = store.commit_move(e1, &snap, LEASE, ta).await;
    assert!(matches!(late, Err(Error::Fenced(_))), "{late:?}");
    assert_eq!(
        store.ownership(&p).await.expect("row").expect("row").owner,
        Some(e1)
    );
    EmbeddedStore::new(&other)
        .commit_move(e1, &snap, LEASE, tb)
        .await
        .expect("b commits the move");
    let row = store.ownership(&p).await.expect("row").expect("row");
    assert_eq!(
        (row.owner, row.committed),
        (Some(e2), Some((e2, Sequence(3))))
    );
    b.resign(tb).await.expect("b resigns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_cannot_be_opened_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // A directory where the file should be.
    let e = EmbeddedDb::open(dir.path())
        .await
        .expect_err("a directory is no database");
    let text = e.to_string();
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    // Garbage where the file should be.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x42u8; 8192]).expect("write junk");
    let e = EmbeddedDb::open(&junk)
        .await
        .expect_err("junk is no database");
    assert!(matches!(dory_core::Error::from(e), Error::Invalid(_)));
}

#[test]
fn public_types_and_futures_are_send() {
    fn shared<T: Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}
    shared::<EmbeddedDb>();
    shared::<EmbeddedStore>();
    shared::<EmbeddedLeadership>();
    shared::<dory_embedded::EmbeddedStatus>();
    shared::<dory_embedded::FileConfig>();
    shared::<dory_embedded::FilePublisher>();
    shared::<dory_embedded::Error>();
    send(&EmbeddedDb::open("x"));
}
