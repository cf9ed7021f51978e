//! The window of unconfirmed messages, and flush.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dory_amqp::AmqpPublisher;
use dory_core::testing::unique_processor;
use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Sequence};
use lapin::ExchangeKind;
use tokio::task::JoinSet;

use crate::broker::broker;

fn message(processor: &ProcessorId, sequence: u64) -> OutputMessage {
    OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(1),
        sequence: Sequence(sequence),
        routing_key: None,
        payload: vec![0u8; 64],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_bounds_unconfirmed_messages() {
    let Some(broker) = broker("window_bounds_unconfirmed_messages").await else {
        return;
    };
    let exchange = broker.exchange("window", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let publisher = Arc::new(
        AmqpPublisher::connect(broker.config(&exchange).with_window(8))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    );
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for n in 0..1_000u64 {
        let publisher = Arc::clone(&publisher);
        let done = Arc::clone(&done);
        // One processor per message: the window, not a processor's own ordering, is what
        // limits how many are in flight.
        let p = unique_processor("window");
        tasks.spawn(async move {
            publisher
                .publish(message(&p, n + 1))
                .await
                .unwrap_or_else(|e| panic!("publish {n}: {e}"));
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    // Watch the window from the side while the burst runs.
    let mut most = 0;
    while done.load(Ordering::SeqCst) < 1_000 {
        let now = publisher.in_flight();
        assert!(now <= 8, "{now} messages unconfirmed through a window of 8");
        most = most.max(now);
        tokio::task::yield_now().await;
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap_or_else(|e| panic!("publish task: {e}"));
    }
    assert!(
        most > 1,
        "publishes ran concurrently (most in flight: {most})"
    );
    assert_eq!(publisher.in_flight(), 0);
    assert_eq!(broker.count(&queue).await, 1_000, "every message arrived");
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}

#[tokio::test]
async fn flush_returns_once_the_burst_is_confirmed() {
    let Some(broker) = broker("flush_returns_once_the_burst_is_confirmed").await else {
        return;
    };
    let exchange = broker.exchange("flush", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let publisher = Arc::new(
        AmqpPublisher::connect(broker.config(&exchange))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    );
    let confirmed = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    const BURST: usize = 200;
    for n in 0..BURST as u64 {
        let publisher = Arc::clone(&publisher);
        let confirmed = Arc::clone(&confirmed);
        let p = unique_processor("flush");
        tasks.spawn(async move {
            publisher
                .publish(message(&p, n + 1))
                .await
                .unwrap_or_else(|e| panic!("publish {n}: {e}"));
            confirmed.fetch_add(1, Ordering::SeqCst);
        });
    }
    // On this single-threaded runtime a spawned publish, once polled, has taken its window
    // slot and holds it until it counted itself confirmed, with no await in between; so
    // `in_flight + confirmed` counts the publishes that have begun. Let them all begin.
    let started = || publisher.in_flight() + confirmed.load(Ordering::SeqCst);
    for _ in 0..10_000 {
        if started() == BURST {
            break;
        }
        tokio::task::yield_now().await;
    }
    let started = started();
    assert_eq!(started, BURST, "every publish of the burst has begun");
    publisher
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert_eq!(
        confirmed.load(Ordering::SeqCst),
        BURST,
        "flush returned before every publish of the burst was confirmed"
    );
    assert_eq!(broker.count(&queue).await, BURST as u32);
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap_or_else(|e| panic!("publish task: {e}"));
    }
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}
