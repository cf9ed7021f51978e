use std::time::Duration;

use dory_core::testing::config_intent_suite;
use dory_core::{ConfigSource, Intent, NodeId, ProcessorSpec};
use dory_mock::MemoryConfig;

use crate::pid;

#[tokio::test(start_paused = true)]
async fn memory_config_records_intents() {
    let config = MemoryConfig::with_processors([ProcessorSpec::new(pid("pinned"))]);
    config_intent_suite(&config, Some(&pid("pinned"))).await;
    assert_eq!(config.intents().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn invalid_specs_are_reported_not_dropped() {
    let mut broken = ProcessorSpec::new(pid("broken"));
    broken.checkpoint_interval = Duration::ZERO;
    let config = MemoryConfig::with_processors([
        ProcessorSpec::new(pid("zeta")),
        broken,
        ProcessorSpec::new(pid("alpha")),
    ]);
    config.add_invalid("Not_An_Id", "field `id` contains '_'");

    let desired = config.desired().await.unwrap();
    let ids: Vec<_> = desired.processors.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["alpha", "zeta"]);
    let invalid: Vec<_> = desired.invalid.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(invalid, ["Not_An_Id", "broken"]);
    assert!(
        desired.invalid[1].error.contains("checkpoint_interval"),
        "{:?}",
        desired.invalid[1]
    );

    assert!(config.remove_invalid("Not_An_Id"));
    assert!(config.remove_processor(&pid("broken")));
    assert!(config.desired_now().invalid.is_empty());
}

#[tokio::test(start_paused = true)]
async fn every_edit_nudges_subscribers() {
    let config = MemoryConfig::new();
    let mut changes = config.changes();
    let edits: [&dyn Fn(); 4] = [
        &|| config.set_processors([ProcessorSpec::new(pid("a"))]),
        &|| config.upsert_processor(ProcessorSpec::new(pid("b"))),
        &|| config.add_invalid("x", "bad"),
        &|| {
            config.remove_processor(&pid("a"));
        },
    ];
    for edit in edits {
        edit();
        tokio::time::timeout(Duration::from_secs(1), changes.changed())
            .await
            .expect("a nudge after an edit");
    }
}

#[tokio::test(start_paused = true)]
async fn pinning_an_unknown_processor_is_not_found() {
    let config = MemoryConfig::new();
    let pin = Intent::Pin {
        processor: pid("ghost"),
        node: Some(NodeId::new("n1")),
    };
    let err = config.record_intent(&pin).await.unwrap_err();
    assert!(
        matches!(&err, dory_core::Error::NotFound(m) if m.contains("ghost")),
        "{err}"
    );
    assert!(config.intents().is_empty());
}
