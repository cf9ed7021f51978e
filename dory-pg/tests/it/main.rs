//! Integration tests of the Postgres backends against a real database: the shared behaviour
//! suites from `dory-core`, plus races only a real database can stage.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it cannot be reached the tests print a
//! skip line and pass, except under `CI=true`, where they fail. Each test works in a schema
//! of its own, dropped at the end, so the tests run in parallel.

mod config;
mod leadership;
mod status;
mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dory_pg::{PgConfig, PgStore};
use sqlx::{AssertSqlSafe, Connection};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn database_url() -> String {
    std::env::var("DORY_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.to_string())
}

/// A store in a fresh schema, dropped (best effort) when this value is.
pub(crate) struct TestDb {
    pub(crate) store: PgStore,
    pub(crate) config: PgConfig,
    _drop: DropSchema,
}

impl TestDb {
    /// Another store (its own pool, as another process would have) on the same schema.
    pub(crate) async fn another_store(&self) -> PgStore {
        PgStore::connect(&self.config)
            .await
            .unwrap_or_else(|e| panic!("second store on {}: {e}", self.config.schema))
    }
}

/// Connects to the test database in a new schema named after `area`; `None` (after printing
/// a skip line) when the database is unreachable outside CI.
pub(crate) async fn test_db(area: &str) -> Option<TestDb> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let schema = format!("dory_it_{area}_{}_{n}_{nanos}", std::process::id());
    let url = database_url();
    let config = PgConfig::new(url.clone())
        .with_schema(schema.clone())
        .with_pool_size(12)
        .with_connect_timeout(Duration::from_secs(5));
    match PgStore::connect(&config).await {
        Ok(store) => Some(TestDb {
            store,
            config,
            _drop: DropSchema { url, schema },
        }),
        Err(e @ dory_pg::Error::Connect(_)) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "CI=true and the test database is unreachable (set DORY_TEST_DATABASE_URL): {e}"
                );
            }
            eprintln!(
                "skipping {area}: test database unreachable ({e}); set DORY_TEST_DATABASE_URL"
            );
            None
        }
        Err(e) => panic!("setting up schema {schema}: {e}"),
    }
}

/// Drops the test schema when the test ends, even when it panicked. It runs its own runtime
/// on a thread of its own, because `Drop` cannot await.
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
                // Test schema names are plain identifiers made above.
                let drop = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                let _ = sqlx::query(AssertSqlSafe(drop)).execute(&mut conn).await;
                let _ = conn.close().await;
            });
        });
        let _ = cleanup.join();
    }
}
