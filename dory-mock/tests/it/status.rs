use dory_core::testing::status_sink_suite;
use dory_core::{ProcessorStatus, StatusSink};
use dory_mock::{FaultSwitch, FaultyStatus, MemoryStatus};

#[tokio::test(start_paused = true)]
async fn memory_status_keeps_the_status_contract() {
    let status = MemoryStatus::new();
    status_sink_suite(&status).await;
    assert!(status.all().is_empty(), "the suite cleans up after itself");
}

#[tokio::test(start_paused = true)]
async fn a_status_outage_writes_nothing() {
    let status = MemoryStatus::new();
    let switch = FaultSwitch::new();
    let faulty = FaultyStatus::new(status.clone(), switch.clone());
    switch.set_outage(true);
    let row = ProcessorStatus {
        processor: "p".into(),
        phase: "running".into(),
        ..Default::default()
    };
    assert!(
        faulty
            .upsert(std::slice::from_ref(&row))
            .await
            .unwrap_err()
            .is_retryable()
    );
    assert!(status.all().is_empty());
    switch.set_outage(false);
    faulty.upsert(std::slice::from_ref(&row)).await.unwrap();
    assert_eq!(status.get("p"), Some(row));
}
