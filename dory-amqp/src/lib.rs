//! RabbitMQ backends for Dory: [`AmqpPublisher`], the [`Publisher`](dory_core::Publisher)
//! processors publish their output through, with publisher confirms and a bounded window of
//! unconfirmed messages.
//!
//! A publish resolves only once the broker confirmed the message; [`flush`] waits for every
//! outstanding confirm, which is what a freezing instance does before it hands its snapshot
//! over. The window keeps memory bounded however slow the broker is: when it is full, the
//! next publish waits.
//!
//! ```no_run
//! use dory_amqp::{AmqpConfig, AmqpPublisher};
//! use dory_core::{Epoch, OutputMessage, ProcessorId, Publisher, Sequence};
//!
//! # async fn example() -> dory_core::Result<()> {
//! let config = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "dory-output")
//!     .with_routing_key("results")
//!     .with_window(256);
//! let publisher = AmqpPublisher::connect(config).await?;
//! publisher
//!     .publish(OutputMessage {
//!         processor: ProcessorId::new("pricer")?,
//!         epoch: Epoch(1),
//!         sequence: Sequence(1),
//!         routing_key: None,
//!         payload: b"42".to_vec(),
//!     })
//!     .await?;
//! publisher.flush().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Delivery guarantee
//!
//! End to end, delivery is **at least once**. A message whose confirm was lost with its
//! connection is sent again after reconnecting, and a processor that fails over replays
//! output published since its last checkpoint under a higher epoch. Every message carries its
//! identity — `message_id` `<processor>:<epoch>:<sequence>` and the headers
//! [`dory-processor`](HEADER_PROCESSOR), [`dory-epoch`](HEADER_EPOCH) and
//! [`dory-sequence`](HEADER_SEQUENCE) — so consumers drop duplicates by
//! `(processor, sequence)`; when two copies of one sequence differ, the higher epoch wins.
//! Messages of one processor arrive in publish order when each publish is awaited before the
//! next, as the runtime does: a copy sent again may repeat an earlier message, never overtake
//! it. Publishes that are in flight together leave in call order, but if their connection is
//! lost they are sent again in whatever order their callers notice.
//!
//! Messages are `mandatory` and persistent: a message no queue is bound to receive fails its
//! publish instead of vanishing, and a confirm from a durable queue means it is on disk.
//!
//! Everything logs under the `dory::amqp` tracing target.
//!
//! [`flush`]: dory_core::Publisher::flush

mod config;
mod error;
mod publisher;

pub use config::{
    AmqpConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_NACK_RETRIES, DEFAULT_RECONNECT_ATTEMPTS,
    DEFAULT_WINDOW,
};
pub use error::Error;
pub use publisher::{AmqpPublisher, HEADER_EPOCH, HEADER_PROCESSOR, HEADER_SEQUENCE};
