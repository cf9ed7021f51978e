//! Test support for code that runs against a real RabbitMQ (this crate's tests, examples,
//! benches, a user's own): a connection and a channel of the test's own.
//!
//! The broker is `DORY_TEST_AMQP_URL` (default [`DEFAULT_TEST_URL`]). When it does not answer
//! within 5 seconds, [`connect`] prints a skip line and returns `None`, except under
//! `CI=true`, where it panics: a CI run must never pass by testing nothing. [`try_connect`]
//! leaves that choice to the caller.

use std::fmt;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};

use crate::AmqpConfig;

/// The test broker when `DORY_TEST_AMQP_URL` is not set: a local RabbitMQ, guest user.
pub const DEFAULT_TEST_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long [`connect`] and [`try_connect`] wait for the broker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The test broker's URL: `DORY_TEST_AMQP_URL`, or [`DEFAULT_TEST_URL`].
pub fn test_url() -> String {
    std::env::var("DORY_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_string())
}

/// A connection to the test broker: its URL, password included (for the code under test to
/// connect with), the connection, and a channel open on it.
pub type TestBroker = (String, Connection, Channel);

/// Why the test broker could not be reached.
#[derive(Debug, Clone)]
pub struct Unreachable {
    /// The broker's URL without its password.
    pub redacted_url: String,
    /// What went wrong: the connection error, or that no answer came in time.
    pub problem: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RabbitMQ at {} is unreachable ({})",
            self.redacted_url, self.problem
        )
    }
}

/// Connects to the test broker ([`test_url`]) and opens a channel, within
/// [`CONNECT_TIMEOUT`]; the caller decides what an [`Unreachable`] broker means.
pub async fn try_connect() -> Result<TestBroker, Unreachable> {
    let url = test_url();
    let connect = async {
        let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        Ok::<_, lapin::Error>((connection, channel))
    };
    let problem = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok((connection, channel))) => {
            return Ok((url, connection, channel));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
    };
    Err(Unreachable {
        redacted_url: AmqpConfig::new(url, "").redacted_url(),
        problem,
    })
}

/// Connects to the test broker for `test` (named in the messages); `None` after a skip line
/// when the broker is unreachable outside CI.
///
/// # Panics
///
/// Under `CI=true` when the broker is unreachable.
pub async fn connect(test: &str) -> Option<TestBroker> {
    match try_connect().await {
        Ok(broker) => Some(broker),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: CI=true and RabbitMQ at {} is unreachable (set DORY_TEST_AMQP_URL): {}",
                e.redacted_url,
                e.problem
            );
            eprintln!("SKIP {test}: {e}; set DORY_TEST_AMQP_URL");
            None
        }
    }
}
