//! Reaching the broker, shared by the publisher and the input: the connection with its TLS
//! settings, the crypto provider, and the backoff between attempts.

use std::future::Future;
use std::sync::Once;
use std::time::Duration;

use lapin::tcp::OwnedTLSConfig;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use tracing::warn;

use crate::config::AmqpConfig;
use crate::error::{Error, connect_error};
use crate::tls;

/// The tracing target everything in this crate logs under.
pub(crate) const TARGET: &str = "dory::amqp";

/// Installs rustls' ring crypto provider as the process default, once, so every TLS user in
/// the workspace (lapin, sqlx, kube) agrees on one provider instead of rustls refusing to pick.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // An error means another crate installed a provider first: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Opens a connection to `config`'s broker named `name` (the name shows in the broker's
/// connection list). `generation` counts reconnects: 0 is the first connect. The caller
/// bounds it, with the channel set-up, by the connect timeout.
pub(crate) async fn connect(
    config: &AmqpConfig,
    uri: &AMQPUri,
    name: &str,
    generation: u64,
) -> Result<Connection, Error> {
    install_crypto_provider();
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::Config(format!(
            "the {name} must be connected from within a tokio runtime"
        )));
    }
    // Read at every connect, so that certificates rotated on disk (short-lived ones, renewed
    // by a certificate manager) are used by the next reconnect.
    let tls = match uri.scheme {
        AMQPScheme::AMQPS => tls::load(config).inspect_err(|e| {
            if generation > 0 {
                warn!(target: TARGET, error = %e, "cannot reconnect: bad TLS file");
            }
        })?,
        AMQPScheme::AMQP => OwnedTLSConfig::default(),
    };
    let url = config.redacted_url();
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let runtime =
        lapin::runtime::default_runtime().map_err(|source| connect_error(url.clone(), source))?;
    Connection::connect_uri_with_config(uri.clone(), properties, tls, runtime)
        .await
        .map_err(|source| connect_error(url, source))
}

/// The delay before retry `attempt` (1-based) of a nacked message or a reconnect: doubling
/// from `reconnect_delay`, capped at `reconnect_max_delay`.
pub(crate) fn backoff(config: &AmqpConfig, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    config
        .reconnect_delay
        .saturating_mul(factor)
        .min(config.reconnect_max_delay)
}

/// Waits for a call the broker connection owes an answer to (an acknowledgement written, a
/// cancel or close answered), for at most the connect timeout. The client library can leave
/// such a call pending for ever when the connection dies under it, so nothing that holds
/// deliveries or a shutdown may wait on it unbounded.
pub(crate) async fn answered<T>(
    config: &AmqpConfig,
    operation: impl FnOnce() -> String,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T, Error> {
    match tokio::time::timeout(config.connect_timeout, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(source)) => Err(Error::Broker {
            operation: operation(),
            source,
        }),
        Err(_) => Err(Error::NoAnswer {
            operation: operation(),
            after: config.connect_timeout,
        }),
    }
}
