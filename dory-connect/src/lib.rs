//! Wires an instance's backends from its environment: the state store, the publisher and the
//! input named by the `DORY_*` variables of [`InstanceEnv`](dory_core::InstanceEnv), which a
//! placement backend sets. Every processor binary (the Rust examples, the Python wheel) starts
//! the same way, so the URLs mean the same everywhere.
//!
//! ```no_run
//! use dory_connect::Backends;
//! use dory_core::InstanceEnv;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let env = InstanceEnv::from_process_env()?;
//! let backends = Backends::connect(&env).await?;
//! // Hand them to the runtime: `Runtime::bind(env, processor, backends.store.clone(),
//! // backends.dyn_publisher(), backends.dyn_input(), settings)`, run it, then:
//! backends.close().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # The URLs
//!
//! Dory's own settings ride in each URL as query parameters, taken out before the URL reaches
//! the driver. The driver's own parameters stay; any other parameter is refused, because both
//! drivers would drop a misspelt one without a word.
//!
//! | variable | schemes | Dory's parameters | kept for the driver |
//! |---|---|---|---|
//! | `DORY_STORE_URL` | `postgres://`, `postgresql://` | `schema` (default `dory`) | `sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `application_name`, `options`, … |
//! | `DORY_STORE_URL` | `sqlite:///abs/path/dory.db` | none | none |
//! | `DORY_PUBLISHER_URL` | `amqp://`, `amqps://` | `exchange` (default `amq.topic`), `routing_key` (default: the processor id) | `heartbeat`, `frame_max`, `channel_max`, `connection_timeout`, `auth_mechanism` |
//! | `DORY_PUBLISHER_URL` | `file:///abs/dir` | none | none |
//! | `DORY_INPUT_URL` (optional) | `amqp://`, `amqps://` | `queue` (required), `prefetch` (default 1000), `consumer_timeout_ms` (default 30 min, RabbitMQ's) | as above |
//!
//! For example `DORY_STORE_URL=postgres://dory:…@db/dory?schema=tenant_a&sslmode=require`,
//! `DORY_PUBLISHER_URL=amqp://dory:…@rabbit/%2f?exchange=out&routing_key=counts`,
//! `DORY_INPUT_URL=amqp://dory:…@rabbit/%2f?queue=words&prefetch=100`. Values are
//! percent-decoded (`%23` is `#`). The input is acknowledged after each checkpoint, so
//! `DORY_CHECKPOINT_INTERVAL_MS` must be at most half the broker's consumer timeout.
//!
//! The no-install defaults (`dory-embedded`) are local files: `sqlite:///abs/path/dory.db` is
//! the embedded SQLite database the orchestrator and every instance on the machine share
//! (created if missing, its directory must exist), and `file:///abs/dir` writes each
//! processor's output to `<dir>/<processor>.jsonl` (created if missing). Both take an absolute
//! path with no host (three slashes), percent-encoded where needed (`%20` for a space, `%23`
//! for `#`, `%3F` for `?`), and no query parameters.
//!
//! The pure functions [`store_settings`], [`publisher_settings`] and [`input_config`]
//! (together: [`BackendsConfig::from_env`]) read the settings without connecting
//! ([`store_config`] and [`publisher_config`] are their Postgres and RabbitMQ halves), so a wrong variable is
//! reported before anything is opened. Every [`ConnectError`] names the variable at fault;
//! none carries a URL, so a password never reaches an error or a log line.
//!
//! Everything logs under the `dory::connect` tracing target.

mod backends;
mod config;
mod error;
mod query;

pub use backends::{Backends, PublisherBackend};
pub use config::{
    BackendsConfig, DEFAULT_EXCHANGE, PublisherConfig, STORE_POOL_SIZE, StoreConfig, input_config,
    publisher_config, publisher_settings, store_config, store_settings,
};
pub use error::ConnectError;

/// The tracing target of this crate.
const TARGET: &str = "dory::connect";
