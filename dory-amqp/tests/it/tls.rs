//! `amqps://`: settings, clear errors for bad TLS files and plain-text ports, and publishing
//! through a real TLS handshake. The test broker speaks plain AMQP, so a TLS-terminating proxy
//! in front of it, with a throwaway CA and server certificate made at test time, plays a TLS
//! listener.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dory_amqp::{AmqpConfig, AmqpPublisher, Error};
use dory_core::testing::{unique_name, unique_processor};
use dory_core::{Epoch, OutputMessage, Publisher, Sequence};
use lapin::ExchangeKind;
use lapin::uri::{AMQPScheme, AMQPUri};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::broker::{Broker, broker};
use crate::proxy::Proxy;

/// `url` with its scheme switched to `amqps` and, when given, its port replaced.
fn amqps(url: &str, port: Option<u16>) -> String {
    let mut uri: AMQPUri = url
        .parse()
        .unwrap_or_else(|e| panic!("test broker URL: {e}"));
    uri.scheme = AMQPScheme::AMQPS;
    if let Some(port) = port {
        uri.authority.port = port;
    }
    uri.to_string()
}

/// A fresh directory for this test's certificate files, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_name(&format!("dory-it-{test}")));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA with a server certificate for the loopback address and, for mutual TLS, a
/// client certificate, all signed by it.
struct Pki {
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    client_pem: String,
    client_key_pem: String,
    ca_der: CertificateDer<'static>,
}

fn key_pair() -> KeyPair {
    KeyPair::generate().unwrap_or_else(|e| panic!("key pair: {e}"))
}

impl Pki {
    fn new() -> Pki {
        let ca_key = key_pair();
        let mut ca = CertificateParams::new(Vec::<String>::new())
            .unwrap_or_else(|e| panic!("CA params: {e}"));
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "dory test CA (throwaway)");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca
            .self_signed(&ca_key)
            .unwrap_or_else(|e| panic!("CA certificate: {e}"));
        let issuer = Issuer::new(ca, ca_key);

        // The client library sends the URL's host as the server name; name the address both
        // ways so the certificate matches however the URL spells it.
        let server_key = key_pair();
        let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap_or_else(|e| panic!("server params: {e}"));
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .unwrap_or_else(|e| panic!("server certificate: {e}"));

        let client_key = key_pair();
        let mut client = CertificateParams::new(vec!["dory-publisher".into()])
            .unwrap_or_else(|e| panic!("client params: {e}"));
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &issuer)
            .unwrap_or_else(|e| panic!("client certificate: {e}"));

        Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_chain: vec![server_cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()).into(),
            client_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }

    /// A TLS server configuration on ring with the server certificate; with `mutual`, it also
    /// requires a client certificate signed by the CA.
    fn acceptor(&self, mutual: bool) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("TLS versions: {e}"));
        let builder = if mutual {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(self.ca_der.clone())
                .unwrap_or_else(|e| panic!("CA root: {e}"));
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap_or_else(|e| panic!("client verifier: {e}"));
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())
            .unwrap_or_else(|e| panic!("server certificate: {e}"));
        TlsAcceptor::from(Arc::new(config))
    }
}

fn message(processor: &dory_core::ProcessorId, sequence: u64) -> OutputMessage {
    OutputMessage {
        processor: processor.clone(),
        epoch: Epoch(1),
        sequence: Sequence(sequence),
        routing_key: None,
        payload: format!("over TLS {sequence}").into_bytes(),
    }
}

/// Publishes through `config`, and again after `proxy` cut the connection (so the publisher
/// reconnects over TLS, reading its TLS files again), and checks both messages arrive.
async fn publish_and_reconnect(broker: &Broker, proxy: &Proxy, config: AmqpConfig, queue: &str) {
    let publisher = AmqpPublisher::connect(config.with_reconnect(
        20,
        Duration::from_millis(50),
        Duration::from_millis(200),
    ))
    .await
    .unwrap_or_else(|e| panic!("connect over TLS: {e}"));
    let p = unique_processor("tls");
    publisher
        .publish(message(&p, 1))
        .await
        .unwrap_or_else(|e| panic!("publish over TLS: {e}"));
    proxy.cut();
    publisher
        .publish(message(&p, 2))
        .await
        .unwrap_or_else(|e| panic!("publish over TLS after a lost connection: {e}"));
    assert!(publisher.reconnects() >= 1, "the publisher reconnected");
    publisher
        .close()
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    let got = broker.drain(queue).await;
    let bodies: Vec<_> = got.iter().map(|d| d.data.as_slice()).collect();
    assert_eq!(
        bodies,
        [b"over TLS 1".as_slice(), b"over TLS 2".as_slice()],
        "both messages published over TLS arrive"
    );
}

#[tokio::test]
async fn amqps_url_is_accepted_and_tls_files_require_it() {
    // Nothing listens on port 1: an accepted URL fails at the network, not at validation.
    let url = "amqps://guest:hunter2@127.0.0.1:1/%2f";
    let e = AmqpPublisher::connect(
        AmqpConfig::new(url, "x").with_connect_timeout(Duration::from_secs(5)),
    )
    .await
    .expect_err("nothing listens on port 1");
    assert!(
        matches!(e, Error::Connect { .. } | Error::ConnectTimeout { .. }),
        "amqps:// passes validation and fails only at connecting: {e}"
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");

    let plain = AmqpConfig::new("amqp://guest:hunter2@127.0.0.1:1/%2f", "x")
        .with_tls_ca_file("/nonexistent/ca.pem");
    let e = AmqpPublisher::connect(plain)
        .await
        .expect_err("TLS files with amqp:// are refused");
    assert!(
        matches!(&e, Error::Config(m) if m.contains("amqps://")),
        "TLS settings with a plain-text URL must not connect in plain text: {e}"
    );
    assert!(!e.to_string().contains("hunter2"), "{e}");
}

#[tokio::test]
async fn missing_or_garbage_tls_files_are_clear_errors() {
    let dir = TempDir::new("tls-files");
    let missing = dir.0.join("missing-ca.pem");
    let garbage = dir.write("garbage.pem", "this is not a certificate\n");
    let truncated = dir.write(
        "truncated.pem",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    // Port 1: a bad file must fail before any connection attempt.
    let url = "amqps://guest:hunter2@127.0.0.1:1/%2f";
    for (path, reason) in [
        (&missing, "cannot read"),
        (&garbage, "no PEM certificate"),
        (&truncated, "CA certificate"),
    ] {
        let e = AmqpPublisher::connect(AmqpConfig::new(url, "x").with_tls_ca_file(path))
            .await
            .expect_err("a bad CA file is refused");
        let text = e.to_string();
        assert!(
            matches!(&e, Error::TlsFile { path: p, .. } if p == path),
            "the error is about the file: {text}"
        );
        assert!(
            text.contains(&path.display().to_string()) && text.contains(reason),
            "the message names the file and the problem: {text}"
        );
        assert!(!text.contains("hunter2"), "{text}");
        let core = dory_core::Error::from(e);
        assert!(
            matches!(core, dory_core::Error::Invalid(_)),
            "a bad file is not worth retrying: {core:?}"
        );
    }

    // A client key that is not a key, and one that belongs to another certificate.
    let pki = Pki::new();
    let cert = dir.write("client.pem", &pki.client_pem);
    let other_key = dir.write("other-key.pem", &key_pair().serialize_pem());
    for (key, reason) in [(&garbage, "private key"), (&other_key, "does not belong")] {
        let e = AmqpPublisher::connect(AmqpConfig::new(url, "x").with_tls_client_cert(&cert, key))
            .await
            .expect_err("a bad client key is refused");
        let text = e.to_string();
        assert!(
            matches!(&e, Error::TlsFile { path, .. } if path == key) && text.contains(reason),
            "{text}"
        );
    }
}

#[tokio::test]
async fn amqps_to_a_plain_text_port_fails_fast_and_clearly() {
    let Some(broker) = broker("amqps_to_a_plain_text_port_fails_fast_and_clearly").await else {
        return;
    };
    // The broker's own, plain-text port, spoken to in TLS.
    let timeout = Duration::from_secs(5);
    let config = AmqpConfig::new(amqps(&broker.url, None), "").with_connect_timeout(timeout);
    let started = Instant::now();
    let e = AmqpPublisher::connect(config)
        .await
        .expect_err("a TLS handshake with a plain-text listener fails");
    let took = started.elapsed();
    assert!(
        took < timeout + Duration::from_secs(2),
        "bounded by the connect timeout: {took:?}"
    );
    let text = e.to_string();
    assert!(
        matches!(e, Error::TlsHandshake { hint, .. } if hint.contains("5671")),
        "the error says the port does not speak TLS: {text}"
    );
    assert!(text.contains("amqps://"), "names the URL: {text}");
    assert!(!text.contains(":guest@"), "without the password: {text}");
    let core = dory_core::Error::from(e);
    assert!(
        matches!(core, dory_core::Error::Unavailable(_)),
        "a connect failure is retryable: {core:?}"
    );
    broker.clean_up().await;
}

#[tokio::test]
async fn publishes_over_tls_with_a_private_ca() {
    let Some(broker) = broker("publishes_over_tls_with_a_private_ca").await else {
        return;
    };
    let dir = TempDir::new("tls-ca");
    let pki = Pki::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let proxy = Proxy::start_tls(&broker.url, pki.acceptor(false)).await;
    let exchange = broker.exchange("tls", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let config = |url: &str| {
        AmqpConfig::new(url, exchange.as_str()).with_connect_timeout(Duration::from_secs(5))
    };

    // Without the private CA the server certificate is not trusted: verification is on.
    let e = AmqpPublisher::connect(config(&proxy.url))
        .await
        .expect_err("a server certificate from an unknown CA is refused");
    assert!(
        matches!(&e, Error::TlsHandshake { hint, .. } if hint.contains("tls_ca_file")),
        "an untrusted certificate fails the connection, pointing at the CA setting: {e}"
    );

    publish_and_reconnect(
        &broker,
        &proxy,
        config(&proxy.url).with_tls_ca_file(&ca),
        &queue,
    )
    .await;
    drop(proxy);
    broker.clean_up().await;
}

#[tokio::test]
async fn publishes_over_mutual_tls_with_a_client_certificate() {
    let Some(broker) = broker("publishes_over_mutual_tls_with_a_client_certificate").await else {
        return;
    };
    let dir = TempDir::new("tls-mutual");
    let pki = Pki::new();
    let ca = dir.write("ca.pem", &pki.ca_pem);
    let cert = dir.write("client.pem", &pki.client_pem);
    let key = dir.write("client-key.pem", &pki.client_key_pem);
    let proxy = Proxy::start_tls(&broker.url, pki.acceptor(true)).await;
    let exchange = broker.exchange("mtls", ExchangeKind::Fanout).await;
    let queue = broker.bound_queue(&exchange, "").await;
    let config = || {
        AmqpConfig::new(proxy.url.as_str(), exchange.as_str())
            .with_connect_timeout(Duration::from_secs(5))
            .with_tls_ca_file(&ca)
    };

    let e = AmqpPublisher::connect(config())
        .await
        .expect_err("a server that requires a client certificate refuses a client without one");
    assert!(
        matches!(&e, Error::TlsHandshake { hint, .. } if hint.contains("client certificate")),
        "the error points at the client certificate: {e}"
    );

    publish_and_reconnect(
        &broker,
        &proxy,
        config().with_tls_client_cert(&cert, &key),
        &queue,
    )
    .await;
    drop(proxy);
    broker.clean_up().await;
}
