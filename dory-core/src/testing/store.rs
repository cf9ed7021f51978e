//! The [`StateStore`] behaviour suite: ownership, fencing and snapshots.
//!
//! [`state_store_suite`] runs every check; each check is also public so a backend can run one
//! alone while it is being written. Checks other than [`term_fencing`] take a `term` that must
//! be the current leadership term (acquire it from the backend's [`Leadership`]).
//!
//! Where the contract says a write is refused, the checks also read the processor's ownership
//! row, history and latest snapshot before and after, and require them unchanged. Every read
//! also checks that the committed checkpoint has not gone backwards and that
//! [`latest`](StateStore::latest) is the committed checkpoint.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

use super::{patiently, test_move_snapshot, test_snapshot, unique_processor};
use crate::backend::{Leadership, StateStore};
use crate::error::{Error, Result};
use crate::model::{Epoch, Ownership, ProcessorId, Sequence, SnapshotMeta, StoredSnapshot, Term};
use crate::snapshot;

/// The lease the checks ask for; long enough never to expire during a check.
const LEASE: Duration = Duration::from_secs(30);

/// Damages one stored snapshot in place, below the [`StateStore`] API (flip a byte of the
/// stored bytes, as disk rot or a bad write would). Backends that can do this run
/// [`damaged_snapshot_suite`].
#[async_trait]
pub trait SnapshotCorruptor: Send + Sync {
    /// Damages the stored snapshot of `processor` at `(epoch, sequence)`.
    async fn corrupt(
        &self,
        processor: &ProcessorId,
        epoch: Epoch,
        sequence: Sequence,
    ) -> Result<()>;
}

/// Runs every [`StateStore`] check against `store`, with terms from `leadership` (a participant
/// of the leadership backend whose terms `store` enforces).
///
/// Leadership is acquired at the start and resigned at the end; if another participant leads,
/// the suite waits for it (up to [`PATIENCE`](super::PATIENCE)).
pub async fn state_store_suite(store: &dyn StateStore, leadership: &dyn Leadership) {
    let term = acquire(leadership).await;
    reads_of_unknown_processors_are_empty(store).await;
    claim_epoch_allocates_in_order(store, term).await;
    claim_epoch_is_compare_and_swap(store, term).await;
    assign_owner_is_compare_and_swap(store, term).await;
    put_checkpoint_is_fenced(store, term).await;
    put_checkpoint_retry_is_idempotent(store, term).await;
    renew_lease_is_fenced(store, term).await;
    commit_move_is_atomic(store, term).await;
    a_delta_is_committed_beside_its_base(store, term).await;
    release_gives_up_ownership(store, term).await;
    history_is_newest_first_and_prune_keeps_one(store, term).await;
    ownerships_are_sorted(store, term).await;
    let term = term_fencing(store, leadership, term).await;
    leadership
        .resign(term)
        .await
        .unwrap_or_else(|e| panic!("resign {term} after the store suite: {e}"));
}

/// Reads of a processor the store has never seen: no row, no snapshots, nothing to prune.
pub async fn reads_of_unknown_processors_are_empty(store: &dyn StateStore) {
    let p = unique_processor("unknown");
    assert_eq!(
        ok(&p, "ownership", store.ownership(&p).await),
        None,
        "{p}: ownership of an unknown processor"
    );
    assert!(
        ok(&p, "history", store.history(&p).await).is_empty(),
        "{p}: history of an unknown processor"
    );
    assert_eq!(
        ok(&p, "latest", store.latest(&p).await),
        None,
        "{p}: latest of an unknown processor"
    );
    let got = ok(&p, "get", store.get(&p, Epoch(1), Sequence(1)).await);
    assert_eq!(got, None, "{p}: get of an unknown processor");
    assert_eq!(
        ok(&p, "prune", store.prune(&p, 0).await),
        0,
        "{p}: prune of an unknown processor"
    );
    assert!(
        !ok(&p, "ownerships", store.ownerships().await)
            .iter()
            .any(|o| o.processor == p),
        "{p}: ownerships lists a processor that was never claimed"
    );
}

/// `claim_epoch` allocates `highest + 1`, starting at epoch 1, and changes nothing else.
pub async fn claim_epoch_allocates_in_order(store: &dyn StateStore, term: Term) {
    let p = unique_processor("claim");
    let mut probe = Probe::new(store, &p);
    for want in 1..=3 {
        let e = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
        assert_eq!(
            e,
            Epoch(want),
            "{p}: claim number {want} must allocate highest + 1"
        );
        let row = probe.row().await;
        assert_eq!(
            row.highest_epoch, e,
            "{p}: highest_epoch after claiming {e}"
        );
        assert_eq!(
            row.owner, None,
            "{p}: claiming {e} must not make it the owner"
        );
        assert_eq!(
            row.lease_expires, None,
            "{p}: claiming {e} must not grant a lease"
        );
        assert_eq!(
            row.committed, None,
            "{p}: claiming {e} must not commit anything"
        );
    }
}

/// Concurrent `claim_epoch` calls never return the same epoch, and together they allocate a
/// contiguous range.
pub async fn claim_epoch_is_compare_and_swap(store: &dyn StateStore, term: Term) {
    let p = unique_processor("claim-race");
    let c = || store.claim_epoch(&p, term);
    let (a, b, c_, d, e, f, g, h) = tokio::join!(c(), c(), c(), c(), c(), c(), c(), c());
    let mut got: Vec<Epoch> = [a, b, c_, d, e, f, g, h]
        .into_iter()
        .map(|r| ok(&p, "concurrent claim_epoch", r))
        .collect();
    got.sort();
    let want: Vec<Epoch> = (1..=8).map(Epoch).collect();
    assert_eq!(
        got, want,
        "{p}: eight concurrent claims must return eight distinct epochs 1..=8"
    );
    let row = Probe::new(store, &p).row().await;
    assert_eq!(
        row.highest_epoch,
        Epoch(8),
        "{p}: highest_epoch after eight claims"
    );
}

/// `assign_owner` is a compare-and-swap on the current owner, to a claimed epoch above it;
/// the loser of a race gets [`Conflict`](Error::Conflict) and changes nothing.
pub async fn assign_owner_is_compare_and_swap(store: &dyn StateStore, term: Term) {
    let p = unique_processor("assign");
    let mut probe = Probe::new(store, &p);
    let e1 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);

    let before = probe.look().await;
    let r = store
        .assign_owner(&p, Some(Epoch(99)), e1, LEASE, term)
        .await;
    conflict(&p, "assign_owner expecting an owner when there is none", r);
    probe.unchanged(&before, "a refused assign_owner").await;

    ok(
        &p,
        "assign_owner(None -> e1)",
        store.assign_owner(&p, None, e1, LEASE, term).await,
    );
    let row = probe.row().await;
    assert_eq!(
        row.owner,
        Some(e1),
        "{p}: owner after assign_owner(None -> {e1})"
    );
    assert!(
        row.lease_expires.is_some(),
        "{p}: assign_owner must grant the new owner a lease"
    );

    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let before = probe.look().await;
    let r = store.assign_owner(&p, None, e2, LEASE, term).await;
    conflict(&p, "assign_owner expecting no owner while e1 owns", r);
    probe.unchanged(&before, "a refused assign_owner").await;

    let unclaimed = Epoch(e2.0 + 10);
    let r = store
        .assign_owner(&p, Some(e1), unclaimed, LEASE, term)
        .await;
    refused(&p, "assign_owner to an epoch that was never claimed", r);
    probe.unchanged(&before, "a refused assign_owner").await;
    let r = store.assign_owner(&p, Some(e1), e1, LEASE, term).await;
    refused(&p, "assign_owner to an epoch not above the owner", r);
    probe.unchanged(&before, "a refused assign_owner").await;

    let r = store.assign_owner(&p, Some(e1), e2, LEASE, term).await;
    conflict(&p, "assign_owner(e1 -> e2) while e1's lease runs", r);
    probe.unchanged(&before, "a refused assign_owner").await;
    expire_lease(store, &p, e1).await;
    ok(
        &p,
        "assign_owner(e1 -> e2)",
        store.assign_owner(&p, Some(e1), e2, LEASE, term).await,
    );
    assert_eq!(
        probe.row().await.owner,
        Some(e2),
        "{p}: owner after assign_owner(e1 -> e2)"
    );
    let r = store
        .put_checkpoint(&test_snapshot(&p, e1, Sequence(1), b"late"), LEASE)
        .await;
    fenced(&p, "put_checkpoint from the previous owner e1", r);

    let e3 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let e4 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    expire_lease(store, &p, e2).await;
    let (r3, r4) = tokio::join!(
        store.assign_owner(&p, Some(e2), e3, LEASE, term),
        store.assign_owner(&p, Some(e2), e4, LEASE, term),
    );
    let winner = match (r3, r4) {
        (Ok(()), Err(Error::Conflict(_))) => e3,
        (Err(Error::Conflict(_)), Ok(())) => e4,
        other => panic!(
            "{p}: two concurrent assign_owner from e2: exactly one must win and the other get Conflict, got {other:?}"
        ),
    };
    assert_eq!(
        probe.row().await.owner,
        Some(winner),
        "{p}: owner after the assign_owner race"
    );
}

/// `put_checkpoint` stores a snapshot only from the owner and only above the last stored
/// sequence; anything else is [`Fenced`](Error::Fenced) and overwrites nothing. It renews the
/// lease and returns the new expiry.
pub async fn put_checkpoint_is_fenced(store: &dyn StateStore, term: Term) {
    let p = unique_processor("put");
    let mut probe = Probe::new(store, &p);

    let r = store
        .put_checkpoint(&test_snapshot(&p, Epoch(1), Sequence(1), b"x"), LEASE)
        .await;
    fenced(&p, "put_checkpoint for a processor with no row", r);
    let e1 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let r = store
        .put_checkpoint(&test_snapshot(&p, e1, Sequence(1), b"x"), LEASE)
        .await;
    fenced(&p, "put_checkpoint from a claimed epoch before it owns", r);
    assert_eq!(
        probe.row().await.committed,
        None,
        "{p}: a fenced put must not commit"
    );
    ok(
        &p,
        "assign_owner",
        store.assign_owner(&p, None, e1, LEASE, term).await,
    );

    let s1 = test_snapshot(&p, e1, Sequence(1), b"one");
    let expiry = ok(
        &p,
        "put_checkpoint e1 #1",
        store.put_checkpoint(&s1, LEASE).await,
    );
    let row = probe.row().await;
    assert_eq!(
        row.committed,
        Some((e1, Sequence(1))),
        "{p}: committed after put e1 #1"
    );
    assert_eq!(
        row.lease_expires,
        Some(expiry),
        "{p}: put_checkpoint must return the lease expiry it stored"
    );
    probe.stored(&s1).await;

    let s5 = test_snapshot(&p, e1, Sequence(5), b"five");
    ok(
        &p,
        "put_checkpoint e1 #5 (sequences may skip)",
        store.put_checkpoint(&s5, LEASE).await,
    );
    probe.stored(&s5).await;

    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let before = probe.look().await;
    let again = test_snapshot(&p, e1, Sequence(5), b"five, rewritten");
    fenced(
        &p,
        "put_checkpoint repeating sequence #5",
        store.put_checkpoint(&again, LEASE).await,
    );
    let older = test_snapshot(&p, e1, Sequence(3), b"three");
    fenced(
        &p,
        "put_checkpoint with an older sequence #3",
        store.put_checkpoint(&older, LEASE).await,
    );
    let other = test_snapshot(&p, e2, Sequence(9), b"not the owner");
    fenced(
        &p,
        "put_checkpoint from claimed non-owner e2",
        store.put_checkpoint(&other, LEASE).await,
    );
    probe
        .unchanged(&before, "fenced put_checkpoint calls")
        .await;
    probe.stored(&s5).await;
    assert_eq!(
        ok(&p, "get", store.get(&p, e1, Sequence(3)).await),
        None,
        "{p}: a fenced put must store nothing"
    );
    assert_eq!(
        ok(&p, "get", store.get(&p, e2, Sequence(9)).await),
        None,
        "{p}: a fenced put must store nothing"
    );

    let short = ok(
        &p,
        "put_checkpoint e1 #6",
        store
            .put_checkpoint(
                &test_snapshot(&p, e1, Sequence(6), b"6"),
                Duration::from_secs(1),
            )
            .await,
    );
    let long = ok(
        &p,
        "put_checkpoint e1 #7",
        store
            .put_checkpoint(
                &test_snapshot(&p, e1, Sequence(7), b"7"),
                Duration::from_secs(3600),
            )
            .await,
    );
    assert!(
        long > short,
        "{p}: put_checkpoint must renew the lease: a 1h lease taken after a 1s one expires later ({long} <= {short})"
    );

    let a = test_snapshot(&p, e1, Sequence(8), b"copy a");
    let b = test_snapshot(&p, e1, Sequence(8), b"copy b");
    let (ra, rb) = tokio::join!(
        store.put_checkpoint(&a, LEASE),
        store.put_checkpoint(&b, LEASE)
    );
    let winner = match (ra, rb) {
        (Ok(_), Err(Error::Fenced(_))) => &a,
        (Err(Error::Fenced(_)), Ok(_)) => &b,
        other => panic!(
            "{p}: two concurrent put_checkpoint of e1 #8: exactly one must succeed and the other be Fenced, got {other:?}"
        ),
    };
    probe.stored(winner).await;
    assert_eq!(
        probe.row().await.committed,
        Some((e1, Sequence(8))),
        "{p}: committed after the put race"
    );
}

/// Repeating the put of the committed checkpoint (its answer was lost) succeeds and renews
/// the lease; the same sequence with different bytes is still refused.
pub async fn put_checkpoint_retry_is_idempotent(store: &dyn StateStore, term: Term) {
    let p = unique_processor("idempotent");
    let e1 = owned(store, &p, term).await;
    let snap = test_snapshot(&p, e1, Sequence(7), b"seven");
    let first = ok(
        &p,
        "put_checkpoint #7",
        store.put_checkpoint(&snap, LEASE).await,
    );
    let again = ok(
        &p,
        "put_checkpoint #7 again (a retry after a lost answer)",
        store.put_checkpoint(&snap, LEASE).await,
    );
    assert!(again >= first, "{p}: the retry must renew the lease");
    let other = test_snapshot(&p, e1, Sequence(7), b"not seven");
    fenced(
        &p,
        "put_checkpoint #7 with different bytes",
        store.put_checkpoint(&other, LEASE).await,
    );
    let latest = ok(&p, "latest", store.latest(&p).await).map(|s| s.bytes);
    assert_eq!(latest, Some(snap.bytes), "{p}: the first #7 must stay");
}

/// `renew_lease` extends the owner's lease and returns the new expiry; any other epoch is
/// [`Fenced`](Error::Fenced) and the lease is left alone.
pub async fn renew_lease_is_fenced(store: &dyn StateStore, term: Term) {
    let p = unique_processor("renew");
    let mut probe = Probe::new(store, &p);
    let r = store.renew_lease(&p, Epoch(1), LEASE).await;
    assert!(
        matches!(r, Err(Error::Fenced(_) | Error::NotFound(_))),
        "{p}: renew_lease for a processor with no row must be Fenced or NotFound, got {r:?}"
    );
    let e1 = owned(store, &p, term).await;
    let short = ok(
        &p,
        "renew_lease 1s",
        store.renew_lease(&p, e1, Duration::from_secs(1)).await,
    );
    assert_eq!(
        probe.row().await.lease_expires,
        Some(short),
        "{p}: renew_lease must return the expiry it stored"
    );
    let long = ok(
        &p,
        "renew_lease 1h",
        store.renew_lease(&p, e1, Duration::from_secs(3600)).await,
    );
    assert!(
        long > short,
        "{p}: a 1h lease renewed after a 1s one must expire later ({long} <= {short})"
    );
    assert_eq!(
        probe.row().await.lease_expires,
        Some(long),
        "{p}: renew_lease must return the expiry it stored"
    );

    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let before = probe.look().await;
    fenced(
        &p,
        "renew_lease from claimed non-owner e2",
        store.renew_lease(&p, e2, LEASE).await,
    );
    fenced(
        &p,
        "renew_lease from an epoch never claimed",
        store.renew_lease(&p, Epoch(e2.0 + 5), LEASE).await,
    );
    probe.unchanged(&before, "a fenced renew_lease").await;

    expire_lease(store, &p, e1).await;
    ok(
        &p,
        "assign_owner(e1 -> e2)",
        store.assign_owner(&p, Some(e1), e2, LEASE, term).await,
    );
    fenced(
        &p,
        "renew_lease from the previous owner e1",
        store.renew_lease(&p, e1, LEASE).await,
    );
}

/// `commit_move` moves ownership and stores the snapshot as the new epoch's first checkpoint
/// in one step; a wrong `from`, an epoch not claimed or not above `from`, or a snapshot older
/// than the committed checkpoint is refused and changes nothing. Of two racing commits from
/// the same owner exactly one wins.
pub async fn commit_move_is_atomic(store: &dyn StateStore, term: Term) {
    let p = unique_processor("commit");
    let mut probe = Probe::new(store, &p);
    let e1 = owned(store, &p, term).await;
    ok(
        &p,
        "put_checkpoint e1 #3",
        store
            .put_checkpoint(&test_snapshot(&p, e1, Sequence(3), b"3"), LEASE)
            .await,
    );
    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);

    // The frozen snapshot may carry the very sequence of the last checkpoint: nothing new was
    // published since.
    let moved = test_move_snapshot(&p, e1, e2, Sequence(3), b"moved");
    ok(
        &p,
        "commit_move e1 -> e2",
        store.commit_move(e1, &moved, LEASE, term).await,
    );
    let row = probe.row().await;
    assert_eq!(row.owner, Some(e2), "{p}: owner after commit_move e1 -> e2");
    assert_eq!(
        row.committed,
        Some((e2, Sequence(3))),
        "{p}: committed after commit_move e1 -> e2"
    );
    assert!(
        row.lease_expires.is_some(),
        "{p}: commit_move must grant the new owner a lease"
    );
    probe.stored(&moved).await;
    let latest = ok(&p, "latest", store.latest(&p).await);
    assert_eq!(
        latest.map(|s| s.bytes),
        Some(moved.bytes.clone()),
        "{p}: latest after commit_move must be the moved snapshot"
    );
    let late = test_snapshot(&p, e1, Sequence(4), b"late");
    fenced(
        &p,
        "put_checkpoint from e1 after the move",
        store.put_checkpoint(&late, LEASE).await,
    );

    let e3 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let before = probe.look().await;
    let r = store
        .commit_move(
            e1,
            &test_move_snapshot(&p, e1, e3, Sequence(4), b"x"),
            LEASE,
            term,
        )
        .await;
    assert!(
        matches!(r, Err(Error::Conflict(_) | Error::Fenced(_))),
        "{p}: commit_move from e1, which no longer owns, must be Conflict or Fenced, got {r:?}"
    );
    probe
        .unchanged(&before, "commit_move from a wrong owner")
        .await;
    let unclaimed = Epoch(e3.0 + 10);
    let r = store
        .commit_move(
            e2,
            &test_move_snapshot(&p, e2, unclaimed, Sequence(4), b"x"),
            LEASE,
            term,
        )
        .await;
    refused(&p, "commit_move to an epoch that was never claimed", r);
    probe
        .unchanged(&before, "commit_move to an unclaimed epoch")
        .await;
    let r = store
        .commit_move(
            e2,
            &test_move_snapshot(&p, e2, e2, Sequence(4), b"x"),
            LEASE,
            term,
        )
        .await;
    refused(&p, "commit_move to the owner itself", r);
    probe
        .unchanged(&before, "commit_move to the owner itself")
        .await;
    let r = store
        .commit_move(
            e2,
            &test_move_snapshot(&p, e2, e3, Sequence(2), b"stale"),
            LEASE,
            term,
        )
        .await;
    fenced(
        &p,
        "commit_move of a snapshot older than the committed #3",
        r,
    );
    probe
        .unchanged(&before, "commit_move of an old snapshot")
        .await;
    assert_eq!(
        ok(&p, "get", store.get(&p, e3, Sequence(2)).await),
        None,
        "{p}: a refused commit must store nothing"
    );

    let e4 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let a = test_move_snapshot(&p, e2, e3, Sequence(5), b"to e3");
    let b = test_move_snapshot(&p, e2, e4, Sequence(5), b"to e4");
    let (ra, rb) = tokio::join!(
        store.commit_move(e2, &a, LEASE, term),
        store.commit_move(e2, &b, LEASE, term),
    );
    let (winner, loser) = match (ra, rb) {
        (Ok(()), Err(_)) => (&a, &b),
        (Err(_), Ok(())) => (&b, &a),
        other => {
            panic!("{p}: two concurrent commit_move from e2: exactly one must win, got {other:?}")
        }
    };
    let row = probe.row().await;
    assert_eq!(
        row.owner,
        Some(winner.meta.epoch),
        "{p}: owner after the commit_move race"
    );
    probe.stored(winner).await;
    let lost = ok(
        &p,
        "get",
        store.get(&p, loser.meta.epoch, Sequence(5)).await,
    );
    assert_eq!(lost, None, "{p}: the losing commit_move must store nothing");
}

/// `release` gives up ownership but keeps the epoch counter, the committed checkpoint and the
/// snapshots; the released epoch is fenced from then on, and a later owner continues above
/// the committed sequence.
pub async fn release_gives_up_ownership(store: &dyn StateStore, term: Term) {
    let p = unique_processor("release");
    let mut probe = Probe::new(store, &p);
    let e1 = owned(store, &p, term).await;
    let s2 = test_snapshot(&p, e1, Sequence(2), b"2");
    ok(
        &p,
        "put_checkpoint e1 #2",
        store.put_checkpoint(&s2, LEASE).await,
    );
    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);

    let before = probe.look().await;
    refused(
        &p,
        "release by e2, which does not own",
        store.release(&p, e2, term).await,
    );
    probe.unchanged(&before, "a refused release").await;

    ok(&p, "release e1", store.release(&p, e1, term).await);
    let row = probe.row().await;
    assert_eq!(row.owner, None, "{p}: owner after release");
    assert_eq!(row.lease_expires, None, "{p}: a released row has no lease");
    assert_eq!(
        row.highest_epoch, e2,
        "{p}: release must keep the highest claimed epoch"
    );
    assert_eq!(
        row.committed,
        Some((e1, Sequence(2))),
        "{p}: release must keep the committed checkpoint"
    );
    probe.stored(&s2).await;
    let late = test_snapshot(&p, e1, Sequence(3), b"late");
    fenced(
        &p,
        "put_checkpoint after release",
        store.put_checkpoint(&late, LEASE).await,
    );
    fenced(
        &p,
        "renew_lease after release",
        store.renew_lease(&p, e1, LEASE).await,
    );

    let e3 = ok(
        &p,
        "claim_epoch after release",
        store.claim_epoch(&p, term).await,
    );
    assert_eq!(
        e3,
        e2.next(),
        "{p}: claims continue above the released epochs"
    );
    ok(
        &p,
        "assign_owner(None -> e3)",
        store.assign_owner(&p, None, e3, LEASE, term).await,
    );
    let same = test_snapshot(&p, e3, Sequence(2), b"restored");
    fenced(
        &p,
        "put_checkpoint from e3 repeating the committed #2",
        store.put_checkpoint(&same, LEASE).await,
    );
    let next = test_snapshot(&p, e3, Sequence(3), b"3");
    ok(
        &p,
        "put_checkpoint e3 #3",
        store.put_checkpoint(&next, LEASE).await,
    );
    probe.stored(&next).await;
}

/// `history` lists every stored snapshot newest first with correct metadata, `get` returns
/// each, and `prune` deletes the oldest but always keeps at least the newest one.
pub async fn history_is_newest_first_and_prune_keeps_one(store: &dyn StateStore, term: Term) {
    let p = unique_processor("history");
    let mut probe = Probe::new(store, &p);
    let e1 = owned(store, &p, term).await;
    let mut written = Vec::new();
    for s in 1..=4 {
        let snap = test_snapshot(&p, e1, Sequence(s), format!("state {s}").as_bytes());
        ok(
            &p,
            "put_checkpoint",
            store.put_checkpoint(&snap, LEASE).await,
        );
        written.push(snap);
    }
    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    let moved = test_move_snapshot(&p, e1, e2, Sequence(4), b"moved");
    ok(
        &p,
        "commit_move",
        store.commit_move(e1, &moved, LEASE, term).await,
    );
    written.push(moved);
    for s in 5..=6 {
        let snap = test_snapshot(&p, e2, Sequence(s), format!("state {s}").as_bytes());
        ok(
            &p,
            "put_checkpoint",
            store.put_checkpoint(&snap, LEASE).await,
        );
        written.push(snap);
    }

    let history = ok(&p, "history", store.history(&p).await);
    let keys: Vec<_> = history.iter().map(|m| (m.epoch, m.sequence)).collect();
    let want: Vec<_> = written
        .iter()
        .rev()
        .map(|s| (s.meta.epoch, s.meta.sequence))
        .collect();
    assert_eq!(
        keys, want,
        "{p}: history must list every snapshot, newest first"
    );
    for snap in &written {
        probe.stored(snap).await;
    }
    let missing = ok(&p, "get", store.get(&p, e1, Sequence(5)).await);
    assert_eq!(missing, None, "{p}: get of a snapshot never stored");

    assert_eq!(
        ok(&p, "prune keep 3", store.prune(&p, 3).await),
        4,
        "{p}: prune(keep 3) of 7 deletes 4"
    );
    let pruned = ok(&p, "history", store.history(&p).await);
    assert_eq!(
        pruned,
        history[..3].to_vec(),
        "{p}: prune must keep the newest snapshots"
    );
    let gone = ok(&p, "get", store.get(&p, e1, Sequence(1)).await);
    assert_eq!(gone, None, "{p}: a pruned snapshot must be gone");
    assert_eq!(
        ok(&p, "prune keep 0", store.prune(&p, 0).await),
        2,
        "{p}: prune(keep 0) of 3 deletes 2"
    );
    let last = ok(&p, "history", store.history(&p).await);
    assert_eq!(
        last,
        history[..1].to_vec(),
        "{p}: prune(keep 0) must keep the newest snapshot"
    );
    assert_eq!(
        ok(&p, "prune keep 5", store.prune(&p, 5).await),
        0,
        "{p}: prune(keep 5) of 1 deletes nothing"
    );
    probe.look().await;
}

/// `ownerships` lists every row sorted by processor id, each equal to `ownership` of that
/// processor.
pub async fn ownerships_are_sorted(store: &dyn StateStore, term: Term) {
    // Created in descending id order, so a store that lists rows by insertion fails.
    let ours: Vec<ProcessorId> = ["zz-rows", "mm-rows", "aa-rows"]
        .into_iter()
        .map(unique_processor)
        .collect();
    for p in &ours {
        owned(store, p, term).await;
    }
    let all = ok(&ours[0], "ownerships", store.ownerships().await);
    for pair in all.windows(2) {
        assert!(
            pair[0].processor < pair[1].processor,
            "ownerships must be sorted by processor id without repeats: {} before {}",
            pair[0].processor,
            pair[1].processor
        );
    }
    for p in &ours {
        let row = ok(p, "ownership", store.ownership(p).await);
        let listed = all.iter().find(|o| &o.processor == p).cloned();
        assert_eq!(
            listed, row,
            "{p}: ownerships must list the same row as ownership"
        );
    }
}

/// Orchestrator writes carrying a term that is no longer current (or not yet issued) are
/// [`Fenced`](Error::Fenced) and change nothing; instance writes (checkpoints, lease renewals)
/// carry no term and are not affected.
///
/// `term` must be `leadership`'s current term; this resigns it, acquires a new one and returns
/// it (still held).
pub async fn term_fencing(store: &dyn StateStore, leadership: &dyn Leadership, term: Term) -> Term {
    let p = unique_processor("term");
    let mut probe = Probe::new(store, &p);
    let e1 = owned(store, &p, term).await;
    ok(
        &p,
        "put_checkpoint e1 #1",
        store
            .put_checkpoint(&test_snapshot(&p, e1, Sequence(1), b"1"), LEASE)
            .await,
    );
    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);

    leadership
        .resign(term)
        .await
        .unwrap_or_else(|e| panic!("resign {term}: {e}"));
    let new = acquire(leadership).await;
    assert!(
        new > term,
        "leadership: a new acquire must return a term above the resigned {term}, got {new}"
    );

    let before = probe.look().await;
    for stale in [term, Term(new.0 + 1)] {
        let what = |op: &str| format!("{op} with term {stale} while {new} is current");
        fenced(&p, &what("claim_epoch"), store.claim_epoch(&p, stale).await);
        fenced(
            &p,
            &what("assign_owner"),
            store.assign_owner(&p, Some(e1), e2, LEASE, stale).await,
        );
        let snap = test_move_snapshot(&p, e1, e2, Sequence(2), b"fenced move");
        fenced(
            &p,
            &what("commit_move"),
            store.commit_move(e1, &snap, LEASE, stale).await,
        );
        fenced(&p, &what("release"), store.release(&p, e1, stale).await);
        probe.unchanged(&before, &what("refused writes")).await;
    }

    let snap = test_snapshot(&p, e1, Sequence(2), b"2");
    ok(
        &p,
        "put_checkpoint (no term) after a term change",
        store.put_checkpoint(&snap, LEASE).await,
    );
    ok(
        &p,
        "renew_lease (no term) after a term change",
        store.renew_lease(&p, e1, LEASE).await.map(drop),
    );
    expire_lease(store, &p, e1).await;
    ok(
        &p,
        "assign_owner with the new term",
        store.assign_owner(&p, Some(e1), e2, LEASE, new).await,
    );
    new
}

/// A damaged stored snapshot is an [`Invalid`](Error::Invalid) error naming the processor and
/// epoch when read, never a panic or garbage; the previous snapshot stays readable and later
/// checkpoints are unaffected.
///
/// Runs only against stores that can damage their own bytes (`corruptor`); `term` must be
/// current.
pub async fn damaged_snapshot_suite(
    store: &dyn StateStore,
    term: Term,
    corruptor: &dyn SnapshotCorruptor,
) {
    let p = unique_processor("damaged");
    let e1 = owned(store, &p, term).await;
    let good = test_snapshot(&p, e1, Sequence(1), b"good");
    ok(
        &p,
        "put_checkpoint #1",
        store.put_checkpoint(&good, LEASE).await,
    );
    let bad = test_snapshot(&p, e1, Sequence(2), b"soon damaged");
    ok(
        &p,
        "put_checkpoint #2",
        store.put_checkpoint(&bad, LEASE).await,
    );
    ok(
        &p,
        "corrupt #2",
        corruptor.corrupt(&p, e1, Sequence(2)).await,
    );

    let names_it = |what: &str, r: Result<Option<StoredSnapshot>>| match r {
        Err(Error::Invalid(msg)) => assert!(
            msg.contains(p.as_str())
                && (msg.contains(&e1.to_string()) || msg.contains(&format!("epoch {}", e1.0))),
            "{p}: the error for a damaged snapshot must name processor {p} and epoch {e1}: {msg:?}"
        ),
        other => panic!("{p}: {what} of a damaged snapshot must be Invalid, got {other:?}"),
    };
    names_it("latest", store.latest(&p).await);
    names_it("get", store.get(&p, e1, Sequence(2)).await);
    let history = ok(&p, "history", store.history(&p).await);
    let keys: Vec<_> = history.iter().map(|m| (m.epoch, m.sequence)).collect();
    assert_eq!(
        keys,
        vec![(e1, Sequence(2)), (e1, Sequence(1))],
        "{p}: history still lists both snapshots"
    );
    let previous = ok(&p, "get #1", store.get(&p, e1, Sequence(1)).await);
    assert_eq!(
        previous.map(|s| s.bytes),
        Some(good.bytes),
        "{p}: the previous good snapshot must stay readable"
    );

    let next = test_snapshot(&p, e1, Sequence(3), b"after");
    ok(
        &p,
        "put_checkpoint #3 after the damage",
        store.put_checkpoint(&next, LEASE).await,
    );
    let latest = ok(&p, "latest", store.latest(&p).await);
    assert_eq!(
        latest.map(|s| s.bytes),
        Some(next.bytes),
        "{p}: latest after a new checkpoint"
    );
}

/// Acquires leadership for a suite, bounded by [`PATIENCE`](super::PATIENCE).
pub(crate) async fn acquire(leadership: &dyn Leadership) -> Term {
    patiently("leadership acquire", leadership.acquire())
        .await
        .unwrap_or_else(|e| panic!("leadership acquire failed: {e}"))
}

/// A pre-copy move commits a delta snapshot: only beside its stored base (else `Conflict`,
/// nothing changed), read back byte for byte, put together with the base into the frozen
/// state, and the base outlives pruning while the delta is kept. A checkpoint is never a
/// delta (`Invalid`).
pub async fn a_delta_is_committed_beside_its_base(store: &dyn StateStore, term: Term) {
    let p = unique_processor("delta");
    let mut probe = Probe::new(store, &p);
    let e1 = owned(store, &p, term).await;
    let base_body = vec![7u8; 3 * snapshot::CHUNK_SIZE];
    let base = test_snapshot(&p, e1, Sequence(5), &base_body);
    ok(
        &p,
        "put_checkpoint of the base",
        store.put_checkpoint(&base, LEASE).await,
    );
    let mut frozen_body = base_body.clone();
    frozen_body[snapshot::CHUNK_SIZE + 1] = 8;
    let delta_of = |base: &StoredSnapshot, sequence: u64| {
        let kept = snapshot::Base::of_encoded(&base.bytes, base_body.clone())
            .unwrap_or_else(|e| panic!("{p}: base of the test delta: {e}"));
        let bytes = snapshot::Encoder::default()
            .encode_delta(&p, e1, Sequence(sequence), &kept, &frozen_body)
            .unwrap_or_else(|e| panic!("{p}: encode the test delta: {e}"));
        StoredSnapshot::from_encoded(bytes, crate::model::Timestamp(0))
            .unwrap_or_else(|e| panic!("{p}: the test delta: {e}"))
    };

    let as_checkpoint = delta_of(&base, 6);
    let before = probe.look().await;
    let r = store.put_checkpoint(&as_checkpoint, LEASE).await;
    assert!(
        matches!(r, Err(Error::Invalid(_))),
        "{p}: a delta as a checkpoint must be Invalid, got {r:?}"
    );
    probe.unchanged(&before, "put_checkpoint of a delta").await;

    let e2 = ok(&p, "claim_epoch", store.claim_epoch(&p, term).await);
    // A delta against a base the store never saw.
    let stranger = test_snapshot(&p, e1, Sequence(4), &base_body);
    let mut orphan = delta_of(&stranger, 6);
    orphan.meta.epoch = e2;
    let before = probe.look().await;
    let r = store.commit_move(e1, &orphan, LEASE, term).await;
    assert!(
        matches!(r, Err(Error::Conflict(_))),
        "{p}: a delta whose base is not stored must be Conflict, got {r:?}"
    );
    probe
        .unchanged(&before, "commit_move of a delta without its base")
        .await;

    let mut moved = delta_of(&base, 6);
    moved.meta.epoch = e2;
    ok(
        &p,
        "commit_move of a delta",
        store.commit_move(e1, &moved, LEASE, term).await,
    );
    probe.stored(&moved).await;
    let latest = ok(&p, "latest", store.latest(&p).await)
        .unwrap_or_else(|| panic!("{p}: no latest snapshot after the delta's commit"));
    assert_eq!(
        latest.bytes, moved.bytes,
        "{p}: latest must be the delta, byte for byte"
    );
    let stored_base = ok(&p, "get the base", store.get(&p, e1, Sequence(5)).await)
        .unwrap_or_else(|| panic!("{p}: the delta's base is gone"));
    let (_, body) = snapshot::apply_delta(&stored_base.bytes, &latest.bytes, &Default::default())
        .unwrap_or_else(|e| panic!("{p}: apply the stored delta to its stored base: {e}"));
    assert_eq!(
        body, frozen_body,
        "{p}: base + delta must be the frozen state"
    );

    // Newer checkpoints than both: pruning to one keeps the committed delta, so its base too.
    ok(&p, "prune", store.prune(&p, 1).await);
    let history = ok(&p, "history", store.history(&p).await);
    assert!(
        history
            .iter()
            .any(|m| (m.epoch, m.sequence) == (e1, Sequence(5))),
        "{p}: prune removed the base of the kept delta: {history:?}"
    );
    for seq in 7..=9 {
        let next = test_snapshot(&p, e2, Sequence(seq), b"full again");
        ok(
            &p,
            "put_checkpoint after the move",
            store.put_checkpoint(&next, LEASE).await,
        );
    }
    // The delta goes first; its base at the next prune (a prune decides from the rows as
    // they were when it began).
    ok(&p, "prune", store.prune(&p, 1).await);
    ok(&p, "prune again", store.prune(&p, 1).await);
    let history = ok(&p, "history", store.history(&p).await);
    assert_eq!(
        history.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![Sequence(9)],
        "{p}: once the delta is pruned its base may go too"
    );
    let _ = probe.look().await;
}

/// Claims the first epoch of `p` and makes it the owner.
/// Lets `epoch`'s lease run out: renewed to a millisecond, then waited out (on tokio's clock,
/// so a paused test runtime advances it; a real store's clock moves on its own).
async fn expire_lease(store: &dyn StateStore, p: &ProcessorId, epoch: Epoch) {
    ok(
        p,
        "renew_lease to 1 ms (to let it run out)",
        store
            .renew_lease(p, epoch, Duration::from_millis(1))
            .await
            .map(drop),
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
}

async fn owned(store: &dyn StateStore, p: &ProcessorId, term: Term) -> Epoch {
    let e = ok(p, "claim_epoch", store.claim_epoch(p, term).await);
    ok(
        p,
        "assign_owner(None -> first epoch)",
        store.assign_owner(p, None, e, LEASE, term).await,
    );
    e
}

/// What a processor looks like through the store, for "nothing changed" comparisons.
#[derive(Debug, PartialEq)]
struct Seen {
    ownership: Option<Ownership>,
    history: Vec<SnapshotMeta>,
    latest: Option<StoredSnapshot>,
}

/// Reads one processor's state and checks the invariants every read must hold.
struct Probe<'a> {
    store: &'a dyn StateStore,
    p: &'a ProcessorId,
    committed: Option<(Epoch, Sequence)>,
}

impl<'a> Probe<'a> {
    fn new(store: &'a dyn StateStore, p: &'a ProcessorId) -> Self {
        Probe {
            store,
            p,
            committed: None,
        }
    }

    async fn look(&mut self) -> Seen {
        let p = self.p;
        let ownership = ok(p, "ownership", self.store.ownership(p).await);
        let history = ok(p, "history", self.store.history(p).await);
        let latest = ok(p, "latest", self.store.latest(p).await);
        let committed = ownership.as_ref().and_then(|o| o.committed);
        if let Some(o) = &ownership {
            assert_eq!(
                &o.processor, p,
                "{p}: ownership row names another processor"
            );
            assert!(
                o.owner.is_none_or(|e| e <= o.highest_epoch),
                "{p}: owner above highest_epoch: {o:?}"
            );
            assert_eq!(
                o.committed.is_some(),
                o.committed_at.is_some(),
                "{p}: committed_at must be set exactly when a checkpoint is committed: {o:?}"
            );
        }
        assert!(
            committed >= self.committed,
            "{p}: the committed checkpoint went backwards: {:?} after {:?}",
            committed,
            self.committed
        );
        self.committed = committed;
        let latest_key = latest.as_ref().map(|s| (s.meta.epoch, s.meta.sequence));
        assert_eq!(
            latest_key, committed,
            "{p}: latest must be the committed checkpoint"
        );
        for meta in &history {
            assert_eq!(
                &meta.processor, p,
                "{p}: history lists another processor's snapshot"
            );
        }
        Seen {
            ownership,
            history,
            latest,
        }
    }

    async fn row(&mut self) -> Ownership {
        let p = self.p;
        self.look()
            .await
            .ownership
            .unwrap_or_else(|| panic!("{p}: no ownership row"))
    }

    async fn unchanged(&mut self, before: &Seen, what: &str) {
        let now = self.look().await;
        assert_eq!(&now, before, "{}: {what} must change nothing", self.p);
    }

    /// Checks that `snap` is stored as given (bytes and metadata; the store sets `created_at`).
    async fn stored(&mut self, snap: &StoredSnapshot) {
        let p = self.p;
        let (e, s) = (snap.meta.epoch, snap.meta.sequence);
        let got = ok(p, "get", self.store.get(p, e, s).await)
            .unwrap_or_else(|| panic!("{p}: snapshot {e} {s} was not stored"));
        assert_eq!(
            got.bytes, snap.bytes,
            "{p}: snapshot {e} {s} bytes differ from what was put"
        );
        let SnapshotMeta {
            processor,
            epoch,
            sequence,
            size,
            created_at: _,
        } = &got.meta;
        assert_eq!(
            (processor, *epoch, *sequence, *size),
            (p, e, s, snap.bytes.len() as u64),
            "{p}: metadata of snapshot {e} {s}"
        );
        let history = ok(p, "history", self.store.history(p).await);
        let listed = history.iter().find(|m| m.epoch == e && m.sequence == s);
        assert_eq!(
            listed,
            Some(&got.meta),
            "{p}: history must list snapshot {e} {s} with the metadata get returns"
        );
        self.look().await;
    }
}

fn ok<T>(p: &ProcessorId, what: &str, r: Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{p}: {what} failed: {e}"))
}

fn fenced<T: Debug>(p: &ProcessorId, what: &str, r: Result<T>) {
    if !matches!(r, Err(Error::Fenced(_))) {
        panic!("{p}: {what} must be refused with Fenced, got {r:?}");
    }
}

fn conflict<T: Debug>(p: &ProcessorId, what: &str, r: Result<T>) {
    if !matches!(r, Err(Error::Conflict(_))) {
        panic!("{p}: {what} must be refused with Conflict, got {r:?}");
    }
}

/// Refused for a reason the contract does not pin to one variant, but not as `Unavailable`:
/// the store must have decided, not failed to answer.
fn refused<T: Debug>(p: &ProcessorId, what: &str, r: Result<T>) {
    if !matches!(&r, Err(e) if !matches!(e, Error::Unavailable(_))) {
        panic!("{p}: {what} must be refused, got {r:?}");
    }
}

/// Two writers racing on one processor through separate handles of the same store (separate
/// connections, as two instance processes would have): only the owner's checkpoints are
/// stored, whatever the interleaving, before and after ownership moves between them.
///
/// `store` is the orchestrator's handle (it claims and assigns under a term from
/// `leadership`); `a` and `b` are the two writers' handles on the same rows. Each writes 20
/// checkpoints per round.
pub async fn concurrent_writers_suite(
    store: &dyn StateStore,
    a: &dyn StateStore,
    b: &dyn StateStore,
    leadership: &dyn Leadership,
) {
    let term = leadership.acquire().await.expect("acquire");
    let p = unique_processor("writers");

    let e1 = store.claim_epoch(&p, term).await.expect("claim e1");
    store
        .assign_owner(&p, None, e1, LEASE, term)
        .await
        .expect("assign e1");
    let e2 = store.claim_epoch(&p, term).await.expect("claim e2");

    // e1 owns: everything e2 writes is fenced, whatever the interleaving.
    let (ra, rb) = tokio::join!(write_many(a, &p, e1, 1, 20), write_many(b, &p, e2, 1, 20));
    assert_all(&p, "owner e1", &ra, false);
    assert_all(&p, "non-owner e2", &rb, true);

    // Hand over to e2 (e1's lease runs out first), then race again: now e1 is the intruder.
    store
        .renew_lease(&p, e1, Duration::from_millis(1))
        .await
        .expect("shorten e1's lease");
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .assign_owner(&p, Some(e1), e2, LEASE, term)
        .await
        .expect("assign e1 -> e2");
    let (ra, rb) = tokio::join!(write_many(a, &p, e1, 21, 20), write_many(b, &p, e2, 21, 20));
    assert_all(&p, "former owner e1", &ra, true);
    assert_all(&p, "owner e2", &rb, false);

    // Nothing a fenced write sent was stored.
    let history = store.history(&p).await.expect("history");
    assert_eq!(history.len(), 40, "{p}: 20 checkpoints of each owner");
    for meta in &history {
        let want = if meta.sequence.0 <= 20 { e1 } else { e2 };
        assert_eq!(
            meta.epoch, want,
            "{p}: {meta:?} filed under the wrong epoch"
        );
        let snap = store
            .get(&p, meta.epoch, meta.sequence)
            .await
            .expect("get")
            .expect("listed snapshot exists");
        assert!(
            written_by(&snap, want),
            "{p}: {meta:?} holds another writer's bytes"
        );
    }
    let row = store.ownership(&p).await.expect("ownership").expect("row");
    assert_eq!(row.owner, Some(e2), "{p}");
    assert_eq!(row.committed, Some((e2, Sequence(40))), "{p}");
    leadership.resign(term).await.expect("resign");
}

/// Writes `count` checkpoints from `epoch`, starting at `first`; returns each outcome.
async fn write_many(
    store: &dyn StateStore,
    p: &ProcessorId,
    epoch: Epoch,
    first: u64,
    count: u64,
) -> Vec<Result<()>> {
    let mut out = Vec::new();
    for s in first..first + count {
        let body = format!("{epoch} wrote {s}");
        let snap = test_snapshot(p, epoch, Sequence(s), body.as_bytes());
        out.push(store.put_checkpoint(&snap, LEASE).await.map(drop));
    }
    out
}

/// Every write in `results` succeeded, or (`fenced`) every one was fenced.
fn assert_all(p: &ProcessorId, what: &str, results: &[Result<()>], fenced: bool) {
    for (i, r) in results.iter().enumerate() {
        if fenced {
            assert!(
                matches!(r, Err(Error::Fenced(_))),
                "{p}: {what}: write {i} must be Fenced, got {r:?}"
            );
        } else {
            assert!(r.is_ok(), "{p}: {what}: write {i} must succeed, got {r:?}");
        }
    }
}

/// Whether `snap` holds the bytes [`write_many`] wrote from `epoch` at its sequence.
fn written_by(snap: &StoredSnapshot, epoch: Epoch) -> bool {
    let body = format!("{epoch} wrote {}", snap.meta.sequence.0);
    crate::snapshot::decode_body(&snap.bytes, &Default::default())
        .map(|(_, raw)| raw == body.as_bytes())
        .unwrap_or(false)
}
