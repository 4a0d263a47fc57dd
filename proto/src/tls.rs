//! TLS for a public listener: a certificate chain and its key in PEM files (rustls, with
//! ring; no OpenSSL). Read and checked once, at start, so that a bad file is a clear error
//! before anything listens.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A certificate chain and key a server presents.
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// The same, as rustls takes it (HTTP/1.1 and HTTP/2 by ALPN).
    rustls: Arc<rustls::ServerConfig>,
}

/// A certificate or key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key: {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("the certificate and key cannot be used together: {0}")]
    Config(#[from] rustls::Error),
}

impl ServerTls {
    /// Reads and checks `cert` (the chain, leaf first) and `key`.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        Self::from_pem(read(cert)?, read(key)?, cert, key)
    }

    fn from_pem(
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        cert: &Path,
        key: &Path,
    ) -> Result<Self, TlsError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .filter_map(Result::ok)
            .collect();
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                path: cert.to_path_buf(),
            });
        }
        let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, private)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            cert_pem,
            key_pem,
            rustls: Arc::new(config),
        })
    }

    /// The configuration for a tonic server.
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        tonic::transport::ServerTlsConfig::new().identity(identity)
    }

    /// The configuration for an HTTP server.
    pub fn rustls(&self) -> Arc<rustls::ServerConfig> {
        self.rustls.clone()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}
