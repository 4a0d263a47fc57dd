use crate::config::VerifierConfig;
use crate::link::{self, LinkParams};
use crate::session::{self, Engine, Plan};
use crate::shared::Shared;
use sibyl_decode::{check_request, GenerationConfig};
use sibyl_proto::v1 as pb;
use sibyl_spec::InboxLimits;
use sibyl_telemetry::metrics::{self, GaugeGuard};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Events buffered per session before the step loop waits for the client.
const EVENT_QUEUE: usize = 64;

/// The `sibyl.v1.Verifier` service.
#[derive(Clone)]
pub struct VerifierService {
    inner: Arc<Inner>,
}

struct Inner {
    config: VerifierConfig,
    engine: OnceLock<Arc<Engine>>,
    endpoints: Arc<sibyl_proto::client::Balancer>,
    active: Arc<AtomicUsize>,
    started: AtomicU64,
}

/// Counts a session as active for as long as it lives.
struct ActiveSession(Arc<AtomicUsize>);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl VerifierService {
    /// A service that answers UNAVAILABLE until a model is set with [`Self::set_ready`].
    pub fn new(config: VerifierConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                engine: OnceLock::new(),
                endpoints: Arc::default(),
                active: Arc::new(AtomicUsize::new(0)),
                started: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn set_ready(&self, engine: Arc<Engine>) {
        let _ = self.inner.engine.set(engine);
    }

    /// The drafters it is configured with.
    pub fn drafters(&self) -> &[crate::DrafterEndpoint] {
        &self.inner.config.drafters
    }

    /// Sessions running now.
    pub fn active_sessions(&self) -> usize {
        self.inner.active.load(Ordering::SeqCst)
    }

    fn engine(&self) -> Result<&Arc<Engine>, Status> {
        self.inner
            .engine
            .get()
            .ok_or_else(|| Status::unavailable("the verifier is still loading its model"))
    }

    /// Checks a request and turns it into a plan and the drafters it uses.
    fn plan(
        &self,
        engine: &Engine,
        request: pb::VerifyRequest,
    ) -> Result<(Plan, Vec<LinkParams>), Status> {
        let config = &self.inner.config;
        let tokenizer = &engine.loaded.tokenizer;
        let ours = sibyl_proto::fingerprint(tokenizer.fingerprint());
        if !request.tokenizer_fingerprint.is_empty() && request.tokenizer_fingerprint != ours {
            return Err(Status::failed_precondition(format!(
                "the prompt was tokenized with tokenizer {}, but this verifier serves {} with \
                 tokenizer {ours}; point the gateway at a verifier of the same model",
                request.tokenizer_fingerprint, config.model_name
            )));
        }
        let sampling = sibyl_proto::sampling_config(request.sampling.as_ref(), rand::random)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let speculation = &config.speculation;
        let generation = GenerationConfig {
            max_tokens: request.max_tokens as usize,
            sampling,
            draft_budget: speculation.draft_budget,
            max_draft_depth: speculation.max_draft_depth,
            min_draft_value: speculation.min_draft_value,
            exempt_draft_nodes: speculation.exempt_draft_nodes,
            learning: speculation.adaptive_tree.then(|| engine.learning.clone()),
            stop_tokens: tokenizer.stop_tokens().to_vec(),
        };
        check_request(&engine.loaded.model, &request.prompt_tokens, &generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let endpoints = self.select_drafters(request.speculation.as_ref())?;
        let open = pb::DraftOpen {
            context_tokens: Vec::new(),
            tokenizer_fingerprint: ours,
            vocab_size: u32::try_from(engine.loaded.model.vocab_size()).unwrap_or(u32::MAX),
            max_block_tokens: speculation.max_draft_depth as u32,
            max_branches: speculation.max_branches as u32,
            max_tokens_ahead: (2 * speculation.max_draft_depth) as u32,
        };
        // What the drafters were told is what their blocks are held to.
        let inbox = InboxLimits {
            vocab_size: engine.loaded.model.vocab_size(),
            max_branch_tokens: (open.max_block_tokens + open.max_tokens_ahead) as usize,
            max_branches: open.max_branches as usize,
            capacity: speculation.inbox_capacity,
        };
        let links: Vec<LinkParams> = endpoints
            .into_iter()
            .enumerate()
            .map(|(index, endpoint)| LinkParams {
                index,
                endpoint,
                open: open.clone(),
            })
            .collect();
        let plan = Plan {
            prompt: request.prompt_tokens,
            config: generation,
            drafter_kinds: links.iter().map(|l| l.endpoint.kind.clone()).collect(),
            step_wait: speculation.step_wait,
            inbox,
            step_times: request.step_times,
        };
        Ok((plan, links))
    }

    fn select_drafters(
        &self,
        speculation: Option<&pb::Speculation>,
    ) -> Result<Vec<crate::DrafterEndpoint>, Status> {
        let configured = &self.inner.config.drafters;
        let Some(speculation) = speculation else {
            return Ok(configured.clone());
        };
        let mode = pb::SpeculationMode::try_from(speculation.mode).map_err(|_| {
            Status::invalid_argument(format!("unknown speculation mode {}", speculation.mode))
        })?;
        if mode == pb::SpeculationMode::Off {
            return Ok(Vec::new());
        }
        if speculation.drafters.is_empty() {
            return Ok(configured.clone());
        }
        for kind in &speculation.drafters {
            if !configured.iter().any(|d| &d.kind == kind) {
                let known: Vec<&str> = configured.iter().map(|d| d.kind.as_str()).collect();
                return Err(Status::invalid_argument(format!(
                    "no drafter of kind `{kind}` here; this verifier has [{}]",
                    known.join(", ")
                )));
            }
        }
        Ok(configured
            .iter()
            .filter(|d| speculation.drafters.contains(&d.kind))
            .cloned()
            .collect())
    }
}

#[tonic::async_trait]
impl pb::verifier_server::Verifier for VerifierService {
    type GenerateStream = ReceiverStream<Result<pb::VerifyEvent, Status>>;

    async fn generate(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let request_id = sibyl_telemetry::trace::request_id(request.metadata());
        let span = tracing::info_span!("verify_session", request_id = %request_id);
        sibyl_telemetry::trace::set_remote_parent(&span, request.metadata());
        let started = self.start(request.into_inner(), request_id, &span);
        if started.is_err() {
            metrics::verifier()
                .sessions
                .with_label_values(&["refused"])
                .inc();
        }
        started
    }

    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::VerifierStatus>, Status> {
        let engine = self.engine()?;
        let inner = &self.inner;
        Ok(Response::new(pb::VerifierStatus {
            model: inner.config.model_name.clone(),
            tokenizer_fingerprint: sibyl_proto::fingerprint(engine.loaded.tokenizer.fingerprint()),
            context_length: u32::try_from(engine.loaded.model.config().context_length)
                .unwrap_or(u32::MAX),
            vocab_size: u32::try_from(engine.loaded.model.vocab_size()).unwrap_or(u32::MAX),
            active_sessions: u32::try_from(self.active_sessions()).unwrap_or(u32::MAX),
            sessions_started: inner.started.load(Ordering::Relaxed),
            drafters: inner
                .config
                .drafters
                .iter()
                .map(|d| d.kind.clone())
                .collect(),
        }))
    }
}

impl VerifierService {
    /// Checks a request and starts its session in `span`.
    fn start(
        &self,
        request: pb::VerifyRequest,
        request_id: String,
        span: &tracing::Span,
    ) -> Result<Response<ReceiverStream<Result<pb::VerifyEvent, Status>>>, Status> {
        let engine = self.engine()?.clone();
        let (plan, links) = self.plan(&engine, request)?;
        let inner = &self.inner;
        let previous = inner.active.fetch_add(1, Ordering::SeqCst);
        let active = ActiveSession(inner.active.clone());
        if previous >= inner.config.max_sessions {
            return Err(Status::resource_exhausted(format!(
                "all {} session slots of this verifier are busy; retry later or add replicas",
                inner.config.max_sessions
            )));
        }
        let active_metric = GaugeGuard::new(&metrics::verifier().active_sessions);
        inner.started.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Shared::new(plan.prompt.clone(), links.len(), plan.inbox));
        let (accepted_len, watch_len) = watch::channel(plan.prompt.len());
        let tasks: Vec<_> = links
            .into_iter()
            .map(|params| {
                tokio::spawn(
                    link::run(
                        params,
                        request_id.clone(),
                        inner.endpoints.clone(),
                        shared.clone(),
                        watch_len.clone(),
                    )
                    .instrument(span.clone()),
                )
            })
            .collect();
        let (events, receiver) = mpsc::channel(EVENT_QUEUE);
        let span = span.clone();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            session::run(&engine, plan, &shared, accepted_len, &events);
            for task in tasks {
                task.abort();
            }
            drop(active);
            drop(active_metric);
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}
