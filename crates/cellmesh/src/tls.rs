//! TLS around a link, for relays deployed on standard ports (443 through middleboxes that pass
//! only TLS).
//!
//! TLS is an outer layer only: inside it the link is unchanged (Noise XX handshake, signed
//! tokens, end to end between device and relay), so a TLS certificate adds reachability, not
//! trust in the relay's identity. A listener with [`NodeConfig::tls`](crate::node::NodeConfig)
//! set runs the TLS handshake before the link's own; a dialer asks for it with
//! [`Transport::Tls`](crate::node::Transport). Both sides use rustls on *ring*, the AEAD
//! crate the rest of cellmesh uses.
//!
//! ```text
//!  cert.pem + key.pem ──server_config──► ServerConfig ──► NodeConfig::tls (every listener)
//!  web roots (+ CA file) ──client_config──► ClientConfig ──► Transport::Tls { server_name, .. }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

pub use rustls::pki_types::ServerName;
pub use rustls::{ClientConfig, ServerConfig};

/// A TLS configuration could not be built from the files given.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{}: malformed PEM: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{}: no PEM certificate in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key section (PKCS#8, PKCS#1 or SEC1).
    #[error("{}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The TLS provider refused the protocol versions (a bug: *ring* supports them).
    #[error("the TLS provider refused the configuration: {0}")]
    Provider(String),
    /// rustls refused a key or certificate (an unsupported key type, a malformed
    /// certificate).
    #[error("{}: {reason}", path.display())]
    Unusable {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        reason: String,
    },
}

/// A server configuration presenting the certificate chain in `cert_pem` (leaf first) with the
/// private key in `key_pem`. TLS 1.3 and 1.2 with rustls's safe defaults; no client
/// certificates (devices authenticate inside, with their tokens).
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(cert_pem)?;
    let text = read(key_pem)?;
    let key = match PrivateKeyDer::from_pem_slice(&text) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key_pem.into(),
            });
        }
        Err(e) => return Err(malformed(key_pem, &e)),
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Provider(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert_pem.into(),
                key: key_pem.into(),
            },
            other => unusable(key_pem, &other),
        })?;
    Ok(Arc::new(config))
}

/// A client configuration that trusts Mozilla's root certificates (the `webpki-roots`
/// crate) and, when given, the CA certificates in `extra_ca_pem` (a private CA, or a
/// self-signed certificate trusted as it is).
pub fn client_config(extra_ca_pem: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca_pem {
        for cert in certificates(path)? {
            roots.add(cert).map_err(|e| unusable(path, &e))?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Provider(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// How a TLS handshake failed, as far as a user can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsFailure {
    /// The peer's certificate was refused: not issued by a trusted root, expired, or not for
    /// the name dialed.
    Certificate,
    /// Anything else: the peer does not speak TLS, refused ours, or the connection broke off.
    Handshake,
}

/// Classifies the error of a TLS handshake (tokio-rustls carries rustls's error inside the
/// `io::Error`).
pub(crate) fn classify(error: &io::Error) -> TlsFailure {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(_)) => TlsFailure::Certificate,
        _ => TlsFailure::Handshake,
    }
}

/// The one crypto provider cellmesh uses, named explicitly so that another crate enabling a
/// second rustls provider in the same binary cannot make the choice ambiguous.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(path, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn malformed(path: &Path, e: &pem::Error) -> TlsError {
    TlsError::Malformed {
        path: path.into(),
        reason: e.to_string(),
    }
}

fn unusable(path: &Path, e: &rustls::Error) -> TlsError {
    TlsError::Unusable {
        path: path.into(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn configs_build_from_a_certificate_and_its_key_and_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = write(dir.path(), "cert.pem", &ck.cert.pem());
        let key = write(dir.path(), "key.pem", &ck.signing_key.serialize_pem());
        let other_key = write(dir.path(), "other.pem", &other.signing_key.serialize_pem());
        let empty = write(dir.path(), "empty.pem", "nothing to see\n");
        let missing = dir.path().join("missing.pem");

        server_config(&cert, &key).unwrap();
        client_config(None).unwrap();
        client_config(Some(&cert)).unwrap();

        let err = |r: Result<Arc<ServerConfig>, TlsError>| r.unwrap_err();
        assert!(matches!(
            err(server_config(&missing, &key)),
            TlsError::Read { .. }
        ));
        assert!(matches!(
            err(server_config(&empty, &key)),
            TlsError::NoCertificate { .. }
        ));
        assert!(matches!(
            err(server_config(&cert, &empty)),
            TlsError::NoKey { .. }
        ));
        // A key file given as the certificate holds no certificate.
        assert!(matches!(
            err(server_config(&key, &key)),
            TlsError::NoCertificate { .. }
        ));
        let mismatch = err(server_config(&cert, &other_key));
        assert!(
            matches!(mismatch, TlsError::KeyMismatch { .. }),
            "{mismatch}"
        );
        assert!(mismatch.to_string().contains("does not match"));
        assert!(matches!(
            client_config(Some(&empty)).unwrap_err(),
            TlsError::NoCertificate { .. }
        ));
        assert!(
            err(server_config(&missing, &key))
                .to_string()
                .contains("missing.pem")
        );
    }
}
