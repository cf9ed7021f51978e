//! Running, checkpointing, moving and restarting.

use std::time::Duration;

use dory_core::{Epoch, InstanceControl, LaunchMode, Phase, Sequence, StateStore, StoredSnapshot};
use dory_runtime::Exit;

use crate::support::{LEASE, World, assert_contiguous, http};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_counter_runs_and_checkpoints() {
    let world = World::new("counter").await;
    let epoch = world.claim(true).await;
    let running = world.start(epoch, LaunchMode::Restore).await;
    world
        .until("a checkpoint is committed", |w| w.committed().is_some())
        .await;
    world
        .until("more output", |w| w.sequences().len() >= 20)
        .await;
    assert_eq!(world.phase(&running).await, Phase::Running);
    let (status, metrics) = http(&running.instance, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    for name in [
        "dory_iterations_total",
        "dory_publishes_total",
        "dory_checkpoints_total",
        "dory_checkpoint_age_seconds",
        "dory_snapshot_bytes",
        "dory_freeze_duration_seconds",
        "dory_restore_duration_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }
    assert!(
        metrics.contains(&format!("dory_epoch {}", epoch.0)),
        "{metrics}"
    );
    let (committed_epoch, _) = world.committed().unwrap();
    assert_eq!(committed_epoch, epoch);
    let exit = running.shutdown().await;
    assert!(matches!(exit, Exit::Saved { .. }), "{exit:?}");
    assert_contiguous(&world);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_continues_the_count_with_no_gap_and_no_duplicate() {
    let world = World::new("mover").await;
    let old_epoch = world.claim(true).await;
    let old = world.start(old_epoch, LaunchMode::Restore).await;
    world
        .until("some output", |w| w.sequences().len() >= 30)
        .await;

    let new_epoch = world.claim(false).await;
    let new = world.start(new_epoch, LaunchMode::Standby).await;
    world.until_phase(&new.instance, Phase::Standby).await;
    // Standing by publishes nothing and refuses a freeze.
    assert!(
        world
            .control
            .freeze(&new.instance, Duration::from_secs(1))
            .await
            .is_err()
    );

    let meta = world
        .control
        .freeze(&old.instance, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(world.phase(&old).await, Phase::Frozen);
    let bytes = world.control.fetch(&old.instance).await.unwrap();
    let frozen_at = world.sequences().len() as u64;
    // The snapshot's sequence is the state's version, one per step: at least one per message.
    assert!(
        meta.sequence >= Sequence(frozen_at),
        "{meta:?} after {frozen_at} messages"
    );
    // A frozen instance publishes nothing more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(world.sequences().len() as u64, frozen_at);

    world.control.load(&new.instance, &bytes).await.unwrap();
    world.control.load(&new.instance, &bytes).await.unwrap(); // idempotent
    let mut snapshot =
        StoredSnapshot::from_encoded(bytes.clone(), dory_core::Timestamp(0)).unwrap();
    snapshot.meta.epoch = new_epoch;
    world
        .store
        .commit_move(old_epoch, &snapshot, LEASE, world.term)
        .await
        .unwrap();
    world.control.resume(&new.instance).await.unwrap();
    assert_eq!(world.phase(&new).await, Phase::Running);

    world
        .until("the new instance publishes", |w| {
            w.sequences().len() as u64 >= frozen_at + 30
        })
        .await;
    world
        .until("the new instance checkpoints", |w| {
            w.committed()
                .is_some_and(|(e, s)| e == new_epoch && s.0 > frozen_at)
        })
        .await;
    // The old instance is frozen and no longer the owner: it exits without saving.
    assert_eq!(old.shutdown().await, Exit::NotOwner);
    let exit = new.shutdown().await;
    assert!(
        matches!(exit, Exit::Saved { sequence: Some(_) }),
        "{exit:?}"
    );
    assert_contiguous(&world);
    let messages = world.publisher.messages_of(&world.processor);
    assert!(
        messages
            .iter()
            .all(|m| (m.sequence.0 <= frozen_at) == (m.epoch == old_epoch))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_saves_and_a_restart_restores() {
    let world = World::new("restarter").await;
    let first = world.claim(true).await;
    let running = world.start(first, LaunchMode::Restore).await;
    world
        .until("some output", |w| w.sequences().len() >= 25)
        .await;
    let exit = running.shutdown().await;
    let published = world.sequences().len() as u64;
    assert_eq!(
        exit,
        Exit::Saved {
            sequence: Some(Sequence(published))
        }
    );
    assert_eq!(world.committed(), Some((first, Sequence(published))));

    // Restart (a failover after the lease ran out) from what the shutdown saved.
    tokio::time::sleep(LEASE + Duration::from_millis(50)).await;
    let second = world.claim(true).await;
    assert_eq!(second, Epoch(first.0 + 1));
    let running = world.start(second, LaunchMode::Restore).await;
    world
        .until("the count continues", |w| {
            w.sequences().len() as u64 >= published + 25
        })
        .await;
    let exit = running.shutdown().await;
    assert!(
        matches!(exit, Exit::Saved { sequence: Some(_) }),
        "{exit:?}"
    );
    assert_contiguous(&world);
}

/// Sums without publishing: its state changes step by step, its output never.
struct Silent;

#[async_trait::async_trait]
impl dory_runtime::Processor for Silent {
    type State = u64;

    async fn step(
        &mut self,
        sum: &mut u64,
        _ctx: &mut dory_runtime::Context,
    ) -> Result<(), dory_runtime::StepError> {
        *sum += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(())
    }
}

/// A state that changes without output is checkpointed too (each step is a new version), and
/// a restart continues from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_without_output_is_checkpointed() {
    let world = World::new("silent").await;
    let epoch = world.claim(true).await;
    let settings = || {
        dory_runtime::Settings::default()
            .with_bind_host("127.0.0.1")
            .with_retry(Duration::from_millis(20))
    };
    let run = |epoch| {
        let env = world.env(epoch, dory_core::LaunchMode::Restore);
        let store: std::sync::Arc<dyn dory_core::StateStore> =
            std::sync::Arc::new(world.store.clone());
        let publisher: std::sync::Arc<dyn dory_core::Publisher> =
            std::sync::Arc::new(world.publisher.clone());
        async move {
            let runtime = dory_runtime::Runtime::bind(
                env,
                Silent,
                store,
                publisher,
                None::<std::sync::Arc<dyn dory_core::Input>>,
                settings(),
            )
            .await
            .unwrap();
            runtime
                .run_until(tokio::time::sleep(Duration::from_millis(400)))
                .await
                .unwrap()
        }
    };
    let exit = run(epoch).await;
    let Exit::Saved {
        sequence: Some(saved),
    } = exit
    else {
        panic!("the final state is saved: {exit:?}");
    };
    assert!(saved.0 > 10, "one version per step: {saved:?}");
    assert!(world.sequences().is_empty(), "it never published");
    let latest = world
        .store
        .latest(&world.processor)
        .await
        .unwrap()
        .expect("a checkpoint without output");
    assert_eq!(latest.meta.sequence, saved);

    // A restart of the owner restores it and goes on from there.
    let exit = run(epoch).await;
    let Exit::Saved {
        sequence: Some(again),
    } = exit
    else {
        panic!("saved again: {exit:?}");
    };
    assert!(again > saved, "{again:?} continues {saved:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_snapshots_are_pruned() {
    let world = World::new("pruned").await;
    let epoch = world.claim(true).await;
    let running = world.start(epoch, LaunchMode::Restore).await;
    let keep = dory_runtime::Settings::default().keep_snapshots;
    // The first committed checkpoint prunes, then every PRUNE_EVERY-th: by the one after
    // that, the store must have been cut back to `keep` at least once since it grew past it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut grew = false;
    loop {
        let stored = world.store.history(&world.processor).await.unwrap().len();
        grew |= stored > keep;
        if grew && stored <= keep {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never pruned back to {keep} snapshots (now {stored}, grew past it: {grew})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(running.shutdown().await, Exit::Saved { .. }));
}
