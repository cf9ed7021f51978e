//! Postgres backends for Dory: the fenced [`StateStore`](dory_core::StateStore)
//! ([`PgStore`]), orchestrator [`Leadership`](dory_core::Leadership) ([`PgLeadership`]), the
//! [`ConfigSource`](dory_core::ConfigSource) with `LISTEN`/`NOTIFY` change nudges
//! ([`PgConfigSource`]) and the [`StatusSink`](dory_core::StatusSink) ([`PgStatus`]).
//!
//! One database can serve many orchestrator replicas and every processor instance: desired
//! processors, ownership rows, snapshots, status and the leadership term live in one schema,
//! and every write that must be fenced is decided inside one transaction under a row lock.
//!
//! ```no_run
//! use dory_core::{ConfigSource, Leadership, ProcessorId, StateStore};
//! use dory_pg::{PgConfig, PgConfigSource, PgLeadership, PgStatus, PgStore};
//!
//! # async fn run() -> Result<(), dory_core::Error> {
//! let config = PgConfig::new("postgres://dory@localhost:5432/dory?sslmode=prefer")
//!     .with_schema("dory");
//! let store = PgStore::connect(&config).await?;
//! let config_source = PgConfigSource::new(&store).await?;
//! let desired = config_source.desired().await?;
//! println!("{} processors, {} invalid", desired.processors.len(), desired.invalid.len());
//! let _status = PgStatus::new(&store);
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
//! | `processors` | `id` | `spec` (`jsonb`), `updated_at` | the desired processors, written by users or their tools: `id` is unchecked text, so a bad row is reported in [`DesiredState::invalid`](dory_core::DesiredState::invalid) rather than refused; `spec` holds the other [`ProcessorSpec`](dory_core::ProcessorSpec) fields as serde JSON |
//! | `intents` | `(kind, subject)` | `node`, `recorded_at` | operator intents: `pin` (subject a processor, `node` where to run it) and `cordon` (subject a node) |
//! | `status` | `processor` | `phase`, `node`, `site`, `epoch`, `last_error`, `updated_at`, `body` | observed status for users to `SELECT`; `body` is the whole [`ProcessorStatus`](dory_core::ProcessorStatus) as JSON |
//!
//! Statement-level triggers on `processors` and `intents` `NOTIFY` the channel
//! `dory_config_<schema>` (cut to 63 bytes), which [`PgConfigSource`] listens on.
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
mod source;
mod status;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{DEFAULT_SCHEMA, PgConfig};
pub use error::Error;
pub use leadership::PgLeadership;
pub use source::PgConfigSource;
pub use status::PgStatus;
pub use store::PgStore;
