//! Shared helpers for Dory benchmarks.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::de::{Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// An orchestrator running on a task of its own, until [`Background::stop`].
pub struct Background {
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<dory_core::Result<()>>,
}

impl Background {
    /// Runs `orchestrator` (`run_until`) on a task until stopped.
    pub fn run(orchestrator: dory_core::orchestrator::Orchestrator) -> Background {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            orchestrator
                .run_until(async {
                    let _ = stopped.await;
                })
                .await
        });
        Background { stop, running }
    }

    /// Stops the orchestrator and waits for its task to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.running.await;
    }
}

/// Runs a benchmark that talks to a server on a two-thread tokio runtime. Its future gets
/// `full`: true under `cargo bench` (which passes `--bench`), false under
/// `cargo test --benches`, where a bench only makes a quick smoke run. A failure is printed
/// with the bench's `name` and ends the process with exit code 1.
pub fn run_server_bench<F, Fut, E>(name: &str, bench: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let full = std::env::args().any(|a| a == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(bench(full)) {
        eprintln!("{name} bench failed: {e}");
        std::process::exit(1);
    }
}

/// The error type of the benchmarks.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Incompressible bytes, the same every run (xorshift64* from a fixed seed).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A state of bytes, serialized as one byte string rather than element by element (serde's
/// default for `Vec<u8>`), so encoding it costs what copying and compressing the bytes cost.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Blob, D::Error> {
        struct BlobVisitor;
        impl<'de> Visitor<'de> for BlobVisitor {
            type Value = Blob;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(BlobVisitor)
    }
}

/// p50, p99 and the maximum of `values` (nearest rank).
pub fn percentiles(mut values: Vec<Duration>) -> (Duration, Duration, Duration) {
    values.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1]
    };
    (at(0.50), at(0.99), values[values.len() - 1])
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The test database when `DORY_TEST_DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A Postgres store in a schema of one bench run's own.
pub struct BenchSchema {
    /// The store, migrated, in the schema.
    pub store: dory_pg::PgStore,
    /// The database URL (without the schema).
    pub url: String,
}

impl BenchSchema {
    /// Connects to `DORY_TEST_DATABASE_URL` in a new schema for bench `name`, with
    /// `statement_timeout`; `None` after a skip line when the database cannot be reached.
    pub async fn open(
        name: &str,
        statement_timeout: Duration,
    ) -> Result<Option<BenchSchema>, BoxError> {
        let url = std::env::var("DORY_TEST_DATABASE_URL")
            .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let schema = format!("dory_bench_{name}_{}_{nanos}", std::process::id());
        let config = dory_pg::PgConfig::new(url.clone())
            .with_schema(schema)
            .with_pool_size(4)
            .with_connect_timeout(Duration::from_secs(5))
            .with_statement_timeout(statement_timeout);
        match dory_pg::PgStore::connect(&config).await {
            Ok(store) => Ok(Some(BenchSchema { store, url })),
            Err(e @ dory_pg::Error::Connect(_)) => {
                println!(
                    "SKIP {name} bench: PostgreSQL is unreachable ({e}); set DORY_TEST_DATABASE_URL"
                );
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Drops the schema (the run's own) and closes the pool, whatever the run's `result`,
    /// which it passes on.
    pub async fn close<T>(self, result: Result<T, BoxError>) -> Result<T, BoxError> {
        let schema = self.store.schema().to_string();
        let drop = format!("DROP SCHEMA \"{schema}\" CASCADE");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(drop))
            .execute(self.store.pool())
            .await
        {
            eprintln!("could not drop schema {schema}: {e}");
        }
        self.store.pool().close().await;
        result
    }
}

/// The 1, 5 and 15 minute load averages, for a bench to print beside its figures.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
