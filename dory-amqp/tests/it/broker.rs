//! The test broker: reaching it (or skipping), and per-test exchanges and queues.

use std::time::Duration;

use async_trait::async_trait;
use dory_amqp::{AmqpConfig, HEADER_EPOCH, HEADER_PROCESSOR, HEADER_SEQUENCE};
use dory_core::testing::{PublishedLog, unique_name};
use dory_core::{Epoch, OutputMessage, ProcessorId, Sequence};
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::Mutex;

/// A test's own connection to the broker, for declaring topology and reading messages back.
pub(crate) struct Broker {
    pub(crate) url: String,
    channel: Channel,
    connection: Connection,
    exchanges: Mutex<Vec<String>>,
    queues: Mutex<Vec<String>>,
}

/// Connects to the test broker, or returns `None` after printing a skip line for `test`;
/// under `CI=true` an unreachable broker fails the test instead.
pub(crate) async fn broker(test: &str) -> Option<Broker> {
    let (url, connection, channel) = dory_amqp::testing::connect(test).await?;
    Some(Broker {
        url,
        channel,
        connection,
        exchanges: Mutex::new(Vec::new()),
        queues: Mutex::new(Vec::new()),
    })
}

impl Broker {
    /// A publisher configuration for `exchange` on this broker.
    pub(crate) fn config(&self, exchange: &str) -> AmqpConfig {
        AmqpConfig::new(self.url.clone(), exchange).with_connect_timeout(Duration::from_secs(5))
    }

    /// Declares a fresh exchange of `kind`, unique to this test and run.
    pub(crate) async fn exchange(&self, area: &str, kind: ExchangeKind) -> String {
        let name = unique_name(&format!("dory-it-{area}"));
        self.declare_exchange(&name, kind).await;
        self.exchanges.lock().await.push(name.clone());
        name
    }

    /// Declares `name` (again).
    pub(crate) async fn declare_exchange(&self, name: &str, kind: ExchangeKind) {
        self.channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
    }

    /// Deletes exchange `name` now.
    pub(crate) async fn delete_exchange(&self, name: &str) {
        self.channel
            .exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete exchange {name}: {e}"));
    }

    /// Declares a queue bound to `exchange` with `binding_key`. It is exclusive to this
    /// connection, so the broker removes it even if the test panics before cleaning up.
    pub(crate) async fn bound_queue(&self, exchange: &str, binding_key: &str) -> String {
        self.bound_queue_with(exchange, binding_key, |_| {}).await
    }

    /// [`bound_queue`](Broker::bound_queue) with queue arguments set by `arguments`.
    pub(crate) async fn bound_queue_with(
        &self,
        exchange: &str,
        binding_key: &str,
        arguments: impl FnOnce(&mut FieldTable),
    ) -> String {
        let name = unique_name("dory-it-q");
        let mut table = FieldTable::default();
        arguments(&mut table);
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                table,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
        self.bind(&name, exchange, binding_key).await;
        self.queues.lock().await.push(name.clone());
        name
    }

    /// Declares a queue bound to `exchange` that other connections can consume (an input's
    /// own connection, say). The broker deletes it a minute after its last use, so a test
    /// that panics leaves nothing behind for long.
    pub(crate) async fn shared_queue(&self, exchange: &str) -> String {
        let name = unique_name("dory-it-input");
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(60_000));
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
        self.bind(&name, exchange, "").await;
        self.queues.lock().await.push(name.clone());
        name
    }

    /// Binds `queue` to `exchange` (again).
    pub(crate) async fn bind(&self, queue: &str, exchange: &str, binding_key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("bind queue {queue} to {exchange}: {e}"));
    }

    /// How many messages wait in `queue`.
    pub(crate) async fn count(&self, queue: &str) -> u32 {
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("count queue {queue}: {e}"))
            .message_count()
    }

    /// Takes every message waiting in `queue`, in queue order.
    pub(crate) async fn drain(&self, queue: &str) -> Vec<Delivery> {
        let mut got = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("get from {queue}: {e}"))
        {
            got.push(m.delivery);
        }
        got
    }

    /// Deletes what this test declared, best effort: leftovers are harmless (names are unique
    /// and queues are exclusive).
    pub(crate) async fn clean_up(self) {
        for queue in self.queues.lock().await.drain(..) {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in self.exchanges.lock().await.drain(..) {
            let _ = self
                .channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// A header as an integer, whichever integer type it arrived as.
fn int_header(delivery: &Delivery, name: &str) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        _ => None,
    }
}

/// The processor-id header.
pub(crate) fn processor_header(delivery: &Delivery) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(HEADER_PROCESSOR)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Rebuilds the output message a delivery carries, from its headers, routing key and body.
pub(crate) fn output_message(delivery: &Delivery) -> Result<OutputMessage, String> {
    let processor = processor_header(delivery).ok_or("no processor header")?;
    let epoch = int_header(delivery, HEADER_EPOCH).ok_or("no epoch header")?;
    let sequence = int_header(delivery, HEADER_SEQUENCE).ok_or("no sequence header")?;
    Ok(OutputMessage {
        processor: ProcessorId::new(processor).map_err(|e| e.to_string())?,
        epoch: Epoch(epoch),
        sequence: Sequence(sequence),
        routing_key: Some(delivery.routing_key.as_str().to_string()),
        payload: delivery.data.clone(),
    })
}

/// A [`PublishedLog`] reading back from a queue bound to the publisher's exchange: the first
/// call takes everything waiting, later calls look at what was taken.
pub(crate) struct QueueLog<'a> {
    pub(crate) broker: &'a Broker,
    pub(crate) queue: String,
    pub(crate) seen: Mutex<Vec<OutputMessage>>,
}

#[async_trait]
impl PublishedLog for QueueLog<'_> {
    async fn published(&self, processor: &ProcessorId) -> dory_core::Result<Vec<OutputMessage>> {
        let mut seen = self.seen.lock().await;
        for delivery in self.broker.drain(&self.queue).await {
            let message = output_message(&delivery).map_err(dory_core::Error::invalid)?;
            seen.push(message);
        }
        Ok(seen
            .iter()
            .filter(|m| &m.processor == processor)
            .cloned()
            .collect())
    }
}
