//! Integration tests of the embedded backends on temporary files: the shared behaviour suites
//! from `dory-core` (the very ones the Postgres and in-memory backends run), plus what only
//! files can stage: several processes on one database (separate `EmbeddedDb::open`s, as
//! SQLite locks per file), the processors file's errors and watcher, the publisher's
//! durability and a torn last line.

mod config;
mod leadership;
mod open_race;
mod publisher;
mod status;
mod store;

use dory_embedded::EmbeddedDb;
use tempfile::TempDir;

/// A database in a directory of its own, removed with this value.
pub(crate) struct TestDb {
    pub(crate) dir: TempDir,
    pub(crate) db: EmbeddedDb,
}

impl TestDb {
    /// Another handle on the same file with its own pool, as another process would have.
    pub(crate) async fn another(&self) -> EmbeddedDb {
        EmbeddedDb::open(self.db.path())
            .await
            .unwrap_or_else(|e| panic!("second handle on {}: {e}", self.db.path().display()))
    }
}

/// A fresh database file in a new temporary directory.
pub(crate) async fn test_db() -> TestDb {
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = EmbeddedDb::open(dir.path().join("dory.db"))
        .await
        .unwrap_or_else(|e| panic!("open the test database: {e}"));
    TestDb { dir, db }
}
