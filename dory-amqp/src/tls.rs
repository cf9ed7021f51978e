//! The TLS settings of an `amqps://` connection, read from the PEM files an [`AmqpConfig`]
//! names and checked here, so that a wrong file fails with its name rather than as a
//! handshake error far from its cause.

use std::path::Path;
use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rustls::InconsistentKeys;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::AmqpConfig;
use crate::error::Error;

const CA: &str = "CA certificate";
const CLIENT_CERT: &str = "client certificate";
const CLIENT_KEY: &str = "client key";

/// Larger than any PEM bundle of certificates or keys; refusing a bigger file keeps a wrong
/// path (a log file, a device) from being read into memory whole.
const MAX_FILE_LEN: u64 = 4 << 20;

/// The TLS settings for connecting to `config`'s broker: the extra CA certificates and the
/// client certificate, read from their files now. The system's certificate store is added by
/// the client library.
pub(crate) fn load(config: &AmqpConfig) -> Result<OwnedTLSConfig, Error> {
    let mut tls = OwnedTLSConfig::default();
    if let Some(path) = &config.tls_ca_file {
        let pem = read(CA, path)?;
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certificates(CA, path, &pem)?.into_iter().enumerate() {
            // The client library silently skips a CA certificate it cannot parse; the
            // handshake would then fail with an unknown issuer instead of naming this file.
            store.add(cert).map_err(|e| {
                bad(
                    CA,
                    path,
                    format!("certificate {} does not parse as X.509 ({e})", i + 1),
                )
            })?;
        }
        tls.cert_chain = Some(pem);
    }
    if let Some(client) = &config.tls_client_cert {
        let cert_pem = read(CLIENT_CERT, &client.cert_file)?;
        let chain = certificates(CLIENT_CERT, &client.cert_file, &cert_pem)?;
        let key_pem = read(CLIENT_KEY, &client.key_file)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            bad(
                CLIENT_KEY,
                &client.key_file,
                format!("no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
            )
        })?;
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| bad(CLIENT_KEY, &client.key_file, format!("unusable key: {e}")))?;
        match CertifiedKey::new(chain, signing_key).keys_match() {
            // A key whose public half rustls cannot tell is checked by the broker instead.
            Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(bad(
                    CLIENT_KEY,
                    &client.key_file,
                    format!(
                        "does not belong to the first certificate of {}",
                        client.cert_file.display()
                    ),
                ));
            }
            Err(e) => {
                return Err(bad(
                    CLIENT_CERT,
                    &client.cert_file,
                    format!("the first certificate does not parse: {e}"),
                ));
            }
        }
        tls.identity = Some(OwnedIdentity::PKCS8 {
            pem: cert_pem.into_bytes(),
            key: key_pem.into_bytes(),
        });
    }
    Ok(tls)
}

fn bad(what: &'static str, path: &Path, reason: impl Into<String>) -> Error {
    Error::TlsFile {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The file's text. PEM is ASCII; bytes outside it can only be in the free text around the
/// PEM sections, which parsing skips, so they are replaced rather than refused.
fn read(what: &'static str, path: &Path) -> Result<String, Error> {
    let unreadable = |e: std::io::Error| bad(what, path, format!("cannot read it: {e}"));
    let len = std::fs::metadata(path).map_err(unreadable)?.len();
    if len > MAX_FILE_LEN {
        return Err(bad(
            what,
            path,
            format!("{len} bytes long; a PEM file of certificates or keys is far smaller"),
        ));
    }
    let bytes = std::fs::read(path).map_err(unreadable)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Every `CERTIFICATE` section of `pem`, in order; at least one.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, path, format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            what,
            path,
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientCert;

    fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("dory-amqp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    fn config() -> AmqpConfig {
        AmqpConfig::new("amqps://guest:guest@127.0.0.1/%2f", "x")
    }

    #[test]
    fn no_files_no_settings() {
        assert_eq!(load(&config()).ok(), Some(OwnedTLSConfig::default()));
    }

    #[test]
    fn bad_files_are_named_errors() {
        let missing = std::env::temp_dir().join("dory-amqp-no-such-ca.pem");
        let not_pem = temp_file("not-pem.pem", b"hello, not a certificate\n");
        let bad_base64 = temp_file(
            "bad-base64.pem",
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let not_x509 = temp_file(
            "not-x509.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        for (path, expect) in [
            (&missing, "cannot read"),
            (&not_pem, "no PEM certificate"),
            (&bad_base64, "not valid PEM"),
            (&not_x509, "does not parse as X.509"),
        ] {
            let e = load(&config().with_tls_ca_file(path)).unwrap_err();
            let text = e.to_string();
            assert!(
                matches!(&e, Error::TlsFile { what: CA, path: p, .. } if p == path)
                    && text.contains(&path.display().to_string())
                    && text.contains(expect),
                "{text}"
            );
            assert!(matches!(
                dory_core::Error::from(e),
                dory_core::Error::Invalid(_)
            ));
        }
        let mut with_client = config();
        with_client.tls_client_cert = Some(ClientCert::new(&not_x509, &not_pem));
        let e = load(&with_client).unwrap_err();
        assert!(
            matches!(&e, Error::TlsFile { what: CLIENT_KEY, path, .. } if path == &not_pem),
            "{e}"
        );
        if let Some(dir) = not_pem.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
