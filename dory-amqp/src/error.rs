//! [`Error`]: what can go wrong talking to RabbitMQ, and how it maps onto Dory's meanings.

use std::time::Duration;

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// What went wrong in this crate, by cause; [`From<Error> for dory_core::Error`] maps each
/// cause to the meaning the orchestrator and runtime decide on (retry or give up).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker URL does not parse, has a scheme other than `amqp://`, or asks for TLS
    /// (`amqps://`), which this build cannot provide.
    #[error("bad AMQP URL {url}: {reason}")]
    BadUrl {
        /// The URL, password removed.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// A setting is out of range (a window of zero, for instance).
    #[error("bad AMQP setting: {0}")]
    Config(String),
    /// Connecting to the broker, or opening the publishing channel, failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// What the client library reported.
        #[source]
        source: lapin::Error,
    },
    /// The broker did not accept the connection within the connect timeout.
    #[error("cannot connect to {url}: no answer within {after:?}")]
    ConnectTimeout {
        /// The URL, password removed.
        url: String,
        /// The connect timeout that ran out.
        after: Duration,
    },
    /// The exchange to publish to could not be checked (it does not exist, or access to it
    /// was refused).
    #[error("cannot declare exchange {exchange:?}: {source}")]
    Declare {
        /// The exchange.
        exchange: String,
        /// What the broker answered.
        #[source]
        source: lapin::Error,
    },
    /// A broker operation failed after setup (a lost connection or channel).
    #[error("{operation}: {source}")]
    Broker {
        /// The operation, naming exchange and routing key where there is one.
        operation: String,
        /// What the client library reported.
        #[source]
        source: lapin::Error,
    },
}

impl From<Error> for dory_core::Error {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match &error {
            Error::BadUrl { .. } | Error::Config(_) => dory_core::Error::invalid(message),
            // A missing exchange is a deployment mistake, not an outage: retrying will not
            // create it.
            Error::Declare { source, .. } if is_not_found(source) => {
                dory_core::Error::not_found(message)
            }
            Error::Declare { source, .. } if is_access_refused(source) => {
                dory_core::Error::invalid(message)
            }
            // The broker refused this very message (too large, not permitted): sending it
            // again cannot help.
            Error::Broker { source, .. } if is_refusal(source) => {
                dory_core::Error::invalid(message)
            }
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::Declare { .. }
            | Error::Broker { .. } => dory_core::Error::unavailable(message),
        }
    }
}

fn soft_error(error: &lapin::Error) -> Option<&AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::NOTFOUND))
}

fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(soft_error(error), Some(AMQPSoftError::ACCESSREFUSED))
}

/// Whether the broker closed the channel because of the message itself (406 precondition
/// failed: larger than the broker allows; 403 access refused: no write permission), so that
/// sending it again on a new channel would fail the same way.
pub(crate) fn is_refusal(error: &lapin::Error) -> bool {
    matches!(
        soft_error(error),
        Some(AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED)
    )
}

/// `url` with its password replaced, so errors and logs never carry a secret.
pub(crate) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &authority[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
        assert_eq!(redact("amqp://user@host"), "amqp://user@host");
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(redact("amqps://a:b@h/v?x=@"), "amqps://a:***@h/v?x=@");
    }

    fn soft(error: AMQPSoftError) -> lapin::Error {
        let amqp = lapin::protocol::AMQPError::new(AMQPErrorKind::Soft(error), "test".into());
        ErrorKind::ProtocolError(amqp).into()
    }

    #[test]
    fn a_refused_message_is_invalid_a_lost_channel_unavailable() {
        let broker = |source| Error::Broker {
            operation: "publish p:1:1".into(),
            source,
        };
        for refusal in [
            AMQPSoftError::PRECONDITIONFAILED,
            AMQPSoftError::ACCESSREFUSED,
        ] {
            assert!(matches!(
                dory_core::Error::from(broker(soft(refusal))),
                dory_core::Error::Invalid(_)
            ));
        }
        let lost = broker(soft(AMQPSoftError::NOTFOUND));
        assert!(dory_core::Error::from(lost).is_retryable());
        let missing = Error::Declare {
            exchange: "x".into(),
            source: soft(AMQPSoftError::NOTFOUND),
        };
        assert!(matches!(
            dory_core::Error::from(missing),
            dory_core::Error::NotFound(_)
        ));
    }

    #[test]
    fn setup_errors_keep_their_meaning() {
        let bad = Error::BadUrl {
            url: "x".into(),
            reason: "nope".into(),
        };
        assert!(matches!(
            dory_core::Error::from(bad),
            dory_core::Error::Invalid(_)
        ));
        let timeout = Error::ConnectTimeout {
            url: "amqp://h".into(),
            after: Duration::from_secs(1),
        };
        assert!(dory_core::Error::from(timeout).is_retryable());
    }
}
