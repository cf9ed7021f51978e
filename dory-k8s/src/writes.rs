//! API writes, rate limited and retried: a token bucket shared by every write of one
//! placement, and exponential backoff with hashed jitter on `429`, `5xx` and lost answers.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::WriteLimits;
use crate::error::{KubeError, is_transient, status_code};

/// The rate limiter and retry policy of one placement's writes.
#[derive(Debug)]
pub(crate) struct Writes {
    limits: WriteLimits,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Writes {
    pub(crate) fn new(limits: WriteLimits) -> Self {
        Writes {
            bucket: Mutex::new(Bucket {
                tokens: f64::from(limits.burst.max(1)),
                at: Instant::now(),
            }),
            limits,
        }
    }

    /// Waits for a token of the bucket.
    async fn admit(&self) {
        let rate = self.limits.per_second.max(0.001);
        let burst = f64::from(self.limits.burst.max(1));
        let wait = {
            let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
            b.at = now;
            // Taking the token now, even if it is not there yet, reserves this caller's place:
            // later callers wait behind it.
            b.tokens -= 1.0;
            (b.tokens < 0.0).then(|| Duration::from_secs_f64(-b.tokens / rate))
        };
        if let Some(wait) = wait {
            tracing::debug!(target: "dory::k8s", ?wait, "write rate limited");
            tokio::time::sleep(wait).await;
        }
    }

    /// Runs `call` (one API write; `attempt` counts from 1) under the rate limit, retrying
    /// transient failures with backoff. `what` names the write in logs and errors.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, KubeError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, kube::Error>>,
    {
        let attempts = self.limits.attempts.max(1);
        let mut attempt = 1;
        loop {
            self.admit().await;
            match call(attempt).await {
                Ok(value) => return Ok(value),
                Err(e) if is_transient(&e) && attempt < attempts => {
                    let delay = self.delay(what, attempt, &e);
                    tracing::warn!(target: "dory::k8s", what, attempt, code = status_code(&e), ?delay, "transient API error, retrying: {e}");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(KubeError::api(what, e)),
            }
        }
    }

    /// The delay before retry `attempt + 1`: doubling from `backoff_initial`, capped, with up
    /// to half of it as jitter hashed from the write and the attempt (no RNG), and at least
    /// what the server asked for (`Retry-After` as `retryAfterSeconds`).
    fn delay(&self, what: &str, attempt: u32, e: &kube::Error) -> Duration {
        let base = self
            .limits
            .backoff_initial
            .saturating_mul(1 << attempt.saturating_sub(1).min(16))
            .min(self.limits.backoff_max);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (what, attempt).hash(&mut h);
        let jitter = base.mul_f64((h.finish() % 1000) as f64 / 2000.0);
        let asked = match e {
            kube::Error::Api(s) => s
                .details
                .as_ref()
                .map(|d| Duration::from_secs(u64::from(d.retry_after_seconds)))
                .unwrap_or_default(),
            _ => Duration::ZERO,
        };
        (base + jitter).max(asked.min(self.limits.backoff_max))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn status(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "Reason").with_code(code),
        ))
    }

    fn limits() -> WriteLimits {
        WriteLimits {
            per_second: 1000.0,
            burst: 10,
            attempts: 3,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_then_returned() {
        let writes = Writes::new(limits());
        let calls = AtomicU32::new(0);
        let ok = writes
            .run("w", |attempt| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if attempt < 3 {
                        Err(status(429))
                    } else {
                        Ok(attempt)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(ok, 3);
        let err = writes
            .run("w", |_| async { Err::<(), _>(status(503)) })
            .await
            .unwrap_err();
        assert_eq!(err.status_code(), Some(503));
        // A conflict is an answer, not a hiccup: no retry.
        calls.store(0, Ordering::SeqCst);
        let err = writes
            .run("w", |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(status(409)) }
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.status_code(), calls.load(Ordering::SeqCst)),
            (Some(409), 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_spaces_writes_beyond_the_burst() {
        let writes = Writes::new(WriteLimits {
            per_second: 10.0,
            burst: 2,
            ..limits()
        });
        let start = Instant::now();
        for _ in 0..4 {
            writes
                .run("w", |_| async { Ok::<_, kube::Error>(()) })
                .await
                .unwrap();
        }
        // Two from the burst, then one every 100 ms.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_millis(300),
            "{took:?}"
        );
    }

    #[test]
    fn delays_double_and_are_capped() {
        let writes = Writes::new(limits());
        let e = status(500);
        let d1 = writes.delay("w", 1, &e);
        let d3 = writes.delay("w", 3, &e);
        assert!(
            d1 >= Duration::from_millis(10) && d1 <= Duration::from_millis(15),
            "{d1:?}"
        );
        assert!(
            d3 >= Duration::from_millis(40) && d3 <= Duration::from_millis(60),
            "{d3:?}"
        );
    }
}
