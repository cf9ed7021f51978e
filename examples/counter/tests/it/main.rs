//! Integration tests of `dory-example-counter`: the real binary as child processes against
//! the real Postgres and RabbitMQ, with the test playing the orchestrator's part.
//!
//! The database is `DORY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), the broker `DORY_TEST_AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`). When either cannot be reached a test prints a
//! skip line and passes, except under `CI=true`, where it fails. Each test works in a schema,
//! an exchange and a queue of its own, removed at the end.

mod handover;
mod instance;
mod services;

use std::time::Duration;

/// Polls `check` until it answers `Some`, or panics naming `what` once `within` has passed.
pub(crate) async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
