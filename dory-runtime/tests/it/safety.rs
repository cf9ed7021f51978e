//! What the runtime refuses and when it stops by itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dory_core::snapshot::Encoder;
use dory_core::{
    Epoch, Error, InputPosition, InstanceControl, LaunchMode, Phase, ProcessorId, Sequence,
    StateStore, StoredSnapshot, Timestamp,
};
use dory_mock::{FaultSwitch, FaultyStore};
use dory_runtime::Exit;
use serde::Serialize;

use crate::support::{LEASE, TOKEN, World, http};

/// The runtime's snapshot body, as a foreign writer would build it.
#[derive(Serialize)]
struct Body {
    version: u64,
    sequence: u64,
    position: InputPosition,
    state: u64,
}

fn snapshot_of(processor: &ProcessorId, epoch: Epoch, count: u64) -> Vec<u8> {
    let body = Body {
        version: count,
        sequence: count,
        position: InputPosition::new(),
        state: count,
    };
    Encoder::default()
        .encode_state(processor, epoch, Sequence(count), &body)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_routes_need_the_token() {
    let world = World::new("guarded").await;
    world.claim(true).await;
    let epoch = world.claim(false).await;
    let standby = world.start(epoch, LaunchMode::Standby).await;
    world.until_phase(&standby.instance, Phase::Standby).await;
    let good = snapshot_of(&world.processor, Epoch(1), 5);
    for (method, path) in [
        ("PUT", "/state"),
        ("GET", "/state"),
        ("POST", "/state/freeze"),
        ("POST", "/state/resume"),
    ] {
        assert_eq!(
            http(&standby.instance, method, path, None, &good).await.0,
            401
        );
        assert_eq!(
            http(&standby.instance, method, path, Some("wrong"), &good)
                .await
                .0,
            401
        );
    }
    // Health needs no token; nothing was loaded by the refused calls.
    assert_eq!(
        http(&standby.instance, "GET", "/healthz", None, b"")
            .await
            .0,
        200
    );
    assert_eq!(
        http(&standby.instance, "POST", "/state/resume", Some(TOKEN), b"")
            .await
            .0,
        409
    );
    standby.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_are_refused_and_leave_the_state_untouched() {
    let world = World::new("loader").await;
    let old = world.claim(true).await;
    let epoch = world.claim(false).await;
    let standby = world.start(epoch, LaunchMode::Standby).await;
    world.until_phase(&standby.instance, Phase::Standby).await;
    let good = snapshot_of(&world.processor, old, 10);
    world.control.load(&standby.instance, &good).await.unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let other = snapshot_of(&ProcessorId::new("someone-else").unwrap(), old, 50);
    let not_older = snapshot_of(&world.processor, epoch, 50);
    let backwards = snapshot_of(&world.processor, old, 3);
    let cases: [(&str, &[u8], &str); 6] = [
        ("truncated", &good[..good.len() / 2], ""),
        ("flipped", &flipped, "checksum"),
        ("empty", b"", ""),
        ("other processor", &other, "someone-else"),
        ("not an older epoch", &not_older, "not older"),
        ("older than the loaded one", &backwards, "not newer"),
    ];
    for (what, bytes, says) in cases {
        let (status, body) = http(&standby.instance, "PUT", "/state", Some(TOKEN), bytes).await;
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body.contains(says), "{what}: {body}");
        let refused = world
            .control
            .load(&standby.instance, bytes)
            .await
            .unwrap_err();
        assert!(matches!(refused, Error::Invalid(_)), "{what}: {refused}");
    }
    assert_eq!(world.phase(&standby).await, Phase::Standby);

    // The good snapshot is still the loaded one: the count continues from 10.
    let mut snapshot = StoredSnapshot::from_encoded(good, Timestamp(0)).unwrap();
    snapshot.meta.epoch = epoch;
    world
        .store
        .commit_move(old, &snapshot, LEASE, world.term)
        .await
        .unwrap();
    world.control.resume(&standby.instance).await.unwrap();
    world.until("output", |w| w.sequences().len() >= 5).await;
    assert_eq!(world.sequences()[..5], [11, 12, 13, 14, 15]);

    // A running instance refuses a load and keeps running.
    let newer = snapshot_of(&world.processor, old, 99);
    let refused = world
        .control
        .load(&standby.instance, &newer)
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");
    assert_eq!(world.phase(&standby).await, Phase::Running);
    standby.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_stuck_in_user_code_makes_freeze_time_out_and_keeps_running() {
    let world = World::new("stuck").await;
    let epoch = world.claim(true).await;
    let running = world.start(epoch, LaunchMode::Restore).await;
    world.until("output", |w| w.sequences().len() >= 5).await;
    running.stuck.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(50)).await;

    let refused = world
        .control
        .freeze(&running.instance, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("safe point"), "{refused}");
    assert_eq!(world.phase(&running).await, Phase::Running);

    // Once user code returns it keeps running: the withdrawn freeze left nothing behind.
    running.stuck.store(false, Ordering::SeqCst);
    running.release.notify_one();
    let before = world.sequences().len();
    world
        .until("more output", |w| w.sequences().len() >= before + 10)
        .await;
    assert_eq!(world.phase(&running).await, Phase::Running);

    // And a later freeze works, and a resume undoes it (the orchestrator's rollback).
    world
        .control
        .freeze(&running.instance, Duration::from_secs(5))
        .await
        .unwrap();
    world.control.resume(&running.instance).await.unwrap();
    let before = world.sequences().len();
    world
        .until("output after resume", |w| w.sequences().len() >= before + 5)
        .await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_runtime_stops_publishing() {
    let world = World::new("fenced").await;
    let epoch = world.claim(true).await;
    let running = world.start(epoch, LaunchMode::Restore).await;
    world.until("output", |w| w.sequences().len() >= 5).await;
    world
        .store
        .release(&world.processor, epoch, world.term)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + LEASE * 4;
    loop {
        let (status, _) = http(&running.instance, "GET", "/readyz", None, b"").await;
        if status == 412 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never fenced (readyz {status})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let count = world.sequences().len();
    tokio::time::sleep(LEASE / 2).await;
    assert_eq!(
        world.sequences().len(),
        count,
        "a fenced instance published"
    );
    let refused = world.control.resume(&running.instance).await.unwrap_err();
    assert!(refused.is_fenced(), "{refused}");
    assert!(matches!(running.shutdown().await, Exit::Fenced { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_stops_publishing_within_the_lease() {
    let world = World::new("cut-off").await;
    let epoch = world.claim(true).await;
    let switch = FaultSwitch::new();
    let store: Arc<dyn StateStore> =
        Arc::new(FaultyStore::new(world.store.clone(), switch.clone()));
    let running = world.start_with(epoch, LaunchMode::Restore, store).await;
    world
        .until("a checkpoint", |w| w.committed().is_some())
        .await;

    switch.set_outage(true);
    tokio::time::sleep(LEASE + Duration::from_millis(100)).await;
    let count = world.sequences().len();
    tokio::time::sleep(LEASE / 2).await;
    assert_eq!(world.sequences().len(), count, "published without a lease");
    assert_eq!(
        http(&running.instance, "GET", "/readyz", None, b"").await.0,
        503
    );
    // Nothing it published is more than one checkpoint interval ahead of committed state
    // (output after the last checkpoint is published again by whoever resumes from it).
    let (_, committed) = world.committed().unwrap();
    assert!(committed.0 > 0);

    // The store comes back: the lease is renewed and publishing goes on.
    switch.set_outage(false);
    world
        .until("output after the outage", |w| {
            w.sequences().len() >= count + 5
        })
        .await;
    let exit = running.shutdown().await;
    assert!(matches!(exit, Exit::Saved { .. }), "{exit:?}");
}
