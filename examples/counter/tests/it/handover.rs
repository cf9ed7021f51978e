//! A make-before-break move of the counter between two real processes, with the test as the
//! orchestrator: the count continues in RabbitMQ with no gap and no duplicate, the old
//! instance exits without saving and the new one saves its final state on SIGTERM.

use std::time::Duration;

use dory_control::HttpControl;
use dory_core::{
    Clock, Epoch, InstanceControl, LaunchMode, Leadership, Phase, ProcessorId, Sequence,
    StateStore, StoredSnapshot, SystemClock,
};
use dory_pg::PgLeadership;

use crate::eventually;
use crate::instance::{Launch, Running};
use crate::services::{broker, test_db};

const LEASE: Duration = Duration::from_secs(3);
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_continues_across_a_move_and_sigterm_saves() {
    let test = "count_continues_across_a_move_and_sigterm_saves";
    let Some(db) = test_db(test).await else {
        return;
    };
    let Some(broker) = broker(test).await else {
        return;
    };
    let store = &db.store;
    let queue = &broker;
    let processor = ProcessorId::new("counter").expect("valid id");
    let config = serde_json::json!({ "interval_ms": 5 });
    // The exchange is the publisher URL's; the routing key defaults to the processor id.
    let publisher_url = broker.publisher_url();
    let launch = |epoch, mode| Launch {
        processor: &processor,
        epoch,
        mode,
        store_url: &db.instance_url,
        publisher_url: &publisher_url,
        lease: LEASE,
        checkpoint_interval: CHECKPOINT_INTERVAL,
        config: config.clone(),
    };

    // The orchestrator's first start: lead, claim epoch 1, make it the owner, launch it.
    let leadership = PgLeadership::new(store, "counter-it");
    let term = tokio::time::timeout(WAIT, leadership.acquire())
        .await
        .expect("leadership within the deadline")
        .expect("acquire leadership");
    let first = store.claim_epoch(&processor, term).await.expect("claim 1");
    assert_eq!(first, Epoch(1));
    store
        .assign_owner(&processor, None, first, LEASE, term)
        .await
        .expect("assign epoch 1");
    let mut one = Running::start("instance-1", launch(first, LaunchMode::Restore)).await;
    eventually(
        "instance 1 to publish 20 counts",
        WAIT,
        move || async move { (queue.count().await >= 20).then_some(()) },
    )
    .await;

    // The move: a replacement in standby, freeze the old one, hand its snapshot over, commit,
    // resume the replacement.
    let control = HttpControl::new();
    let second = store.claim_epoch(&processor, term).await.expect("claim 2");
    assert_eq!(second, Epoch(2));
    let mut two = Running::start("instance-2", launch(second, LaunchMode::Standby)).await;
    let (ctl, standby) = (&control, &two.instance);
    eventually("instance 2 to stand by", WAIT, move || async move {
        let health = ctl.health(standby).await.ok()?;
        (health.phase == Phase::Standby).then_some(())
    })
    .await;
    let frozen = control
        .freeze(&one.instance, Duration::from_secs(5))
        .await
        .expect("freeze instance 1");
    let frozen_output = control
        .health(&one.instance)
        .await
        .expect("health of frozen instance 1");
    assert_eq!(frozen_output.phase, Phase::Frozen);
    let bytes = control.fetch(&one.instance).await.expect("fetch snapshot");
    control
        .load(&two.instance, &bytes)
        .await
        .expect("load into instance 2");
    let mut snapshot =
        StoredSnapshot::from_encoded(bytes, SystemClock.now()).expect("a valid snapshot");
    assert_eq!(snapshot.meta.sequence, frozen.sequence);
    // The header names the epoch that took it; the store files it as the new owner's first
    // checkpoint.
    snapshot.meta.epoch = second;
    store
        .commit_move(first, &snapshot, LEASE, term)
        .await
        .expect("commit the move");
    control
        .resume(&two.instance)
        .await
        .expect("resume instance 2");
    let moved_at = frozen_output.sequence.0;
    eventually(
        "instance 2 to publish 20 more counts",
        WAIT,
        move || async move { (u64::from(queue.count().await) >= moved_at + 20).then_some(()) },
    )
    .await;

    // Shutdown: both get SIGTERM; the old one is frozen and no longer the owner.
    one.terminate();
    two.terminate();
    let (status_one, exit_one) = one.exited(WAIT).await;
    let (status_two, exit_two) = two.exited(WAIT).await;
    assert!(status_one.success(), "instance 1: {status_one}");
    assert!(status_two.success(), "instance 2: {status_two}");
    assert_eq!(exit_one, "not-owner", "instance 1 exits without saving");
    let saved = exit_two
        .strip_prefix("saved sequence=")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("instance 2 saves on SIGTERM, said {exit_two:?}"));

    // The output: 1, 2, 3, ... with no gap and no duplicate, epoch 1 up to the move and
    // epoch 2 after it; each body is its sequence.
    let messages = broker.drain().await;
    assert!(
        messages.len() as u64 > moved_at,
        "{} messages, moved at {moved_at}",
        messages.len()
    );
    for (i, m) in messages.iter().enumerate() {
        let expected = i as u64 + 1;
        assert_eq!(
            m.sequence, expected,
            "sequence gap or duplicate at message {i}: {m:?}"
        );
        assert_eq!(m.body, expected.to_string(), "body of message {i}: {m:?}");
        let epoch = if expected <= moved_at { 1 } else { 2 };
        assert_eq!(
            m.epoch, epoch,
            "epoch of message {i} (moved at {moved_at}): {m:?}"
        );
    }

    // The store: epoch 2 owns the processor and its final checkpoint is the latest.
    let row = store
        .ownership(&processor)
        .await
        .expect("read ownership")
        .expect("an ownership row");
    assert_eq!(row.owner, Some(second));
    assert_eq!(row.committed, Some((second, Sequence(saved))));
    let latest = store
        .latest(&processor)
        .await
        .expect("read latest")
        .expect("a latest snapshot");
    assert_eq!(
        (latest.meta.epoch, latest.meta.sequence),
        (second, Sequence(saved))
    );
    assert!(
        saved > frozen.sequence.0,
        "instance 2 stepped after the move"
    );
    // Instance 1 wrote nothing after it froze: its checkpoints all precede the moved snapshot.
    for meta in store.history(&processor).await.expect("history") {
        if meta.epoch == first {
            assert!(
                meta.sequence <= frozen.sequence,
                "{meta:?} after the freeze"
            );
        }
    }

    leadership.resign(term).await.expect("resign");
    broker.clean_up().await;
}
