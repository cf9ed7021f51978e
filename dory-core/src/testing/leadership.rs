//! The [`Leadership`] behaviour suite: one leader at a time, rising terms, and a store that
//! refuses a former leader's writes.

use std::fmt::Debug;

use super::store::acquire;
use super::{QUIET_PERIOD, patiently, unique_processor};
use crate::backend::{Leadership, StateStore};
use crate::error::{Error, Result};

/// Runs the leadership checks with two participants `a` and `b` of one leadership backend and
/// the `store` that enforces its terms.
///
/// - While `a` leads, `b.acquire()` does not return (watched for
///   [`QUIET_PERIOD`]); an abandoned `acquire` leaves nothing behind.
/// - Once `a` resigns, `b.acquire()` returns (within [`PATIENCE`](super::PATIENCE)) a higher
///   term; `check` of the old term is [`Fenced`](Error::Fenced) for both participants.
/// - The store refuses orchestrator writes under the old term and accepts them under the new.
/// - A late `resign` of the old term does not depose the new leader.
/// - Leadership can pass back to `a`, again with a higher term.
///
/// Neither participant may lead when the suite starts; neither leads when it ends.
pub async fn leadership_suite(a: &dyn Leadership, b: &dyn Leadership, store: &dyn StateStore) {
    let p = unique_processor("leader");
    let ta = acquire(a).await;
    ok("a.check of its own term", a.check(ta).await);
    if let Ok(r) = tokio::time::timeout(QUIET_PERIOD, b.acquire()).await {
        panic!("leadership: b.acquire() returned {r:?} while a leads with {ta}");
    }
    ok("a.check after b tried to acquire", a.check(ta).await);
    ok(
        "claim_epoch with the leader's term",
        store.claim_epoch(&p, ta).await.map(drop),
    );

    let (tb, resigned) = tokio::join!(
        patiently("b.acquire() after a resigns", b.acquire()),
        async {
            // Let b start waiting first, so the handover wakes a waiter rather than an idle one.
            tokio::time::sleep(QUIET_PERIOD / 5).await;
            a.resign(ta).await
        }
    );
    ok("a.resign", resigned);
    let tb = ok("b.acquire() after a resigned", tb);
    assert!(
        tb > ta,
        "leadership: b's term {tb} must be above a's former term {ta}"
    );
    fenced(
        &format!("a.check({ta}) after b took over"),
        a.check(ta).await,
    );
    fenced(
        &format!("b.check({ta}) of the former term"),
        b.check(ta).await,
    );
    ok("b.check of its own term", b.check(tb).await);

    fenced(
        &format!("claim_epoch with former term {ta}"),
        store.claim_epoch(&p, ta).await,
    );
    ok(
        "claim_epoch with the new term",
        store.claim_epoch(&p, tb).await.map(drop),
    );

    // A deposed leader's late resign is harmless whatever it returns.
    let _ = a.resign(ta).await;
    ok("b.check after a's late resign", b.check(tb).await);
    if let Ok(r) = tokio::time::timeout(QUIET_PERIOD, a.acquire()).await {
        panic!("leadership: a.acquire() returned {r:?} while b leads with {tb}");
    }

    ok("b.resign", b.resign(tb).await);
    let ta2 = acquire(a).await;
    assert!(
        ta2 > tb,
        "leadership: a's new term {ta2} must be above b's former term {tb}"
    );
    fenced(
        &format!("b.check({tb}) after a took over"),
        b.check(tb).await,
    );
    fenced(
        &format!("claim_epoch with former term {tb}"),
        store.claim_epoch(&p, tb).await,
    );
    ok(
        "claim_epoch with a's new term",
        store.claim_epoch(&p, ta2).await.map(drop),
    );
    ok("a.resign at the end", a.resign(ta2).await);
}

fn ok<T>(what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("leadership: {what} failed: {e}"))
}

fn fenced<T: Debug>(what: &str, r: Result<T>) {
    if !matches!(r, Err(Error::Fenced(_))) {
        panic!("leadership: {what} must be Fenced, got {r:?}");
    }
}
