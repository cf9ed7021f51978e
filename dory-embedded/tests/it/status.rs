//! The status sink: the shared suite, and the columns users query.

use dory_core::testing::{status_sink_suite, unique_name};
use dory_core::{Epoch, NodeId, ProcessorStatus, Site, StatusSink, Timestamp};
use dory_embedded::EmbeddedStatus;

use crate::test_db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_sink_suite_passes() {
    let t = test_db().await;
    status_sink_suite(&EmbeddedStatus::new(&t.db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_columns_can_be_queried() {
    let t = test_db().await;
    let sink = EmbeddedStatus::new(&t.db);
    let id = unique_name("cols");
    sink.upsert(&[ProcessorStatus {
        processor: id.clone(),
        phase: "failed".into(),
        node: Some(NodeId::new("node-7")),
        site: Some(Site::Cloud),
        epoch: Some(Epoch(3)),
        last_error: Some("exited(1)".into()),
        updated_at: Timestamp(1_700_000_000_123),
        ..ProcessorStatus::default()
    }])
    .await
    .expect("upsert");
    type Row = (
        String,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
        i64,
    );
    let row: Row = sqlx::query_as(
        "SELECT phase, node, site, epoch, last_error, updated_at FROM status WHERE processor = ?1",
    )
    .bind(&id)
    .fetch_one(t.db.pool())
    .await
    .expect("select");
    assert_eq!(
        row,
        (
            "failed".to_string(),
            Some("node-7".to_string()),
            Some("cloud".to_string()),
            Some(3),
            Some("exited(1)".to_string()),
            1_700_000_000_123
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_body_is_an_error_naming_the_row() {
    let t = test_db().await;
    let sink = EmbeddedStatus::new(&t.db);
    sqlx::query(
        "INSERT INTO status (processor, phase, updated_at, body) \
         VALUES ('edited', 'running', 0, '{\"phase\": 7}')",
    )
    .execute(t.db.pool())
    .await
    .expect("insert");
    let err = sink.read().await.expect_err("a body that does not parse");
    assert!(matches!(err, dory_core::Error::Invalid(_)), "{err}");
    assert!(err.to_string().contains("\"edited\""), "{err}");
}
