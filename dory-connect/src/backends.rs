//! [`Backends`]: the connected state store, publisher and input of one instance.

use std::fmt;
use std::sync::Arc;

use dory_amqp::{AmqpInput, AmqpPublisher};
use dory_core::env::{INPUT_URL, PUBLISHER_URL, STORE_URL};
use dory_core::{Input, InstanceEnv, Publisher, StateStore};
use dory_embedded::{EmbeddedDb, EmbeddedStore, FilePublisher};
use dory_pg::PgStore;
use tracing::{info, warn};

use crate::TARGET;
use crate::config::{BackendsConfig, PublisherConfig, StoreConfig};
use crate::error::ConnectError;

/// An instance's connected backends, ready to hand to the processor runtime.
#[non_exhaustive]
pub struct Backends {
    /// The state store (`DORY_STORE_URL`): a [`PgStore`] or an [`EmbeddedStore`].
    pub store: Arc<dyn StateStore>,
    /// The publisher (`DORY_PUBLISHER_URL`). Kept concrete so the owner can close it at exit
    /// ([`Backends::close`]); [`Backends::dyn_publisher`] is the same one as a [`Publisher`].
    pub publisher: PublisherBackend,
    /// The input (`DORY_INPUT_URL`), if the processor consumes any.
    pub input: Option<Arc<AmqpInput>>,
}

/// The connected publisher, whichever `DORY_PUBLISHER_URL` named.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PublisherBackend {
    /// RabbitMQ (`amqp://`, `amqps://`).
    Amqp(Arc<AmqpPublisher>),
    /// JSON-lines files (`file://`).
    File(Arc<FilePublisher>),
}

impl PublisherBackend {
    /// The publisher as the [`Publisher`] the runtime takes.
    pub fn as_dyn(&self) -> Arc<dyn Publisher> {
        match self {
            PublisherBackend::Amqp(p) => p.clone(),
            PublisherBackend::File(p) => p.clone(),
        }
    }

    /// The RabbitMQ publisher, if that is the one.
    pub fn amqp(&self) -> Option<&Arc<AmqpPublisher>> {
        match self {
            PublisherBackend::Amqp(p) => Some(p),
            PublisherBackend::File(_) => None,
        }
    }

    /// The file publisher, if that is the one.
    pub fn file(&self) -> Option<&Arc<FilePublisher>> {
        match self {
            PublisherBackend::File(p) => Some(p),
            PublisherBackend::Amqp(_) => None,
        }
    }

    /// Waits for every outstanding confirm (RabbitMQ: then closes the connection; files:
    /// every line written so far is on disk).
    pub async fn close(&self) -> dory_core::Result<()> {
        match self {
            PublisherBackend::Amqp(p) => p.close().await,
            PublisherBackend::File(p) => p.close().await,
        }
    }
}

impl Backends {
    /// Reads every backend's settings from `env` ([`BackendsConfig::from_env`]: nothing is
    /// connected when a variable is wrong), then connects the store, the publisher and the
    /// input, in that order.
    pub async fn connect(env: &InstanceEnv) -> Result<Backends, ConnectError> {
        BackendsConfig::from_env(env)?.connect().await
    }

    /// The publisher as the [`Publisher`] the runtime takes.
    pub fn dyn_publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.as_dyn()
    }

    /// The input as the [`Input`] the runtime takes, if there is one.
    pub fn dyn_input(&self) -> Option<Arc<dyn Input>> {
        self.input.clone().map(|input| input as Arc<dyn Input>)
    }

    /// Closes the input (its unreleased messages go back to the queue) and the publisher
    /// (after waiting for every outstanding confirm). Both are closed even when one fails;
    /// the first failure is returned. The store's connections close when it is dropped.
    pub async fn close(&self) -> dory_core::Result<()> {
        let input = match &self.input {
            Some(input) => input.close().await,
            None => Ok(()),
        };
        let publisher = self.publisher.close().await;
        input.and(publisher)
    }
}

impl BackendsConfig {
    /// Connects the store, the publisher and the input, in that order. A failure names the
    /// variable of the backend that failed; the publisher is closed again when the input
    /// cannot connect.
    pub async fn connect(self) -> Result<Backends, ConnectError> {
        let store: Arc<dyn StateStore> = match &self.store {
            StoreConfig::Postgres(config) => Arc::new(PgStore::connect(config).await.map_err(
                |source| ConnectError::Store {
                    var: STORE_URL,
                    source: Box::new(source),
                },
            )?),
            StoreConfig::Sqlite(path) => {
                let db = EmbeddedDb::open(path)
                    .await
                    .map_err(|source| ConnectError::Local {
                        var: STORE_URL,
                        role: "state store",
                        source: Box::new(source),
                    })?;
                Arc::new(EmbeddedStore::new(&db))
            }
        };
        let publisher =
            match &self.publisher {
                PublisherConfig::Amqp(config) => PublisherBackend::Amqp(Arc::new(
                    AmqpPublisher::connect(config.clone())
                        .await
                        .map_err(|source| ConnectError::Broker {
                            var: PUBLISHER_URL,
                            role: "publisher",
                            source: Box::new(source),
                        })?,
                )),
                PublisherConfig::File(dir) => PublisherBackend::File(Arc::new(
                    FilePublisher::open(dir).map_err(|source| ConnectError::Local {
                        var: PUBLISHER_URL,
                        role: "publisher",
                        source: Box::new(source),
                    })?,
                )),
            };
        let input = match &self.input {
            None => None,
            Some(config) => match AmqpInput::connect(config.clone()).await {
                Ok(input) => Some(Arc::new(input)),
                Err(source) => {
                    if let Err(e) = publisher.close().await {
                        warn!(target: TARGET, error = %e, "closing the publisher after the input failed");
                    }
                    return Err(ConnectError::Broker {
                        var: INPUT_URL,
                        role: "input",
                        source: Box::new(source),
                    });
                }
            },
        };
        info!(
            target: TARGET,
            store = %describe_store(&self.store),
            publisher = %describe_publisher(&self.publisher),
            input.queue = self.input.as_ref().map(|i| i.queue.as_str()),
            "backends connected"
        );
        Ok(Backends {
            store,
            publisher,
            input,
        })
    }
}

/// The store for a log line, without its URL (which may hold a password).
fn describe_store(store: &StoreConfig) -> String {
    match store {
        StoreConfig::Postgres(pg) => format!("postgres schema {}", pg.schema),
        StoreConfig::Sqlite(path) => format!("sqlite {}", path.display()),
    }
}

/// The publisher for a log line, without its URL.
fn describe_publisher(publisher: &PublisherConfig) -> String {
    match publisher {
        PublisherConfig::Amqp(amqp) => format!(
            "amqp exchange {:?} routing key {:?}",
            amqp.exchange, amqp.routing_key
        ),
        PublisherConfig::File(dir) => format!("files in {}", dir.display()),
    }
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backends")
            .field(
                "publisher",
                &match &self.publisher {
                    PublisherBackend::Amqp(p) => format!("{:?}", p.config()),
                    PublisherBackend::File(p) => format!("{p:?}"),
                },
            )
            .field("input", &self.input.as_ref().map(|i| i.config()))
            .finish_non_exhaustive()
    }
}
