use std::time::Duration;

use dory_core::testing::{self, damaged_snapshot_suite, state_store_suite, test_snapshot};
use dory_core::{Epoch, Error, Leadership, Sequence, StateStore, Term, Timestamp};
use dory_mock::{FaultSwitch, Faulty, MemoryLeadership};

use crate::{pid, store, store_at};

const LEASE: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn memory_store_keeps_the_store_contract() {
    let store = store();
    state_store_suite(&store, &MemoryLeadership::new(&store)).await;
}

#[tokio::test(start_paused = true)]
async fn memory_store_reports_damaged_snapshots() {
    let store = store();
    let term = MemoryLeadership::new(&store).acquire().await.unwrap();
    damaged_snapshot_suite(&store, term, &store).await;
}

#[tokio::test(start_paused = true)]
async fn fault_wrappers_without_faults_keep_the_store_contract() {
    let store = store();
    let switch = FaultSwitch::new();
    let faulty = Faulty::new(store.clone(), switch.clone());
    let leadership = Faulty::new(MemoryLeadership::new(&store), switch.clone());
    state_store_suite(&faulty, &leadership).await;
    assert!(
        switch.calls() > 100,
        "the suite went through the wrapper: {switch:?}"
    );
    assert_eq!(switch.injected(), 0);
}

#[tokio::test(start_paused = true)]
async fn leases_run_on_the_injected_clock() {
    let store = store_at(Timestamp(1_000));
    let term = MemoryLeadership::new(&store).acquire().await.unwrap();
    let p = pid("lease");
    let e1 = store.claim_epoch(&p, term).await.unwrap();
    store.assign_owner(&p, None, e1, LEASE, term).await.unwrap();
    assert_eq!(
        store.ownership_now(&p).unwrap().lease_expires,
        Some(Timestamp(11_000))
    );

    tokio::time::advance(Duration::from_secs(5)).await;
    let renewed = store.renew_lease(&p, e1, LEASE).await.unwrap();
    assert_eq!(renewed, Timestamp(16_000));
    tokio::time::advance(Duration::from_secs(1)).await;
    let put = store
        .put_checkpoint(&test_snapshot(&p, e1, Sequence(1), b"s"), LEASE)
        .await
        .unwrap();
    assert_eq!(put, Timestamp(17_000));
    let own = store.ownership_now(&p).unwrap();
    assert_eq!(
        (own.lease_expires, own.committed_at),
        (Some(Timestamp(17_000)), Some(Timestamp(7_000)))
    );
    let meta = &store.history(&p).await.unwrap()[0];
    assert_eq!(
        meta.created_at,
        Timestamp(7_000),
        "the store stamps snapshots with its own clock"
    );
}

#[tokio::test(start_paused = true)]
async fn snapshots_that_fail_verification_are_not_stored() {
    let store = store();
    let term = MemoryLeadership::new(&store).acquire().await.unwrap();
    let p = pid("verify");
    let e1 = store.claim_epoch(&p, term).await.unwrap();
    store.assign_owner(&p, None, e1, LEASE, term).await.unwrap();

    let mut garbage = test_snapshot(&p, e1, Sequence(1), b"state");
    let last = garbage.bytes.len() - 1;
    garbage.bytes[last] ^= 0xff;
    let err = store.put_checkpoint(&garbage, LEASE).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("processor verify") && m.contains("e1")),
        "{err}"
    );

    // Bytes of another sequence than the metadata claims.
    let mut mislabelled = test_snapshot(&p, e1, Sequence(2), b"state");
    mislabelled.meta.sequence = Sequence(3);
    let err = store.put_checkpoint(&mislabelled, LEASE).await.unwrap_err();
    assert!(
        matches!(&err, Error::Invalid(m) if m.contains("header says")),
        "{err}"
    );
    assert!(store.history(&p).await.unwrap().is_empty());
    assert_eq!(store.ownership_now(&p).unwrap().committed, None);
}

#[tokio::test(start_paused = true)]
async fn an_epoch_that_owned_never_owns_again() {
    let store = store();
    let term = MemoryLeadership::new(&store).acquire().await.unwrap();
    let p = pid("no-return");
    let e1 = store.claim_epoch(&p, term).await.unwrap();
    store.assign_owner(&p, None, e1, LEASE, term).await.unwrap();
    store.release(&p, e1, term).await.unwrap();
    let err = store
        .assign_owner(&p, None, e1, LEASE, term)
        .await
        .unwrap_err();
    assert!(err.is_fenced(), "{err}");
    // A retried release of what nothing owns succeeds.
    store.release(&p, e1, term).await.unwrap();
    let e2 = store.claim_epoch(&p, term).await.unwrap();
    store.assign_owner(&p, None, e2, LEASE, term).await.unwrap();
    assert_eq!(store.ownership_now(&p).unwrap().owner, Some(Epoch(2)));
}

#[tokio::test(start_paused = true)]
async fn writes_before_any_leader_are_fenced() {
    let store = store();
    assert_eq!(store.term(), Term(0));
    let err = store.claim_epoch(&pid("early"), Term(0)).await.unwrap_err();
    assert!(
        err.is_fenced() && err.to_string().contains("processor early"),
        "{err}"
    );
    assert_eq!(store.ownership_now(&pid("early")), None);
}

#[tokio::test(start_paused = true)]
async fn unique_ids_differ() {
    assert_ne!(
        testing::unique_processor("x"),
        testing::unique_processor("x")
    );
}
