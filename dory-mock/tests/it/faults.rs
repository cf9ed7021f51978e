use std::sync::Arc;
use std::time::Duration;

use dory_core::testing::publisher_suite;
use dory_core::{ConfigSource, Error, Leadership, Publisher, StateStore, StatusSink};
use dory_mock::{
    FaultSwitch, Faulty, FaultyConfig, FaultyLeadership, FaultyPublisher, FaultyStatus,
    FaultyStore, MemoryConfig, MemoryLeadership, MemoryPublisher, MemoryStatus, MemoryStore,
};

use crate::{msg, pid, store};

#[tokio::test(start_paused = true)]
async fn an_outage_fails_every_call_without_reaching_the_backend() {
    let store = store();
    let switch = FaultSwitch::new();
    let faulty = FaultyStore::new(store.clone(), switch.clone());
    let leader = FaultyLeadership::new(MemoryLeadership::new(&store), switch.clone());
    let config = FaultyConfig::new(MemoryConfig::new(), switch.clone());
    let term = leader.acquire().await.unwrap();

    switch.set_outage(true);
    assert!(switch.outage());
    let err = faulty.claim_epoch(&pid("p"), term).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("claim_epoch of p") && m.contains("outage")),
        "{err}"
    );
    assert_eq!(
        store.ownership_now(&pid("p")),
        None,
        "the call did not reach the store"
    );
    assert!(faulty.ownerships().await.unwrap_err().is_retryable());
    assert!(leader.check(term).await.unwrap_err().is_retryable());
    assert!(config.desired().await.unwrap_err().is_retryable());

    switch.set_outage(false);
    faulty.claim_epoch(&pid("p"), term).await.unwrap();
    assert_eq!(switch.injected(), 4);
}

#[tokio::test(start_paused = true)]
async fn fail_next_fails_that_many_calls() {
    let status = MemoryStatus::new();
    let switch = FaultSwitch::new();
    let faulty = FaultyStatus::new(status, switch.clone());
    switch.fail_next(2);
    assert!(faulty.read().await.is_err());
    assert!(faulty.read().await.is_err());
    assert!(faulty.read().await.is_ok());
    assert_eq!((switch.calls(), switch.injected()), (3, 2));
}

#[tokio::test(start_paused = true)]
async fn a_lost_reply_reports_failure_for_a_call_that_took_effect() {
    let publisher = MemoryPublisher::new();
    let switch = FaultSwitch::new();
    let faulty = FaultyPublisher::new(publisher.clone(), switch.clone());
    switch.lose_next_replies(1);
    let err = faulty.publish(msg("p", 1, 1, "x")).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("reply lost") && m.contains("p:1:1")),
        "{err}"
    );
    assert_eq!(publisher.len(), 1, "the message was published all the same");
    // A retry duplicates it under the same id, which the consumers' rule removes.
    faulty.publish(msg("p", 1, 1, "x")).await.unwrap();
    assert_eq!((publisher.len(), publisher.deduplicated().len()), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_failing_call_that_is_refused_loses_no_reply() {
    let switch = FaultSwitch::new();
    let faulty = FaultyPublisher::new(MemoryPublisher::new(), switch.clone());
    switch.fail_next(1);
    switch.lose_next_replies(1);
    assert!(faulty.publish(msg("p", 1, 1, "x")).await.is_err());
    assert_eq!(faulty.inner().len(), 0);
    assert!(
        faulty.publish(msg("p", 1, 1, "x")).await.is_err(),
        "the lost reply is still planned"
    );
    assert_eq!(faulty.inner().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn latency_runs_on_tokio_time() {
    let switch = FaultSwitch::new();
    let faulty = FaultyPublisher::new(MemoryPublisher::new(), switch.clone());
    switch.set_latency(Duration::from_millis(250));
    assert_eq!(switch.latency(), Duration::from_millis(250));
    let start = tokio::time::Instant::now();
    publisher_suite(&faulty, faulty.inner()).await;
    // The suite makes 42 calls (40 publishes and 2 flushes), two streams of them concurrently.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250 * 21) && elapsed < Duration::from_millis(250 * 30),
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_outage_that_begins_during_the_latency_hits_the_call() {
    let switch = FaultSwitch::new();
    let faulty = FaultyStatus::new(MemoryStatus::new(), switch.clone());
    switch.set_latency(Duration::from_secs(1));
    let (read, ()) = tokio::join!(faulty.read(), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        switch.set_outage(true);
    });
    assert!(read.is_err());
}

#[tokio::test(start_paused = true)]
async fn clear_turns_faults_off_and_keeps_counting() {
    let switch = FaultSwitch::new();
    let faulty = FaultyStatus::new(MemoryStatus::new(), switch.clone());
    switch.set_outage(true);
    switch.fail_next(3);
    switch.set_latency(Duration::from_secs(1));
    assert!(faulty.read().await.is_err());
    switch.clear();
    assert!(faulty.read().await.is_ok());
    assert_eq!(
        (switch.calls(), switch.injected(), switch.latency()),
        (2, 1, Duration::ZERO)
    );
}

#[test]
fn backends_and_wrappers_are_shareable_trait_objects() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<MemoryStore>();
    send_sync::<MemoryLeadership>();
    send_sync::<MemoryConfig>();
    send_sync::<MemoryStatus>();
    send_sync::<MemoryPublisher>();
    send_sync::<FaultSwitch>();
    send_sync::<Faulty<MemoryStore>>();

    let store = crate::store();
    let switch = FaultSwitch::new();
    let _: Arc<dyn StateStore> = Arc::new(FaultyStore::new(store.clone(), switch.clone()));
    let _: Arc<dyn Leadership> = Arc::new(FaultyLeadership::new(
        MemoryLeadership::new(&store),
        switch.clone(),
    ));
    let _: Arc<dyn ConfigSource> = Arc::new(FaultyConfig::new(MemoryConfig::new(), switch.clone()));
    let _: Arc<dyn StatusSink> = Arc::new(FaultyStatus::new(MemoryStatus::new(), switch.clone()));
    let _: Arc<dyn Publisher> = Arc::new(FaultyPublisher::new(MemoryPublisher::new(), switch));
}

#[test]
fn switch_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let switch = FaultSwitch::new();
    send(&switch.run("test", || "call".into(), async { Ok(()) }));
}
