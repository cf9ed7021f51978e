//! In-memory Dory backends and fault injection, for tests and the deterministic simulator.
//!
//! Every backend trait of [`dory_core`] has an in-memory implementation here that passes the
//! same behaviour suites ([`dory_core::testing`]) as the real backends do:
//!
//! | trait | mock |
//! |---|---|
//! | [`StateStore`](dory_core::StateStore) | [`MemoryStore`]: ownership rows, leases on an injected clock, snapshots, the leadership term |
//! | [`Leadership`](dory_core::Leadership) | [`MemoryLeadership`]: participants over one `MemoryStore`, with [`depose`](MemoryLeadership::depose) |
//! | [`ConfigSource`](dory_core::ConfigSource) | [`MemoryConfig`]: specs, invalid entries and intents, edited by the test |
//! | [`StatusSink`](dory_core::StatusSink) | [`MemoryStatus`] |
//! | [`Publisher`](dory_core::Publisher) | [`MemoryPublisher`]: records every message; [`Deduplicator`] applies the consumers' rule |
//!
//! Faults are not built into the mocks: [`Faulty`] wraps any backend behind a [`FaultSwitch`]
//! (outages, failed calls, lost replies, latency) that a test or the simulator flips.
//!
//! Everything is deterministic: state lives in ordered maps, time comes only from the injected
//! [`Clock`](dory_core::Clock) or tokio's (simulated) timer, and no lock is held across an
//! `.await`. Each mock is a cheap handle: clones share state, so a test keeps one clone to
//! inspect what the code under test did through another.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use dory_core::{Leadership, ProcessorId, StateStore, Timestamp, TokioClock};
//! use dory_mock::{FaultSwitch, FaultyStore, MemoryLeadership, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> dory_core::Result<()> {
//! let store = MemoryStore::new(Arc::new(TokioClock::starting_at(Timestamp(0))));
//! let leader = MemoryLeadership::new(&store);
//! let term = leader.acquire().await?;
//!
//! let switch = FaultSwitch::new();
//! let faulty = FaultyStore::new(store.clone(), switch.clone());
//! let p = ProcessorId::new("counter")?;
//! let epoch = faulty.claim_epoch(&p, term).await?;
//!
//! switch.set_outage(true);
//! let lease = Duration::from_secs(10);
//! assert!(faulty.assign_owner(&p, None, epoch, lease, term).await.unwrap_err().is_retryable());
//! switch.set_outage(false);
//! faulty.assign_owner(&p, None, epoch, lease, term).await?;
//! assert_eq!(store.ownership_now(&p).and_then(|o| o.owner), Some(epoch));
//! # Ok(())
//! # }
//! ```

pub mod config;
pub mod faults;
pub mod leadership;
pub mod publisher;
pub mod sim;
pub mod status;
pub mod store;

pub use config::MemoryConfig;
pub use faults::{
    FaultSwitch, Faulty, FaultyConfig, FaultyLeadership, FaultyPublisher, FaultyStatus, FaultyStore,
};
pub use leadership::MemoryLeadership;
pub use publisher::{DedupStats, Deduplicator, MemoryPublisher, Offer};
pub use status::MemoryStatus;
pub use store::MemoryStore;
