//! Leadership: the shared suite, and a leader whose session is killed.

use std::time::Duration;

use dory_core::testing::{
    PATIENCE, leadership_suite, test_move_snapshot, unique_name, unique_processor,
};
use dory_core::{Error, Leadership, Sequence, StateStore};
use dory_pg::PgLeadership;

use crate::test_db;

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_suite_passes() {
    let Some(db) = test_db("leader").await else {
        return;
    };
    let a = PgLeadership::new(&db.store, unique_name("a"));
    let b = PgLeadership::new(&db.store, unique_name("b"));
    leadership_suite(&a, &b, &db.store).await;
}

fn fenced<T: std::fmt::Debug>(what: &str, r: dory_core::Result<T>) {
    assert!(
        matches!(r, Err(Error::Fenced(_))),
        "{what} must be Fenced, got {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_leader_is_replaced_and_its_late_writes_refused() {
    let Some(db) = test_db("terminate").await else {
        return;
    };
    let store = &db.store;
    let a = PgLeadership::new(store, unique_name("a"));
    let b =
        PgLeadership::new(store, unique_name("b")).with_poll_interval(Duration::from_millis(50));
    let p = unique_processor("terminate");

    let ta = a.acquire().await.expect("a acquires");
    let e1 = store.claim_epoch(&p, ta).await.expect("claim e1 under a");
    store
        .assign_owner(&p, None, e1, LEASE, ta)
        .await
        .expect("assign e1 under a");
    let e2 = store.claim_epoch(&p, ta).await.expect("claim e2 under a");

    // b waits for the lock while a's session is killed from outside, as a network cut or an
    // administrator would.
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(a.application_name())
        .fetch_all(store.pool())
        .await
        .expect("terminate a's session");
        assert_eq!(killed, vec![true], "exactly a's lock session is terminated");
    };
    let (tb, ()) = tokio::join!(tokio::time::timeout(PATIENCE, b.acquire()), kill);
    let tb = tb.expect("b takes over in time").expect("b acquires");
    assert!(tb > ta, "b's term {tb} must be above a's {ta}");

    fenced(
        "a.check after its session was terminated",
        a.check(ta).await,
    );
    b.check(tb).await.expect("b leads");

    // The deposed leader's late writes are refused by the store itself.
    fenced(
        "claim_epoch under a's term",
        store.claim_epoch(&p, ta).await,
    );
    fenced(
        "assign_owner under a's term",
        store.assign_owner(&p, Some(e1), e2, LEASE, ta).await,
    );
    let snap = test_move_snapshot(&p, e1, e2, Sequence(1), b"late move");
    fenced(
        "commit_move under a's term",
        store.commit_move(e1, &snap, LEASE, ta).await,
    );
    fenced("release under a's term", store.release(&p, e1, ta).await);
    let row = store.ownership(&p).await.expect("ownership").expect("row");
    assert_eq!(row.owner, Some(e1), "refused writes change nothing");
    assert_eq!(row.highest_epoch, e2, "refused writes change nothing");

    // The new leader's writes go through.
    store.claim_epoch(&p, tb).await.expect("claim under b");
    let _ = a.resign(ta).await;
    b.check(tb).await.expect("a's late resign leaves b leading");
    b.resign(tb).await.expect("b resigns");

    // a can lead again later, on a new session and a higher term.
    let ta2 = tokio::time::timeout(PATIENCE, a.acquire())
        .await
        .expect("a acquires again in time")
        .expect("a acquires again");
    assert!(ta2 > tb, "a's new term {ta2} must be above {tb}");
    a.resign(ta2).await.expect("a resigns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_term_waits_for_writes_deciding_under_the_old_one() {
    let Some(db) = test_db("share").await else {
        return;
    };
    let store = &db.store;
    let a = PgLeadership::new(store, unique_name("a"));
    let b =
        PgLeadership::new(store, unique_name("b")).with_poll_interval(Duration::from_millis(20));
    let ta = a.acquire().await.expect("a acquires");

    // An orchestrator write under ta that has read the term row and not yet committed, as
    // every term-fenced write does.
    let mut write = store.pool().begin().await.expect("begin");
    let seen: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1 FOR SHARE")
        .fetch_one(&mut *write)
        .await
        .expect("read the term FOR SHARE");
    assert_eq!(u64::try_from(seen).ok(), Some(ta.0));
    a.resign(ta).await.expect("a resigns");

    let watch = async {
        // b has the lock by now, but its increment must wait for the write to end.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let current: i64 = sqlx::query_scalar("SELECT term FROM leadership WHERE id = 1")
            .fetch_one(store.pool())
            .await
            .expect("read the term");
        write.commit().await.expect("commit the write");
        current
    };
    let (tb, current) = tokio::join!(tokio::time::timeout(PATIENCE, b.acquire()), watch);
    assert_eq!(
        u64::try_from(current).ok(),
        Some(ta.0),
        "the new term must not be visible while a write under {ta} is deciding"
    );
    let tb = tb.expect("b acquires in time").expect("b acquires");
    assert!(tb > ta, "b's term {tb} must be above {ta}");
    b.resign(tb).await.expect("b resigns");
}
