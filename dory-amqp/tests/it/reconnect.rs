//! A lost channel is replaced and the unconfirmed message sent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dory_amqp::AmqpPublisher;
use dory_core::testing::unique_processor;
use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Sequence};
use lapin::ExchangeKind;

use crate::broker::{broker, output_message};
use crate::proxy::Proxy;

fn message(processor: &ProcessorId, sequence: u64) -> OutputMessage {
    OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(2),
        sequence: Sequence(sequence),
        routing_key: None,
        payload: sequence.to_string().into_bytes(),
    }
}

#[tokio::test]
async fn lost_channel_is_replaced_and_the_message_sent_again() {
    let Some(broker) = broker("lost_channel_is_replaced_and_the_message_sent_again").await else {
        return;
    };
    let broker = Arc::new(broker);
    let exchange = broker.exchange("reconnect", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange).with_reconnect(
        20,
        Duration::from_millis(50),
        Duration::from_millis(200),
    ))
    .await
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let p = unique_processor("reconnect");
    publisher
        .publish(message(&p, 1))
        .await
        .unwrap_or_else(|e| panic!("publish 1: {e}"));

    // Deleting the exchange makes the broker close the publishing channel on the next
    // publish (404), and makes reconnecting fail until the exchange is back.
    broker.delete_exchange(&exchange).await;
    let restore = {
        let broker = Arc::clone(&broker);
        let exchange = exchange.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            broker
                .declare_exchange(&exchange, ExchangeKind::Fanout)
                .await;
            broker.bind(&queue, &exchange, "").await;
        })
    };
    publisher
        .publish(message(&p, 2))
        .await
        .unwrap_or_else(|e| panic!("publish 2 across the lost channel: {e}"));
    restore
        .await
        .unwrap_or_else(|e| panic!("restore exchange: {e}"));
    publisher
        .publish(message(&p, 3))
        .await
        .unwrap_or_else(|e| panic!("publish 3 on the new channel: {e}"));

    let got: Vec<u64> = broker
        .drain(&queue)
        .await
        .iter()
        .map(|d| output_message(d).map(|m| m.sequence.0))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("read back: {e}"));
    assert_eq!(got, vec![1, 2, 3], "in order, none lost");
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    if let Ok(broker) = Arc::try_unwrap(broker) {
        broker.clean_up().await;
    }
}

#[tokio::test]
async fn without_reconnects_a_lost_channel_is_unavailable() {
    let Some(broker) = broker("without_reconnects_a_lost_channel_is_unavailable").await else {
        return;
    };
    let exchange = broker.exchange("noreconnect", ExchangeKind::Fanout).await;
    let _queue = broker.bound_queue(&exchange, "").await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange).with_reconnect(
        0,
        Duration::from_millis(10),
        Duration::from_millis(10),
    ))
    .await
    .unwrap_or_else(|e| panic!("connect: {e}"));
    broker.delete_exchange(&exchange).await;
    let p = unique_processor("noreconnect");
    let err = publisher
        .publish(message(&p, 1))
        .await
        .expect_err("publishing to a deleted exchange fails");
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        err.to_string().contains(&exchange),
        "names the exchange: {err}"
    );
    broker.clean_up().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_resends_every_unconfirmed_message() {
    let Some(broker) = broker("lost_connection_resends_every_unconfirmed_message").await else {
        return;
    };
    let exchange = broker.exchange("lostconn", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let proxy = Proxy::start(&broker.url).await;
    let mut config = broker.config(&exchange).with_reconnect(
        20,
        Duration::from_millis(20),
        Duration::from_millis(200),
    );
    config.url = proxy.url.clone();
    let publisher = Arc::new(
        AmqpPublisher::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy: {e}")),
    );

    // Many processors publish sequences at once; the connection is cut three times while
    // messages are unconfirmed (with ten publishing, some always are).
    const PROCESSORS: usize = 10;
    const EACH: u64 = 100;
    let confirmed = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut processors = Vec::new();
    for _ in 0..PROCESSORS {
        let p = unique_processor("lostconn");
        processors.push(p.clone());
        let publisher = Arc::clone(&publisher);
        let confirmed = Arc::clone(&confirmed);
        tasks.spawn(async move {
            for s in 1..=EACH {
                publisher
                    .publish(message(&p, s))
                    .await
                    .unwrap_or_else(|e| panic!("publish {p} #{s} across a lost connection: {e}"));
                confirmed.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    for at in [100, 400, 700] {
        while confirmed.load(Ordering::SeqCst) < at {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        proxy.cut();
    }
    while let Some(joined) = tasks.join_next().await {
        joined.unwrap_or_else(|e| panic!("publish task: {e}"));
    }
    publisher
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert!(
        publisher.reconnects() >= 1,
        "the publisher noticed the cut connections"
    );

    let mut got: Vec<(String, u64)> = Vec::new();
    for delivery in broker.drain(&queue).await {
        let m = output_message(&delivery).unwrap_or_else(|e| panic!("read back: {e}"));
        got.push((m.processor.to_string(), m.sequence.0));
    }
    for p in &processors {
        let sequences: Vec<u64> = got
            .iter()
            .filter(|(q, _)| q == p.as_str())
            .map(|(_, s)| *s)
            .collect();
        // At least once, in order: duplicates only repeat what came before.
        let mut highest = 0;
        for &s in &sequences {
            assert!(
                s <= highest + 1,
                "{p}: #{s} overtook #{} ({sequences:?})",
                highest + 1
            );
            highest = highest.max(s);
        }
        assert_eq!(highest, EACH, "{p}: every message arrived ({sequences:?})");
    }
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    drop(proxy);
    broker.clean_up().await;
}
