//! [`AmqpConfig`]: where and how [`AmqpPublisher`](crate::AmqpPublisher) publishes.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};

use crate::error::{Error, redact};

/// The default [`window`](AmqpConfig::window): enough unconfirmed messages to keep a broker
/// round trip busy, few enough that a stalled broker pins little memory.
pub const DEFAULT_WINDOW: usize = 256;

/// The default [`connect_timeout`](AmqpConfig::connect_timeout).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default [`nack_retries`](AmqpConfig::nack_retries).
pub const DEFAULT_NACK_RETRIES: u32 = 3;

/// The default [`reconnect_attempts`](AmqpConfig::reconnect_attempts).
pub const DEFAULT_RECONNECT_ATTEMPTS: u32 = 8;

/// Where and how to publish. Build with [`AmqpConfig::new`] and the `with_*` methods.
///
/// `Debug` shows the URL without its password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AmqpConfig {
    /// The broker: `amqp://user:password@host:port/vhost` (the vhost URL-encoded: `%2f` is
    /// `/`), or `amqps://` for TLS (port 5671 by default), which verifies the broker's
    /// certificate against the system's certificate store and
    /// [`tls_ca_file`](AmqpConfig::tls_ca_file).
    pub url: String,
    /// The exchange messages are published to (`""` is the default exchange). It must exist:
    /// the publisher checks it at connect time but does not create it, because exchanges,
    /// queues and bindings belong to whoever deploys the consumers.
    pub exchange: String,
    /// The routing key of messages that carry none.
    pub routing_key: String,
    /// At most this many messages are published and not yet confirmed; a publish beyond it
    /// waits for a slot, so memory stays bounded however slow the broker is.
    pub window: usize,
    /// How long connecting (TCP, TLS, AMQP handshake, channel set-up) may take.
    pub connect_timeout: Duration,
    /// How often a message the broker refused (nack) is sent again, with the reconnect
    /// backoff between tries, before the publish fails.
    pub nack_retries: u32,
    /// How often, after a lost connection or channel, the publisher reconnects (with
    /// exponential backoff) before a publish fails; `0` turns reconnecting off.
    pub reconnect_attempts: u32,
    /// The first reconnect delay; each further attempt doubles it, up to
    /// [`reconnect_max_delay`](AmqpConfig::reconnect_max_delay).
    pub reconnect_delay: Duration,
    /// The longest delay between two reconnect attempts.
    pub reconnect_max_delay: Duration,
    /// A PEM file of CA certificates trusted for `amqps://` besides the system's certificate
    /// store: the CA of a private broker. Read at every (re)connect, so a rotated file is
    /// picked up by the next reconnect.
    pub tls_ca_file: Option<PathBuf>,
    /// The client certificate and key `amqps://` presents to a broker that requires mutual
    /// TLS. Read at every (re)connect, like [`tls_ca_file`](AmqpConfig::tls_ca_file).
    pub tls_client_cert: Option<ClientCert>,
}

/// Where the client certificate for mutual TLS is read from: two PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientCert {
    /// The client certificate, then any intermediate certificates, in PEM.
    pub cert_file: PathBuf,
    /// The certificate's private key in PEM (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key_file: PathBuf,
}

impl ClientCert {
    /// The certificate chain in `cert_file` with the private key in `key_file`.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        ClientCert {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        }
    }
}

impl AmqpConfig {
    /// Publishing to `exchange` on the broker at `url`, with default settings otherwise.
    pub fn new(url: impl Into<String>, exchange: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            exchange: exchange.into(),
            routing_key: String::new(),
            window: DEFAULT_WINDOW,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            nack_retries: DEFAULT_NACK_RETRIES,
            reconnect_attempts: DEFAULT_RECONNECT_ATTEMPTS,
            reconnect_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            tls_ca_file: None,
            tls_client_cert: None,
        }
    }

    /// Sets the routing key of messages that carry none.
    pub fn with_routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_key = routing_key.into();
        self
    }

    /// Sets the window: the most messages published and not yet confirmed.
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = window;
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how often a nacked message is sent again.
    pub fn with_nack_retries(mut self, retries: u32) -> Self {
        self.nack_retries = retries;
        self
    }

    /// Sets how often the publisher reconnects after a lost connection or channel, and the
    /// first and longest delay between attempts; `attempts == 0` turns reconnecting off.
    pub fn with_reconnect(mut self, attempts: u32, delay: Duration, max_delay: Duration) -> Self {
        self.reconnect_attempts = attempts;
        self.reconnect_delay = delay;
        self.reconnect_max_delay = max_delay;
        self
    }

    /// Trusts the CA certificates in the PEM file at `path` for `amqps://`, besides the
    /// system's certificate store.
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Presents the certificate chain in `cert_file` with the private key in `key_file` (both
    /// PEM) to a broker that requires mutual TLS.
    pub fn with_tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client_cert = Some(ClientCert::new(cert_file, key_file));
        self
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks the settings and parses the URL.
    pub(crate) fn validate(&self) -> Result<AMQPUri, Error> {
        let bad_url = |reason: String| Error::BadUrl {
            url: self.redacted_url(),
            reason,
        };
        let scheme_ok = ["amqp://", "amqps://"].iter().any(|s| {
            self.url
                .get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s))
        });
        if !scheme_ok {
            return Err(bad_url("the scheme must be amqp:// or amqps://".into()));
        }
        let uri: AMQPUri = self.url.parse().map_err(bad_url)?;
        let tls_settings = self.tls_ca_file.is_some() || self.tls_client_cert.is_some();
        if uri.scheme == AMQPScheme::AMQP && tls_settings {
            // Whoever names a CA or a client certificate expects TLS; connecting in plain text
            // anyway would send credentials and messages unencrypted without a word.
            return Err(Error::Config(format!(
                "TLS files are set but {} connects without TLS: use amqps://",
                self.redacted_url()
            )));
        }
        if self.window == 0 {
            return Err(Error::Config("window must be at least 1".into()));
        }
        if self.window > u32::MAX as usize || self.window > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(Error::Config(format!(
                "window {} is too large",
                self.window
            )));
        }
        // AMQP short strings carry at most 255 bytes; refusing here beats a broker error later.
        for (what, value) in [
            ("exchange", &self.exchange),
            ("routing key", &self.routing_key),
        ] {
            if value.len() > 255 {
                return Err(Error::Config(format!(
                    "{what} is {} bytes long; at most 255",
                    value.len()
                )));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::Config("connect timeout must not be zero".into()));
        }
        Ok(uri)
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &self.redacted_url())
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("window", &self.window)
            .field("connect_timeout", &self.connect_timeout)
            .field("nack_retries", &self.nack_retries)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("reconnect_max_delay", &self.reconnect_max_delay)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_client_cert", &self.tls_client_cert)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_settings_without_panicking() {
        let ok = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "x");
        assert!(ok.validate().is_ok());
        for url in ["http://h", "", "amqp", "amqp://[::1", "postgres://a@b/c"] {
            let e = AmqpConfig::new(url, "x").validate().unwrap_err();
            assert!(matches!(e, Error::BadUrl { .. }), "{url}: {e}");
        }
        let tls = AmqpConfig::new("amqps://guest:guest@127.0.0.1/%2f", "x")
            .validate()
            .unwrap_or_else(|e| panic!("amqps is accepted: {e}"));
        assert_eq!(tls.scheme, AMQPScheme::AMQPS);
        assert_eq!(tls.authority.port, 5671, "amqps defaults to the TLS port");
        let plain_with_ca = ok.clone().with_tls_ca_file("ca.pem").validate();
        assert!(
            matches!(&plain_with_ca, Err(Error::Config(m)) if m.contains("amqps://")),
            "TLS files with amqp:// must not silently connect in plain text: {plain_with_ca:?}"
        );
        assert!(matches!(
            ok.clone().with_window(0).validate(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            AmqpConfig::new(ok.url.clone(), "e".repeat(256)).validate(),
            Err(Error::Config(_))
        ));
    }

    #[test]
    fn debug_hides_the_password() {
        let c = AmqpConfig::new("amqp://guest:hunter2@h/%2f", "x");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
