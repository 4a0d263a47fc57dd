//! How the roles of a deployment secure their links: the token they show each other, TLS on
//! their listeners, and the certificate authorities they trust when calling each other.

use anyhow::bail;
use clap::Args;
use sibyl_proto::auth::InternalToken;
use sibyl_proto::client::ServiceAddress;
use sibyl_proto::tls::{ClientTls, ServerTls};
use std::path::PathBuf;
use std::sync::Arc;

/// How the roles of one deployment recognise each other.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// A file of tokens, one per line, shared by the deployment's roles: the verifier and
    /// drafters accept only calls that carry one (health and reflection stay open), and a
    /// role sends the first. Without it they accept any caller that reaches them.
    #[arg(long, env = "SIBYL_INTERNAL_TOKEN_FILE")]
    pub internal_token_file: Option<PathBuf>,
}

impl TokenArgs {
    pub fn token(&self) -> anyhow::Result<Option<InternalToken>> {
        match &self.internal_token_file {
            Some(path) => Ok(Some(InternalToken::from_file(path)?)),
            None => Ok(None),
        }
    }
}

/// TLS on a role's listeners.
#[derive(Debug, Clone, Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain (leaf first) for TLS on this role's API listeners (gRPC over
    /// TLS, and HTTPS on the gateway; the /metrics port stays plain); with --tls-key.
    #[arg(long, env = "SIBYL_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SIBYL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The certificate and key, read and checked; `None` without the flags.
    pub fn load(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(Arc::new(ServerTls::from_files(cert, key)?))),
            _ => Ok(None),
        }
    }
}

/// What a role trusts when it calls others over TLS.
#[derive(Debug, Clone, Args)]
pub struct ClientTlsArgs {
    /// PEM certificates of the authorities to trust when calling other roles at https://
    /// addresses (their certificates must name the host in the address).
    #[arg(long, env = "SIBYL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The authorities, read and checked, for calling `addresses`: an error if one is
    /// `https://` and no authority was given.
    pub fn load<'a>(
        &self,
        addresses: impl IntoIterator<Item = &'a ServiceAddress>,
    ) -> anyhow::Result<Option<Arc<ClientTls>>> {
        let tls = match &self.tls_ca {
            Some(path) => Some(Arc::new(ClientTls::from_file(path)?)),
            None => None,
        };
        if tls.is_none() {
            if let Some(address) = addresses.into_iter().find(|a| a.tls) {
                bail!("{address} is called over TLS: give the certificate authority to trust with --tls-ca");
            }
        }
        Ok(tls)
    }
}
