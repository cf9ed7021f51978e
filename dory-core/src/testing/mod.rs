//! Shared behaviour suites: the checks every backend runs against itself.
//!
//! Each backend trait in [`crate::backend`] has a **Contract** section; the suites here turn
//! those sentences into assertions, so the in-memory mocks, Postgres, SQLite, RabbitMQ and the
//! rest are held to the very same rules. A backend's own tests build an instance of the
//! backend and hand it to the suite:
//!
//! ```
//! use dory_core::{Leadership, StateStore};
//!
//! // In a backend's tests, called from a `#[tokio::test]` with the backend under test.
//! async fn store_contract(store: &dyn StateStore, leadership: &dyn Leadership) {
//!     dory_core::testing::state_store_suite(store, leadership).await;
//! }
//! ```
//!
//! The suites are test helpers: they panic with a message naming the contract point that was
//! broken, and every failure message says which processor it happened on. They use a fresh,
//! unique processor id per check (see [`unique_processor`]), so several suites, and several
//! runs of the same suite, can share one backend such as a long-lived test database.
//!
//! Suites that wait for something (leadership, a change nudge) bound the wait with
//! `tokio::time::timeout`; under a paused tokio runtime that costs no real time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::model::{Epoch, ProcessorId, Sequence, StoredSnapshot, Timestamp};
use crate::snapshot;

pub mod config;
pub mod leadership;
pub mod publisher;
pub mod status;
pub mod store;

pub use config::config_intent_suite;
pub use leadership::leadership_suite;
pub use publisher::{PublishedLog, publisher_suite};
pub use status::status_sink_suite;
pub use store::{
    SnapshotCorruptor, concurrent_writers_suite, damaged_snapshot_suite, state_store_suite,
};

/// How long a suite waits for something that should happen promptly (a leadership handover,
/// a change nudge) before it declares the contract broken. Generous, because real backends
/// poll; free under a paused tokio runtime.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// How long a suite waits to convince itself that something does **not** happen (a second
/// leader while the first one leads).
pub const QUIET_PERIOD: Duration = Duration::from_millis(500);

/// A processor id no other check, and no earlier run against the same backend, has used.
///
/// `area` names the check (keep it short: ids are DNS labels of at most 42 characters). The
/// id ends with a per-process salt, so a persistent test database that still holds rows from
/// an earlier run does not make claims start above epoch 1.
pub fn unique_processor(area: &str) -> ProcessorId {
    ProcessorId::new(unique_name(area))
        .unwrap_or_else(|e| panic!("suite bug: area {area:?} makes an invalid processor id: {e}"))
}

/// A unique name for things that are not processor ids (node names, status rows).
pub fn unique_name(area: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{area}-{n}-{}", salt())
}

/// Six base-36 characters that differ between test processes. The wall clock is read once,
/// only to tell runs apart; nothing a suite asserts depends on it.
fn salt() -> &'static str {
    static SALT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SALT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let seed = format!("{}:{nanos}", std::process::id());
        let mut h = xxhash_rust::xxh3::xxh3_64(seed.as_bytes());
        let mut s = String::with_capacity(6);
        for _ in 0..6 {
            let d = (h % 36) as u32;
            h /= 36;
            s.push(char::from_digit(d, 36).unwrap_or('0'));
        }
        s
    })
}

/// A snapshot of `processor` at `(epoch, sequence)` whose state is `body`, encoded by the real
/// codec as a runtime would hand it to the store; `body` makes two snapshots of the same
/// `(epoch, sequence)` distinguishable.
pub fn test_snapshot(
    processor: &ProcessorId,
    epoch: Epoch,
    sequence: Sequence,
    body: &[u8],
) -> StoredSnapshot {
    let what = || format!("encode test snapshot of {processor} {epoch} {sequence}");
    let bytes = snapshot::Encoder::default()
        .encode_body(processor, epoch, sequence, snapshot::Codec::Raw, body)
        .unwrap_or_else(|e| panic!("{}: {e}", what()));
    StoredSnapshot::from_encoded(bytes, Timestamp(0)).unwrap_or_else(|e| panic!("{}: {e}", what()))
}

/// A snapshot as a move commits it: taken by `from` (its header says so) and filed as the
/// first checkpoint of `to`.
pub fn test_move_snapshot(
    processor: &ProcessorId,
    from: Epoch,
    to: Epoch,
    sequence: Sequence,
    body: &[u8],
) -> StoredSnapshot {
    let mut snapshot = test_snapshot(processor, from, sequence, body);
    snapshot.meta.epoch = to;
    snapshot
}

/// Runs `fut`, panicking with `what` if it has not finished within [`PATIENCE`].
pub(crate) async fn patiently<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: did not finish within {PATIENCE:?}"),
    }
}
