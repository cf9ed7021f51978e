//! Postgres backends for Dory: the fenced [`StateStore`](dory_core::StateStore)
//! ([`PgStore`]) and orchestrator [`Leadership`](dory_core::Leadership) ([`PgLeadership`]).
//!
//! One database can serve many orchestrator replicas and every processor instance: ownership
//! rows, snapshots and the leadership term live in one schema, and every write that must be
//! fenced is decided inside one transaction under a row lock.
//!
//! ```no_run
//! use dory_core::{Leadership, ProcessorId, StateStore};
//! use dory_pg::{PgConfig, PgLeadership, PgStore};
//!
//! # async fn run() -> Result<(), dory_core::Error> {
//! let config = PgConfig::new("postgres://dory@localhost:5432/dory?sslmode=prefer")
//!     .with_schema("dory");
//! let store = PgStore::connect(&config).await?;
//! let leadership = PgLeadership::new(&store, "orchestrator-1");
//! let term = leadership.acquire().await?;
//! let epoch = store.claim_epoch(&ProcessorId::new("counter")?, term).await?;
//! println!("claimed {epoch} under {term}");
//! leadership.resign(term).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Tables
//!
//! [`PgStore::connect`] creates the schema if it is missing and applies the embedded
//! migrations (`migrations/`); every pooled connection's `search_path` is that schema, so
//! sqlx's `_sqlx_migrations` table lives there too.
//!
//! | table | key | columns | what for |
//! |---|---|---|---|
//! | `ownership` | `processor` | `owner`, `highest`, `newest_owner`, `lease_expires`, `committed_epoch`, `committed_seq`, `committed_at` | who may write each processor's state: the owning epoch, the highest claimed, the newest that ever owned (ownership only moves above it), the owner's lease and the committed checkpoint |
//! | `snapshots` | `(processor, epoch, sequence)` | `size`, `created_at`, `body` | encoded snapshots (header and zstd body, stored without a second compression: `STORAGE EXTERNAL`), verified on write and on read |
//! | `leadership` | `id` (always 1) | `term`, `holder`, `since` | the fencing term: incremented by each new leader, compared by every orchestrator write |
//!
//! # Fencing
//!
//! - Checkpoints lock the `ownership` row, check owner and sequence, and insert the snapshot
//!   in the same transaction.
//! - Orchestrator writes read `leadership` `FOR SHARE` before deciding, so a new leader's
//!   increment waits for writes already deciding under the old term, and every later write
//!   sees the new one.
//! - Leases and timestamps come from the database clock.
//!
//! Everything logs under the `dory::pg` tracing target.

mod config;
mod error;
mod leadership;
mod store;

pub use config::{DEFAULT_SCHEMA, PgConfig};
pub use error::Error;
pub use leadership::PgLeadership;
pub use store::PgStore;
