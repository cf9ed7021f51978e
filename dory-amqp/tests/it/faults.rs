//! The publisher under broker faults, on a private node: a numbered stream published while
//! the broker closes every connection, and while its app restarts, reaches a consumer whole —
//! every sequence number at least once, nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dory_amqp::{AmqpConfig, AmqpInput, AmqpInputConfig, AmqpPublisher};
use dory_core::testing::unique_processor;
use dory_core::{Epoch, Input, OutputMessage, Publisher, Sequence};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};

use crate::broker::output_message;
use crate::input::{Folded, numbered};
use crate::node::PrivateNode;

/// Messages published before each fault and after the last.
const STRETCH: u64 = 500;
/// Publishing tasks, each awaiting its publishes in line, so several are unconfirmed at once.
const PUBLISHERS: u64 = 4;
const EXCHANGE: &str = "dory-faults";
const QUEUE: &str = "dory-faults-q";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_closed_connections() {
    let Some(node) = PrivateNode::start("stream_survives_closed_connections") else {
        return;
    };
    stream_through_faults(node, 3, |node, _| node.close_all_connections()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_app_restart() {
    let Some(node) = PrivateNode::start("stream_survives_app_restart") else {
        return;
    };
    stream_through_faults(node, 2, |node, _| {
        node.restart_app(Duration::from_millis(500));
    })
    .await;
}

/// Publishes a numbered stream, injecting `fault` `faults` times with [`STRETCH`] messages
/// before each and after the last, then reads the queue back with a fresh connection.
async fn stream_through_faults(
    node: PrivateNode,
    faults: u64,
    fault: impl Fn(&PrivateNode, u64) + Send + Sync + 'static,
) {
    declare_durable_topology(&node.url).await;
    let config = AmqpConfig::new(node.url.clone(), EXCHANGE)
        .with_window(64)
        .with_connect_timeout(Duration::from_secs(5))
        .with_reconnect(60, Duration::from_millis(50), Duration::from_millis(500));
    let publisher = Arc::new(
        AmqpPublisher::connect(config)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}")),
    );
    let processor = unique_processor("faults");
    let published = Arc::new(AtomicU64::new(0));
    let node = Arc::new(node);

    let stop = Arc::new(AtomicBool::new(false));

    // Each fault lands while the stream is flowing, and the stream goes on long enough after
    // it to need the reconnect.
    let injector = {
        let node = Arc::clone(&node);
        let published = Arc::clone(&published);
        let stop = Arc::clone(&stop);
        tokio::task::spawn_blocking(move || {
            let wait_for = |count: u64| {
                while published.load(Ordering::Relaxed) < count {
                    std::thread::sleep(Duration::from_millis(2));
                }
            };
            for i in 0..faults {
                wait_for(published.load(Ordering::Relaxed) + STRETCH);
                fault(&node, i);
            }
            wait_for(published.load(Ordering::Relaxed) + STRETCH);
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..PUBLISHERS {
        let publisher = Arc::clone(&publisher);
        let published = Arc::clone(&published);
        let stop = Arc::clone(&stop);
        let processor = processor.clone();
        tasks.spawn(async move {
            let mut sent = Vec::new();
            let mut sequence = lane + 1;
            while !stop.load(Ordering::Relaxed) {
                let message = OutputMessage {
                    processor: processor.clone(),
                    epoch: Epoch(3),
                    sequence: Sequence(sequence),
                    routing_key: None,
                    payload: sequence.to_string().into_bytes(),
                };
                publisher
                    .publish(message)
                    .await
                    .unwrap_or_else(|e| panic!("publish {sequence}: {e}"));
                published.fetch_add(1, Ordering::Relaxed);
                sent.push(sequence);
                sequence += PUBLISHERS;
            }
            sent
        });
    }
    let mut sent = BTreeSet::new();
    while let Some(done) = tasks.join_next().await {
        sent.extend(done.unwrap_or_else(|e| panic!("publishing task: {e}")));
    }
    injector
        .await
        .unwrap_or_else(|e| panic!("fault injector: {e}"));
    publisher
        .flush()
        .await
        .unwrap_or_else(|e| panic!("flush: {e}"));
    assert!(
        publisher.reconnects() >= faults,
        "{} reconnects for {faults} faults: a fault missed the publisher",
        publisher.reconnects()
    );

    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for delivery in drain_queue(&node.url).await {
        let message = output_message(&delivery).unwrap_or_else(|e| panic!("delivery: {e}"));
        assert_eq!(
            message.processor, processor,
            "a message of another processor"
        );
        assert_eq!(message.epoch, Epoch(3));
        assert_eq!(
            message.payload,
            message.sequence.0.to_string().into_bytes(),
            "body of sequence {}",
            message.sequence.0
        );
        *seen.entry(message.sequence.0).or_default() += 1;
    }
    let missing: Vec<u64> = sent
        .iter()
        .copied()
        .filter(|s| !seen.contains_key(s))
        .collect();
    assert!(missing.is_empty(), "sequences never delivered: {missing:?}");
    let foreign: Vec<u64> = seen.keys().copied().filter(|s| !sent.contains(s)).collect();
    assert!(foreign.is_empty(), "sequences never published: {foreign:?}");
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} sequences delivered, {duplicates} more than once, {} reconnects",
        sent.len(),
        publisher.reconnects()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_survives_closed_connections_and_app_restart() {
    let Some(node) = PrivateNode::start("input_survives_closed_connections_and_app_restart") else {
        return;
    };
    const LAST: u64 = 3_000;
    const CHECKPOINT_EVERY: u64 = 50;
    const PREFETCH: u16 = 100;
    declare_durable_topology(&node.url).await;
    let publisher = AmqpPublisher::connect(AmqpConfig::new(node.url.clone(), EXCHANGE))
        .await
        .unwrap_or_else(|e| panic!("connect publisher: {e}"));
    let processor = unique_processor("faults-input");
    for sequence in 1..=LAST {
        publisher
            .publish(numbered(&processor, sequence))
            .await
            .unwrap_or_else(|e| panic!("publish {sequence}: {e}"));
    }
    let _ = publisher.close().await;

    let broker = AmqpConfig::new(node.url.clone(), "")
        .with_connect_timeout(Duration::from_secs(5))
        .with_reconnect(60, Duration::from_millis(50), Duration::from_millis(500));
    let input = AmqpInput::connect(
        AmqpInputConfig::new(broker, QUEUE, Duration::from_secs(5)).with_prefetch(PREFETCH),
    )
    .await
    .unwrap_or_else(|e| panic!("connect input: {e}"));
    let node = Arc::new(node);
    let mut state = Folded::default();
    let mut committed = Folded::default();
    let mut failed_releases = 0;
    let mut folded = 0u64;
    // Each fault lands while messages are delivered and not yet released, between two
    // checkpoints.
    let faults: [(u64, Fault); 3] = [
        (LAST / 4 + 7, PrivateNode::close_all_connections),
        (LAST / 2 + 7, |node| {
            node.restart_app(Duration::from_millis(500))
        }),
        (3 * LAST / 4 + 7, PrivateNode::close_all_connections),
    ];
    while committed.counts.len() as u64 != LAST {
        let message = tokio::time::timeout(Duration::from_secs(60), input.next())
            .await
            .unwrap_or_else(|_| panic!("no input within 60s; folded {folded}"))
            .unwrap_or_else(|e| panic!("next: {e}"));
        if state.fold(&message) != dory_core::Admission::Duplicate {
            folded += 1;
        }
        if let Some((_, fault)) = faults.iter().find(|(at, _)| *at == folded) {
            let node = Arc::clone(&node);
            let fault = *fault;
            tokio::task::spawn_blocking(move || fault(&node))
                .await
                .unwrap_or_else(|e| panic!("fault: {e}"));
            folded += 1; // once per fault, however many duplicates follow
        }
        // Duplicates count against the prefetch until released: a full prefetch checkpoints.
        if folded.is_multiple_of(CHECKPOINT_EVERY)
            || input.unreleased() >= usize::from(PREFETCH)
            || state.counts.len() as u64 == LAST
        {
            committed = state.clone();
            if let Err(e) = input.release(input.mark()).await {
                eprintln!("release failed (the messages come again): {e}");
                failed_releases += 1;
            }
        }
    }
    committed.assert_exactly_once(LAST);
    assert!(
        input.reconnects() >= 3,
        "{} reconnects for 3 faults: a fault missed the input",
        input.reconnects()
    );
    eprintln!(
        "{LAST} sequences folded exactly once through 3 faults; {} reconnects, {failed_releases} \
         failed releases",
        input.reconnects()
    );
    let _ = input.close().await;
}

/// A disruption of the private node.
type Fault = fn(&PrivateNode);

/// A durable fanout exchange and a durable queue: both must outlive an app restart.
async fn declare_durable_topology(url: &str) {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("connect to the private node: {e}"));
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("channel: {e}"));
    let durable = || ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare exchange: {e}"));
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue: {e}"));
    channel
        .queue_bind(
            QUEUE.into(),
            EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("bind queue: {e}"));
    let _ = connection.close(200, "declared".into()).await;
}

async fn drain_queue(url: &str) -> Vec<lapin::message::Delivery> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("reconnect to read back: {e}"));
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("channel: {e}"));
    let mut got = Vec::new();
    while let Some(m) = channel
        .basic_get(QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap_or_else(|e| panic!("get: {e}"))
    {
        got.push(m.delivery);
    }
    let _ = connection.close(200, "read back".into()).await;
    got
}
