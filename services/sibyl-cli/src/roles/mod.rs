//! `sibyl serve`, `sibyl gateway`, `sibyl verifier`, `sibyl drafter`: the roles as servers.
//! `serve` starts all of them in one process, wired over loopback gRPC exactly as separate
//! processes are.

mod drafter;
mod gateway;
mod serve;
mod verifier;

pub use drafter::{run_drafter, DrafterArgs};
pub use gateway::{run_gateway, GatewayArgs};
pub use serve::{run_serve, ServeArgs};
pub use verifier::{run_verifier, VerifierRoleArgs};

use anyhow::Context;
use clap::Args;
use sibyl_proto::server::OnLoadError;
use sibyl_setup::args::ModelArgs;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;

/// Logs and traces. Spans are exported over OTLP/gRPC when the standard
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`OTEL_SERVICE_NAME` overrides `sibyl-<role>`).
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log lines as JSON objects (for log collectors) instead of text, with the request id.
    #[arg(long, env = "SIBYL_LOG_JSON")]
    pub log_json: bool,
}

/// What a role does when its model file is missing or bad.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Milliseconds between attempts to load a model file that is missing or bad; health
    /// says NOT_SERVING meanwhile. 0: exit with the error instead.
    #[arg(long, env = "SIBYL_LOAD_RETRY_MS", default_value_t = 5000)]
    pub load_retry_ms: u64,
}

impl LoadArgs {
    fn on_error(&self) -> OnLoadError {
        match self.load_retry_ms {
            0 => OnLoadError::Fail,
            ms => OnLoadError::Retry(Duration::from_millis(ms)),
        }
    }
}

/// The role's runtime, with logging and span export installed on it (the exporter's gRPC
/// channel lives on the runtime). Drop the telemetry before the runtime: that flushes spans.
fn runtime(
    role: &str,
    telemetry: &TelemetryArgs,
) -> anyhow::Result<(tokio::runtime::Runtime, sibyl_telemetry::Telemetry)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let installed = {
        let _entered = runtime.enter();
        sibyl_telemetry::init(&format!("sibyl-{role}"), telemetry.log_json)
    };
    Ok((runtime, installed))
}

/// Serves `/metrics` on `addr` in the background (roles without an HTTP API).
async fn spawn_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(addr, "metrics endpoint").await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    tokio::spawn(async move {
        // Until the process ends: metrics stay readable while the role drains.
        let forever = std::future::pending();
        if let Err(error) = sibyl_telemetry::serve_metrics(listener, forever).await {
            tracing::error!(%error, "the metrics endpoint failed");
        }
    });
    Ok(())
}

/// The name a model is served under.
fn served_name(model: &ModelArgs, explicit: Option<&String>) -> String {
    if let Some(name) = explicit {
        return name.clone();
    }
    match sibyl_models::resolve(&model.model) {
        Ok(sibyl_models::ModelSource::File(path)) => path
            .file_stem()
            .map_or_else(|| model.model.clone(), |s| s.to_string_lossy().into_owned()),
        _ => model.model.clone(),
    }
}

fn text_loader(
    model: ModelArgs,
) -> impl FnMut() -> anyhow::Result<sibyl_engine::TextModel> + Send + 'static {
    move || Ok(sibyl_engine::load_text(&model.locate()?)?)
}

/// [`text_loader`] for a gateway: chat content is tokenized as plain text, by a tokenizer
/// made on first use, and long prompts are bounded by an automaton also made on first use;
/// both made here, so that no request waits for them. `chat_template` (`--chat-template`)
/// replaces the file's.
fn gateway_text_loader(
    model: ModelArgs,
    chat_template: Option<String>,
) -> impl FnMut() -> anyhow::Result<sibyl_engine::TextModel> + Send + 'static {
    let mut load = text_loader(model);
    move || {
        let mut text = load()?;
        if let Some(source) = &chat_template {
            let (bos, eos) = (text.tokenizer.bos_text(), text.tokenizer.eos_text());
            let template =
                sibyl_engine::ChatTemplate::new(source, bos, eos).context("--chat-template")?;
            text.chat_template = Some(template);
            tracing::info!("chats render with the template of --chat-template");
        }
        text.tokenizer.encode_text("")?;
        text.tokenizer.prepare_prompt_bound();
        Ok(text)
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}
