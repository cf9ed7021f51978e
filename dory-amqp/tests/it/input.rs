//! The input consumer: acknowledgements held until release, redelivery after a crash, the
//! position skipping what the state holds, pausing, and the settings it refuses.

use std::collections::BTreeMap;
use std::time::Duration;

use dory_amqp::{AmqpInput, AmqpInputConfig, AmqpPublisher, Error};
use dory_core::testing::unique_processor;
use dory_core::{Admission, Epoch, Input, InputPosition, OutputMessage, ProcessorId, Publisher};
use dory_core::{InputMark, Sequence};
use lapin::ExchangeKind;

use crate::broker::{Broker, broker};
use crate::proxy::Proxy;

/// A processor's state as the runtime keeps it: the input position beside what was folded in
/// (here, how often each sequence was).
#[derive(Clone, Debug, Default)]
pub(crate) struct Folded {
    pub(crate) position: InputPosition,
    pub(crate) counts: BTreeMap<u64, u32>,
}

impl Folded {
    /// Takes one message through the position, as the runtime does before user code sees it.
    pub(crate) fn fold(&mut self, message: &dory_core::InputMessage) -> Admission {
        let admission = self.position.admit(message);
        if admission != Admission::Duplicate {
            let origin = message.origin.as_ref().expect("test messages are numbered");
            *self.counts.entry(origin.sequence).or_default() += 1;
        }
        admission
    }

    /// Every sequence of `1..=last` folded in exactly once, and nothing else.
    pub(crate) fn assert_exactly_once(&self, last: u64) {
        let wrong: Vec<(u64, u32)> = self
            .counts
            .iter()
            .map(|(s, n)| (*s, *n))
            .filter(|(_, n)| *n != 1)
            .collect();
        assert!(
            wrong.is_empty(),
            "sequences folded in more than once: {wrong:?}"
        );
        let missing: Vec<u64> = (1..=last)
            .filter(|s| !self.counts.contains_key(s))
            .collect();
        assert!(missing.is_empty(), "sequences never folded in: {missing:?}");
        assert_eq!(self.counts.len() as u64, last, "sequences never published");
    }
}

pub(crate) fn numbered(processor: &ProcessorId, sequence: u64) -> OutputMessage {
    OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(1),
        sequence: Sequence(sequence),
        routing_key: None,
        payload: sequence.to_string().into_bytes(),
    }
}

async fn publish_range(
    publisher: &AmqpPublisher,
    processor: &ProcessorId,
    range: std::ops::RangeInclusive<u64>,
) {
    for sequence in range {
        publisher
            .publish(numbered(processor, sequence))
            .await
            .unwrap_or_else(|e| panic!("publish {sequence}: {e}"));
    }
}

/// A fanout exchange with a queue inputs can consume, a publisher to it and a processor name.
async fn pipeline(broker: &Broker, area: &str) -> (String, AmqpPublisher, ProcessorId) {
    let exchange = broker.exchange(area, ExchangeKind::Fanout).await;
    let queue = broker.shared_queue(&exchange).await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange))
        .await
        .unwrap_or_else(|e| panic!("connect publisher: {e}"));
    (queue, publisher, unique_processor(area))
}

fn input_config(broker: &Broker, queue: &str, prefetch: u16) -> AmqpInputConfig {
    AmqpInputConfig::new(broker.config(""), queue, Duration::from_secs(5)).with_prefetch(prefetch)
}

async fn next(input: &AmqpInput) -> dory_core::InputMessage {
    tokio::time::timeout(Duration::from_secs(10), input.next())
        .await
        .unwrap_or_else(|_| panic!("no input within 10s"))
        .unwrap_or_else(|e| panic!("next: {e}"))
}

fn sequence_of(message: &dory_core::InputMessage) -> u64 {
    message.origin.as_ref().expect("numbered").sequence
}

#[tokio::test]
async fn messages_are_acknowledged_only_when_released() {
    let Some(broker) = broker("messages_are_acknowledged_only_when_released").await else {
        return;
    };
    let (queue, publisher, processor) = pipeline(&broker, "input-ack").await;
    publish_range(&publisher, &processor, 1..=10).await;

    let input = AmqpInput::connect(input_config(&broker, &queue, 100))
        .await
        .unwrap_or_else(|e| panic!("connect input: {e}"));
    let mut marks = Vec::new();
    for expected in 1..=10 {
        let message = next(&input).await;
        let origin = message
            .origin
            .clone()
            .expect("the publisher's headers give the origin");
        assert_eq!(
            (origin.producer.as_str(), origin.sequence),
            (processor.as_str(), expected)
        );
        assert!(!message.redelivered);
        assert_eq!(message.payload, expected.to_string().into_bytes());
        marks.push(input.mark());
    }
    assert_eq!(input.unreleased(), 10);
    input
        .release(marks[3])
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    assert_eq!(input.unreleased(), 6);
    // Releasing an older mark again does nothing (a second multiple-ack below the first
    // would close the channel).
    input
        .release(marks[1])
        .await
        .unwrap_or_else(|e| panic!("release again: {e}"));
    input
        .release(InputMark(0))
        .await
        .unwrap_or_else(|e| panic!("release 0: {e}"));
    assert_eq!(input.unreleased(), 6);
    input.close().await.unwrap_or_else(|e| panic!("close: {e}"));

    // The six unreleased messages are back in the queue, in order, marked redelivered.
    let again = AmqpInput::connect(input_config(&broker, &queue, 100))
        .await
        .unwrap_or_else(|e| panic!("reconnect input: {e}"));
    for expected in 5..=10 {
        let message = next(&again).await;
        assert_eq!(sequence_of(&message), expected);
        assert!(
            message.redelivered,
            "sequence {expected} was delivered before"
        );
    }
    again
        .release(again.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    again.close().await.unwrap_or_else(|e| panic!("close: {e}"));
    assert_eq!(broker.count(&queue).await, 0, "everything released is gone");
    let _ = publisher.close().await;
    broker.clean_up().await;
}

/// Crashes between processing and checkpoint, and between checkpoint and release: every
/// message is folded into the committed state exactly once.
#[tokio::test]
async fn restarts_from_checkpoints_fold_every_message_once() {
    let Some(broker) = broker("restarts_from_checkpoints_fold_every_message_once").await else {
        return;
    };
    let (queue, publisher, processor) = pipeline(&broker, "input-once").await;
    const LAST: u64 = 300;
    publish_range(&publisher, &processor, 1..=LAST).await;
    // A publisher that lost its confirms sends some messages again.
    publish_range(&publisher, &processor, 100..=120).await;

    let mut committed = Folded::default();
    let mut duplicates = 0;
    // Each round restores the committed state, processes some messages with a checkpoint
    // every 16, then crashes: on odd rounds right after processing, on even rounds after a
    // checkpoint committed but before its release reached the broker.
    for round in 0.. {
        assert!(round < 100, "no progress after 100 rounds: {committed:?}");
        if committed.counts.len() as u64 == LAST && broker.count(&queue).await == 0 {
            break;
        }
        let input = AmqpInput::connect(input_config(&broker, &queue, 64))
            .await
            .unwrap_or_else(|e| panic!("connect input: {e}"));
        let mut state = committed.clone();
        let budget = 40 + (round % 3) * 11;
        let mut pending_release = None;
        for i in 1..=budget {
            let Ok(message) = tokio::time::timeout(Duration::from_millis(500), input.next()).await
            else {
                break; // The queue is empty.
            };
            let message = message.unwrap_or_else(|e| panic!("next: {e}"));
            if state.fold(&message) == Admission::Duplicate {
                duplicates += 1;
            }
            if i % 16 == 0 {
                committed = state.clone();
                pending_release = Some(input.mark());
                if round % 2 == 1 || i + 16 <= budget {
                    input
                        .release(input.mark())
                        .await
                        .unwrap_or_else(|e| panic!("release: {e}"));
                    pending_release = None;
                }
            }
        }
        if pending_release.is_none() && round % 2 == 0 {
            // The round ended without the crash it was meant to have: commit what it did.
            committed = state.clone();
            input
                .release(input.mark())
                .await
                .unwrap_or_else(|e| panic!("release: {e}"));
        }
        input.close().await.unwrap_or_else(|e| panic!("close: {e}"));
    }
    committed.assert_exactly_once(LAST);
    assert!(
        duplicates >= 21,
        "the copies sent twice were skipped: {duplicates}"
    );
    let _ = publisher.close().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn pause_gives_back_what_was_not_processed_in_order() {
    let Some(broker) = broker("pause_gives_back_what_was_not_processed_in_order").await else {
        return;
    };
    let (queue, publisher, processor) = pipeline(&broker, "input-pause").await;
    publish_range(&publisher, &processor, 1..=20).await;

    // The old instance processes five messages (more sit prefetched), freezes and pauses.
    let old = AmqpInput::connect(input_config(&broker, &queue, 50))
        .await
        .unwrap_or_else(|e| panic!("connect old: {e}"));
    let mut state = Folded::default();
    for _ in 0..5 {
        state.fold(&next(&old).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // let the prefetch fill
    old.pause().await.unwrap_or_else(|e| panic!("pause: {e}"));
    assert_eq!(
        old.unreleased(),
        5,
        "pausing keeps the processed ones unreleased"
    );

    // The new instance restores the frozen state and gets the rest in order, first.
    let new = AmqpInput::connect(input_config(&broker, &queue, 50))
        .await
        .unwrap_or_else(|e| panic!("connect new: {e}"));
    for expected in 6..=20 {
        let message = next(&new).await;
        assert_eq!(sequence_of(&message), expected, "given back in order");
        assert_eq!(state.fold(&message), Admission::New);
    }
    // The old instance goes without releasing: its five come back and are skipped.
    old.close()
        .await
        .unwrap_or_else(|e| panic!("close old: {e}"));
    for expected in 1..=5 {
        let message = next(&new).await;
        assert_eq!(sequence_of(&message), expected);
        assert_eq!(state.fold(&message), Admission::Duplicate);
    }
    new.release(new.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    state.assert_exactly_once(20);

    // A paused input consumes again on `next`.
    publish_range(&publisher, &processor, 21..=21).await;
    new.pause()
        .await
        .unwrap_or_else(|e| panic!("pause new: {e}"));
    assert_eq!(sequence_of(&next(&new).await), 21);
    new.release(new.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    new.close()
        .await
        .unwrap_or_else(|e| panic!("close new: {e}"));
    let _ = publisher.close().await;
    broker.clean_up().await;
}

#[tokio::test]
async fn settings_the_broker_would_punish_are_refused() {
    let Some(broker) = broker("settings_the_broker_would_punish_are_refused").await else {
        return;
    };
    let slow = AmqpInputConfig::new(broker.config(""), "q", Duration::from_secs(20 * 60));
    let err = AmqpInput::connect(slow)
        .await
        .expect_err("20 min > half of 30 min");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("1200s") && text.contains("1800s"), "{text}");

    let raised = AmqpInputConfig::new(broker.config(""), "q", Duration::from_secs(20 * 60))
        .with_consumer_timeout(Duration::from_secs(3600));
    assert!(
        raised.validate().is_ok(),
        "within half an hour-long consumer timeout"
    );

    let unlimited = input_config(&broker, "q", 0);
    let err = AmqpInput::connect(unlimited).await.expect_err("prefetch 0");
    assert!(err.to_string().contains("prefetch 0"), "{err}");

    let missing = dory_core::testing::unique_name("dory-it-no-such-queue");
    let err = AmqpInput::connect(input_config(&broker, &missing, 10))
        .await
        .expect_err("a missing queue");
    let core: dory_core::Error = err.into();
    assert!(matches!(core, dory_core::Error::NotFound(_)), "{core:?}");
    assert!(core.to_string().contains(&missing), "{core}");
    broker.clean_up().await;
}

#[tokio::test]
async fn a_lost_connection_is_replaced_and_nothing_is_folded_twice() {
    let Some(broker) = broker("a_lost_connection_is_replaced_and_nothing_is_folded_twice").await
    else {
        return;
    };
    let (queue, publisher, processor) = pipeline(&broker, "input-cut").await;
    publish_range(&publisher, &processor, 1..=60).await;
    let proxy = Proxy::start(&broker.url).await;
    let mut through_proxy = input_config(&broker, &queue, 20);
    through_proxy.broker = through_proxy.broker.clone().with_reconnect(
        20,
        Duration::from_millis(20),
        Duration::from_millis(200),
    );
    through_proxy.broker.url = proxy.url.clone();
    let input = AmqpInput::connect(through_proxy)
        .await
        .unwrap_or_else(|e| panic!("connect input: {e}"));
    let mut state = Folded::default();
    for _ in 0..10 {
        state.fold(&next(&input).await);
    }
    input
        .release(input.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    for _ in 0..5 {
        state.fold(&next(&input).await);
    }
    // Five folded and unreleased, fifteen more prefetched: all twenty come again.
    proxy.cut();
    let mut duplicates = 0;
    while state.counts.len() < 60 {
        if state.fold(&next(&input).await) == Admission::Duplicate {
            duplicates += 1;
        }
        // Duplicates count against the prefetch until released: a full one checkpoints.
        if input.unreleased() == 20 {
            // An acknowledgement sent as the cut lands may get no answer: harmless, the
            // messages come again and the position skips them.
            if let Err(e) = input.release(input.mark()).await {
                assert!(matches!(e, dory_core::Error::Unavailable(_)), "{e:?}");
                assert!(e.to_string().contains(&queue), "{e}");
            }
        }
    }
    assert_eq!(input.reconnects(), 1);
    // The five folded before the cut come again; so may prefetched ones the client handed
    // out before it noticed the cut.
    assert!((5..=20).contains(&duplicates), "{duplicates} duplicates");
    input
        .release(input.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    state.assert_exactly_once(60);
    input.close().await.unwrap_or_else(|e| panic!("close: {e}"));
    assert_eq!(broker.count(&queue).await, 0);
    let _ = publisher.close().await;
    broker.clean_up().await;
}

/// A `next` dropped before it resolves (a runtime reaching a safe point for a freeze) loses
/// nothing, also while it consumes again after a pause.
#[tokio::test]
async fn dropped_next_calls_lose_nothing() {
    let Some(broker) = broker("dropped_next_calls_lose_nothing").await else {
        return;
    };
    let (queue, publisher, processor) = pipeline(&broker, "input-drop").await;
    let input = AmqpInput::connect(input_config(&broker, &queue, 10))
        .await
        .unwrap_or_else(|e| panic!("connect input: {e}"));
    // Dropped for certain: the queue is empty, and then the consumer is being started again
    // after a pause.
    let mut dropped = 0;
    for pause in [false, true, false, true] {
        if pause {
            input.pause().await.unwrap_or_else(|e| panic!("pause: {e}"));
        }
        let waited = tokio::time::timeout(Duration::from_millis(20), input.next()).await;
        assert!(waited.is_err(), "nothing was published yet");
        dropped += 1;
    }
    publish_range(&publisher, &processor, 1..=40).await;
    let mut state = Folded::default();
    let mut round = 0u32;
    while state.counts.len() < 40 {
        round += 1;
        assert!(round < 100_000, "no progress: {state:?}");
        if round.is_multiple_of(7) {
            input.pause().await.unwrap_or_else(|e| panic!("pause: {e}"));
        }
        // Most calls are dropped at once, some mid-way, the rest resolve.
        let patience = Duration::from_micros(u64::from(round % 5) * 300);
        match tokio::time::timeout(patience, input.next()).await {
            Ok(message) => {
                let message = message.unwrap_or_else(|e| panic!("next: {e}"));
                state.fold(&message);
            }
            Err(_) => dropped += 1,
        }
        if input.unreleased() == 10 {
            input
                .release(input.mark())
                .await
                .unwrap_or_else(|e| panic!("release: {e}"));
        }
    }
    assert!(dropped >= 4);
    input
        .release(input.mark())
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    state.assert_exactly_once(40);
    input.close().await.unwrap_or_else(|e| panic!("close: {e}"));
    assert_eq!(broker.count(&queue).await, 0, "nothing left behind");
    let _ = publisher.close().await;
    broker.clean_up().await;
}
