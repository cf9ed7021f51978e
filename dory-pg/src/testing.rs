//! Test support for code that runs against a real PostgreSQL (this crate's tests, examples,
//! a user's own): a [`PgStore`] in a schema of its own, dropped when the test ends.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default [`DEFAULT_TEST_URL`]). When it cannot be
//! reached, [`TestSchema::create`] prints a skip line and returns `None`, except under
//! `CI=true`, where it panics: a CI run must never pass by testing nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection};

use crate::{Error, PgConfig, PgStore};

/// The test database when `DORY_TEST_DATABASE_URL` is not set.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The test database's URL: `DORY_TEST_DATABASE_URL`, or [`DEFAULT_TEST_URL`].
pub fn test_database_url() -> String {
    std::env::var("DORY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_string())
}

/// A store in a fresh schema of the test database, dropped (best effort) with this value,
/// even when the test panicked.
pub struct TestSchema {
    /// The store, migrated, in the schema.
    pub store: PgStore,
    /// The settings it was connected with ([`PgConfig::schema`] is the schema).
    pub config: PgConfig,
    _drop: DropSchema,
}

impl TestSchema {
    /// Connects to the test database in a new schema named after `area` (a plain identifier:
    /// letters, digits, `_`), with a pool of `pool_size`; `None` after a skip line when the
    /// database is unreachable outside CI.
    pub async fn create(area: &str, pool_size: u32) -> Option<TestSchema> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let schema = format!("dory_it_{area}_{}_{n}_{nanos}", std::process::id());
        let url = test_database_url();
        let config = PgConfig::new(url.clone())
            .with_schema(schema.clone())
            .with_pool_size(pool_size)
            .with_connect_timeout(Duration::from_secs(5));
        match PgStore::connect(&config).await {
            Ok(store) => Some(TestSchema {
                store,
                config,
                _drop: DropSchema { url, schema },
            }),
            Err(e @ Error::Connect(_)) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{area}: CI=true and the test database is unreachable (set \
                     DORY_TEST_DATABASE_URL): {e}"
                );
                eprintln!(
                    "SKIP {area}: test database unreachable ({e}); set DORY_TEST_DATABASE_URL"
                );
                None
            }
            Err(e) => panic!("setting up schema {schema}: {e}"),
        }
    }

    /// Another store (its own pool, as another process would have) on the same schema.
    pub async fn another_store(&self) -> PgStore {
        PgStore::connect(&self.config)
            .await
            .unwrap_or_else(|e| panic!("second store on {}: {e}", self.config.schema))
    }
}

/// Drops the schema on a runtime and thread of its own, because `Drop` cannot await.
struct DropSchema {
    url: String,
    schema: String,
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(mut conn) = sqlx::PgConnection::connect(&url).await else {
                    return;
                };
                // The schema name is a plain identifier made by `create`.
                let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                let _ = sqlx::query(AssertSqlSafe(drop)).execute(&mut conn).await;
                let _ = conn.close().await;
            });
        });
        let _ = cleanup.join();
    }
}
