//! Where the orchestrator and the backends get the time from.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::Timestamp;

/// A source of the current time. The planner never reads a clock: the orchestrator reads one
/// and passes `now` in, so a simulation can substitute simulated time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(since.as_millis() as u64)
    }
}

/// Time from tokio's clock, counted from a fixed start. Under a paused tokio runtime this is
/// simulated time, which is how the simulator runs the real orchestrator deterministically.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: tokio::time::Instant,
    origin_ts: Timestamp,
}

impl TokioClock {
    /// A clock that reads `origin_ts` now and advances with tokio's time.
    pub fn starting_at(origin_ts: Timestamp) -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
            origin_ts,
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.origin_ts.plus(self.origin.elapsed())
    }
}
