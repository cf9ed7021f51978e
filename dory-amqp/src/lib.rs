//! RabbitMQ backends for Dory: [`AmqpPublisher`], the [`Publisher`](dory_core::Publisher)
//! processors publish their output through, with publisher confirms and a bounded window of
//! unconfirmed messages; and [`AmqpInput`], the [`Input`](dory_core::Input) they consume,
//! acknowledged only after a checkpoint.
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
//! # Input
//!
//! [`AmqpInput`] consumes a queue with manual acknowledgements and a prefetch limit. The
//! runtime passes each message through the [`InputPosition`](dory_core::InputPosition) kept
//! in the processor's state, and [releases](dory_core::Input::release) the messages a
//! checkpoint covers only after that checkpoint committed. A crash, failover or move thus
//! costs redeliveries, never messages, and the position recognises the redelivered ones the
//! restored state already holds by their `dory-processor` and `dory-sequence` headers. End
//! to end: each message from a Dory producer is folded into the committed state exactly
//! once, a message without those headers at least once, and output is published at least
//! once (see [`dory_core::input`]).
//!
//! Two broker settings matter:
//! - **`consumer_timeout`** (30 minutes by default): the broker closes the channel of a
//!   consumer that holds a delivery longer. Acknowledgements wait for a checkpoint, so
//!   [`AmqpInput::connect`] refuses a checkpoint interval above half of
//!   [`AmqpInputConfig::consumer_timeout`]; set that to the broker's value when it differs.
//! - **the prefetch**: it bounds the messages processed between two checkpoints, since none
//!   is acknowledged before one. When [`unreleased`](dory_core::Input::unreleased) reaches
//!   it, the broker sends nothing more until the next checkpoint releases them.
//!
//! Declare the queue with `x-single-active-consumer`, so that during a partition the broker
//! itself keeps a second reader waiting until the first is gone, and hands the first one's
//! unacknowledged messages on in order. Without it, those messages come back after later
//! ones; the position still folds each of them in once (it records which sequences the state
//! holds, not just the highest), within its bound of [`MAX_GAPS`](dory_core::MAX_GAPS).
//!
//! ```no_run
//! use std::time::Duration;
//! use dory_amqp::{AmqpConfig, AmqpInput, AmqpInputConfig};
//! use dory_core::{Admission, Input, InputPosition};
//!
//! # async fn example() -> dory_core::Result<()> {
//! let broker = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "");
//! let input = AmqpInput::connect(
//!     AmqpInputConfig::new(broker, "prices", Duration::from_secs(10)).with_prefetch(500),
//! )
//! .await?;
//! let mut position = InputPosition::new(); // restored from the snapshot in practice
//! let message = input.next().await?;
//! if position.admit(&message) != Admission::Duplicate {
//!     // fold `message.payload` into the state
//! }
//! // ... once a checkpoint taken after this message has committed:
//! input.release(input.mark()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # TLS
//!
//! An `amqps://` URL (port 5671 unless it names one) connects over TLS (rustls on ring) and
//! verifies the broker's certificate against the system's certificate store (the host's CA
//! bundle, or the files `SSL_CERT_FILE` and `SSL_CERT_DIR` name) plus, for a private CA, the
//! PEM file set with [`AmqpConfig::with_tls_ca_file`]. A broker that requires mutual
//! TLS gets the client certificate and key set with [`AmqpConfig::with_tls_client_cert`]. The
//! files are read at every (re)connect, so renewed certificates are picked up without a
//! restart; a missing or malformed one fails with [`Error::TlsFile`] naming it, and a failed
//! handshake (a plain-text port, an untrusted certificate) with [`Error::TlsHandshake`] and a
//! hint at the cause. TLS files with a plain `amqp://` URL are refused rather than ignored.
//! With no certificate in the system store at all (a minimal image without a CA bundle),
//! point `SSL_CERT_FILE` at the CA instead.
//!
//! ```no_run
//! # async fn example() -> Result<(), dory_amqp::Error> {
//! let config = dory_amqp::AmqpConfig::new("amqps://dory:secret@rabbit.internal/%2f", "out")
//!     .with_tls_ca_file("/etc/dory/rabbit-ca.pem")
//!     .with_tls_client_cert("/etc/dory/client.pem", "/etc/dory/client-key.pem");
//! let publisher = dory_amqp::AmqpPublisher::connect(config).await?;
//! # drop(publisher);
//! # Ok(())
//! # }
//! ```
//!
//! Everything logs under the `dory::amqp` tracing target.
//!
//! Feature `testing` adds the module `testing`: a test's own connection to a real RabbitMQ
//! (`DORY_TEST_AMQP_URL`), or a skip line when it is unreachable (a panic under `CI=true`).
//!
//! [`flush`]: dory_core::Publisher::flush

mod config;
mod error;
mod input;
mod link;
mod publisher;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;

pub use config::{
    AmqpConfig, ClientCert, DEFAULT_CONNECT_TIMEOUT, DEFAULT_NACK_RETRIES,
    DEFAULT_RECONNECT_ATTEMPTS, DEFAULT_WINDOW,
};
pub use error::Error;
pub use input::{AmqpInput, AmqpInputConfig, BROKER_CONSUMER_TIMEOUT, DEFAULT_PREFETCH};
pub use publisher::{AmqpPublisher, HEADER_EPOCH, HEADER_PROCESSOR, HEADER_SEQUENCE};
