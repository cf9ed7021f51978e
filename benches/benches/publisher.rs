//! Confirmed publishing to RabbitMQ: Dory's `AmqpPublisher` beside a plain lapin loop doing the
//! same work in the same run, 1 KiB persistent, mandatory messages, each confirmed.
//!
//! `cargo bench -p dory-benches --bench publisher` publishes a fixed count of messages with at
//! most `W` unconfirmed at once (W = 100), then a smaller count waiting on each confirm
//! (W = 1), in interleaved rounds with the order alternating, and keeps each side's best
//! round: load from concurrent builds only ever adds time. It prints
//! `publisher 1KiB window=W: dory X msg/s, raw lapin Y msg/s, ratio Z` per window; the goal is
//! a ratio of at least 0.9.
//!
//! - Dory: one task per message in flight (a `JoinSet` holding at most `W`), each awaiting
//!   `Publisher::publish`, which resolves on the broker's confirm; the publisher's window is
//!   `W` too. At W = 1 each publish is awaited in line, as the processor runtime does.
//! - Raw lapin: one channel in confirm mode; `basic_publish` (persistent, mandatory), keeping at
//!   most `W` confirm futures and awaiting the oldest before the next publish.
//!
//! Both publish to one durable queue bound to a direct exchange declared for this run (both
//! deleted at the end); the queue is purged between runs, and each purge must find exactly
//! the messages just published. The broker is `DORY_TEST_AMQP_URL` (default: a local RabbitMQ
//! with the guest user); when it cannot be reached the bench prints a skip line and exits 0.
//! Without `--bench` (as under `cargo test --benches`) it runs one tiny round as a smoke test.

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dory_amqp::{AmqpConfig, AmqpPublisher};
use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Sequence};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::task::JoinSet;

type BoxError = Box<dyn StdError + Send + Sync>;
type Result<T> = std::result::Result<T, BoxError>;

const ROUTING_KEY: &str = "bench";
const PAYLOAD: usize = 1024;
/// AMQP delivery mode 2: persistent, as Dory publishes.
const PERSISTENT: u8 = 2;

/// One measured configuration: the window, how many messages per run, how many rounds.
struct Plan {
    window: usize,
    count: usize,
    rounds: usize,
}

fn plans(full: bool) -> Vec<Plan> {
    if full {
        vec![
            Plan {
                window: 100,
                count: 20_000,
                rounds: 5,
            },
            Plan {
                window: 1,
                count: 1_000,
                rounds: 5,
            },
        ]
    } else {
        vec![
            Plan {
                window: 100,
                count: 200,
                rounds: 1,
            },
            Plan {
                window: 1,
                count: 20,
                rounds: 1,
            },
        ]
    }
}

fn main() {
    dory_benches::run_server_bench("publisher", run);
}

/// The bench's own connection: declares the topology, runs the raw loop and cleans up.
struct Setup {
    connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
}

async fn run(full: bool) -> Result<()> {
    // Unlike a test, the bench skips under `CI=true` too.
    let (url, connection, channel) = match dory_amqp::testing::try_connect().await {
        Ok(broker) => broker,
        Err(unreachable) => {
            println!("SKIP publisher bench: {unreachable}; set DORY_TEST_AMQP_URL");
            return Ok(());
        }
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let suffix = format!("{}-{nanos}", std::process::id());
    let setup = Setup {
        connection,
        channel,
        exchange: format!("dory-bench-x-{suffix}"),
        queue: format!("dory-bench-q-{suffix}"),
    };
    let result = measure(&setup, &url, full).await;
    // Clean up whatever happened: the queue and exchange exist for this run only.
    let _ = setup
        .channel
        .queue_delete(setup.queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = setup
        .channel
        .exchange_delete(
            setup.exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = setup.connection.close(200, "bench done".into()).await;
    result
}

async fn measure(setup: &Setup, url: &str, full: bool) -> Result<()> {
    let ch = &setup.channel;
    ch.exchange_declare(
        setup.exchange.as_str().into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        setup.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        setup.queue.as_str().into(),
        setup.exchange.as_str().into(),
        ROUTING_KEY.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;

    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i * 31 % 251) as u8).collect();
    let processor = ProcessorId::new("bench-publisher")?;
    let mut sequence = 0u64;
    for plan in plans(full) {
        let config = AmqpConfig::new(url, setup.exchange.as_str())
            .with_routing_key(ROUTING_KEY)
            .with_window(plan.window)
            .with_connect_timeout(Duration::from_secs(5));
        let publisher = Arc::new(AmqpPublisher::connect(config).await?);
        let (mut dory_best, mut raw_best) = (Duration::MAX, Duration::MAX);
        let (mut dory_all, mut raw_all) = (Vec::new(), Vec::new());
        for round in 0..plan.rounds {
            // Alternate which side goes first, so neither always follows a purge.
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let took = dory_run(
                        &publisher,
                        &processor,
                        sequence,
                        plan.count,
                        plan.window,
                        &payload,
                    )
                    .await?;
                    sequence += plan.count as u64;
                    dory_all.push(took);
                    dory_best = dory_best.min(took);
                } else {
                    let took = raw_run(setup, plan.count, plan.window, &payload).await?;
                    raw_all.push(took);
                    raw_best = raw_best.min(took);
                }
                let purged = ch
                    .queue_purge(setup.queue.as_str().into(), QueuePurgeOptions::default())
                    .await?;
                if purged as usize != plan.count {
                    return Err(format!(
                        "{} run published {} messages but the queue held {purged}",
                        ["dory", "raw"][side],
                        plan.count
                    )
                    .into());
                }
            }
        }
        publisher.close().await?;
        let rate = |d: Duration| plan.count as f64 / d.as_secs_f64();
        let rates = |all: &[Duration]| {
            all.iter()
                .map(|d| format!("{:.0}", rate(*d)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "publisher 1KiB window={}: dory {:.0} msg/s, raw lapin {:.0} msg/s, ratio {:.3} \
             ({} messages, best of {} rounds; dory rounds: {}; raw rounds: {})",
            plan.window,
            rate(dory_best),
            rate(raw_best),
            raw_best.as_secs_f64() / dory_best.as_secs_f64(),
            plan.count,
            plan.rounds,
            rates(&dory_all),
            rates(&raw_all),
        );
    }
    Ok(())
}

/// Publishes `count` messages through Dory's publisher, at most `window` in flight, and waits
/// for every confirm.
async fn dory_run(
    publisher: &Arc<AmqpPublisher>,
    processor: &ProcessorId,
    first: u64,
    count: usize,
    window: usize,
    payload: &[u8],
) -> Result<Duration> {
    let message = |i: usize| OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(1),
        sequence: Sequence(first + i as u64 + 1),
        routing_key: None,
        payload: payload.to_vec(),
    };
    if window == 1 {
        // Waiting on each, as the processor runtime publishes: awaited in line, no task.
        let started = Instant::now();
        for i in 0..count {
            publisher.publish(message(i)).await?;
        }
        return Ok(started.elapsed());
    }
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..count {
        if tasks.len() >= window
            && let Some(done) = tasks.join_next().await
        {
            done??;
        }
        let message = message(i);
        let publisher = Arc::clone(publisher);
        tasks.spawn(async move { publisher.publish(message).await });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(started.elapsed())
}

/// Publishes `count` messages on the bench's confirm-mode channel, at most `window`
/// unconfirmed, awaiting the oldest confirm before the next publish.
async fn raw_run(setup: &Setup, count: usize, window: usize, payload: &[u8]) -> Result<Duration> {
    let properties = BasicProperties::default().with_delivery_mode(PERSISTENT);
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut pending = VecDeque::with_capacity(window);
    let started = Instant::now();
    for _ in 0..count {
        if pending.len() >= window
            && let Some(confirm) = pending.pop_front()
        {
            confirmed(confirm.await?)?;
        }
        let confirm = setup
            .channel
            .basic_publish(
                setup.exchange.as_str().into(),
                ROUTING_KEY.into(),
                options,
                payload,
                properties.clone(),
            )
            .await?;
        pending.push_back(confirm);
    }
    while let Some(confirm) = pending.pop_front() {
        confirmed(confirm.await?)?;
    }
    Ok(started.elapsed())
}

fn confirmed(confirmation: Confirmation) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        other => Err(format!("raw publish not confirmed: {other:?}").into()),
    }
}
