//! What one publish puts on the wire, and what it refuses.

use std::time::Duration;

use dory_amqp::{AmqpConfig, AmqpPublisher, Error, HEADER_EPOCH, HEADER_SEQUENCE};
use dory_core::testing::unique_processor;
use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Sequence};
use lapin::ExchangeKind;
use lapin::types::AMQPValue;

use crate::broker::{broker, output_message, processor_header};

fn message(processor: &ProcessorId, sequence: u64, routing_key: Option<&str>) -> OutputMessage {
    OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(7),
        sequence: Sequence(sequence),
        routing_key: routing_key.map(str::to_string),
        payload: format!("payload {sequence}").into_bytes(),
    }
}

#[tokio::test]
async fn unroutable_message_is_an_error_not_a_silent_drop() {
    let Some(broker) = broker("unroutable_message_is_an_error_not_a_silent_drop").await else {
        return;
    };
    // A direct exchange with no binding at all: no routing key reaches a queue.
    let exchange = broker.exchange("unroutable", ExchangeKind::Direct).await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let p = unique_processor("unroutable");
    let err = publisher
        .publish(message(&p, 1, Some("nowhere")))
        .await
        .expect_err("an unroutable mandatory message must fail its publish");
    assert!(matches!(err, dory_core::Error::Invalid(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&exchange) && text.contains("nowhere"),
        "the error names exchange and routing key: {text}"
    );
    // The channel survives a returned message: the next routable publish goes through.
    let queue = broker.bound_queue(&exchange, "somewhere").await;
    publisher
        .publish(message(&p, 2, Some("somewhere")))
        .await
        .unwrap_or_else(|e| panic!("publish after a returned message: {e}"));
    assert_eq!(broker.count(&queue).await, 1);
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}

#[tokio::test]
async fn message_id_headers_and_routing_are_set() {
    let Some(broker) = broker("message_id_headers_and_routing_are_set").await else {
        return;
    };
    let exchange = broker.exchange("headers", ExchangeKind::Topic).await;
    let queue = broker.bound_queue(&exchange, "#").await;
    let publisher = AmqpPublisher::connect(broker.config(&exchange).with_routing_key("fallback"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let p = unique_processor("headers");
    publisher
        .publish(message(&p, 41, None))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    publisher
        .publish(message(&p, 42, Some("explicit.key")))
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"));
    let got = broker.drain(&queue).await;
    assert_eq!(got.len(), 2, "both messages arrive");
    for (delivery, (sequence, key)) in got.iter().zip([(41, "fallback"), (42, "explicit.key")]) {
        let id = format!("{p}:7:{sequence}");
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str()),
            Some(id.as_str()),
            "message id"
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(delivery.routing_key.as_str(), key, "routing key of {id}");
        assert_eq!(processor_header(delivery).as_deref(), Some(p.as_str()));
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        assert_eq!(
            headers.inner().get(HEADER_EPOCH),
            Some(&AMQPValue::LongLongInt(7))
        );
        assert_eq!(
            headers.inner().get(HEADER_SEQUENCE),
            Some(&AMQPValue::LongLongInt(sequence))
        );
        let back = output_message(delivery).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(back.message_id(), id);
        assert_eq!(back.payload, format!("payload {sequence}").into_bytes());
    }
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}

#[tokio::test]
async fn setup_errors_are_clear() {
    let bad = AmqpPublisher::connect(AmqpConfig::new("http://guest:pw@host/", "x"))
        .await
        .expect_err("a non-AMQP URL is refused");
    assert!(matches!(bad, Error::BadUrl { .. }), "{bad}");
    assert!(
        !bad.to_string().contains(":pw@"),
        "no password in errors: {bad}"
    );

    // Port 1 on the loopback refuses at once: a connect error, retryable.
    let refused = AmqpPublisher::connect(
        AmqpConfig::new("amqp://guest:guest@127.0.0.1:1/%2f", "x")
            .with_connect_timeout(Duration::from_secs(5)),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(
        dory_core::Error::from(refused).is_retryable(),
        "an unreachable broker is retryable"
    );

    let Some(broker) = broker("setup_errors_are_clear").await else {
        return;
    };
    let missing = format!("{}-missing", dory_core::testing::unique_name("dory-it"));
    let err = AmqpPublisher::connect(broker.config(&missing))
        .await
        .expect_err("a missing exchange is refused at connect");
    assert!(matches!(err, Error::Declare { .. }), "{err}");
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(matches!(
        dory_core::Error::from(err),
        dory_core::Error::NotFound(_)
    ));
    broker.clean_up().await;
}

#[tokio::test]
async fn nacked_message_is_retried_then_unavailable() {
    let Some(broker) = broker("nacked_message_is_retried_then_unavailable").await else {
        return;
    };
    let exchange = broker.exchange("nack", ExchangeKind::Fanout).await;
    // A full queue that rejects publishes makes the broker nack: a refusal that may pass
    // (a consumer could make room), so it is retried, then reported as retryable.
    let queue = broker
        .bound_queue_with(&exchange, "", |args| {
            args.insert("x-max-length".into(), AMQPValue::LongInt(1));
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
        })
        .await;
    let publisher = AmqpPublisher::connect(
        broker
            .config(&exchange)
            .with_nack_retries(2)
            .with_reconnect(3, Duration::from_millis(10), Duration::from_millis(10)),
    )
    .await
    .unwrap_or_else(|e| panic!("connect: {e}"));
    let p = unique_processor("nack");
    publisher
        .publish(message(&p, 1, None))
        .await
        .unwrap_or_else(|e| panic!("publish into the empty queue: {e}"));
    let err = publisher
        .publish(message(&p, 2, None))
        .await
        .expect_err("the full queue nacks");
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("nack"), "{err}");
    // Room again: the same message goes through.
    broker.drain(&queue).await;
    publisher
        .publish(message(&p, 2, None))
        .await
        .unwrap_or_else(|e| panic!("publish once there is room: {e}"));
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    broker.clean_up().await;
}
