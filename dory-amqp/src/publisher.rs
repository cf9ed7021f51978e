//! [`AmqpPublisher`]: the RabbitMQ [`Publisher`], with publisher confirms and a bounded window.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dory_core::{OutputMessage, Publisher};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use lapin::{ExchangeKind, message::BasicReturnMessage};
use tokio::sync::Semaphore;
use tracing::{debug, info, trace, warn};

use crate::config::AmqpConfig;
use crate::error::{Error, connect_error, is_refusal};
use crate::link::{TARGET, answered, backoff, connect};

/// A publish whose confirmation takes longer than this is logged as a warning: the broker is
/// slow (a memory or disk alarm, a flow-controlled connection) and processors will feel it.
const SLOW_PUBLISH: Duration = Duration::from_secs(1);

/// AMQP delivery mode 2: the broker writes the message to disk (in a durable queue) before it
/// confirms, so a confirm means the message survives a broker restart.
const PERSISTENT: u8 = 2;

/// The header carrying the processor id, as a string. Each part of the message id has a
/// header of its own, so consumers (and header exchanges) need not parse the id.
pub const HEADER_PROCESSOR: &str = "dory-processor";
/// The writing instance's epoch, as a signed 64-bit integer.
pub const HEADER_EPOCH: &str = "dory-epoch";
/// The processor's sequence of the message, as a signed 64-bit integer.
pub const HEADER_SEQUENCE: &str = "dory-sequence";

/// One connection with its confirm-mode channel. Replaced as a whole when either is lost: a
/// closed channel loses its unconfirmed messages just like a closed connection does.
struct Link {
    connection: Connection,
    channel: Channel,
    /// Counts replacements, so concurrent publishers that saw the same broken link reconnect
    /// once, not once each.
    generation: u64,
}

/// Bookkeeping of the current link, behind a short synchronous lock.
struct Current {
    link: Arc<Link>,
    /// When the last reconnect attempt for `link.generation` failed: publishers that find the
    /// same broken link within `reconnect_delay` do not hammer the broker with more attempts.
    last_failure: Option<Instant>,
}

/// Publishes processor output to a RabbitMQ exchange and resolves each publish only once the
/// broker confirmed it.
///
/// - Every message is `mandatory` and persistent, with `message_id` set to
///   [`OutputMessage::message_id`] and the headers [`HEADER_PROCESSOR`], [`HEADER_EPOCH`] and
///   [`HEADER_SEQUENCE`]; the routing key is the message's or the configured default.
/// - At most [`AmqpConfig::window`] messages are unconfirmed at once; further publishes wait.
/// - An unroutable message (returned by the broker) fails with
///   [`Invalid`](dory_core::Error::Invalid) naming exchange and routing key; a nack is retried
///   [`AmqpConfig::nack_retries`] times, then fails with
///   [`Unavailable`](dory_core::Error::Unavailable).
/// - A lost connection or channel is replaced (with backoff, up to
///   [`AmqpConfig::reconnect_attempts`] times per publish) and every unconfirmed message is sent
///   again with the same message id: delivery is at least once. Messages of one processor
///   stay in order as long as each publish is awaited before the next.
pub struct AmqpPublisher {
    config: AmqpConfig,
    uri: AMQPUri,
    window: Semaphore,
    /// The window as a permit count (validated to fit in a `u32`).
    window_size: u32,
    current: Mutex<Current>,
    /// Serialises reconnect attempts.
    reconnecting: tokio::sync::Mutex<()>,
}

impl AmqpPublisher {
    /// Connects to the broker, checks that the exchange exists and opens a channel in
    /// publisher-confirm mode. Must be called within a tokio runtime.
    ///
    /// With `amqps://`, the TLS files of the config are read and checked first: a missing or
    /// malformed one fails with [`Error::TlsFile`] naming it. Every reconnect reads them again.
    pub async fn connect(config: AmqpConfig) -> Result<AmqpPublisher, Error> {
        let uri = config.validate()?;
        let window_size = u32::try_from(config.window)
            .map_err(|_| Error::Config(format!("window {} is too large", config.window)))?;
        let link = open_link(&config, &uri, 0).await?;
        info!(
            target: TARGET,
            url = %config.redacted_url(),
            exchange = %config.exchange,
            window = config.window,
            "publisher connected"
        );
        Ok(AmqpPublisher {
            window: Semaphore::new(config.window),
            window_size,
            current: Mutex::new(Current {
                link: Arc::new(link),
                last_failure: None,
            }),
            reconnecting: tokio::sync::Mutex::new(()),
            uri,
            config,
        })
    }

    /// The settings this publisher was built from.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }

    /// How many messages are published (or waiting to be sent again) and not yet confirmed.
    ///
    /// While a [`flush`](Publisher::flush) waits, it holds the slots freed so far, and they
    /// count here too.
    pub fn in_flight(&self) -> usize {
        self.config
            .window
            .saturating_sub(self.window.available_permits())
    }

    /// How many times the connection was replaced after a lost connection or channel.
    pub fn reconnects(&self) -> u64 {
        self.lock().link.generation
    }

    /// Waits for every outstanding confirm, then closes the connection. Publishes after this
    /// reconnect.
    pub async fn close(&self) -> dory_core::Result<()> {
        self.flush().await?;
        let link = self.link();
        if !link.connection.status().connected() {
            // Already gone (lost, or closed before): nothing left to close.
            return Ok(());
        }
        answered(
            &self.config,
            || "close connection".into(),
            link.connection.close(200, "dory publisher closed".into()),
        )
        .await?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn link(&self) -> Arc<Link> {
        Arc::clone(&self.lock().link)
    }

    /// Replaces the link of generation `broken` with a new one, unless another publisher has
    /// already done so (or failed to, a moment ago).
    async fn relink(&self, broken: u64) -> Result<(), Error> {
        let _one_at_a_time = self.reconnecting.lock().await;
        {
            let current = self.lock();
            if current.link.generation != broken {
                return Ok(());
            }
            if let Some(failed) = current.last_failure
                && failed.elapsed() < self.config.reconnect_delay
            {
                // Another publisher's attempt failed a moment ago: this one's next send fails
                // fast on the broken link and counts as one of its attempts.
                return Ok(());
            }
        }
        match open_link(&self.config, &self.uri, broken + 1).await {
            Ok(link) => {
                let old = {
                    let mut current = self.lock();
                    current.last_failure = None;
                    std::mem::replace(&mut current.link, Arc::new(link))
                };
                info!(
                    target: TARGET,
                    exchange = %self.config.exchange,
                    generation = broken + 1,
                    "publisher reconnected"
                );
                // The old connection may still be up with only its channel closed; close it
                // so it does not linger. Its unconfirmed messages are being sent again.
                tokio::spawn(async move {
                    let _ = old.connection.close(200, "replaced".into()).await;
                });
                Ok(())
            }
            Err(e) => {
                self.lock().last_failure = Some(Instant::now());
                Err(e)
            }
        }
    }
}

/// Connects, checks the exchange and opens a confirm-mode channel, within the connect timeout.
async fn open_link(config: &AmqpConfig, uri: &AMQPUri, generation: u64) -> Result<Link, Error> {
    let url = config.redacted_url();
    let attempt = async {
        let connection = connect(config, uri, "dory publisher", generation).await?;
        let channel = match set_up_channel(config, &connection).await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = connection.close(200, "set-up failed".into()).await;
                return Err(e);
            }
        };
        Ok(Link {
            connection,
            channel,
            generation,
        })
    };
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Ok(link) => link,
        Err(_) => Err(Error::ConnectTimeout {
            url,
            after: config.connect_timeout,
        }),
    }
}

async fn set_up_channel(config: &AmqpConfig, connection: &Connection) -> Result<Channel, Error> {
    let connect_error = |source| connect_error(config.redacted_url(), source);
    let channel = connection.create_channel().await.map_err(connect_error)?;
    // The default exchange always exists and cannot be declared, not even passively.
    if !config.exchange.is_empty() {
        // Passive: only checks that the exchange exists (its kind is ignored), so a typo in
        // the name fails here, at start-up, rather than as a closed channel on first publish.
        channel
            .exchange_declare(
                config.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| Error::Declare {
                exchange: config.exchange.clone(),
                source,
            })?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(connect_error)?;
    Ok(channel)
}

/// The AMQP properties of `message`: persistent, with its id and identity headers.
fn properties(message: &OutputMessage, id: &str) -> dory_core::Result<BasicProperties> {
    // AMQP field tables have no unsigned 64-bit integer; RabbitMQ reads signed ones.
    let signed = |what: &str, value: u64| {
        i64::try_from(value).map_err(|_| {
            dory_core::Error::invalid(format!(
                "publish {id}: {what} {value} does not fit an AMQP header"
            ))
        })
    };
    if id.len() > 255 {
        return Err(dory_core::Error::invalid(format!(
            "publish {id}: message id longer than 255 bytes"
        )));
    }
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_PROCESSOR.into(),
        AMQPValue::LongString(LongString::from(message.processor.as_str())),
    );
    headers.insert(
        HEADER_EPOCH.into(),
        AMQPValue::LongLongInt(signed("epoch", message.epoch.0)?),
    );
    headers.insert(
        HEADER_SEQUENCE.into(),
        AMQPValue::LongLongInt(signed("sequence", message.sequence.0)?),
    );
    Ok(BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers))
}

/// What one attempt at sending a message came to.
enum Sent {
    Confirmed,
    Returned(Box<BasicReturnMessage>),
    Nacked,
}

async fn send_once(
    link: &Link,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<Sent, lapin::Error> {
    let confirm = link
        .channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            payload,
            properties,
        )
        .await?
        .await?;
    Ok(match confirm {
        Confirmation::Ack(None) => Sent::Confirmed,
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Sent::Returned(Box::new(returned))
        }
        // `NotRequested` would mean the channel is not in confirm mode, which `open_link`
        // rules out; count it as a refusal rather than claim durability we cannot know.
        Confirmation::Nack(None) | Confirmation::NotRequested => Sent::Nacked,
    })
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, message: OutputMessage) -> dory_core::Result<()> {
        let id = message.message_id();
        let exchange = self.config.exchange.as_str();
        let routing_key = message
            .routing_key
            .as_deref()
            .unwrap_or(&self.config.routing_key);
        if routing_key.len() > 255 {
            return Err(dory_core::Error::invalid(format!(
                "publish {id}: routing key longer than 255 bytes"
            )));
        }
        let properties = properties(&message, &id)?;
        let what =
            || format!("publish {id} to exchange {exchange:?} with routing key {routing_key:?}");

        // Held until the confirm resolved: the window bounds unconfirmed messages, and flush
        // waits for every permit to come back.
        let _slot =
            self.window.acquire().await.map_err(|_| {
                dory_core::Error::unavailable(format!("{}: publisher closed", what()))
            })?;
        let started = Instant::now();
        let mut nacks = 0u32;
        let mut reconnects = 0u32;
        loop {
            let link = self.link();
            match send_once(
                &link,
                exchange,
                routing_key,
                &message.payload,
                properties.clone(),
            )
            .await
            {
                Ok(Sent::Confirmed) => {
                    let took = started.elapsed();
                    if took >= SLOW_PUBLISH {
                        warn!(target: TARGET, message_id = %id, ?took, "slow publisher confirm");
                    } else {
                        trace!(target: TARGET, message_id = %id, ?took, "published");
                    }
                    return Ok(());
                }
                Ok(Sent::Returned(returned)) => {
                    warn!(
                        target: TARGET,
                        message_id = %id,
                        exchange,
                        routing_key,
                        reply_code = returned.reply_code,
                        "message returned unroutable"
                    );
                    return Err(dory_core::Error::invalid(format!(
                        "{}: unroutable, returned by the broker ({} {})",
                        what(),
                        returned.reply_code,
                        returned.reply_text
                    )));
                }
                Ok(Sent::Nacked) => {
                    nacks += 1;
                    if nacks > self.config.nack_retries {
                        return Err(dory_core::Error::unavailable(format!(
                            "{}: refused (nack) by the broker {nacks} times",
                            what()
                        )));
                    }
                    warn!(target: TARGET, message_id = %id, nacks, "broker nacked; sending again");
                    tokio::time::sleep(backoff(&self.config, nacks)).await;
                }
                Err(source) => {
                    let refused = is_refusal(&source);
                    let error = Error::Broker {
                        operation: what(),
                        source,
                    };
                    reconnects += 1;
                    if refused || reconnects > self.config.reconnect_attempts {
                        // The next publish finds the closed channel and replaces it.
                        return Err(error.into());
                    }
                    warn!(
                        target: TARGET,
                        message_id = %id,
                        attempt = reconnects,
                        error = %error,
                        "connection or channel lost; reconnecting to send again"
                    );
                    tokio::time::sleep(backoff(&self.config, reconnects)).await;
                    if let Err(e) = self.relink(link.generation).await {
                        // The next round sends on the broken link, fails fast and counts
                        // another attempt, so a broker that stays away ends the publish.
                        debug!(target: TARGET, message_id = %id, error = %e, "reconnect failed");
                    }
                }
            }
        }
    }

    async fn flush(&self) -> dory_core::Result<()> {
        // Every unconfirmed message holds a permit until its confirm resolved; once all of
        // them are back, nothing published before this call is outstanding. The semaphore is
        // fair, so later publishes queue behind the flush instead of starving it.
        let all = self
            .window
            .acquire_many(self.window_size)
            .await
            .map_err(|_| dory_core::Error::unavailable("flush: publisher closed"))?;
        drop(all);
        Ok(())
    }
}

impl fmt::Debug for AmqpPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpPublisher")
            .field("config", &self.config)
            .field("in_flight", &self.in_flight())
            .field("generation", &self.lock().link.generation)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dory_core::{Epoch, ProcessorId, Sequence};

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn headers_and_id_are_set_and_overflow_is_refused() {
        let mut m = OutputMessage {
            processor: ProcessorId::new("p").unwrap(),
            epoch: Epoch(3),
            sequence: Sequence(9),
            routing_key: None,
            payload: vec![],
        };
        let p = properties(&m, &m.message_id()).unwrap();
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("p:3:9"));
        assert_eq!(*p.delivery_mode(), Some(PERSISTENT));
        m.sequence = Sequence(u64::MAX);
        assert!(matches!(
            properties(&m, &m.message_id()),
            Err(dory_core::Error::Invalid(_))
        ));
    }

    #[allow(dead_code)]
    fn futures_are_send(p: &AmqpPublisher, m: OutputMessage) {
        assert_send(&AmqpPublisher::connect(AmqpConfig::new("amqp://h", "x")));
        assert_send(&p.publish(m));
        assert_send(&p.flush());
        assert_send(&p.close());
    }
}
