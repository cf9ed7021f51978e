//! `dory-example-counter`: a Rust processor on `dory-runtime` that counts 1, 2, 3, ... and
//! publishes each count, wired from the instance environment.
//!
//! Everything comes from the `DORY_*` variables of [`InstanceEnv`] (what a placement backend
//! sets):
//!
//! - `DORY_STORE_URL`: `postgres://…` (or `postgresql://…`), a [`PgStore`]. The schema holding
//!   Dory's tables is the URL's `schema` query parameter (`…/dory?schema=tenant_a`), taken out
//!   of the URL before it reaches the driver; without it, [`dory_pg::DEFAULT_SCHEMA`].
//! - `DORY_PUBLISHER_URL`: `amqp://…` or `amqps://…`, an [`AmqpPublisher`]. The exchange and
//!   routing key come from `DORY_CONFIG` (below); by default RabbitMQ's built-in `amq.topic`
//!   exchange with the processor id as routing key. Messages are mandatory: until a queue is
//!   bound to receive them, publishing fails and the count does not advance.
//! - `DORY_CONFIG`: optional JSON `{"exchange": "…", "routing_key": "…", "interval_ms": 100}`.
//!
//! Each message's body is the count in decimal; its `dory-sequence` header is the output
//! sequence, which equals the count, across checkpoints, restarts and moves.
//!
//! Stdout carries two machine-readable lines (logs go to stderr, `RUST_LOG` filters them):
//! `listening on <address>` once the endpoint port is bound, and `exit: …` at the end
//! (`exit: saved sequence=<n>`, `exit: saved nothing`, `exit: not-owner`, `exit: fenced …`,
//! `exit: grace-exceeded`). The exit code is 0 for a clean shutdown (saved, or frozen and no
//! longer the owner), 3 when the store fenced the instance, 4 when the grace period ran out,
//! 1 for anything else (a bad environment, an unreachable store or broker).
//!
//! `dory-example-counter claim` stands in for the orchestrator when running by hand: with
//! `DORY_STORE_URL` and `DORY_PROCESSOR_ID` set, it takes the leadership term, claims the
//! processor's next epoch, makes it the owner (waiting for a previous owner's lease to run
//! out) and prints the epoch, to start an instance with in `restore` mode.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use dory_amqp::{AmqpConfig, AmqpPublisher};
use dory_core::{Error, InstanceEnv, Leadership, ProcessorId, Publisher, StateStore};
use dory_pg::{PgConfig, PgLeadership, PgStore};
use dory_runtime::{Context, Exit, Processor, Runtime, Settings, StepError, sigterm};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// The exchange used when `DORY_CONFIG` names none: it exists on every RabbitMQ.
const DEFAULT_EXCHANGE: &str = "amq.topic";

/// The processor's own settings, from `DORY_CONFIG`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CounterConfig {
    /// The exchange counts are published to.
    exchange: String,
    /// The routing key; the processor id when `None`.
    routing_key: Option<String>,
    /// The pause after each count.
    interval_ms: u64,
}

impl Default for CounterConfig {
    fn default() -> Self {
        CounterConfig {
            exchange: DEFAULT_EXCHANGE.to_string(),
            routing_key: None,
            interval_ms: 100,
        }
    }
}

/// Publishes the next count, then counts it. The count is the runtime-owned state, so it
/// travels in every checkpoint and move.
struct Counter {
    interval: Duration,
}

#[async_trait]
impl Processor for Counter {
    type State = u64;

    async fn step(&mut self, count: &mut u64, ctx: &mut Context) -> Result<(), StepError> {
        let next = *count + 1;
        // Only a confirmed publish advances the count: a failed one is tried again with the
        // same sequence and body.
        ctx.publish(None, next.to_string().into_bytes()).await?;
        *count = next;
        tokio::time::sleep(self.interval).await;
        Ok(())
    }
}

/// Splits the `schema` query parameter off a Postgres URL: the store's settings.
fn store_config(url: &str) -> anyhow::Result<PgConfig> {
    let scheme = url.split("://").next().unwrap_or_default();
    if !url.contains("://") || !matches!(scheme, "postgres" | "postgresql") {
        bail!(
            "{}: this example supports only postgres:// state stores, not {scheme:?}",
            dory_core::env::STORE_URL
        );
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut schema = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| match p.strip_prefix("schema=") {
            Some(name) => {
                schema = Some(name.to_string());
                false
            }
            None => true,
        })
        .collect();
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let config = PgConfig::new(url).with_pool_size(4);
    Ok(match schema {
        Some(schema) => config.with_schema(schema),
        None => config,
    })
}

/// The publisher's settings from `DORY_PUBLISHER_URL` and `DORY_CONFIG`.
fn publisher_config(env: &InstanceEnv, config: &CounterConfig) -> anyhow::Result<AmqpConfig> {
    let var = dory_core::env::PUBLISHER_URL;
    let Some(url) = &env.publisher_url else {
        bail!("{var} is not set: the counter publishes every count");
    };
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        let scheme = url.split("://").next().unwrap_or_default();
        bail!("{var}: this example supports only amqp:// and amqps:// publishers, not {scheme:?}");
    }
    let routing_key = config
        .routing_key
        .clone()
        .unwrap_or_else(|| env.processor.to_string());
    Ok(AmqpConfig::new(url.clone(), config.exchange.clone()).with_routing_key(routing_key))
}

fn exit_code(exit: &Exit) -> (String, u8) {
    let said = match exit {
        Exit::Saved {
            sequence: Some(sequence),
        } => format!("saved sequence={}", sequence.0),
        Exit::Saved { sequence: None } => "saved nothing".to_string(),
        Exit::NotOwner => "not-owner".to_string(),
        Exit::Fenced { reason } => format!("fenced {reason}"),
        Exit::GraceExceeded => "grace-exceeded".to_string(),
        Exit::SaveFailed { last_committed } => {
            format!("save-failed last-committed={}", last_committed.0)
        }
        other => format!("{other:?}"),
    };
    (said, u8::try_from(exit.code()).unwrap_or(1))
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(command) = std::env::args().nth(1) {
        if command != "claim" {
            bail!("unknown command {command:?}: run without arguments, or `claim`");
        }
        let epoch = claim().await?;
        println!("{}", epoch.0);
        return Ok(ExitCode::SUCCESS);
    }
    // Installed first, so a SIGTERM that arrives while connecting is not lost.
    let shutdown = sigterm()?;
    let env = InstanceEnv::from_process_env().context("reading the instance environment")?;
    let config: CounterConfig = match &env.config {
        serde_json::Value::Null => CounterConfig::default(),
        value => serde_json::from_value(value.clone()).with_context(|| {
            format!("{} is not a counter configuration", dory_core::env::CONFIG)
        })?,
    };
    // Not `?env`: its Debug shows the store URL, which may hold a password.
    tracing::info!(processor = %env.processor, epoch = env.epoch.0, mode = %env.mode, ?config, "starting");

    let store_config = store_config(&env.store_url)?;
    let store = PgStore::connect(&store_config)
        .await
        .with_context(|| format!("connecting the state store ({store_config:?})"))?;
    let publisher_config = publisher_config(&env, &config)?;
    let publisher = AmqpPublisher::connect(publisher_config.clone())
        .await
        .with_context(|| format!("connecting the publisher ({publisher_config:?})"))?;
    let store: Arc<dyn StateStore> = Arc::new(store);
    let publisher = Arc::new(publisher);
    let shared: Arc<dyn Publisher> = publisher.clone();

    let counter = Counter {
        interval: Duration::from_millis(config.interval_ms),
    };
    let runtime = Runtime::bind(env, counter, store, shared, None, Settings::default()).await?;
    println!("listening on {}", runtime.local_addr());
    let exit = runtime.run_until(shutdown).await?;
    if let Err(e) = publisher.close().await {
        tracing::warn!("closing the publisher: {e}");
    }
    let (line, code) = exit_code(&exit);
    println!("exit: {line}");
    Ok(ExitCode::from(code))
}

/// The orchestrator's part for a run by hand: claim the next epoch and make it the owner.
async fn claim() -> anyhow::Result<dory_core::Epoch> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let processor = ProcessorId::new(var(dory_core::env::PROCESSOR_ID)?)?;
    let lease = match std::env::var(dory_core::env::LEASE_MS) {
        Ok(ms) => Duration::from_millis(
            ms.parse()
                .with_context(|| format!("{} is not a number", dory_core::env::LEASE_MS))?,
        ),
        Err(_) => Duration::from_secs(15),
    };
    let store_config = store_config(&var(dory_core::env::STORE_URL)?)?;
    let store = PgStore::connect(&store_config)
        .await
        .with_context(|| format!("connecting the state store ({store_config:?})"))?;
    let leadership = PgLeadership::new(&store, "dory-example-counter-claim");
    let term = tokio::time::timeout(Duration::from_secs(30), leadership.acquire())
        .await
        .context("another orchestrator holds the leadership")??;
    let result = async {
        let epoch = store.claim_epoch(&processor, term).await?;
        let deadline = tokio::time::Instant::now() + lease * 2 + Duration::from_secs(5);
        loop {
            let owner = store.ownership(&processor).await?.and_then(|r| r.owner);
            match store
                .assign_owner(&processor, owner, epoch, lease, term)
                .await
            {
                Ok(()) => return Ok(epoch),
                // The previous owner's lease has not run out yet.
                Err(Error::Conflict(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("waiting for the previous owner's lease: {why}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow::Error::from(e)),
            }
        }
    }
    .await;
    leadership.resign(term).await?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_comes_from_the_url() {
        let c = store_config("postgres://u@h:5432/db?sslmode=disable&schema=tenant_a").unwrap();
        assert_eq!(c.url, "postgres://u@h:5432/db?sslmode=disable");
        assert_eq!(c.schema, "tenant_a");
        let c = store_config("postgresql://u@h/db?schema=x").unwrap();
        assert_eq!(
            (c.url.as_str(), c.schema.as_str()),
            ("postgresql://u@h/db", "x")
        );
        let c = store_config("postgres://u@h/db").unwrap();
        assert_eq!(c.schema, dory_pg::DEFAULT_SCHEMA);
        assert!(store_config("sqlite:///tmp/x.db").is_err());
        assert!(store_config("nonsense").is_err());
    }
}
