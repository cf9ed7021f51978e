use dory_core::testing::publisher_suite;
use dory_core::{Epoch, OutputMessage, Publisher, Sequence};
use dory_mock::{DedupStats, Deduplicator, MemoryPublisher, Offer};

use crate::{msg, pid};

#[tokio::test(start_paused = true)]
async fn memory_publisher_keeps_the_publisher_contract() {
    let publisher = MemoryPublisher::new();
    publisher_suite(&publisher, &publisher).await;
    assert_eq!(publisher.len(), 40);
}

#[tokio::test(start_paused = true)]
async fn memory_publisher_records_duplicates_as_published() {
    let publisher = MemoryPublisher::new();
    for m in [
        msg("a", 1, 1, "x"),
        msg("b", 1, 1, "y"),
        msg("a", 1, 1, "x"),
    ] {
        publisher.publish(m).await.unwrap();
    }
    assert_eq!(publisher.messages().len(), 3);
    assert_eq!(publisher.messages_of(&pid("a")).len(), 2);
    let dedup = publisher.deduplicated();
    assert_eq!(dedup.len(), 2);
    assert_eq!(dedup.stats().duplicate, 1);
}

#[test]
fn when_copies_differ_the_higher_epoch_wins() {
    let mut dedup = Deduplicator::new();
    assert_eq!(dedup.offer(msg("p", 1, 1, "old")), Offer::New);
    assert_eq!(dedup.offer(msg("p", 1, 1, "old")), Offer::Duplicate);
    assert_eq!(dedup.offer(msg("p", 2, 1, "new")), Offer::Replaced);
    assert_eq!(dedup.offer(msg("p", 1, 1, "old")), Offer::Dropped);
    assert_eq!(dedup.offer(msg("p", 2, 1, "other")), Offer::Conflicting);
    // An identical copy from a later epoch (a replay after failover) is a duplicate; the kept
    // copy carries the later epoch.
    assert_eq!(dedup.offer(msg("p", 3, 1, "new")), Offer::Duplicate);
    let kept: Vec<_> = dedup.messages_of(&pid("p")).collect();
    assert_eq!(
        (kept.len(), kept[0].epoch, kept[0].payload.as_slice()),
        (1, Epoch(3), &b"new"[..])
    );
    let stats = dedup.stats();
    assert_eq!(
        stats,
        DedupStats {
            new: 1,
            duplicate: 2,
            replaced: 1,
            dropped: 1,
            conflicting: 1
        }
    );
    assert_eq!(stats.offered(), 6);
}

#[test]
fn kept_messages_are_ordered_by_processor_and_sequence() {
    let dedup: Deduplicator = [
        msg("b", 1, 2, "b2"),
        msg("a", 1, 3, "a3"),
        msg("b", 1, 1, "b1"),
        msg("a", 1, 1, "a1"),
        msg("ab", 1, 1, "x"),
    ]
    .into_iter()
    .collect();
    let ids: Vec<_> = dedup.messages().map(OutputMessage::message_id).collect();
    assert_eq!(ids, ["a:1:1", "a:1:3", "ab:1:1", "b:1:1", "b:1:2"]);
    assert_eq!(dedup.sequences_of(&pid("a")), [Sequence(1), Sequence(3)]);
    assert_eq!(dedup.sequences_of(&pid("c")), []);
    assert_eq!(dedup.into_messages().len(), 5);
}
