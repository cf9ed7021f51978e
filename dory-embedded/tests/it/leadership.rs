//! Leadership: the shared suite, a leader process that dies, a lock file deleted by hand.

use std::time::Duration;

use dory_core::testing::{PATIENCE, leadership_suite, unique_name, unique_processor};
use dory_core::{Error, Leadership, StateStore};
use dory_embedded::{EmbeddedLeadership, EmbeddedStore};

use crate::test_db;

fn fenced<T: std::fmt::Debug>(what: &str, r: dory_core::Result<T>) {
    assert!(
        matches!(r, Err(Error::Fenced(_))),
        "{what} must be Fenced, got {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_suite_passes() {
    let t = test_db().await;
    let a = EmbeddedLeadership::new(&t.db, unique_name("a"));
    // b in another "process": its own pool on the file.
    let b = EmbeddedLeadership::new(&t.another().await, unique_name("b"));
    leadership_suite(&a, &b, &EmbeddedStore::new(&t.db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_frees_the_lock_at_once() {
    let t = test_db().await;
    let a = EmbeddedLeadership::new(&t.db, "a");
    let b = EmbeddedLeadership::new(&t.another().await, "b")
        .with_poll_interval(Duration::from_millis(10));
    let ta = a.acquire().await.expect("a acquires");
    // The process dies: its file handle is closed with it.
    drop(a);
    let tb = tokio::time::timeout(PATIENCE, b.acquire())
        .await
        .expect("b takes over in time")
        .expect("b acquires");
    assert!(tb > ta, "{tb} above {ta}");
    b.check(tb).await.expect("b leads");
    b.resign(tb).await.expect("b resigns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lock_file_cannot_make_two_leaders_write() {
    let t = test_db().await;
    let store = EmbeddedStore::new(&t.db);
    let a = EmbeddedLeadership::new(&t.db, "a");
    let b = EmbeddedLeadership::new(&t.another().await, "b");
    let p = unique_processor("deleted");
    let ta = a.acquire().await.expect("a acquires");
    store.claim_epoch(&p, ta).await.expect("claim under a");
    // Someone removes the lock file while a leads: b locks a new file of the same name.
    std::fs::remove_file(t.db.leader_lock_path()).expect("remove the lock file");
    let tb = tokio::time::timeout(PATIENCE, b.acquire())
        .await
        .expect("b acquires in time")
        .expect("b acquires");
    assert!(tb > ta);
    // The term fences a: its check fails and the store refuses its writes.
    fenced("a.check after b took a new term", a.check(ta).await);
    fenced(
        "claim_epoch under a's term",
        store.claim_epoch(&p, ta).await,
    );
    store.claim_epoch(&p, tb).await.expect("claim under b");
    b.resign(tb).await.expect("b resigns");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_again_while_leading_returns_the_same_term() {
    let t = test_db().await;
    let a = EmbeddedLeadership::new(&t.db, "a");
    let ta = a.acquire().await.expect("acquire");
    assert_eq!(a.acquire().await.expect("again"), ta);
    let holder: String = sqlx::query_scalar("SELECT holder FROM leadership WHERE id = 1")
        .fetch_one(t.db.pool())
        .await
        .expect("holder");
    assert_eq!(holder, "a");
    a.resign(ta).await.expect("resign");
    fenced("check after resign", a.check(ta).await);
}
