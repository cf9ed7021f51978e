//! The [`StatusSink`] behaviour suite.

use super::unique_name;
use crate::backend::StatusSink;
use crate::model::{Epoch, FailoverReport, NodeId, ProcessorStatus, Sequence, Site, Timestamp};

/// Runs the status checks against `sink`:
///
/// - every field of a status survives a write and a read;
/// - [`read`](StatusSink::read) is sorted by processor id, whatever order rows were written in;
/// - [`upsert`](StatusSink::upsert) replaces a processor's status as a whole (fields set before
///   and absent now are cleared);
/// - [`remove`](StatusSink::remove) deletes the given processors and ignores unknown ids;
/// - empty upserts and removes succeed and change nothing.
///
/// Other rows already in the sink are left alone and ignored, except for the sort order.
pub async fn status_sink_suite(sink: &dyn StatusSink) {
    // Status rows are keyed by the id as written in the config, which need not be a valid
    // processor id; one of them is not.
    let base = unique_name("status");
    let ids = [
        format!("{base}-c"),
        format!("{base}-a"),
        format!("{base}-b_not-a-label"),
    ];
    let full = |id: &str| ProcessorStatus {
        processor: id.to_string(),
        phase: "running".into(),
        node: Some(NodeId::new("node-1")),
        site: Some(Site::Edge),
        epoch: Some(Epoch(7)),
        last_checkpoint: Some(Sequence(42)),
        last_checkpoint_at: Some(Timestamp(1_700_000_000_123)),
        last_move_at: Some(Timestamp(1_700_000_000_000)),
        last_move_pause_ms: Some(12),
        restarts: 3,
        recent_failures: vec![Timestamp(1_699_999_999_000), Timestamp(1_700_000_000_001)],
        last_error: Some("instance e6 failed: exited(1)".into()),
        spec_revision: Some(0x1234_5678_9abc_def0),
        updated_at: Timestamp(1_700_000_000_200),
        last_failover: Some(FailoverReport {
            at: Timestamp(1_699_999_999_500),
            epoch: Epoch(7),
            lost_epoch: Some(Epoch(5)),
            lost_node: Some(NodeId::new("node-0")),
            lost_at: Some(Timestamp(1_699_999_990_000)),
            restored_sequence: Some(Sequence(40)),
            checkpoint_at: Some(Timestamp(1_699_999_989_700)),
            checkpoint_age_ms: Some(300),
        }),
    };
    let bare = |id: &str| ProcessorStatus {
        processor: id.to_string(),
        phase: "pending".into(),
        updated_at: Timestamp(1_700_000_000_300),
        ..ProcessorStatus::default()
    };

    sink.upsert(&[full(&ids[0]), bare(&ids[1])])
        .await
        .unwrap_or_else(|e| panic!("status: upsert {base}: {e}"));
    sink.upsert(&[full(&ids[2])])
        .await
        .unwrap_or_else(|e| panic!("status: upsert {base}: {e}"));
    let mut want = vec![full(&ids[0]), bare(&ids[1]), full(&ids[2])];
    want.sort_by(|a, b| a.processor.cmp(&b.processor));
    assert_eq!(
        ours(sink, &base).await,
        want,
        "status: rows of {base} after the first upserts"
    );

    // Replacing the full row by a bare one clears every field the bare one leaves unset.
    sink.upsert(&[bare(&ids[0]), full(&ids[1])])
        .await
        .unwrap_or_else(|e| panic!("status: upsert {base}: {e}"));
    let mut want = vec![bare(&ids[0]), full(&ids[1]), full(&ids[2])];
    want.sort_by(|a, b| a.processor.cmp(&b.processor));
    assert_eq!(
        ours(sink, &base).await,
        want,
        "status: upsert must replace each status as a whole"
    );

    let unknown = format!("{base}-never-written");
    sink.remove(&[ids[1].clone(), unknown])
        .await
        .unwrap_or_else(|e| panic!("status: remove {base}: {e}"));
    want.retain(|s| s.processor != ids[1]);
    assert_eq!(
        ours(sink, &base).await,
        want,
        "status: remove must delete the given rows and ignore unknown ids"
    );

    sink.upsert(&[])
        .await
        .unwrap_or_else(|e| panic!("status: empty upsert: {e}"));
    sink.remove(&[])
        .await
        .unwrap_or_else(|e| panic!("status: empty remove: {e}"));
    assert_eq!(
        ours(sink, &base).await,
        want,
        "status: empty upsert and remove must change nothing"
    );

    sink.remove(&ids)
        .await
        .unwrap_or_else(|e| panic!("status: remove {base}: {e}"));
    assert_eq!(
        ours(sink, &base).await,
        vec![],
        "status: rows of {base} after removing them all"
    );
}

/// The rows this run wrote, after checking the whole list is sorted.
async fn ours(sink: &dyn StatusSink, base: &str) -> Vec<ProcessorStatus> {
    let all = sink
        .read()
        .await
        .unwrap_or_else(|e| panic!("status: read: {e}"));
    for pair in all.windows(2) {
        assert!(
            pair[0].processor < pair[1].processor,
            "status: read must be sorted by processor id without repeats: {:?} before {:?}",
            pair[0].processor,
            pair[1].processor
        );
    }
    all.into_iter()
        .filter(|s| s.processor.starts_with(base))
        .collect()
}
