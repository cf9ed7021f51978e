//! [`AmqpInput`]: a processor's input from a RabbitMQ queue, acknowledged only after the
//! checkpoint holding its effect has committed.

use std::collections::VecDeque;
use std::fmt;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dory_core::{Input, InputMark, InputMessage, Origin};
use futures_core::Stream;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
use lapin::options::{BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, Consumer};
use tracing::{debug, info, warn};

use crate::config::AmqpConfig;
use crate::error::{Error, connect_error};
use crate::link::{TARGET, answered, backoff, connect};
use crate::publisher::{HEADER_PROCESSOR, HEADER_SEQUENCE};

/// RabbitMQ's default `consumer_timeout`: a delivery not acknowledged within it makes the
/// broker close the channel.
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The default [`prefetch`](AmqpInputConfig::prefetch).
pub const DEFAULT_PREFETCH: u16 = 1_000;

/// How long [`pause`](Input::pause) waits for deliveries still on their way after the
/// consumer was cancelled.
const CANCEL_DRAIN: Duration = Duration::from_millis(500);

/// Where and how a processor consumes its input.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpInputConfig {
    /// The broker connection: its URL, TLS files, connect timeout and reconnect settings are
    /// used; the exchange, routing key, window and nack retries are the publisher's.
    pub broker: AmqpConfig,
    /// The queue to consume. It must exist (it belongs to whoever deploys the pipeline); a
    /// queue with `x-single-active-consumer` makes the broker refuse a second reader too.
    pub queue: String,
    /// At most this many messages are delivered and not yet acknowledged. Messages are
    /// acknowledged only after a checkpoint, so this bounds the messages processed between
    /// two checkpoints: when [`Input::unreleased`] reaches it, checkpoint early.
    pub prefetch: u16,
    /// The broker's `consumer_timeout` (RabbitMQ's default: 30 minutes). Set it to what the
    /// broker is configured with; it cannot be read over AMQP.
    pub consumer_timeout: Duration,
    /// The processor's checkpoint interval. Acknowledgements wait for a checkpoint, so the
    /// interval must be well within the consumer timeout: [`AmqpInput::connect`] refuses one
    /// longer than half of it, leaving the other half for a slow checkpoint.
    pub checkpoint_interval: Duration,
}

impl AmqpInputConfig {
    /// Consuming `queue` on `broker`'s broker, checkpointing every `checkpoint_interval`,
    /// with the default prefetch and the broker's default consumer timeout.
    pub fn new(
        broker: AmqpConfig,
        queue: impl Into<String>,
        checkpoint_interval: Duration,
    ) -> Self {
        AmqpInputConfig {
            broker,
            queue: queue.into(),
            prefetch: DEFAULT_PREFETCH,
            consumer_timeout: BROKER_CONSUMER_TIMEOUT,
            checkpoint_interval,
        }
    }

    /// Sets the prefetch: the most messages delivered and not yet acknowledged.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the broker's consumer timeout, when it is not RabbitMQ's default.
    pub fn with_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// Checks the settings: a queue name, a prefetch, a checkpoint interval within half the
    /// consumer timeout, and the broker settings.
    pub fn validate(&self) -> Result<AMQPUri, Error> {
        let uri = self.broker.validate()?;
        if self.queue.is_empty() {
            return Err(Error::Config("the input queue name is empty".into()));
        }
        if self.prefetch == 0 {
            // AMQP reads 0 as "no limit": with acknowledgements held until a checkpoint, the
            // whole queue could end up in memory.
            return Err(Error::Config(
                "input prefetch 0 means no limit; set the most messages to hold between \
                 checkpoints"
                    .into(),
            ));
        }
        if self.checkpoint_interval.is_zero()
            || self.checkpoint_interval > self.consumer_timeout / 2
        {
            return Err(Error::Config(format!(
                "checkpoint interval {:?} must be above zero and at most half the broker's \
                 consumer_timeout {:?}: input is acknowledged only after a checkpoint, and \
                 the broker closes the channel of a consumer that holds a delivery longer \
                 than consumer_timeout (raise consumer_timeout on the broker and in this \
                 config, or checkpoint more often)",
                self.checkpoint_interval, self.consumer_timeout
            )));
        }
        Ok(uri)
    }
}

/// A delivery returned by `next` and not yet acknowledged.
struct Unreleased {
    /// The mark just after it.
    mark: u64,
    /// The channel it came on: a delivery tag means nothing on another channel.
    generation: u64,
    acker: Acker,
}

/// The consuming side: the connection, its channel and the consumer, if consuming.
struct Subscription {
    connection: Connection,
    channel: Channel,
    /// `None` while paused.
    consumer: Option<Consumer>,
    /// Consuming again after a pause, when a `next` doing it was dropped before it finished.
    starting: Option<tokio::task::JoinHandle<Result<Consumer, Error>>>,
    /// The connection's events. A connection the broker closed, or whose socket failed, does
    /// not end the consumer's stream: an error here is how `next` learns of it.
    events: Pin<Box<dyn Stream<Item = lapin::Event> + Send>>,
    generation: u64,
}

/// What `release` and `mark` need, behind a short synchronous lock (never held over an
/// await), so releasing never waits for `next` to get a message.
#[derive(Default)]
struct Ledger {
    returned: u64,
    unreleased: VecDeque<Unreleased>,
    /// The channel generation deliveries now arrive on.
    generation: u64,
}

/// A processor's input from a RabbitMQ queue: the [`Input`] of `dory-amqp`.
///
/// - Manual acknowledgements with a prefetch limit; a message is acknowledged only by
///   [`release`](Input::release), after the checkpoint holding its effect committed.
/// - [`InputMessage::origin`] comes from the `dory-processor` and `dory-sequence` headers
///   that [`AmqpPublisher`](crate::AmqpPublisher) sets, so a Dory pipeline deduplicates
///   across moves and failovers with [`InputPosition`](dory_core::InputPosition).
/// - [`next`](Input::next) is cancel-safe: a delivery is taken from the consumer and recorded
///   in one poll, so a dropped `next` leaves it with the client, for the next call; consuming
///   again after a pause runs in a task of its own; a connection half made when `next` is
///   dropped closes with its last handle, and the broker gives its deliveries back.
/// - A lost connection is replaced with backoff; what was delivered on it and not released
///   comes again (marked redelivered), and the position skips what the state already holds.
pub struct AmqpInput {
    config: AmqpInputConfig,
    uri: AMQPUri,
    subscription: tokio::sync::Mutex<Option<Subscription>>,
    ledger: Mutex<Ledger>,
    /// Serialises acknowledgements: a multiple-ack below one already sent would close the
    /// channel (unknown delivery tag).
    releasing: tokio::sync::Mutex<()>,
}

impl AmqpInput {
    /// Checks the settings (see [`AmqpInputConfig::validate`]), connects, sets the prefetch
    /// and starts consuming, checking that the queue exists.
    pub async fn connect(config: AmqpInputConfig) -> Result<AmqpInput, Error> {
        let uri = config.validate()?;
        let input = AmqpInput {
            subscription: tokio::sync::Mutex::new(None),
            ledger: Mutex::new(Ledger::default()),
            releasing: tokio::sync::Mutex::new(()),
            uri,
            config,
        };
        {
            let mut subscription = input.subscription.lock().await;
            *subscription = Some(input.subscribe(0).await?);
        }
        info!(
            target: TARGET,
            url = %input.config.broker.redacted_url(),
            queue = %input.config.queue,
            prefetch = input.config.prefetch,
            "input connected"
        );
        Ok(input)
    }

    /// The settings this input was built from.
    pub fn config(&self) -> &AmqpInputConfig {
        &self.config
    }

    /// How many times the connection was replaced after it was lost.
    pub fn reconnects(&self) -> u64 {
        self.ledger().generation
    }

    /// Closes the connection; every message not released goes back to the queue.
    pub async fn close(&self) -> dory_core::Result<()> {
        let Some(subscription) = self.subscription.lock().await.take() else {
            return Ok(());
        };
        self.ledger().unreleased.clear();
        let connection = &subscription.connection;
        answered(
            &self.config.broker,
            || format!("close input of queue {:?}", self.config.queue),
            connection.close(200, "input closed".into()),
        )
        .await?;
        Ok(())
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection and channel with the prefetch set, consuming the queue.
    async fn subscribe(&self, generation: u64) -> Result<Subscription, Error> {
        let broker = &self.config.broker;
        let queue = &self.config.queue;
        let setup = async {
            let connection = connect(broker, &self.uri, "dory input", generation).await?;
            let channel = connection
                .create_channel()
                .await
                .map_err(|source| connect_error(broker.redacted_url(), source))?;
            channel
                .basic_qos(self.config.prefetch, BasicQosOptions::default())
                .await
                .map_err(|source| Error::Broker {
                    operation: format!("set prefetch {}", self.config.prefetch),
                    source,
                })?;
            // Passive: a missing queue fails here, naming it, not as a closed channel later.
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|source| Error::Queue {
                    queue: queue.clone(),
                    source,
                })?;
            // Listening before consuming: an event is only kept for a listener that exists.
            let events = Box::pin(connection.events_listener());
            let consumer = consume(&channel, queue).await?;
            Ok::<_, Error>(Subscription {
                connection,
                channel,
                consumer: Some(consumer),
                starting: None,
                events,
                generation,
            })
        };
        let subscription = match tokio::time::timeout(broker.connect_timeout, setup).await {
            Ok(subscription) => subscription?,
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    url: broker.redacted_url(),
                    after: broker.connect_timeout,
                });
            }
        };
        let mut ledger = self.ledger();
        // Deliveries of an older channel come again on this one: their tags are void.
        ledger.unreleased.retain(|u| u.generation == generation);
        ledger.generation = generation;
        Ok(subscription)
    }

    /// Replaces a lost subscription, with backoff, up to the configured attempts.
    async fn resubscribe(&self, slot: &mut Option<Subscription>, broken: u64) -> Result<(), Error> {
        if let Some(old) = slot.take() {
            tokio::spawn(async move {
                let _ = old.connection.close(200, "replaced".into()).await;
            });
        }
        let broker = &self.config.broker;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.subscribe(broken + 1).await {
                Ok(subscription) => {
                    info!(
                        target: TARGET,
                        queue = %self.config.queue,
                        generation = broken + 1,
                        "input reconnected"
                    );
                    *slot = Some(subscription);
                    return Ok(());
                }
                Err(e) if attempt < broker.reconnect_attempts => {
                    let delay = backoff(broker, attempt);
                    warn!(
                        target: TARGET,
                        queue = %self.config.queue,
                        error = %e,
                        attempt,
                        ?delay,
                        "input reconnect failed"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

async fn consume(channel: &Channel, queue: &str) -> Result<Consumer, Error> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| Error::Broker {
            operation: format!("consume queue {queue:?}"),
            source,
        })
}

#[async_trait]
impl Input for AmqpInput {
    async fn next(&self) -> dory_core::Result<InputMessage> {
        let mut slot = self.subscription.lock().await;
        loop {
            let Some(subscription) = slot.as_mut() else {
                // Closed: consuming again needs a new connection.
                let generation = self.ledger().generation;
                self.resubscribe(&mut slot, generation).await?;
                continue;
            };
            let generation = subscription.generation;
            let consumer = match &mut subscription.consumer {
                Some(consumer) => consumer,
                None => {
                    // Paused: consume again on the same channel, so deliveries taken before
                    // the pause can still be released. In a task of its own, so that a `next`
                    // dropped meanwhile cannot leave behind a consumer nobody reads, holding
                    // deliveries on this channel.
                    let starting = subscription.starting.get_or_insert_with(|| {
                        let channel = subscription.channel.clone();
                        let queue = self.config.queue.clone();
                        tokio::spawn(async move { consume(&channel, &queue).await })
                    });
                    let started = starting.await;
                    subscription.starting = None;
                    match started {
                        Ok(Ok(consumer)) => subscription.consumer.insert(consumer),
                        Ok(Err(e)) => {
                            warn!(target: TARGET, error = %e, "cannot consume again after pause");
                            self.resubscribe(&mut slot, generation).await?;
                            continue;
                        }
                        Err(e) => {
                            warn!(target: TARGET, error = %e, "consuming again after pause failed");
                            self.resubscribe(&mut slot, generation).await?;
                            continue;
                        }
                    }
                }
            };
            let events = &mut subscription.events;
            let delivery = tokio::select! {
                // The loss first: deliveries the client still holds from a lost connection
                // cannot be acknowledged, and come again on the next one anyway.
                biased;
                () = connection_lost(events, &self.config.queue) => None,
                delivery = next_delivery(consumer) => delivery,
            };
            match delivery {
                Some(Ok(delivery)) => return Ok(self.returned(delivery, generation)),
                Some(Err(e)) => {
                    warn!(target: TARGET, queue = %self.config.queue, error = %e, "input lost");
                }
                None => {}
            }
            self.resubscribe(&mut slot, generation).await?;
        }
    }

    fn mark(&self) -> InputMark {
        InputMark(self.ledger().returned)
    }

    async fn release(&self, mark: InputMark) -> dory_core::Result<()> {
        let _one_at_a_time = self.releasing.lock().await;
        let last = {
            let mut ledger = self.ledger();
            let mut last = None;
            while ledger.unreleased.front().is_some_and(|u| u.mark <= mark.0) {
                last = ledger.unreleased.pop_front();
            }
            // Only a delivery of the current channel can be acknowledged; the others come
            // again on it, and are released with it.
            last.filter(|u| u.generation == ledger.generation)
        };
        let Some(last) = last else {
            return Ok(());
        };
        let operation = || {
            format!(
                "acknowledge input of queue {:?} up to mark {}",
                self.config.queue, mark.0
            )
        };
        // Failing here is harmless for the state: unacknowledged messages come again and the
        // position skips them. It is reported so that the caller can log it.
        let acked = answered(
            &self.config.broker,
            &operation,
            last.acker.ack(BasicAckOptions { multiple: true }),
        )
        .await?;
        if acked {
            Ok(())
        } else {
            Err(dory_core::Error::unavailable(format!(
                "{}: the channel is gone; the messages come again",
                operation()
            )))
        }
    }

    async fn pause(&self) -> dory_core::Result<()> {
        let mut slot = self.subscription.lock().await;
        let Some(subscription) = slot.as_mut() else {
            return Ok(());
        };
        if let Some(starting) = subscription.starting.take()
            && let Ok(Ok(consumer)) = starting.await
        {
            // A `next` was dropped while it consumed again: cancel what it started.
            subscription.consumer = Some(consumer);
        }
        let Some(mut consumer) = subscription.consumer.take() else {
            return Ok(());
        };
        let queue = &self.config.queue;
        // On failure the channel is gone: the broker gives every unacknowledged delivery back.
        answered(
            &self.config.broker,
            || format!("stop consuming queue {queue:?}"),
            subscription
                .channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await?;
        // Deliveries already sent before the cancel arrive still; each goes back unprocessed,
        // to be the first the next consumer gets.
        let mut given_back = 0;
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(CANCEL_DRAIN, next_delivery(&mut consumer)).await
        {
            let give_back = delivery.acker.nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            });
            answered(
                &self.config.broker,
                || format!("give back a delivery of queue {queue:?}"),
                give_back,
            )
            .await?;
            given_back += 1;
        }
        debug!(target: TARGET, queue = %queue, given_back, "input paused");
        Ok(())
    }

    fn unreleased(&self) -> usize {
        self.ledger().unreleased.len()
    }
}

impl AmqpInput {
    /// Records a delivery as returned and turns it into an input message.
    fn returned(&self, delivery: Delivery, generation: u64) -> InputMessage {
        let origin = origin(&delivery);
        let message = InputMessage {
            routing_key: Some(delivery.routing_key.as_str().to_string()),
            redelivered: delivery.redelivered,
            origin,
            payload: delivery.data,
        };
        let mut ledger = self.ledger();
        ledger.returned += 1;
        let mark = ledger.returned;
        ledger.unreleased.push_back(Unreleased {
            mark,
            generation,
            acker: delivery.acker,
        });
        message
    }
}

/// The origin a Dory publisher wrote into the headers, if both parts are there.
fn origin(delivery: &Delivery) -> Option<Origin> {
    let headers = delivery.properties.headers().as_ref()?.inner();
    let producer = match headers.get(HEADER_PROCESSOR)? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        _ => return None,
    };
    let sequence = match headers.get(HEADER_SEQUENCE)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok()?,
        AMQPValue::LongInt(v) => u64::try_from(*v).ok()?,
        AMQPValue::LongUInt(v) => u64::from(*v),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok()?,
        AMQPValue::ShortUInt(v) => u64::from(*v),
        _ => return None,
    };
    Some(Origin { producer, sequence })
}

impl fmt::Debug for AmqpInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpInput")
            .field("url", &self.config.broker.redacted_url())
            .field("queue", &self.config.queue)
            .field("prefetch", &self.config.prefetch)
            .field("unreleased", &self.unreleased())
            .finish()
    }
}

/// Waits until `events` reports the connection failed or closed, and logs why.
async fn connection_lost(
    events: &mut Pin<Box<dyn Stream<Item = lapin::Event> + Send>>,
    queue: &str,
) {
    loop {
        match poll_fn(|cx| events.as_mut().poll_next(cx)).await {
            Some(lapin::Event::Error(error)) => {
                warn!(target: TARGET, queue = %queue, %error, "input connection lost");
                return;
            }
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                warn!(target: TARGET, queue = %queue, %reason, "input connection blocked");
            }
            Some(_) => {}
            None => {
                warn!(target: TARGET, queue = %queue, "input connection gone");
                return;
            }
        }
    }
}

/// The consumer's next delivery; `None` once it is cancelled or its channel is gone.
async fn next_delivery(consumer: &mut Consumer) -> Option<lapin::Result<Delivery>> {
    poll_fn(|cx| Pin::new(&mut *consumer).poll_next(cx)).await
}
