use crate::config::VerifierConfig;
use crate::link::{self, LinkParams};
use crate::scheduler::{Join, SchedulerHandle};
use crate::session::{Plan, Remote, RemoteClient};
use crate::shared::Shared;
use sibyl_decode::{check_request, GenerationConfig, Session, SharedLearning};
use sibyl_engine::LoadedModel;
use sibyl_grammar::{GrammarCompiler, GrammarConstraint};
use sibyl_ngram::PredictionDrafter;
use sibyl_proto::v1 as pb;
use sibyl_spec::{InboxLimits, MinTokens, TokenConstraint, TokenId};
use sibyl_telemetry::metrics::{self, GaugeGuard};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Events buffered per session; past them the session waits (without holding up the others)
/// for its client to read.
const EVENT_QUEUE: usize = 64;

/// The loaded model and the scheduler that runs every session on it.
pub(crate) struct Engine {
    pub(crate) loaded: Arc<LoadedModel>,
    /// What steps of this model cost, learned from every session (adaptive tree size).
    pub(crate) learning: SharedLearning,
    pub(crate) scheduler: SchedulerHandle,
    /// Grammars over the model's vocabulary, made at the first request with one.
    pub(crate) grammar: OnceLock<Result<GrammarCompiler, String>>,
}

impl Engine {
    /// The grammar engine for this model's vocabulary, built at the first call (some
    /// hundreds of milliseconds: call it off the async workers).
    fn grammar(&self) -> &Result<GrammarCompiler, String> {
        self.grammar.get_or_init(|| {
            let started = Instant::now();
            let tokenizer = &self.loaded.tokenizer;
            let tokens = (0..self.loaded.model.vocab_size() as TokenId)
                .map(|id| (tokenizer.token_bytes(id).to_vec(), tokenizer.is_control(id)));
            let compiler = GrammarCompiler::new(tokens, tokenizer.stop_tokens());
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                ok = compiler.is_ok(),
                "grammar engine built for the vocabulary"
            );
            compiler.map_err(|e| e.to_string())
        })
    }

    /// Compiles `grammar` into a constraint on this model's output (about a millisecond).
    fn output_grammar(&self, grammar: &pb::OutputGrammar) -> Result<GrammarConstraint, Status> {
        use pb::output_grammar::Kind;
        let compiler = match self.grammar() {
            Ok(compiler) => compiler,
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "this model cannot follow a grammar: {e}"
                )))
            }
        };
        let compiled = match &grammar.kind {
            Some(Kind::JsonSchema(schema)) => compiler.json_schema(schema),
            Some(Kind::Regex(regex)) => compiler.regex(regex),
            Some(Kind::Choice(choice)) => compiler.choice(&choice.choices),
            Some(Kind::Lark(lark)) => compiler.lark(lark),
            None => return Err(Status::invalid_argument("the output grammar is empty")),
        };
        compiled.map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

/// What admission reserves for a session: a session slot and room in the KV-cache budget
/// (in tokens), given back when the session leaves the scheduler.
struct Admission {
    slots: Arc<Semaphore>,
    /// KV-cache room in tokens.
    cache_tokens: Arc<Semaphore>,
    total_cache_tokens: usize,
    /// Requests waiting now.
    waiting: AtomicUsize,
}

/// The `sibyl.v1.Verifier` service.
#[derive(Clone)]
pub struct VerifierService {
    inner: Arc<Inner>,
}

struct Inner {
    config: VerifierConfig,
    engine: OnceLock<Arc<Engine>>,
    admission: OnceLock<Admission>,
    endpoints: Arc<sibyl_proto::client::Balancer>,
    active: Arc<AtomicUsize>,
    started: AtomicU64,
}

/// Counts a session as active for as long as it lives.
struct ActiveSession(Arc<AtomicUsize>);

impl ActiveSession {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl VerifierService {
    /// A service that answers UNAVAILABLE until a model is set with [`Self::set_ready`].
    pub fn new(config: VerifierConfig) -> Self {
        let endpoints = sibyl_proto::client::Balancer::new(config.drafter_tls.clone());
        Self {
            inner: Arc::new(Inner {
                config,
                engine: OnceLock::new(),
                admission: OnceLock::new(),
                endpoints: Arc::new(endpoints),
                active: Arc::new(AtomicUsize::new(0)),
                started: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn set_ready(&self, engine: Arc<Engine>) {
        let config = &self.inner.config;
        let per_token = engine.loaded.model.new_cache().bytes_per_token().max(1);
        let total_cache_tokens = match config.kv_cache_bytes {
            Some(bytes) => (bytes / per_token).min(Semaphore::MAX_PERMITS),
            None => Semaphore::MAX_PERMITS,
        };
        let _ = self.inner.admission.set(Admission {
            slots: Arc::new(Semaphore::new(config.max_sessions)),
            cache_tokens: Arc::new(Semaphore::new(total_cache_tokens)),
            total_cache_tokens,
            waiting: AtomicUsize::new(0),
        });
        let _ = self.inner.engine.set(engine);
    }

    /// How its scheduler fills each forward pass.
    pub(crate) fn scheduler_config(&self) -> sibyl_decode::SchedulerConfig {
        self.inner.config.scheduler.clone()
    }

    /// The token its callers must show, and it shows its drafters.
    pub(crate) fn internal_token(&self) -> Option<&sibyl_proto::auth::InternalToken> {
        self.inner.config.internal_token.as_ref()
    }

    /// What `https://` drafters are checked against.
    pub(crate) fn drafter_tls(&self) -> Option<std::sync::Arc<sibyl_proto::tls::ClientTls>> {
        self.inner.config.drafter_tls.clone()
    }

    /// Longest a step waits for drafts.
    pub(crate) fn step_wait(&self) -> Duration {
        self.inner.config.speculation.step_wait
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
        let mut max_tokens = request.max_tokens as usize;
        if let Some(cap) = config.max_model_len {
            let prompt = request.prompt_tokens.len();
            if prompt >= cap {
                return Err(Status::invalid_argument(format!(
                    "the prompt has {prompt} tokens; this verifier serves at most {cap} tokens \
                     of prompt and output together (--max-model-len)"
                )));
            }
            max_tokens = max_tokens.min(cap - prompt);
        }
        let generation = GenerationConfig {
            max_tokens,
            sampling,
            tree: speculation.tree,
            learning: speculation.adaptive_tree.then(|| engine.learning.clone()),
            stop_tokens: match request.ignore_eos {
                true => Vec::new(),
                false => tokenizer.stop_tokens().to_vec(),
            }
            .into_iter()
            .chain(request.stop_token_ids.iter().copied())
            .collect(),
            prefix_cache: request.prefix_cache.unwrap_or(true),
            logprobs: request.logprobs.map(|n| n as usize),
        };
        check_request(&engine.loaded.model, &request.prompt_tokens, &generation)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let prompt_logprobs = match request.prompt_logprobs {
            Some(n) if n as usize > sibyl_spec::MAX_TOP_LOGPROBS => {
                return Err(Status::invalid_argument(format!(
                    "`prompt_logprobs` is at most {}, not {n}",
                    sibyl_spec::MAX_TOP_LOGPROBS
                )))
            }
            n => n.map(|n| n as usize),
        };
        let mut constraints: Vec<Box<dyn TokenConstraint + Sync>> = Vec::new();
        if let Some(grammar) = &request.grammar {
            constraints.push(Box::new(engine.output_grammar(grammar)?));
        }
        if request.min_tokens > 0 {
            let min = MinTokens::new(request.min_tokens as usize, generation.stop_tokens.clone());
            constraints.push(Box::new(min));
        }
        let endpoints = self.select_drafters(request.speculation.as_ref())?;
        let prediction = self.prediction(engine, &request)?;
        let open = pb::DraftOpen {
            context_tokens: Vec::new(),
            tokenizer_fingerprint: ours,
            vocab_size: u32::try_from(engine.loaded.model.vocab_size()).unwrap_or(u32::MAX),
            max_block_tokens: speculation.tree.max_depth as u32,
            max_branches: speculation.max_branches as u32,
            max_tokens_ahead: (2 * speculation.tree.max_depth) as u32,
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
                token: self.inner.config.internal_token.clone(),
            })
            .collect();
        let mut drafter_kinds: Vec<String> =
            links.iter().map(|l| l.endpoint.kind.clone()).collect();
        let prediction = prediction.map(|tokens| {
            drafter_kinds.push("prediction".into());
            PredictionDrafter::new(tokens, request.prompt_tokens.len())
        });
        let plan = Plan {
            prompt: request.prompt_tokens,
            config: generation,
            drafter_kinds,
            inbox,
            step_times: request.step_times,
            constraints,
            prompt_logprobs,
            prediction,
        };
        Ok((plan, links))
    }

    /// The request's predicted output, checked, unless speculation is off or it is empty.
    fn prediction(
        &self,
        engine: &Engine,
        request: &pb::VerifyRequest,
    ) -> Result<Option<Vec<TokenId>>, Status> {
        let off = request
            .speculation
            .as_ref()
            .is_some_and(|s| pb::SpeculationMode::try_from(s.mode) == Ok(pb::SpeculationMode::Off));
        if off || request.prediction.is_empty() {
            return Ok(None);
        }
        let model = &engine.loaded.model;
        let window = model.config().context_length;
        if request.prediction.len() > window {
            return Err(Status::invalid_argument(format!(
                "the prediction has {} tokens, more than the context window of {window}",
                request.prediction.len()
            )));
        }
        let vocab = model.vocab_size();
        if let Some(token) = request.prediction.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!(
                "prediction token {token} is outside the vocabulary of {vocab} tokens"
            )));
        }
        Ok(Some(request.prediction.clone()))
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
        let started = self
            .start(request.into_inner(), request_id, &span)
            .instrument(span.clone())
            .await;
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
        let context_length = engine.loaded.model.config().context_length;
        Ok(Response::new(pb::VerifierStatus {
            model: inner.config.model_name.clone(),
            tokenizer_fingerprint: sibyl_proto::fingerprint(engine.loaded.tokenizer.fingerprint()),
            context_length: u32::try_from(
                inner
                    .config
                    .max_model_len
                    .map_or(context_length, |cap| cap.min(context_length)),
            )
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
    /// Checks a request, waits for its admission and hands its session to the scheduler.
    async fn start(
        &self,
        request: pb::VerifyRequest,
        request_id: String,
        span: &tracing::Span,
    ) -> Result<Response<ReceiverStream<Result<pb::VerifyEvent, Status>>>, Status> {
        let engine = self.engine()?.clone();
        if request.grammar.is_some() && engine.grammar.get().is_none() {
            let building = engine.clone();
            tokio::task::spawn_blocking(move || {
                building.grammar();
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        }
        let (mut plan, links) = self.plan(&engine, request)?;
        let held = self.admit(&engine, &plan).await?;
        let inner = &self.inner;
        inner.started.fetch_add(1, Ordering::Relaxed);
        let mut session = Session::new(
            &engine.loaded.model,
            &plan.prompt,
            plan.config.clone(),
            plan.drafter_kinds.clone(),
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        for constraint in plan.constraints.drain(..) {
            session = session.with_constraint(constraint);
        }
        if let Some(top) = plan.prompt_logprobs {
            session = session
                .with_prompt_logprobs(top)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let shared = Arc::new(Shared::new(plan.prompt.clone(), links.len(), plan.inbox));
        let (accepted_len, watch_len) = watch::channel(plan.prompt.len());
        let gathers =
            plan.config.tree.budget > 0 && (!links.is_empty() || plan.prediction.is_some());
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
        let client = RemoteClient::new(
            Remote {
                shared,
                accepted_len,
                events,
                gathers,
                idle_timeout: inner.config.idle_timeout,
                step_times: plan.step_times,
                links: tasks,
                prediction: plan.prediction.take(),
                span: span.clone(),
                held,
            },
            &plan.drafter_kinds,
        );
        if let Err(join) = engine.scheduler.join(Join { session, client }) {
            join.client.abort_links();
            return Err(Status::unavailable("the verifier is shutting down"));
        }
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    /// Waits, in a bounded queue and at most the queue timeout, for a session slot and for
    /// room in the KV-cache budget for the whole request (prompt, output and one step's
    /// draft nodes). Refused requests get RESOURCE_EXHAUSTED with a `retry-after` hint.
    async fn admit(&self, engine: &Engine, plan: &Plan) -> Result<crate::session::Held, Status> {
        let config = &self.inner.config;
        let admission = self
            .inner
            .admission
            .get()
            .ok_or_else(|| Status::unavailable("the verifier is still loading its model"))?;
        let context_length = engine.loaded.model.config().context_length;
        let needed = (plan.prompt.len() + plan.config.max_tokens + plan.config.tree.budget + 1)
            .min(context_length);
        if needed > admission.total_cache_tokens {
            return Err(Status::resource_exhausted(format!(
                "the request needs KV-cache room for {needed} tokens; this verifier's whole \
                 budget (--kv-cache-bytes) holds {}: lower max_tokens or shorten the prompt",
                admission.total_cache_tokens
            )));
        }
        let m = metrics::verifier();
        let queued = admission.waiting.fetch_add(1, Ordering::SeqCst);
        let _queued = Waiting(&admission.waiting);
        let immediate = admission.slots.available_permits() > 0 && queued == 0;
        if !immediate && queued >= config.max_queue {
            return Err(overloaded(
                format!(
                    "all {} session slots are busy and {} requests are waiting (--max-queue); \
                     retry later or add replicas",
                    config.max_sessions, config.max_queue
                ),
                config.queue_timeout,
            ));
        }
        let _gauge = GaugeGuard::new(&m.queued_requests);
        let waited = Instant::now();
        let acquire = async {
            let slot = admission.slots.clone().acquire_owned().await;
            let room = admission
                .cache_tokens
                .clone()
                .acquire_many_owned(u32::try_from(needed).unwrap_or(u32::MAX))
                .await;
            match (slot, room) {
                (Ok(slot), Ok(room)) => Some((slot, room)),
                _ => None,
            }
        };
        let admitted = tokio::time::timeout(config.queue_timeout, acquire).await;
        m.queue_wait.observe(waited.elapsed().as_secs_f64());
        let Ok(Some((slot, room))) = admitted else {
            return Err(overloaded(
                format!(
                    "no session slot or KV-cache room came free within {} ms \
                     (--queue-timeout-ms); retry later or add replicas",
                    config.queue_timeout.as_millis()
                ),
                config.queue_timeout,
            ));
        };
        let active = ActiveSession::new(self.inner.active.clone());
        let gauge = GaugeGuard::new(&m.active_sessions);
        let held: (
            OwnedSemaphorePermit,
            OwnedSemaphorePermit,
            ActiveSession,
            GaugeGuard,
        ) = (slot, room, active, gauge);
        Ok(Box::new(held))
    }
}

/// Counts a request as waiting for admission while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// RESOURCE_EXHAUSTED with a `retry-after` hint in seconds (the gateway's HTTP 429 carries
/// it as `Retry-After`).
fn overloaded(message: String, queue_timeout: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    let seconds = queue_timeout.as_secs().clamp(1, 60);
    if let Ok(value) = seconds.to_string().parse() {
        status.metadata_mut().insert("retry-after", value);
    }
    status
}
