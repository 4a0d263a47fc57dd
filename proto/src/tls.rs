//! TLS for a listener (a certificate chain and its key in PEM files) and for a client (the
//! certificate authorities it trusts), with rustls and ring; no OpenSSL. Files are read and
//! checked once, at start, so that a bad file is a clear error before anything listens.

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

/// The certificate authorities a client trusts for the servers it calls over TLS
/// (`https://` addresses): it checks that a server's certificate chains to one of them and
/// names the host it called.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    /// The name certificates must carry, whatever host was called.
    server_name: Option<String>,
}

impl ClientTls {
    /// Reads `path`, one or more PEM certificates.
    pub fn from_file(path: &Path) -> Result<Self, TlsError> {
        let ca_pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let certificates = CertificateDer::pem_slice_iter(&ca_pem)
            .filter_map(Result::ok)
            .count();
        if certificates == 0 {
            return Err(TlsError::NoCertificate {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            ca_pem,
            server_name: None,
        })
    }

    /// The same authorities, with certificates checked for `name` instead of the host
    /// called (a health check calling 127.0.0.1 in a container whose certificate names the
    /// service).
    pub fn expecting(self, name: String) -> Self {
        Self {
            server_name: Some(name),
            ..self
        }
    }

    /// The configuration for a tonic client calling `host` (the name its certificate must
    /// carry unless [`Self::expecting`] says otherwise; an IP address works when the
    /// certificate lists it).
    pub fn tonic(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .domain_name(self.server_name.as_deref().unwrap_or(host))
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}
