//! `sibyl verifier`: the target model, speculating with remote drafters.

use super::{bind, runtime, served_name, spawn_metrics, LoadArgs, TelemetryArgs};
use crate::security::{ClientTlsArgs, ServerTlsArgs, TokenArgs};
use crate::shutdown::DrainArgs;
use anyhow::bail;
use clap::Args;
use sibyl_proto::server::Listener;
use sibyl_setup::args::{at_least_one, factor, DeviceArgs, ModelArgs, TreeArgs};
use sibyl_setup::{init_threads, load_model};
use sibyl_spec::TreeLimits;
use sibyl_verifier::{DrafterEndpoint, SpeculationConfig, VerifierConfig, VerifierService};
use std::net::SocketAddr;
use std::time::Duration;

/// How the verifier runs sessions.
#[derive(Debug, Clone, Args)]
pub struct VerifierArgs {
    #[command(flatten)]
    pub tree: TreeArgs,

    /// Longest a verify step waits for drafts that have not arrived, in milliseconds.
    #[arg(long, env = "SIBYL_DRAFT_WAIT_MS", default_value_t = 5)]
    pub draft_wait_ms: u64,

    /// Most generations at once, run together one forward pass per step; more wait in
    /// the queue.
    #[arg(long, env = "SIBYL_MAX_SESSIONS", default_value_t = 16, value_parser = at_least_one)]
    pub max_sessions: usize,

    /// Most requests waiting for a session slot or KV-cache room; more are refused at once
    /// with RESOURCE_EXHAUSTED (HTTP 429 with Retry-After). 0: no queue.
    #[arg(long, env = "SIBYL_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Longest a request waits in the queue, in milliseconds, before it is refused with
    /// RESOURCE_EXHAUSTED (HTTP 429 with Retry-After).
    #[arg(long, env = "SIBYL_QUEUE_TIMEOUT_MS", default_value_t = 30_000)]
    pub queue_timeout_ms: u64,

    /// KV-cache bytes all sessions together may reserve; each reserves room for its prompt,
    /// its max_tokens and one step's draft nodes when it is admitted (default: no budget
    /// beyond --max-sessions).
    #[arg(long, env = "SIBYL_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,

    /// Most tokens of prompt and output of one request, below the model's context window:
    /// a longer prompt is refused before any work, an output stops there (default: the
    /// model's window).
    #[arg(long, env = "SIBYL_MAX_MODEL_LEN", value_parser = at_least_one)]
    pub max_model_len: Option<usize>,

    /// A client that does not read its stream for this many milliseconds loses its session
    /// (its slot and KV cache are freed).
    #[arg(long, env = "SIBYL_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,

    /// Most prompt tokens in one forward pass (a long prompt is processed in chunks).
    #[arg(long, env = "SIBYL_PREFILL_CHUNK", default_value_t = 256, value_parser = at_least_one)]
    pub prefill_chunk: usize,

    /// While other sessions are decoding, prompt tokens join a step only as far as the step
    /// is expected to take at most this many times as long as without them (by measured
    /// step costs), so a long prompt never stalls the streams.
    #[arg(long, env = "SIBYL_PREFILL_STALL", default_value_t = 2.0, value_parser = factor)]
    pub prefill_stall: f64,

    /// Bytes of keys and values kept from ended sessions (prompt and output), so that a
    /// later prompt starting the same way (the next turn of a chat, a shared system prompt)
    /// computes only the rest; least recently used first out. Besides --kv-cache-bytes.
    /// 0 keeps nothing (running sessions still share their work).
    #[arg(long, env = "SIBYL_PREFIX_CACHE_BYTES", default_value_t = 1 << 30)]
    pub prefix_cache_bytes: usize,
}

impl VerifierArgs {
    pub(super) fn config(
        &self,
        model_name: String,
        drafters: Vec<DrafterEndpoint>,
    ) -> anyhow::Result<VerifierConfig> {
        if self.tree.draft_depth > 256 {
            bail!("--draft-depth must be at most 256");
        }
        Ok(VerifierConfig {
            max_sessions: self.max_sessions,
            max_queue: self.max_queue,
            queue_timeout: Duration::from_millis(self.queue_timeout_ms),
            kv_cache_bytes: self.kv_cache_bytes,
            max_model_len: self.max_model_len,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            scheduler: sibyl_decode::SchedulerConfig {
                prompt_tokens_per_step: self.prefill_chunk,
                prefill_stall: self.prefill_stall,
                draft_wait: Duration::from_millis(self.draft_wait_ms),
                prefix_cache_bytes: self.prefix_cache_bytes,
                ..sibyl_decode::SchedulerConfig::default()
            },
            speculation: SpeculationConfig {
                tree: TreeLimits {
                    max_depth: self.tree.draft_depth.max(1),
                    ..self.tree.limits()
                },
                adaptive_tree: self.tree.draft_sizing == sibyl_setup::args::DraftSizing::Adaptive,
                step_wait: Duration::from_millis(self.draft_wait_ms),
                ..SpeculationConfig::default()
            },
            ..VerifierConfig::new(model_name, drafters)
        })
    }
}

#[derive(Debug, Clone, Args)]
pub struct VerifierRoleArgs {
    /// Address of the `sibyl.v1.Verifier` gRPC service.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "0.0.0.0:50052")]
    pub grpc_addr: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint (HTTP).
    #[arg(long, env = "SIBYL_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// A drafter to speculate with, as KIND=http://HOST:PORT (https:// over TLS, with
    /// --tls-ca); repeat for several. A name that resolves to several addresses (a headless
    /// Service) spreads sessions over them.
    #[arg(long = "drafter", env = "SIBYL_DRAFTERS", value_delimiter = ',')]
    pub drafters: Vec<String>,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    #[command(flatten)]
    pub tls_ca: ClientTlsArgs,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verifier: VerifierArgs,

    /// Name the model is served under (default: the --model value, or the file's stem).
    #[arg(long, env = "SIBYL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub internal: TokenArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

fn drafter_endpoints(values: &[String]) -> anyhow::Result<Vec<DrafterEndpoint>> {
    values
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<DrafterEndpoint>().map_err(anyhow::Error::from))
        .collect()
}

pub fn run_verifier(args: VerifierRoleArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads);
    let name = served_name(&args.model, args.served_model_name.as_ref());
    let drafters = drafter_endpoints(&args.drafters)?;
    let drafter_tls = args.tls_ca.load(drafters.iter().map(|d| &d.address))?;
    let mut config = args.verifier.config(name, drafters)?;
    config.internal_token = args.internal.token()?;
    config.drafter_tls = drafter_tls;
    let tls = args.tls.load()?;
    let (runtime, telemetry) = runtime("verifier", &args.telemetry)?;
    let result = runtime.block_on(async move {
        let tcp = bind(args.grpc_addr, "verifier").await?;
        spawn_metrics(args.metrics_addr).await?;
        let addr = tcp.local_addr()?;
        tracing::info!(%addr, tls = tls.is_some(), "verifier listening");
        let listener = Listener { tcp, tls };
        let model = args.model.clone();
        let device = args.device.device;
        let stop = args.drain.on_signal();
        let serve = sibyl_verifier::serve(
            listener,
            VerifierService::new(config),
            move || load_model(&model, device),
            args.load.on_error(),
            stop.stopped(),
        );
        args.drain.bounded(&stop, serve).await?;
        Ok(())
    });
    drop(telemetry);
    result
}
