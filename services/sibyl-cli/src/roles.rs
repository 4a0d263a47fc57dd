//! `sibyl serve`, `sibyl gateway`, `sibyl verifier`, `sibyl drafter`: the roles as servers.
//! `serve` starts all of them in one process, wired over loopback gRPC exactly as separate
//! processes are.

use crate::args::{
    at_least_one, value_name, DeviceArgs, LmArgs, ModelArgs, NgramArgs, RetrievalArgs, TreeArgs,
    NEEDS_DATASTORE,
};
use crate::generate::{init_threads, load_model, tokenizer_id};
use crate::security::{ClientTlsArgs, ServerTlsArgs, TokenArgs};
use crate::shutdown::{shutdown_signal, DrainArgs, DRAIN_GRACE};
use crate::suffix::{SuffixState, SuffixStateArgs};
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sibyl_drafter::{DraftService, MakeDrafter, Peers, ShareInbox};
use sibyl_gateway::GatewayConfig;
use sibyl_lm::LmDrafter;
use sibyl_ngram::NgramDrafter;
use sibyl_proto::auth::{ApiKeys, InternalToken};
use sibyl_proto::client::ServiceAddress;
use sibyl_proto::server::{Listener, OnLoadError, ShutdownSwitch};
use sibyl_retrieval::{Datastore, RetrievalConfig, RetrievalDrafter, SuffixIndex};
use sibyl_spec::{Drafter, Proposal, TreeLimits};
use sibyl_verifier::{DrafterEndpoint, SpeculationConfig, VerifierConfig, VerifierService};
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

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
    #[arg(long, env = "SIBYL_PREFILL_STALL", default_value_t = 2.0)]
    pub prefill_stall: f64,

    /// Bytes of keys and values kept from ended sessions (prompt and output), so that a
    /// later prompt starting the same way (the next turn of a chat, a shared system prompt)
    /// computes only the rest; least recently used first out. Besides --kv-cache-bytes.
    /// 0 keeps nothing (running sessions still share their work).
    #[arg(long, env = "SIBYL_PREFIX_CACHE_BYTES", default_value_t = 1 << 30)]
    pub prefix_cache_bytes: usize,
}

impl VerifierArgs {
    fn config(
        &self,
        model_name: String,
        drafters: Vec<DrafterEndpoint>,
    ) -> anyhow::Result<VerifierConfig> {
        if !(self.prefill_stall.is_finite() && self.prefill_stall >= 1.0) {
            bail!("--prefill-stall must be a number of at least 1");
        }
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
                adaptive_tree: self.tree.draft_sizing == crate::args::DraftSizing::Adaptive,
                step_wait: Duration::from_millis(self.draft_wait_ms),
                ..SpeculationConfig::default()
            },
            ..VerifierConfig::new(model_name, drafters)
        })
    }
}

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
}

impl GatewayLimitArgs {
    /// The gateway's config for serving `model_name` from `verifier`.
    fn config(
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
        })
    }

    /// Serves `/metrics` on its own address, when one was given.
    async fn spawn_metrics(&self) -> anyhow::Result<()> {
        match self.metrics_addr {
            Some(addr) => spawn_metrics(addr).await,
            None => Ok(()),
        }
    }
}

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

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the OpenAI-compatible HTTP API.
    #[arg(long, env = "SIBYL_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Address of the `sibyl.v1.Gateway` gRPC API.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Drafters the server runs, comma-separated (`ngram,suffix`); by default the n-gram
    /// drafter, and the retrieval drafter when there is a --datastore.
    #[arg(long, env = "SIBYL_DRAFT", value_enum, value_delimiter = ',')]
    pub draft: Vec<DrafterKindArg>,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub verifier: VerifierArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    /// With a datastore, a retrieval drafter runs beside the n-gram drafter.
    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub suffix: SuffixStateArgs,

    #[command(flatten)]
    pub limits: GatewayLimitArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
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

    /// The model the verifier serves: its tokenizer and chat template are read from the file.
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

/// Kinds of drafter the drafter role can host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DrafterKindArg {
    /// Prompt lookup and the session's own history.
    Ngram,
    /// Lookup in datastores built by `sibyl index` (`--datastore`).
    Retrieval,
    /// A small model of the verifier's tokenizer (`--draft-model`).
    Lm,
    /// Matches in the generations this drafter has seen finish (prompts and outputs) and
    /// in the session's own context (`--suffix-max-tokens`).
    Suffix,
}

#[derive(Debug, Clone, Args)]
pub struct DrafterArgs {
    /// Which drafter to host.
    #[arg(long, env = "SIBYL_DRAFTER_KIND", value_enum)]
    pub kind: DrafterKindArg,

    /// Address of the `sibyl.v1.Drafter` gRPC service.
    #[arg(long, env = "SIBYL_GRPC_ADDR", default_value = "0.0.0.0:50061")]
    pub grpc_addr: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint (HTTP).
    #[arg(long, env = "SIBYL_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// The verifier's model: sessions whose tokenizer differs from this file's are refused.
    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub suffix: SuffixStateArgs,

    /// With --kind suffix: the replicas of this drafter, as http://HOST:PORT (https://
    /// with --tls-ca): a name that resolves to all of them (a headless Service), or a list
    /// (repeat the flag, or separate with commas); this drafter among them is skipped.
    /// Every generation that finishes here is sent to each, and theirs come here, so every
    /// replica drafts from what all of them have seen.
    #[arg(long, env = "SIBYL_SUFFIX_PEERS", value_delimiter = ',')]
    pub suffix_peers: Vec<ServiceAddress>,

    #[command(flatten)]
    pub tls_ca: ClientTlsArgs,

    #[command(flatten)]
    pub lm: LmArgs,

    #[command(flatten)]
    pub load: LoadArgs,

    #[command(flatten)]
    pub drain: DrainArgs,

    #[command(flatten)]
    pub internal: TokenArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
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
/// both made here, so that no request waits for them.
fn gateway_text_loader(
    model: ModelArgs,
) -> impl FnMut() -> anyhow::Result<sibyl_engine::TextModel> + Send + 'static {
    let mut load = text_loader(model);
    move || {
        let text = load()?;
        text.tokenizer.encode_text("")?;
        text.tokenizer.prepare_prompt_bound();
        Ok(text)
    }
}

fn ngram_drafter(ngram: &NgramArgs) -> anyhow::Result<MakeDrafter> {
    let config = ngram.config();
    Ok(Arc::new(move || {
        Box::new(NgramDrafter::new(config.clone()))
    }))
}

fn drafter_endpoints(values: &[String]) -> anyhow::Result<Vec<DrafterEndpoint>> {
    values
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<DrafterEndpoint>().map_err(anyhow::Error::from))
        .collect()
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

/// A drafter that proposes nothing: what a session would get before its role has loaded
/// (sessions only start after, so none does).
struct NoDrafts(&'static str);

impl Drafter for NoDrafts {
    fn kind(&self) -> &str {
        self.0
    }

    fn propose(&mut self, _: &[u32], _: usize) -> Vec<Proposal> {
        Vec::new()
    }
}

/// A drafter role's service and loader: the loader reads the tokenizer of `model` and, for
/// the retrieval drafter, opens the datastores and checks them against it; for the LM
/// drafter, loads its model and checks its tokenizer. Doing that with the model, not at
/// start, makes a missing or bad file NOT_SERVING and retried like a missing model file.
fn drafter_role(
    kind: DrafterKindArg,
    ngram: &NgramArgs,
    retrieval: &RetrievalArgs,
    suffix: &SuffixStateArgs,
    lm: &LmArgs,
    model: ModelArgs,
) -> anyhow::Result<(
    DraftService,
    impl FnMut() -> anyhow::Result<u64> + Send + 'static,
    Option<SuffixState>,
)> {
    let suffix = (kind == DrafterKindArg::Suffix)
        .then(|| SuffixState::new(Arc::new(SuffixIndex::new(retrieval.suffix())), suffix));
    let datastores: Arc<OnceLock<Vec<Arc<Datastore>>>> = Arc::default();
    let lm_model: Arc<OnceLock<Arc<sibyl_engine::Model>>> = Arc::default();
    let lm_config = lm.config()?;
    let make = match kind {
        DrafterKindArg::Ngram => ngram_drafter(ngram)?,
        DrafterKindArg::Lm => {
            let loaded = lm_model.clone();
            let make: MakeDrafter = Arc::new(move || match loaded.get() {
                Some(model) => Box::new(LmDrafter::new(model.clone(), lm_config.clone())),
                None => Box::new(NoDrafts("lm")),
            });
            make
        }
        DrafterKindArg::Retrieval => {
            if retrieval.datastores.is_empty() {
                bail!(NEEDS_DATASTORE);
            }
            let stores = datastores.clone();
            let make: MakeDrafter = Arc::new(move || {
                // Sessions start once loading has succeeded, so the stores are there.
                let stores = stores.get().cloned().unwrap_or_default();
                Box::new(RetrievalDrafter::new(stores, RetrievalConfig::default()))
            });
            make
        }
        DrafterKindArg::Suffix => {
            // Every session of this role adds to one index when it ends.
            let state = suffix.clone().expect("made for the suffix kind");
            let make: MakeDrafter = Arc::new(move || state.drafter());
            make
        }
    };
    let mut load = text_loader(model);
    let (retrieval, lm) = (retrieval.clone(), lm.clone());
    let state = suffix.clone();
    let loader = move || -> anyhow::Result<u64> {
        let text = load()?;
        let tokenizer = tokenizer_id(&text.tokenizer, text.config.vocab_size);
        if let Some(state) = &state {
            state.loaded(tokenizer);
        }
        if kind == DrafterKindArg::Retrieval && datastores.get().is_none() {
            let _ = datastores.set(retrieval.open(tokenizer)?);
        }
        if kind == DrafterKindArg::Lm && lm_model.get().is_none() {
            let _ = lm_model.set(lm.load(&text.tokenizer)?);
        }
        Ok(tokenizer.fingerprint)
    };
    Ok((DraftService::new(make), loader, suffix))
}

pub fn run_drafter(args: DrafterArgs) -> anyhow::Result<()> {
    if !args.suffix_peers.is_empty() && args.kind != DrafterKindArg::Suffix {
        bail!(
            "--suffix-peers is for --kind suffix: only the suffix drafter keeps an index to share"
        );
    }
    let (service, load, suffix) = drafter_role(
        args.kind,
        &args.ngram,
        &args.retrieval,
        &args.suffix,
        &args.lm,
        args.model,
    )?;
    let token = args.internal.token()?;
    let peer_tls = args.tls_ca.load(args.suffix_peers.iter())?;
    let origin = rand::random::<u64>();
    let mut service = service.requiring(token.clone());
    if let Some(state) = &suffix {
        let (index, held) = (state.index.clone(), state.index.clone());
        service = service.accepting_shared(ShareInbox {
            origin,
            accept: Arc::new(move |document| index.add_shared(document)),
            held: Arc::new(move || held.held()),
        });
    }
    let tls = args.tls.load()?;
    let (runtime, telemetry) = runtime("drafter", &args.telemetry)?;
    let result = runtime.block_on(async move {
        let tcp = bind(args.grpc_addr, "drafter").await?;
        spawn_metrics(args.metrics_addr).await?;
        let addr = tcp.local_addr()?;
        tracing::info!(%addr, kind = ?args.kind, tls = tls.is_some(), "drafter listening");
        if let Some(state) = &suffix {
            state.spawn_upkeep();
            if !args.suffix_peers.is_empty() {
                let names: Vec<String> = args.suffix_peers.iter().map(|p| p.to_string()).collect();
                tracing::info!(peers = %names.join(","), "sharing finished generations with peers");
                let peers = Peers {
                    services: args.suffix_peers.clone(),
                    tls: peer_tls,
                    token,
                    origin,
                };
                state.index.on_add(service.share_with(peers.clone()));
                state.spawn_catch_up(service.clone(), peers);
            }
        }
        let listener = Listener { tcp, tls };
        let stop = args.drain.on_signal();
        let serve = sibyl_drafter::serve(
            listener,
            service,
            load,
            args.load.on_error(),
            stop.stopped(),
        );
        let served = args.drain.bounded(&stop, serve).await;
        if let Some(state) = suffix {
            let _ = tokio::task::spawn_blocking(move || state.save()).await;
        }
        served?;
        Ok(())
    });
    drop(telemetry);
    result
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
            gateway_text_loader(args.model.clone()),
            args.load.on_error(),
            stop.stopped(),
        );
        args.drain.bounded(&stop, serve).await?;
        Ok(())
    });
    drop(telemetry);
    result
}

pub fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    init_threads(args.model.threads);
    let name = served_name(&args.model, args.limits.served_model_name.as_ref());
    // By default the n-gram drafter, and the retrieval drafter when there is a datastore.
    let mut kinds = args.draft.clone();
    if kinds.is_empty() {
        kinds.push(DrafterKindArg::Ngram);
        if !args.retrieval.datastores.is_empty() {
            kinds.push(DrafterKindArg::Retrieval);
        }
    }
    let mut seen = Vec::new();
    kinds.retain(|kind| {
        let new = !seen.contains(kind);
        seen.push(*kind);
        new
    });
    // The roles talk over loopback ports that any local process could reach: they show
    // each other a token made for this run.
    let token = InternalToken::from_text(&format!("{:032x}", rand::random::<u128>()))?;
    let (runtime, telemetry) = runtime("serve", &args.telemetry)?;
    let result = runtime.block_on(async move {
        args.limits.spawn_metrics().await?;
        // The model file first, once, so the three roles do not race to fetch it.
        let model = args.model.clone();
        let path = tokio::task::spawn_blocking(move || model.locate()).await??;
        let mut model = args.model.clone();
        model.model = path.to_string_lossy().into_owned();
        let device = args.device.device;

        let http = bind(args.http_addr, "HTTP API").await?;
        let grpc = bind(args.grpc_addr, "gRPC API").await?;
        let verifier_listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "verifier").await?;
        let verifier_addr = verifier_listener.local_addr()?;
        // Keys and certificates are read before any role starts: a bad file is the first
        // thing said.
        let mut gateway_config = args.limits.config(
            name.clone(),
            vec![format!("http://{verifier_addr}").parse()?],
            args.drain.timeout(),
        )?;
        gateway_config.internal_token = Some(token.clone());

        let stop = ShutdownSwitch::default();
        let mut roles = RoleTasks::default();
        let mut endpoints = Vec::new();
        let mut drafters_text = Vec::new();
        let mut suffixes = Vec::new();
        for kind in kinds {
            let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), "drafter").await?;
            let addr = listener.local_addr()?;
            let (service, load, suffix) = drafter_role(
                kind,
                &args.ngram,
                &args.retrieval,
                &args.suffix,
                &LmArgs::default(),
                model.clone(),
            )?;
            if let Some(state) = suffix {
                state.spawn_upkeep();
                suffixes.push(state);
            }
            roles.spawn(
                "drafter",
                sibyl_drafter::serve(
                    listener,
                    service.requiring(Some(token.clone())),
                    load,
                    OnLoadError::Fail,
                    stop.stopped(),
                ),
            );
            let kind = value_name(kind);
            endpoints.push(format!("{kind}=http://{addr}").parse::<DrafterEndpoint>()?);
            drafters_text.push(format!("{kind} drafter {addr}"));
        }
        let mut config = args.verifier.config(name.clone(), endpoints)?;
        config.internal_token = Some(token.clone());
        let verifier_model = model.clone();
        roles.spawn(
            "verifier",
            sibyl_verifier::serve(
                verifier_listener,
                VerifierService::new(config),
                move || load_model(&verifier_model, device),
                OnLoadError::Fail,
                stop.stopped(),
            ),
        );
        let tls = gateway_config.tls.is_some();
        let access = match &gateway_config.api_keys {
            Some(keys) => format!("API key required ({} in --api-key-file)", keys.len()),
            None => "open, no API key (--api-key-file)".to_string(),
        };
        let http_addr = http.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        roles.spawn(
            "gateway",
            sibyl_gateway::serve(
                grpc,
                http,
                gateway_config,
                gateway_text_loader(model),
                OnLoadError::Fail,
                stop.stopped(),
            ),
        );
        tracing::info!("loading {name}");
        // Until every role serves, or one ends first (a failed load, say).
        let ended = tokio::select! {
            () = until_serving(verifier_addr, grpc_addr, tls) => {
                let drafters = drafters_text.join(", ");
                let (scheme, over) = if tls { ("https", ", TLS") } else { ("http", "") };
                let message = format!(
                    "sibyl serve: {name} ready\n  OpenAI HTTP API  {scheme}://{http_addr}/v1\n  gRPC gateway     {grpc_addr} (sibyl.v1.Gateway{over})\n  verifier         {verifier_addr}, {drafters} (loopback)\n  access           {access}\n"
                );
                // One write, and a closed stdout is no reason to stop serving (`println!`
                // writes piece by piece and panics when the reader has gone).
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(message.as_bytes()).and_then(|()| stdout.flush());
                None
            }
            first = roles.first_ended() => Some(first),
        };
        // Then until a signal, or until a role ends: then stop them all.
        let first = match ended {
            Some(first) => first,
            None => tokio::select! {
                () = shutdown_signal() => Ok(()),
                first = roles.first_ended() => first,
            },
        };
        stop.trigger();
        // The gateway ends the streams still open at the drain timeout; the rest end soon
        // after.
        let deadline = tokio::time::Instant::now() + args.drain.timeout() + DRAIN_GRACE;
        let outcome = roles.finish(first, deadline).await;
        for state in suffixes {
            let _ = tokio::task::spawn_blocking(move || state.save()).await;
        }
        outcome
    });
    drop(telemetry);
    result
}

/// How long `sibyl serve` waits for one of its roles to say SERVING before asking again.
const READY_WAIT: Duration = Duration::from_secs(2);

/// What `sibyl serve` gives its gateway to follow the verifier to SERVING where it cannot
/// ask it (over TLS: it holds no authority for the gateway's certificate). The gateway
/// checks its verifier every 0.5 s while that does not answer.
const TLS_GATEWAY_FOLLOWS: Duration = Duration::from_secs(1);

/// Returns once the verifier at `verifier`, then the gateway at `gateway`, say SERVING.
async fn until_serving(verifier: SocketAddr, gateway: SocketAddr, tls: bool) {
    loop {
        if !sibyl_proto::client::wait_until_serving(verifier, READY_WAIT).await {
            continue;
        }
        if tls {
            tokio::time::sleep(TLS_GATEWAY_FOLLOWS).await;
            return;
        }
        if sibyl_proto::client::wait_until_serving(gateway, READY_WAIT).await {
            return;
        }
    }
}

/// The roles `sibyl serve` runs as tasks, known by name.
#[derive(Default)]
struct RoleTasks {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
}

impl RoleTasks {
    fn spawn<E>(
        &mut self,
        role: &'static str,
        serving: impl Future<Output = Result<(), E>> + Send + 'static,
    ) where
        E: std::error::Error + Send + Sync + 'static,
    {
        let task = self
            .tasks
            .spawn(async move { serving.await.map_err(anyhow::Error::from) });
        self.names.insert(task.id(), role);
    }

    /// How the first role to end ended (an error names the role); never ready while none
    /// runs.
    async fn first_ended(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next_with_id().await {
            Some(joined) => self.outcome(joined),
            None => std::future::pending().await,
        }
    }

    fn outcome(
        &self,
        joined: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let (id, result) = match joined {
            Ok((id, result)) => (id, result),
            Err(error) => (error.id(), Err(anyhow::Error::from(error))),
        };
        let role = self.names.get(&id).copied().unwrap_or("role");
        result.with_context(|| format!("the {role} failed"))
    }

    /// Waits for the roles still running until `deadline` (those left then are aborted):
    /// `first`, how the first one ended, unless it was fine and a later one failed.
    async fn finish(
        mut self,
        first: anyhow::Result<()>,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let mut outcome = first;
        while let Ok(Some(joined)) =
            tokio::time::timeout_at(deadline, self.tasks.join_next_with_id()).await
        {
            let result = self.outcome(joined);
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}
