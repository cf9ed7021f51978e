//! [`Backends`]: the connected state store, publisher and input of one instance.

use std::fmt;
use std::sync::Arc;

use dory_amqp::{AmqpInput, AmqpPublisher};
use dory_core::env::{INPUT_URL, PUBLISHER_URL, STORE_URL};
use dory_core::{Input, InstanceEnv, Publisher, StateStore};
use dory_pg::PgStore;
use tracing::{info, warn};

use crate::TARGET;
use crate::config::BackendsConfig;
use crate::error::ConnectError;

/// An instance's connected backends, ready to hand to the processor runtime.
#[non_exhaustive]
pub struct Backends {
    /// The state store (`DORY_STORE_URL`): a [`PgStore`].
    pub store: Arc<dyn StateStore>,
    /// The publisher (`DORY_PUBLISHER_URL`). Kept concrete so the owner can
    /// [`close`](AmqpPublisher::close) it at exit; [`Backends::dyn_publisher`] is the same
    /// one as a [`Publisher`].
    pub publisher: Arc<AmqpPublisher>,
    /// The input (`DORY_INPUT_URL`), if the processor consumes any.
    pub input: Option<Arc<AmqpInput>>,
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
        self.publisher.clone()
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
        let store = PgStore::connect(&self.store)
            .await
            .map_err(|source| ConnectError::Store {
                var: STORE_URL,
                source: Box::new(source),
            })?;
        let publisher = AmqpPublisher::connect(self.publisher.clone())
            .await
            .map_err(|source| ConnectError::Broker {
                var: PUBLISHER_URL,
                role: "publisher",
                source: Box::new(source),
            })?;
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
            schema = %self.store.schema,
            exchange = %self.publisher.exchange,
            routing_key = %self.publisher.routing_key,
            input.queue = self.input.as_ref().map(|i| i.queue.as_str()),
            "backends connected"
        );
        Ok(Backends {
            store: Arc::new(store),
            publisher: Arc::new(publisher),
            input,
        })
    }
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backends")
            .field("publisher", self.publisher.config())
            .field("input", &self.input.as_ref().map(|i| i.config()))
            .finish_non_exhaustive()
    }
}
