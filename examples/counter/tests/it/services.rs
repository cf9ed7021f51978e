//! The real servers: a Postgres store in a schema of its own and a RabbitMQ exchange and
//! queue of their own, or a skip line when a server is unreachable (a failure under
//! `CI=true`).

use dory_pg::PgStore;
use dory_pg::testing::TestSchema;
use lapin::message::Delivery;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

/// A name unique to this test process and call.
pub(crate) fn unique(area: &str) -> String {
    dory_core::testing::unique_name(area)
}

/// A store in a fresh schema, dropped (best effort) when this value is.
pub(crate) struct TestDb {
    pub(crate) store: PgStore,
    /// The URL an instance is given: the database URL with this schema as `schema=`.
    pub(crate) instance_url: String,
    _schema: TestSchema,
}

/// Connects to the test database in a new schema; `None` (after a skip line) when the
/// database is unreachable outside CI.
pub(crate) async fn test_db(_test: &str) -> Option<TestDb> {
    let schema = TestSchema::create("counter", 4).await?;
    let url = &schema.config.url;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(TestDb {
        store: schema.store.clone(),
        instance_url: format!("{url}{separator}schema={}", schema.config.schema),
        _schema: schema,
    })
}

/// The test's own connection to the broker, with an exchange and a queue bound to it.
pub(crate) struct Broker {
    pub(crate) url: String,
    pub(crate) exchange: String,
    pub(crate) queue: String,
    connection: Connection,
    channel: Channel,
}

/// Connects to the test broker and declares a topic exchange and an exclusive queue bound to
/// every key (the broker removes the queue with this connection, even after a panic);
/// `None` (after a skip line) when the broker is unreachable outside CI.
pub(crate) async fn broker(test: &str) -> Option<Broker> {
    let (url, connection, channel) = dory_amqp::testing::connect(test).await?;
    let exchange = unique("dory-it-counter");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare exchange {exchange}: {e}"));
    let queue = unique("dory-it-counter-q");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare queue {queue}: {e}"));
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("bind {queue} to {exchange}: {e}"));
    Some(Broker {
        url,
        exchange,
        queue,
        connection,
        channel,
    })
}

/// One message as the test reads it back.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) epoch: u64,
    pub(crate) sequence: u64,
    pub(crate) body: String,
}

impl Broker {
    /// The URL an instance publishes with: the broker URL with this test's exchange as
    /// `exchange=` (a query parameter `dory-connect` takes out before the URL reaches the
    /// client).
    pub(crate) fn publisher_url(&self) -> String {
        let separator = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{separator}exchange={}", self.url, self.exchange)
    }

    /// How many messages wait in the queue.
    pub(crate) async fn count(&self) -> u32 {
        self.channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("count queue {}: {e}", self.queue))
            .message_count()
    }

    /// Takes every message waiting in the queue, in queue order.
    pub(crate) async fn drain(&self) -> Vec<Received> {
        let mut got = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("get from {}: {e}", self.queue))
        {
            got.push(received(&m.delivery));
        }
        got
    }

    /// Deletes the exchange and closes the connection (which removes the exclusive queue).
    pub(crate) async fn clean_up(self) {
        let _ = self
            .channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

fn int_header(delivery: &Delivery, name: &str) -> u64 {
    let value = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned());
    match value {
        Some(AMQPValue::LongLongInt(v)) => u64::try_from(v).ok(),
        Some(AMQPValue::LongInt(v)) => u64::try_from(v).ok(),
        Some(AMQPValue::LongUInt(v)) => Some(u64::from(v)),
        _ => None,
    }
    .unwrap_or_else(|| panic!("message without an integer {name} header: {delivery:?}"))
}

fn received(delivery: &Delivery) -> Received {
    Received {
        epoch: int_header(delivery, dory_amqp::HEADER_EPOCH),
        sequence: int_header(delivery, dory_amqp::HEADER_SEQUENCE),
        body: String::from_utf8_lossy(&delivery.data).into_owned(),
    }
}
