//! `sibyl health`: one gRPC health check, for container health checks.

use anyhow::Context;
use clap::Args;
use std::time::Duration;

/// Asks a server's gRPC health once.
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The server, as HOST:PORT.
    #[arg(long)]
    pub addr: String,

    /// The health entry to ask about ("" for the whole server).
    #[arg(long, default_value = "")]
    pub service: String,

    /// Ask over TLS, trusting the certificate authorities in this PEM file (the server's
    /// certificate must name the host of --addr, or --tls-server-name).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,

    /// The name the server's certificate must carry, when it is not the host of --addr (a
    /// container's health check calling 127.0.0.1, say).
    #[arg(long, requires = "tls_ca")]
    pub tls_server_name: Option<String>,

    /// Longest wait for the answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// `sibyl health`: exit code 0 when the server says SERVING (container health checks; the
/// image has no other gRPC client).
pub fn run_health(args: HealthArgs) -> anyhow::Result<()> {
    let (host, port) = args
        .addr
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.trim_matches(['[', ']']), port.parse::<u16>().ok()?)))
        .with_context(|| format!("--addr `{}`: expected HOST:PORT", args.addr))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let tls = match &args.tls_ca {
        Some(path) => {
            let tls = sibyl_proto::tls::ClientTls::from_file(path)?;
            Some(match args.tls_server_name {
                Some(name) => tls.expecting(name),
                None => tls,
            })
        }
        None => None,
    };
    runtime
        .block_on(sibyl_proto::client::check_serving(
            host,
            port,
            &args.service,
            tls.as_ref(),
            timeout,
        ))
        .map_err(|reason| anyhow::anyhow!("not serving: {reason}"))?;
    println!("SERVING");
    Ok(())
}
