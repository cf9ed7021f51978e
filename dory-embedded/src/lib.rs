//! Dory's no-install defaults: everything the orchestrator and its instances need, in local
//! files. The `dory` CLI and every processor instance use these when no Postgres or RabbitMQ
//! is configured.
//!
//! - [`EmbeddedDb`]: one SQLite file (WAL mode, `synchronous=FULL`) shared by the
//!   orchestrator and every instance process on the machine, with
//!   - [`EmbeddedStore`], the fenced [`StateStore`](dory_core::StateStore): ownership, leases
//!     and the move commit exactly as the Postgres store decides them;
//!   - [`EmbeddedStatus`], the [`StatusSink`](dory_core::StatusSink);
//!   - [`EmbeddedLeadership`], [`Leadership`](dory_core::Leadership) through an exclusive
//!     `flock` on a file beside the database plus a term row every orchestrator write is
//!     checked against.
//! - [`FileConfig`], the [`ConfigSource`](dory_core::ConfigSource): `[processors.<id>]` tables
//!   of a TOML file, re-read on change, with errors naming file, line and field; operator
//!   intents (pins, cordons) live in the database, never in the user's file.
//! - [`FilePublisher`], the [`Publisher`](dory_core::Publisher): durable JSON-lines files,
//!   one per processor, with group commit; [`read_output`] reads them back.
//!
//! ```no_run
//! use dory_core::{ConfigSource, Leadership, ProcessorId, StateStore};
//! use dory_embedded::{EmbeddedDb, EmbeddedLeadership, EmbeddedStore, FileConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let db = EmbeddedDb::open(".dory/dory.db").await?;
//! let config = FileConfig::open("dory.toml", &db)?;
//! let desired = config.desired().await?;
//! println!("{} processors, {} invalid", desired.processors.len(), desired.invalid.len());
//! let store = EmbeddedStore::new(&db);
//! let leadership = EmbeddedLeadership::new(&db, "orchestrator-1");
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
//! [`EmbeddedDb::open`] creates the file if it is missing and applies the embedded migrations
//! (`migrations/`). Times are milliseconds since the Unix epoch, from the wall clock (every
//! process using the file is on this machine, so they share one clock).
//!
//! | table | key | columns | what for |
//! |---|---|---|---|
//! | `ownership` | `processor` | `owner`, `highest`, `newest_owner`, `lease_expires`, `committed_epoch`, `committed_seq`, `committed_at` | who may write each processor's state, as in Postgres |
//! | `snapshots` | `(processor, epoch, sequence)` | `size`, `created_at`, `body` | encoded snapshots, verified on write and on read |
//! | `leadership` | `id` (always 1) | `term`, `holder`, `since` | the fencing term: incremented by each new leader, compared by every orchestrator write |
//! | `intents` | `(kind, subject)` | `node`, `recorded_at` | operator intents: `pin` (subject a processor, `node` where to run it) and `cordon` (subject a node) |
//! | `intents_version` | `id` (always 1) | `version` | bumped by triggers on every change to `intents`, polled by [`FileConfig`] |
//! | `status` | `processor` | `phase`, `node`, `site`, `epoch`, `last_error`, `updated_at`, `body` | observed status; `body` is the whole [`ProcessorStatus`](dory_core::ProcessorStatus) as JSON |
//!
//! # Many processes
//!
//! Every write that decides something runs in a `BEGIN IMMEDIATE` transaction, which takes
//! the file's write lock before its first read; SQLite has one writer per file, so decisions
//! in different processes serialise and each sees the one before. Waiting for the lock is
//! bounded by a busy timeout ([`BUSY_TIMEOUT`]), after which the operation fails with
//! [`Unavailable`](dory_core::Error::Unavailable) (retryable). Readers never wait (WAL).
//! The database must be on a local file system: SQLite's WAL mode, like `flock`, does not
//! work across network file systems.
//!
//! Everything logs under the `dory::embedded` tracing target.

mod config;
mod db;
mod error;
mod leadership;
mod publisher;
mod spec_file;
mod status;
mod store;

pub use config::{FileConfig, parse_processors};
pub use db::{BUSY_TIMEOUT, EmbeddedDb};
pub use error::Error;
pub use leadership::EmbeddedLeadership;
pub use publisher::{
    DamagedLine, FilePublisher, OutputLog, OutputRecord, output_path, read_output,
};
pub use status::EmbeddedStatus;
pub use store::EmbeddedStore;
