//! `dory-example-counter`: a Rust processor on `dory-runtime` that counts 1, 2, 3, ... and
//! publishes each count, wired from the instance environment.
//!
//! Everything comes from the `DORY_*` variables of [`InstanceEnv`] (what a placement backend
//! sets), wired by [`dory_connect::Backends`]:
//!
//! - `DORY_STORE_URL`: `postgres://…` (or `postgresql://…`), a `PgStore`. The schema holding
//!   Dory's tables is the URL's `schema` query parameter (`…/dory?schema=tenant_a`), taken out
//!   of the URL before it reaches the driver; without it, [`dory_pg::DEFAULT_SCHEMA`].
//! - `DORY_PUBLISHER_URL`: `amqp://…` or `amqps://…`, an `AmqpPublisher`. The exchange and
//!   routing key are the URL's `exchange` and `routing_key` query parameters
//!   (`…/%2f?exchange=out&routing_key=counts`); by default RabbitMQ's built-in `amq.topic`
//!   exchange with the processor id as routing key. Messages are mandatory: until a queue is
//!   bound to receive them, publishing fails and the count does not advance.
//! - `DORY_INPUT_URL` must not be set: the counter consumes no input.
//! - `DORY_CONFIG`: optional JSON `{"interval_ms": 100, "spin": false}`: the pause after each
//!   count, cut short when the runtime wants a safe point; with `"spin": true` it is not, as
//!   user code stuck in a long computation (what freeze timeouts are tested with).
//!
//! Each message's body is the count in decimal; its `dory-sequence` header is the output
//! sequence, which equals the count, across checkpoints, restarts and moves.
//!
//! Stdout carries two machine-readable lines (logs go to stderr, `RUST_LOG` filters them):
//! `listening on <address>` once the endpoint port is bound, and `exit: …` at the end
//! (`exit: saved sequence=<n>`, `exit: saved nothing`, `exit: not-owner`, `exit: fenced …`,
//! `exit: grace-exceeded`, `exit: save-failed last-committed=<n>`). The exit code is 0 for a
//! clean shutdown (saved, or frozen and no longer the owner), 3 when the store fenced the
//! instance, 4 when the grace period ran out, 5 when the final checkpoint could not be stored,
//! 1 for anything else (a bad environment, an unreachable store or broker).
//!
//! `dory-example-counter claim` stands in for the orchestrator when running by hand: with
//! `DORY_STORE_URL` and `DORY_PROCESSOR_ID` set, it takes the leadership term, claims the
//! processor's next epoch, makes it the owner (waiting for a previous owner's lease to run
//! out) and prints the epoch, to start an instance with in `restore` mode. `claim --standby`
//! and `commit-move` play the orchestrator's part in a move (see [`orchestrate`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use async_trait::async_trait;
use dory_connect::Backends;
use dory_core::InstanceEnv;
use dory_runtime::{Context, Processor, Runtime, Settings, StepError, sigterm};
use serde::Deserialize;
use tracing_subscriber::EnvFilter;

mod orchestrate;

/// The processor's own settings, from `DORY_CONFIG`. Where counts go is the publisher URL's
/// business (`exchange=`, `routing_key=`), not this.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
struct CounterConfig {
    /// The pause after each count.
    interval_ms: u64,
    /// The pause ignores the runtime's safe points (user code stuck in a computation).
    spin: bool,
}

impl Default for CounterConfig {
    fn default() -> Self {
        CounterConfig {
            interval_ms: 100,
            spin: false,
        }
    }
}

impl CounterConfig {
    /// Reads `DORY_CONFIG` (`null` when it is not set).
    fn from_json(value: &serde_json::Value) -> anyhow::Result<Self> {
        match value {
            serde_json::Value::Null => Ok(CounterConfig::default()),
            value => serde_json::from_value(value.clone()).with_context(|| {
                format!(
                    "{} is not a counter configuration ({{\"interval_ms\": 100}}; the exchange \
                     and routing key are query parameters of {})",
                    dory_core::env::CONFIG,
                    dory_core::env::PUBLISHER_URL
                )
            }),
        }
    }
}

/// Publishes the next count, then counts it. The count is the runtime-owned state, so it
/// travels in every checkpoint and move.
struct Counter {
    interval: Duration,
    spin: bool,
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
        if self.spin {
            tokio::time::sleep(self.interval).await;
            return Ok(());
        }
        // Cut short when the runtime wants a safe point, so a freeze never waits out the
        // interval.
        tokio::select! {
            () = tokio::time::sleep(self.interval) => {}
            () = ctx.safe_point_wanted() => {}
        }
        Ok(())
    }
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        let epoch = orchestrate::run(&args).await?;
        println!("{}", epoch.0);
        return Ok(ExitCode::SUCCESS);
    }
    // Installed first, so a SIGTERM that arrives while connecting is not lost.
    let shutdown = sigterm()?;
    let env = InstanceEnv::from_process_env().context("reading the instance environment")?;
    let config = CounterConfig::from_json(&env.config)?;
    if env.input_url.is_some() {
        // Connecting it would hold a prefetch of messages no step ever reads.
        bail!(
            "{} is set, but the counter consumes no input",
            dory_core::env::INPUT_URL
        );
    }
    // Not `?env`: its Debug shows the store URL, which may hold a password.
    tracing::info!(processor = %env.processor, epoch = env.epoch.0, mode = %env.mode, ?config, "starting");

    let backends = Backends::connect(&env).await?;
    let counter = Counter {
        interval: Duration::from_millis(config.interval_ms),
        spin: config.spin,
    };
    let runtime = Runtime::bind(
        env,
        counter,
        Arc::clone(&backends.store),
        backends.dyn_publisher(),
        None,
        Settings::default(),
    )
    .await?;
    println!("listening on {}", runtime.local_addr());
    let exit = runtime.run_until(shutdown).await?;
    if let Err(e) = backends.close().await {
        tracing::warn!("closing the publisher: {e}");
    }
    println!("exit: {exit}");
    Ok(ExitCode::from(u8::try_from(exit.code()).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_the_interval_only() {
        let c = CounterConfig::from_json(&serde_json::Value::Null).unwrap();
        assert_eq!(c, CounterConfig::default());
        let c = CounterConfig::from_json(&serde_json::json!({"interval_ms": 5})).unwrap();
        assert_eq!(c.interval_ms, 5);
        // The exchange moved to the publisher URL: an old configuration says so.
        let e = CounterConfig::from_json(&serde_json::json!({"exchange": "out"})).unwrap_err();
        assert!(format!("{e:#}").contains("DORY_PUBLISHER_URL"), "{e:#}");
    }
}
