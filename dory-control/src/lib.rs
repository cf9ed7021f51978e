//! Dory's instance control channel: the HTTP endpoints every processor instance serves, and
//! the client the orchestrator drives them with.
//!
//! - [`wire`]: the format both sides share: routes, the bearer-token header, request and
//!   answer bodies, the JSON error body, and the one mapping between error meanings
//!   ([`dory_core::Error`]) and HTTP status codes.
//! - [`server`]: the [`InstanceEndpoint`] trait the processor runtime implements and the axum
//!   [`router`] that serves it (token check, body limits, freeze deadline, error bodies).
//! - [`client`]: [`HttpControl`], the [`dory_core::InstanceControl`] of the real placement
//!   backends.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use dory_control::{HttpControl, InstanceEndpoint, ServerSettings, router};
//! use dory_core::{
//!     ControlEndpoint, Epoch, Error, Health, Instance, InstanceControl, NodeId, Phase,
//!     ProcessorId, Result, Sequence, SnapshotMeta, Timestamp,
//! };
//!
//! /// An instance that only ever stands by.
//! struct Standby;
//!
//! #[async_trait::async_trait]
//! impl InstanceEndpoint for Standby {
//!     fn health(&self) -> Health {
//!         Health { phase: Phase::Standby, epoch: Epoch(2), sequence: Sequence(0), protocol: dory_core::CONTROL_PROTOCOL }
//!     }
//!     fn ready(&self) -> Result<()> { Ok(()) }
//!     fn metrics(&self) -> String { "dory_epoch 2\n".into() }
//!     async fn freeze(&self, _: Duration) -> Result<SnapshotMeta> {
//!         Err(Error::conflict("standing by, nothing to freeze"))
//!     }
//!     async fn snapshot(&self) -> Result<bytes::Bytes> {
//!         Err(Error::conflict("not frozen"))
//!     }
//!     async fn load(&self, _: bytes::Bytes) -> Result<()> { Ok(()) }
//!     async fn resume(&self, _: Option<Sequence>) -> Result<()> { Ok(()) }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // The instance: serve the router (the runtime does this on DORY_PORT).
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let address = listener.local_addr().unwrap().to_string();
//! let app = router(Arc::new(Standby), ServerSettings::new("s3cret"));
//! tokio::spawn(async move { axum::serve(listener, app).await });
//!
//! // The orchestrator: reach it through what the placement reported.
//! let instance = Instance {
//!     processor: ProcessorId::new("counter")?,
//!     epoch: Epoch(2),
//!     node: NodeId::new("n1"),
//!     phase: Phase::Standby,
//!     revision: 0,
//!     started_at: Timestamp(0),
//!     endpoint: Some(ControlEndpoint { address, token: "s3cret".into() }),
//! };
//! let control = HttpControl::new();
//! assert_eq!(control.health(&instance).await?.phase, Phase::Standby);
//! control.resume(&instance).await?;
//! let refused = control.freeze(&instance, Duration::from_secs(1)).await.unwrap_err();
//! assert!(matches!(refused, Error::Conflict(_)), "{refused}");
//! # Ok::<(), Error>(())
//! # }).unwrap();
//! ```

pub mod client;
pub mod server;
pub mod wire;

pub use client::{ClientSettings, HttpControl};
pub use server::{InstanceEndpoint, ServerSettings, router};
pub use wire::{ErrorBody, ErrorKind, FreezeRequest, Route};
