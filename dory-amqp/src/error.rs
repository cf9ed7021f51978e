//! [`Error`]: what can go wrong talking to RabbitMQ, and how it maps onto Dory's meanings.

use std::path::PathBuf;
use std::time::Duration;

use lapin::ErrorKind;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};

/// What went wrong in this crate, by cause; [`From<Error> for dory_core::Error`] maps each
/// cause to the meaning the orchestrator and runtime decide on (retry or give up).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker URL does not parse, or has a scheme other than `amqp://` or `amqps://`.
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
    /// A TLS file (CA certificates, client certificate or key) cannot be read, or does not
    /// hold what it should.
    #[error("bad AMQP TLS {what} file {}: {reason}", path.display())]
    TlsFile {
        /// What the file should hold: `CA certificate`, `client certificate` or `client key`.
        what: &'static str,
        /// The file, as configured.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// Connecting to the broker, or opening the publishing channel, failed.
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// What the client library reported.
        #[source]
        source: lapin::Error,
    },
    /// The TLS set-up or handshake of an `amqps://` connection failed: no system certificate
    /// store, a port that does not speak TLS, an untrusted broker certificate, or a broker that
    /// wants (another) client certificate. The hint says which it looks like.
    #[error("cannot connect to {url}: TLS handshake failed ({hint}): {source}")]
    TlsHandshake {
        /// The URL, password removed.
        url: String,
        /// The likely cause, in words.
        hint: &'static str,
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
    /// The queue to consume could not be checked (it does not exist, or access to it was
    /// refused).
    #[error("cannot consume queue {queue:?}: {source}")]
    Queue {
        /// The queue.
        queue: String,
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
    /// A broker operation got no answer in time: the connection died under it, most likely.
    #[error("{operation}: no answer within {after:?}")]
    NoAnswer {
        /// The operation, naming the queue or exchange.
        operation: String,
        /// How long it waited: the connect timeout.
        after: Duration,
    },
}

impl From<Error> for dory_core::Error {
    fn from(error: Error) -> Self {
        let message = error.to_string();
        match &error {
            // A bad TLS file stays bad until someone fixes it: retrying cannot help.
            Error::BadUrl { .. } | Error::Config(_) | Error::TlsFile { .. } => {
                dory_core::Error::invalid(message)
            }
            // A missing exchange is a deployment mistake, not an outage: retrying will not
            // create it.
            Error::Declare { source, .. } | Error::Queue { source, .. } if is_not_found(source) => {
                dory_core::Error::not_found(message)
            }
            Error::Declare { source, .. } | Error::Queue { source, .. }
                if is_access_refused(source) =>
            {
                dory_core::Error::invalid(message)
            }
            // The broker refused this very message (too large, not permitted): sending it
            // again cannot help.
            Error::Broker { source, .. } if is_refusal(source) => {
                dory_core::Error::invalid(message)
            }
            // Retryable like any failed connect: a broker being reconfigured, or a certificate
            // being renewed, fails handshakes for a while.
            Error::Connect { .. }
            | Error::TlsHandshake { .. }
            | Error::ConnectTimeout { .. }
            | Error::Declare { .. }
            | Error::Queue { .. }
            | Error::Broker { .. }
            | Error::NoAnswer { .. } => dory_core::Error::unavailable(message),
        }
    }
}

/// A failed connect to `url` as an error: a failed TLS handshake gets its own variant, with a
/// hint at the likely cause, since rustls' own words ("corrupt message", "unknown issuer")
/// rarely point at the setting to fix.
pub(crate) fn connect_error(url: String, source: lapin::Error) -> Error {
    if no_system_certificates(&source) {
        return Error::TlsHandshake {
            url,
            hint: "the system certificate store has no certificate: install a CA bundle, or \
                   point SSL_CERT_FILE at the CA's PEM file",
            source,
        };
    }
    let Some(tls) = tls_error(&source) else {
        return Error::Connect { url, source };
    };
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    let hint = match tls {
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the port does not seem to speak TLS: RabbitMQ takes amqps:// on 5671 and plain \
             amqp:// on 5672"
        }
        rustls::Error::InvalidCertificate(Cert::UnknownIssuer) => {
            "the broker's certificate is not signed by a CA in the system store or the \
             configured tls_ca_file"
        }
        rustls::Error::InvalidCertificate(Cert::NotValidForName)
        | rustls::Error::InvalidCertificate(Cert::NotValidForNameContext { .. }) => {
            "the broker's certificate is not issued for the host in the URL"
        }
        rustls::Error::InvalidCertificate(Cert::Expired)
        | rustls::Error::InvalidCertificate(Cert::ExpiredContext { .. })
        | rustls::Error::InvalidCertificate(Cert::NotValidYet)
        | rustls::Error::InvalidCertificate(Cert::NotValidYetContext { .. }) => {
            "the broker's certificate is expired or not yet valid (or this host's clock is off)"
        }
        rustls::Error::InvalidCertificate(_) => "the broker's certificate is not trusted",
        rustls::Error::AlertReceived(Alert::CertificateRequired | Alert::HandshakeFailure) => {
            "the broker may require a client certificate: set tls_client_cert"
        }
        rustls::Error::AlertReceived(
            Alert::BadCertificate
            | Alert::UnknownCA
            | Alert::CertificateUnknown
            | Alert::CertificateExpired
            | Alert::CertificateRevoked
            | Alert::UnsupportedCertificate
            | Alert::AccessDenied,
        ) => "the broker refused the client certificate",
        _ => "see the TLS error",
    };
    Error::TlsHandshake { url, hint, source }
}

/// Whether the client library found no certificate in the system store, which it needs even
/// when a CA file is configured. It says so only in words; should they change, the error is a
/// plain [`Error::Connect`] carrying them.
fn no_system_certificates(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::IOError(io) if io.to_string().contains("native certificates"))
}

/// The rustls error inside a client library error, if it is one.
fn tls_error(error: &lapin::Error) -> Option<&rustls::Error> {
    match error.kind() {
        ErrorKind::IOError(io) => io.get_ref()?.downcast_ref::<rustls::Error>(),
        _ => None,
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
