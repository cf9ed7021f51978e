//! The [`Publisher`] behaviour suite.

use async_trait::async_trait;

use super::unique_processor;
use crate::backend::{OutputMessage, Publisher};
use crate::error::Result;
use crate::model::{Epoch, ProcessorId, Sequence};

/// Reads back what a publisher delivered: the in-memory publisher's record, a broker queue, a
/// JSON-lines file. The publisher suite needs one to see what arrived.
#[async_trait]
pub trait PublishedLog: Send + Sync {
    /// Every delivered message of `processor`, in delivery order.
    async fn published(&self, processor: &ProcessorId) -> Result<Vec<OutputMessage>>;
}

/// Runs the publisher checks against `publisher`, reading deliveries back through `log`:
///
/// - after [`publish`](Publisher::publish) resolved and a [`flush`](Publisher::flush), every
///   message has arrived, once, with its processor, epoch, sequence, payload (empty ones too)
///   and routing key (where one was given: `None` may arrive as the publisher's default);
/// - messages of one processor arrive in publish order, also while two processors publish
///   concurrently;
/// - `flush` with nothing outstanding resolves at once.
pub async fn publisher_suite(publisher: &dyn Publisher, log: &dyn PublishedLog) {
    publisher
        .flush()
        .await
        .unwrap_or_else(|e| panic!("publisher: flush with nothing outstanding: {e}"));
    let a = unique_processor("pub-a");
    let b = unique_processor("pub-b");
    let messages = |p: &ProcessorId, epoch: Epoch| -> Vec<OutputMessage> {
        (1..=20)
            .map(|s| OutputMessage {
                processor: p.clone(),
                epoch,
                sequence: Sequence(s),
                routing_key: (s % 3 == 0).then(|| format!("route-{s}")),
                payload: if s % 5 == 0 {
                    Vec::new()
                } else {
                    format!("{p} message {s}").into_bytes()
                },
            })
            .collect()
    };
    let sent_a = messages(&a, Epoch(1));
    let sent_b = messages(&b, Epoch(4));
    let send = |sent: Vec<OutputMessage>| async move {
        for m in sent {
            let id = m.message_id();
            publisher
                .publish(m)
                .await
                .unwrap_or_else(|e| panic!("publisher: publish {id}: {e}"));
        }
    };
    tokio::join!(send(sent_a.clone()), send(sent_b.clone()));
    publisher
        .flush()
        .await
        .unwrap_or_else(|e| panic!("publisher: flush: {e}"));

    for (p, sent) in [(&a, &sent_a), (&b, &sent_b)] {
        let got = log
            .published(p)
            .await
            .unwrap_or_else(|e| panic!("publisher: read back {p}: {e}"));
        let ids =
            |ms: &[OutputMessage]| ms.iter().map(OutputMessage::message_id).collect::<Vec<_>>();
        assert_eq!(
            ids(&got),
            ids(sent),
            "publisher: {p}: every message must arrive once, in publish order"
        );
        for (got, sent) in got.iter().zip(sent) {
            let id = sent.message_id();
            assert_eq!(got.payload, sent.payload, "publisher: payload of {id}");
            if sent.routing_key.is_some() {
                assert_eq!(
                    got.routing_key, sent.routing_key,
                    "publisher: routing key of {id}"
                );
            }
        }
    }
}
