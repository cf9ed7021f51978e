//! The pre-copy move: a full checkpoint stored and loaded while the old instance runs, then a
//! delta at the freeze; and every way the delta can be refused or read back.

use std::sync::Arc;
use std::time::Duration;

use dory_core::snapshot::{self, SnapshotKind};
use dory_core::{
    Epoch, Error, Input, InstanceControl, LaunchMode, Phase, StateStore, StoredSnapshot,
};
use dory_runtime::{Context, Exit, Processor, Runtime, Settings, StepError};
use tokio::sync::oneshot;

use crate::support::{LEASE, Running, World, assert_contiguous, http, instance_at};

/// Starts an owner, lets it count, and pre-copies it: (the instance, its epoch, the base).
async fn counting_with_base(world: &World) -> (Running, Epoch, Vec<u8>) {
    let epoch = world.claim(true).await;
    let old = world.start(epoch, LaunchMode::Restore).await;
    world
        .until("some output", |w| w.sequences().len() >= 20)
        .await;
    let base = world
        .control
        .precopy(&old.instance, Duration::from_secs(5))
        .await
        .unwrap();
    (old, epoch, base)
}

/// Claims an epoch and starts it in standby: (the instance, its epoch).
async fn standby(world: &World) -> (Running, Epoch) {
    let epoch = world.claim(false).await;
    let standby = world.start(epoch, LaunchMode::Standby).await;
    world.until_phase(&standby.instance, Phase::Standby).await;
    (standby, epoch)
}

/// Freezes `old` and fetches its snapshot; returns it with the output count at the freeze.
async fn freeze(world: &World, old: &Running) -> (Vec<u8>, u64) {
    world
        .control
        .freeze(&old.instance, Duration::from_secs(5))
        .await
        .unwrap();
    let bytes = world.control.fetch(&old.instance).await.unwrap();
    (bytes, world.sequences().len() as u64)
}

/// Commits `bytes` as the move from `from` to `to`, as the orchestrator does.
async fn commit(world: &World, from: Epoch, to: Epoch, bytes: &[u8]) -> dory_core::Result<()> {
    let mut snapshot = StoredSnapshot::from_encoded(bytes.to_vec(), dory_core::Timestamp(0))?;
    snapshot.meta.epoch = to;
    world
        .store
        .commit_move(from, &snapshot, LEASE, world.term)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_precopy_move_sends_a_delta_and_the_count_continues() {
    let world = World::new("precopied").await;
    let (old, old_epoch, base) = counting_with_base(&world).await;
    let base_header = snapshot::verify(&base).unwrap();
    assert_eq!(base_header.kind, SnapshotKind::Full);
    // The base is a checkpoint the store holds: the delta's commit needs it there.
    let stored = world
        .store
        .get(&world.processor, old_epoch, base_header.sequence)
        .await
        .unwrap()
        .expect("the pre-copied base is stored");
    assert_eq!(stored.bytes, base);
    let (_, metrics) = http(&old.instance, "GET", "/metrics", None, b"").await;
    assert!(metrics.contains("dory_precopies_total 1\n"), "{metrics}");
    // Pre-copy keeps the instance running.
    let before = world.sequences().len();
    world
        .until("output after the pre-copy", |w| {
            w.sequences().len() > before + 5
        })
        .await;

    let (new, new_epoch) = standby(&world).await;
    world.control.load(&new.instance, &base).await.unwrap();

    let (delta, frozen_at) = freeze(&world, &old).await;
    let delta_header = snapshot::verify(&delta).unwrap();
    assert_eq!(delta_header.kind, SnapshotKind::Delta);
    assert!(delta_header.sequence > base_header.sequence);
    let named = snapshot::delta_base(&delta).unwrap().unwrap();
    assert_eq!(
        (named.epoch, named.sequence, named.checksum),
        (old_epoch, base_header.sequence, base_header.checksum)
    );

    world.control.load(&new.instance, &delta).await.unwrap();
    world.control.load(&new.instance, &delta).await.unwrap(); // idempotent
    commit(&world, old_epoch, new_epoch, &delta).await.unwrap();
    world.control.resume(&new.instance).await.unwrap();
    world
        .until("the new instance publishes", |w| {
            w.sequences().len() as u64 >= frozen_at + 20
        })
        .await;
    // A state that came as a delta is checkpointed in full soon after, so the store need not
    // keep reading it beside its base.
    world
        .until("the new instance's first checkpoint", |w| {
            w.committed()
                .is_some_and(|(e, s)| e == new_epoch && s > delta_header.sequence)
        })
        .await;
    assert_eq!(old.shutdown().await, Exit::NotOwner);
    assert!(matches!(new.shutdown().await, Exit::Saved { .. }));
    assert_contiguous(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_without_its_base_is_refused_and_the_full_state_is_served() {
    let world = World::new("baseless").await;
    let (old, old_epoch, base) = counting_with_base(&world).await;
    let (new, new_epoch) = standby(&world).await;

    let (delta, frozen_at) = freeze(&world, &old).await;
    // No base loaded: the delta is refused and nothing is loaded (resume still refuses).
    let refused = world.control.load(&new.instance, &delta).await.unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");
    assert!(world.control.resume(&new.instance).await.is_err());

    // The whole state, on demand, at the delta's sequence.
    let full = world.control.fetch_full(&old.instance).await.unwrap();
    let full_header = snapshot::verify(&full).unwrap();
    let delta_header = snapshot::verify(&delta).unwrap();
    assert_eq!(full_header.kind, SnapshotKind::Full);
    assert_eq!(full_header.sequence, delta_header.sequence);
    assert_eq!(
        snapshot::resolve_delta(delta.clone(), Some(&base), &Default::default()).unwrap(),
        full
    );
    world.control.load(&new.instance, &full).await.unwrap();
    commit(&world, old_epoch, new_epoch, &full).await.unwrap();
    world.control.resume(&new.instance).await.unwrap();
    world
        .until("the new instance publishes", |w| {
            w.sequences().len() as u64 >= frozen_at + 10
        })
        .await;
    assert_eq!(old.shutdown().await, Exit::NotOwner);
    new.shutdown().await;
    assert_contiguous(&world);
}

/// The orchestrator loads and commits at once; when the load is lost (here: never sent), the
/// standby holds only the pre-copy's base. Told at its resume which sequence was committed,
/// it restores that from the store instead of running from the older base, and the count
/// continues without a gap or a repeat. With nothing loaded at all it does the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_resumed_with_a_committed_sequence_it_lacks_restores_it() {
    let world = World::new("mended").await;
    let (old, old_epoch, base) = counting_with_base(&world).await;
    let (new, new_epoch) = standby(&world).await;
    world.control.load(&new.instance, &base).await.unwrap();
    let (delta, frozen_at) = freeze(&world, &old).await;
    let delta_header = snapshot::verify(&delta).unwrap();
    assert!(delta_header.sequence > snapshot::verify(&base).unwrap().sequence);
    commit(&world, old_epoch, new_epoch, &delta).await.unwrap();
    world
        .control
        .resume_committed(&new.instance, delta_header.sequence)
        .await
        .unwrap();
    let health = world.control.health(&new.instance).await.unwrap();
    assert_eq!(health.phase, Phase::Running);
    world
        .until("the new instance publishes", |w| {
            w.sequences().len() as u64 >= frozen_at + 10
        })
        .await;
    assert_eq!(old.shutdown().await, Exit::NotOwner);

    // Nothing loaded: the same, from the new owner's own checkpoint (saved at shutdown).
    let saved = new.shutdown().await;
    let Exit::Saved {
        sequence: Some(saved),
    } = saved
    else {
        panic!("the owner did not save at shutdown: {saved:?}");
    };
    let (unloaded, third) = standby(&world).await;
    let mut snapshot = world.store.latest(&world.processor).await.unwrap().unwrap();
    snapshot.meta.epoch = third;
    world
        .store
        .commit_move(new_epoch, &snapshot, LEASE, world.term)
        .await
        .unwrap();
    let last = world.sequences().len() as u64;
    let refused = world.control.resume(&unloaded.instance).await.unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");
    world
        .control
        .resume_committed(&unloaded.instance, saved)
        .await
        .unwrap();
    world
        .until("the third instance publishes", |w| {
            w.sequences().len() as u64 >= last + 10
        })
        .await;
    unloaded.shutdown().await;
    assert_contiguous(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_of_another_base_is_refused_and_the_loaded_state_kept() {
    let world = World::new("otherbase").await;
    let (old, old_epoch, first) = counting_with_base(&world).await;
    let (new, new_epoch) = standby(&world).await;
    world.control.load(&new.instance, &first).await.unwrap();
    // A second pre-copy replaces the old instance's base; the replacement holds the first.
    let before = world.sequences().len();
    world
        .until("more output", |w| w.sequences().len() > before + 5)
        .await;
    let second = world
        .control
        .precopy(&old.instance, Duration::from_secs(5))
        .await
        .unwrap();
    assert_ne!(first, second);
    let (delta, _) = freeze(&world, &old).await;
    let refused = world.control.load(&new.instance, &delta).await.unwrap_err();
    assert!(matches!(refused, Error::Invalid(_)), "{refused}");
    assert!(refused.to_string().contains("applies to"), "{refused}");
    // The first base is still loaded: the delta of the second base after loading it works.
    world.control.load(&new.instance, &second).await.unwrap();
    world.control.load(&new.instance, &delta).await.unwrap();
    commit(&world, old_epoch, new_epoch, &delta).await.unwrap();
    world.control.resume(&new.instance).await.unwrap();
    assert_eq!(old.shutdown().await, Exit::NotOwner);
    new.shutdown().await;
    assert_contiguous(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reads_a_committed_delta_beside_its_base() {
    let world = World::new("restored").await;
    let (old, old_epoch, _base) = counting_with_base(&world).await;
    let (delta, frozen_at) = freeze(&world, &old).await;
    // Committed as an evacuation does (to a new epoch with no instance yet), then that epoch
    // starts in restore mode: the latest stored snapshot is the delta, read with its base.
    let new_epoch = world.claim(false).await;
    commit(&world, old_epoch, new_epoch, &delta).await.unwrap();
    assert_eq!(old.shutdown().await, Exit::NotOwner);
    let latest = world.store.latest(&world.processor).await.unwrap().unwrap();
    assert_eq!(latest.bytes, delta);

    let restored = world.start(new_epoch, LaunchMode::Restore).await;
    world
        .until("the restored instance publishes", |w| {
            w.sequences().len() as u64 >= frozen_at + 10
        })
        .await;
    // A state restored from a delta is checkpointed in full right after its first step, as
    // one loaded as a delta is, not only at the next periodic checkpoint.
    let delta_sequence = snapshot::verify(&delta).unwrap().sequence;
    world
        .until("the restored instance's first checkpoint", |w| {
            w.committed()
                .is_some_and(|(e, s)| e == new_epoch && s > delta_sequence)
        })
        .await;
    let first = world
        .store
        .history(&world.processor)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.epoch == new_epoch && m.sequence > delta_sequence)
        .map(|m| m.sequence.0)
        .min();
    assert_eq!(first, Some(delta_sequence.0 + 1));
    restored.shutdown().await;
    assert_contiguous(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_instance_refuses_to_precopy() {
    let world = World::new("standbycopy").await;
    let epoch = world.claim(false).await;
    let standby = world.start(epoch, LaunchMode::Standby).await;
    world.until_phase(&standby.instance, Phase::Standby).await;
    let refused = world
        .control
        .precopy(&standby.instance, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");
    standby.shutdown().await;
}

/// Steps as fast as it can: the run loop is back at a safe point right after every answer.
struct Spinner;

#[async_trait::async_trait]
impl Processor for Spinner {
    type State = u64;

    async fn step(&mut self, count: &mut u64, _ctx: &mut Context) -> Result<(), StepError> {
        *count += 1;
        tokio::task::yield_now().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_precopy_answers_the_base_its_freeze_takes_the_delta_against() {
    let world = World::new("spinner").await;
    let epoch = world.claim(true).await;
    let runtime = Runtime::bind(
        world.env(epoch, LaunchMode::Restore),
        Spinner,
        Arc::new(world.store.clone()),
        Arc::new(world.publisher.clone()),
        None::<Arc<dyn Input>>,
        Settings::default().with_bind_host("127.0.0.1"),
    )
    .await
    .unwrap();
    let instance = instance_at(&world, epoch, runtime.local_addr().to_string());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(runtime.run_until(async move {
        let _ = stopped.await;
    }));
    world.until_phase(&instance, Phase::Running).await;
    // A run loop that answered one request and, back at its next safe point before the
    // request saw the answer, pre-copied again would have replaced the base the answer names.
    for _ in 0..20 {
        let base = world
            .control
            .precopy(&instance, Duration::from_secs(5))
            .await
            .unwrap();
        let base = snapshot::verify(&base).unwrap();
        world
            .control
            .freeze(&instance, Duration::from_secs(5))
            .await
            .unwrap();
        let delta = world.control.fetch(&instance).await.unwrap();
        let named = snapshot::delta_base(&delta)
            .unwrap()
            .expect("a step ran since the pre-copy: the freeze sends a delta");
        assert_eq!(
            (named.sequence, named.checksum),
            (base.sequence, base.checksum)
        );
        world.control.resume(&instance).await.unwrap();
    }
    let _ = stop.send(());
    let exit = task.await.unwrap().unwrap();
    assert!(matches!(exit, Exit::Saved { .. }), "{exit:?}");
}
