//! Integration tests of the Postgres backends against a real database: the shared behaviour
//! suites from `dory-core`, plus races only a real database can stage.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached the tests print a
//! skip line and pass, except under `CI=true`, where they fail. Each test works in a schema
//! of its own, dropped at the end, so the tests run in parallel.

mod config;
mod leadership;
mod orchestrators;
mod status;
mod store;

use dory_pg::testing::TestSchema;

pub(crate) use dory_pg::testing::DEFAULT_TEST_URL as DEFAULT_URL;

/// The tests' database handle: a store in a schema of its own.
pub(crate) type TestDb = TestSchema;

/// Connects to the test database in a new schema named after `area`; `None` (after printing
/// a skip line) when the database is unreachable outside CI.
pub(crate) async fn test_db(area: &str) -> Option<TestDb> {
    TestSchema::create(area, 12).await
}
