//! Dory's processor runtime, the Rust SDK: it runs a [`Processor`] as one instance of the
//! orchestrator's protocol.
//!
//! The runtime owns the processor's state and lends it to [`Processor::step`] one iteration
//! at a time; between steps (safe points) it checkpoints to the [`StateStore`] at the
//! configured interval, renews the ownership lease, freezes for a move, and saves on
//! shutdown. It serves the instance endpoints of [`dory_control`] (health, readiness,
//! Prometheus metrics, freeze, fetch, load, resume) on the environment's port. Backends are
//! injected: the binary picks the store, publisher and input from the [`InstanceEnv`].
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use dory_core::{InstanceEnv, Publisher, StateStore};
//! use dory_runtime::{Context, Processor, Runtime, Settings, StepError, sigterm};
//!
//! struct Counter;
//!
//! #[async_trait::async_trait]
//! impl Processor for Counter {
//!     type State = u64;
//!     async fn step(&mut self, count: &mut u64, ctx: &mut Context) -> Result<(), StepError> {
//!         ctx.publish(None, (*count + 1).to_le_bytes().to_vec()).await?;
//!         *count += 1;
//!         tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//!         Ok(())
//!     }
//! }
//!
//! async fn run(store: Arc<dyn StateStore>, publisher: Arc<dyn Publisher>) -> Result<(), Box<dyn std::error::Error>> {
//!     let env = InstanceEnv::from_process_env()?;
//!     let shutdown = sigterm()?;
//!     let runtime = Runtime::bind(env, Counter, store, publisher, None, Settings::default()).await?;
//!     println!("serving on {}", runtime.local_addr());
//!     let exit = runtime.run_until(shutdown).await?;
//!     println!("{exit:?}");
//!     Ok(())
//! }
//! ```
//!
//! [`StateStore`]: dory_core::StateStore
//! [`InstanceEnv`]: dory_core::InstanceEnv

mod endpoint;
mod error;
mod processor;
mod runtime;
mod shared;

pub use error::{RuntimeError, StepError};
pub use processor::{Context, Processor};
pub use runtime::{Exit, PRUNE_EVERY, Runtime, Settings, sigterm};
