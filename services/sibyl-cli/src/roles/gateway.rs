//! `sibyl gateway`: the OpenAI-compatible HTTP API and the gRPC API.

use super::{
    bind, gateway_text_loader, runtime, served_name, spawn_metrics, LoadArgs, TelemetryArgs,
};
use crate::security::{ClientTlsArgs, ServerTlsArgs, TokenArgs};
use crate::shutdown::DrainArgs;
use anyhow::{bail, Context};
use clap::Args;
use sibyl_gateway::{GatewayConfig, SamplingDefaults};
use sibyl_proto::auth::ApiKeys;
use sibyl_proto::client::ServiceAddress;
use sibyl_setup::args::ModelArgs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the gateway allows.
#[derive(Debug, Clone, Args)]
pub struct GatewayLimitArgs {
    /// Most tokens one request may generate (`max_tokens` above it is a 400).
    #[arg(long, env = "SIBYL_MAX_TOKENS_LIMIT", default_value_t = 4096)]
    pub max_tokens_limit: usize,

    /// Name the model is served under (default: the --model value, or the file's stem).
    #[arg(long, env = "SIBYL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// File of API keys, one per line: every request but /health (and gRPC health) then
    /// needs `Authorization: Bearer KEY` (401, or UNAUTHENTICATED, otherwise). Without it
    /// the API is open to anyone who can reach it.
    #[arg(long, env = "SIBYL_API_KEYS_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// Serve Prometheus `/metrics` on this address, open, instead of on the HTTP API's port
    /// (where it needs an API key when there are keys).
    #[arg(long, env = "SIBYL_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// Split a reasoning model's thinking from its answer in chat responses
    /// (`reasoning_content`), as vLLM's flag does: `qwen3` (an answer's `<think>` block),
    /// `deepseek_r1` (thinking until `</think>`).
    #[arg(long, env = "SIBYL_REASONING_PARSER", value_parser = ["qwen3", "deepseek_r1"])]
    pub reasoning_parser: Option<String>,

    /// Sampling for HTTP requests that set none, as JSON, as vLLM's flag takes it:
    /// `{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0}`. It goes over what the
    /// model file recommends (its `general.sampling.*`), which goes over each API's default.
    #[arg(long, env = "SIBYL_OVERRIDE_GENERATION_CONFIG", value_parser = generation_config)]
    pub override_generation_config: Option<SamplingDefaults>,

    /// A chat template to render chats with instead of the model file's: a Jinja file, or
    /// the template itself, as vLLM's flag takes it (for a file without a template, or
    /// with one that lacks something, such as tools).
    #[arg(long, env = "SIBYL_CHAT_TEMPLATE", value_name = "FILE|TEMPLATE")]
    pub chat_template: Option<String>,
}

/// `--override-generation-config`: the keys vLLM's flag takes that sibyl applies, checked.
fn generation_config(text: &str) -> Result<SamplingDefaults, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        temperature: Option<f32>,
        top_k: Option<i64>,
        top_p: Option<f32>,
        min_p: Option<f32>,
    }
    let config: Config = serde_json::from_str(text)
        .map_err(|e| format!("{e} (a JSON object of `temperature`, `top_k`, `top_p`, `min_p`)"))?;
    let defaults = SamplingDefaults {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        min_p: config.min_p,
    };
    defaults.check()?;
    match defaults.temperature {
        Some(t) if t > sibyl_gateway::MAX_TEMPERATURE => Err(format!(
            "temperature {t} is over {}, the most a request may set",
            sibyl_gateway::MAX_TEMPERATURE
        )),
        _ => Ok(defaults),
    }
}

impl GatewayLimitArgs {
    /// The gateway's config for serving `model_name` from `verifier`.
    pub(super) fn config(
        &self,
        model_name: String,
        verifiers: Vec<ServiceAddress>,
        drain_timeout: Duration,
    ) -> anyhow::Result<GatewayConfig> {
        let api_keys = match &self.api_key_file {
            Some(path) => Some(Arc::new(ApiKeys::from_file(path)?)),
            None => None,
        };
        let tls = self.tls.load()?;
        Ok(GatewayConfig {
            model_name,
            verifiers,
            max_tokens_limit: self.max_tokens_limit,
            sse_keep_alive: sibyl_gateway::SSE_KEEP_ALIVE,
            api_keys,
            internal_token: None,
            verifier_tls: None,
            drain_timeout,
            tls,
            metrics_on_http: self.metrics_addr.is_none(),
            reasoning_parser: self
                .reasoning_parser
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(anyhow::Error::msg)?,
            sampling_override: self.override_generation_config.unwrap_or_default(),
        })
    }

    /// `--chat-template`'s text, read and compiled once at start, so that a missing file or
    /// a template that does not compile stops the role with a message.
    pub(super) fn chat_template(&self) -> anyhow::Result<Option<String>> {
        /// Longer is not a chat template (a model file given by mistake, say).
        const MAX_BYTES: u64 = 1 << 20;
        let Some(value) = &self.chat_template else {
            return Ok(None);
        };
        let jinja = value.contains("{{") || value.contains("{%");
        let read = std::fs::File::open(value).and_then(|file| {
            let mut text = String::new();
            std::io::Read::read_to_string(
                &mut std::io::Read::take(file, MAX_BYTES + 1),
                &mut text,
            )?;
            Ok(text)
        });
        let source = match read {
            Ok(text) if text.len() as u64 > MAX_BYTES => {
                bail!("--chat-template: {value} is over {MAX_BYTES} bytes: not a chat template")
            }
            Ok(text) => text.strip_prefix('\u{feff}').unwrap_or(&text).to_string(),
            // Not a file: the template itself, as vLLM's flag takes it.
            Err(_) if jinja => value.clone(),
            Err(error) => bail!(
                "--chat-template: reading {value}: {error} (give a Jinja file or the template \
                 itself; built-in template names are not taken)"
            ),
        };
        sibyl_engine::ChatTemplate::new(&source, "", "").context("--chat-template")?;
        Ok(Some(source))
    }

    /// Serves `/metrics` on its own address, when one was given.
    pub(super) async fn spawn_metrics(&self) -> anyhow::Result<()> {
        match self.metrics_addr {
            Some(addr) => spawn_metrics(addr).await,
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, env = "SIBYL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Address of the `sibyl.v1.Gateway` gRPC API.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// The verifier, as http://HOST:PORT, or https://HOST:PORT over TLS (with --tls-ca);
    /// requests are spread over every address of a name that has several (a headless
    /// Service), and over several verifiers (repeat the flag, or separate with commas).
    #[arg(
        long = "verifier",
        env = "SIBYL_VERIFIER",
        value_delimiter = ',',
        required = true
    )]
    pub verifiers: Vec<String>,

    #[command(flatten)]
    pub tls_ca: ClientTlsArgs,

    /// The model the verifier serves: its tokenizer and chat template (unless
    /// --chat-template) are read from the file.
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub limits: GatewayLimitArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub internal: TokenArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let verifiers = args
        .verifiers
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<ServiceAddress>())
        .collect::<Result<Vec<_>, _>>()?;
    if verifiers.is_empty() {
        bail!("--verifier: no address given");
    }
    let verifier_tls = args.tls_ca.load(&verifiers)?;
    let mut config = args.limits.config(
        served_name(&args.model, args.limits.served_model_name.as_ref()),
        verifiers,
        args.drain.timeout(),
    )?;
    config.internal_token = args.internal.token()?;
    config.verifier_tls = verifier_tls;
    let chat_template = args.limits.chat_template()?;
    let (runtime, telemetry) = runtime("gateway", &args.telemetry)?;
    let result = runtime.block_on(async move {
        args.limits.spawn_metrics().await?;
        let grpc = bind(args.grpc_addr, "gRPC API").await?;
        let http = bind(args.http_addr, "HTTP API").await?;
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "gateway listening");
        let stop = args.drain.on_signal();
        let serve = sibyl_gateway::serve(
            grpc,
            http,
            config,
            gateway_text_loader(args.model.clone(), chat_template),
            args.load.on_error(),
            stop.stopped(),
        );
        args.drain.bounded(&stop, serve).await?;
        Ok(())
    });
    drop(telemetry);
    result
}
