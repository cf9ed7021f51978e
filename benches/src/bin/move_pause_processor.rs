//! `move_pause_processor`: the processor of the `move_pause` bench, a real process on
//! `dory-runtime`, wired from its `DORY_*` environment by `dory-connect`.
//!
//! Its state is `size` random bytes (`DORY_CONFIG={"size": N}`) and a step counter. Each
//! step publishes `{"step":<n>,"t_ns":<wall-clock ns since the Unix epoch>}`, the time taken
//! when the step begins, then sleeps about 1 ms (cut short when the runtime wants a safe
//! point, so a freeze or a shutdown never waits for the sleep). Every process on the machine
//! reads the same wall clock, so the bench can subtract the times two instances wrote.
//!
//! Stdout carries `started <t_ns>` when `main` begins, `connected <t_ns>` once the store and
//! publisher are open (the bench splits a start-up with them), `listening on <address>` once
//! the endpoint is bound and `exit: …` at the end, as the counter example does; the exit code
//! is the runtime's (0 when nothing was lost). The runtime's logs go to stderr (the instance's
//! `stderr.log` under the local placement), warnings by default, more with `RUST_LOG`.
//!
//! `move_pause_processor supervise --dir <instance dir> -- <program> [args…]` is the local
//! placement's supervisor instead (`dory_local::supervise`), so the bench needs no other
//! binary.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dory_benches::{Blob, random_bytes};
use dory_connect::Backends;
use dory_core::InstanceEnv;
use dory_runtime::{Context, Processor, Runtime, Settings, StepError, sigterm};
use serde::{Deserialize, Serialize};

/// The pause after each step.
const STEP_SLEEP: Duration = Duration::from_millis(1);

/// `DORY_CONFIG`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// How many random bytes the state holds.
    size: usize,
}

/// What travels in every snapshot.
#[derive(Default, Serialize, Deserialize)]
struct State {
    /// `size` random (incompressible) bytes; one flips per step, so the state changes.
    blob: Blob,
    /// Steps taken, across every instance.
    steps: u64,
}

/// Publishes the time of each step.
struct Stamper {
    size: usize,
}

#[async_trait]
impl Processor for Stamper {
    type State = State;

    async fn step(&mut self, state: &mut State, ctx: &mut Context) -> Result<(), StepError> {
        if state.blob.0.len() != self.size {
            // A fresh start (no snapshot to restore): made once, before the first output.
            state.blob = Blob(random_bytes(self.size));
        }
        let at = now_ns();
        let step = state.steps + 1;
        ctx.publish(
            None,
            format!("{{\"step\":{step},\"t_ns\":{at}}}").into_bytes(),
        )
        .await?;
        state.steps = step;
        if let Some(byte) = state.blob.0.get_mut(step as usize % self.size.max(1)) {
            *byte ^= 1;
        }
        tokio::select! {
            () = tokio::time::sleep(STEP_SLEEP) => {}
            () = ctx.safe_point_wanted() => {}
        }
        Ok(())
    }
}

/// Wall-clock ns since the Unix epoch.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "supervise") {
        return dory_local::supervise(args.skip(1));
    }
    println!("started {}", now_ns());
    // The runtime's warnings (and more with `RUST_LOG`) in the instance's stderr log.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("move_pause_processor: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("move_pause_processor: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Installed first, so a SIGTERM that arrives while connecting is not lost.
    let shutdown = sigterm()?;
    let env = InstanceEnv::from_process_env()?;
    let config: Config = serde_json::from_value(env.config.clone())
        .map_err(|e| format!("DORY_CONFIG is not {{\"size\": <bytes>}}: {e}"))?;
    let backends = Backends::connect(&env).await?;
    println!("connected {}", now_ns());
    let runtime = Runtime::bind(
        env,
        Stamper { size: config.size },
        Arc::clone(&backends.store),
        backends.dyn_publisher(),
        None,
        Settings::default(),
    )
    .await?;
    println!("listening on {}", runtime.local_addr());
    let exit = runtime.run_until(shutdown).await?;
    if let Err(e) = backends.close().await {
        eprintln!("move_pause_processor: closing the publisher: {e}");
    }
    println!("exit: {exit}");
    Ok(ExitCode::from(u8::try_from(exit.code()).unwrap_or(1)))
}
