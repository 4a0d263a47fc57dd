//! The gateway's one code path for both APIs: render and tokenize the prompt, check it, run
//! it on a verifier, and stream detokenized text back with stop strings applied.

use crate::params::{
    check_logprobs, DrafterStats, FinishReason, Grammar, Logprobs, Sampling, Speculation,
    TokenLogprob, MAX_LOGPROBS,
};
use crate::stop::StopStrings;
use crate::GatewayConfig;
use sibyl_engine::{
    ChatMessage, ChatOptions, Detokenizer, InfillBudget, InfillFile, RepoInfill, TextModel,
};
use sibyl_proto::auth::KeyId;
use sibyl_proto::client::{fnv1a, Balancer, Open};
use sibyl_proto::server::ShutdownSwitch;
use sibyl_proto::v1::{self as pb, verifier_client::VerifierClient, verify_event::Event};
use sibyl_telemetry::metrics::{self, GaugeGuard};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::{Code, Status};
use tracing::Instrument;

/// Prompt tokens whose hash picks the verifier of a request (see [`Gateway::generate`]): a
/// chat template's first tokens and the start of the first message.
pub const ROUTING_BLOCK: usize = 64;

/// Longest a request waits for a verifier to accept its session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most verifiers a request is offered to when they answer UNAVAILABLE before starting it.
const OPEN_ATTEMPTS: usize = 3;
/// Most stop strings per request (OpenAI's limit).
const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes (the matcher's work grows with it).
const MAX_STOP_BYTES: usize = 256;

/// The tokens of prefix, middle and suffix a repository-level fill-in-the-middle prompt keeps
/// at most (llama.cpp's default batch, which its `/infill` cuts them to).
pub const INFILL_BATCH: usize = 2048;

/// What to generate from.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    /// Token ids of the served vocabulary, as they are.
    Tokens(Vec<u32>),
    /// Fill in the middle: the text before the gap and the text after it, put between a
    /// code model's fill-in-the-middle tokens.
    Infill {
        prefix: String,
        suffix: String,
    },
    /// Messages, and how the chat template renders them (with the definitions of the
    /// tools the model may call: OpenAI's `tools` entries).
    Chat {
        messages: Vec<ChatMessage>,
        options: ChatOptions,
    },
}

/// One request, in the terms both APIs share.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Requested model name; `None` for the served one.
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// Most tokens to generate; `None` for as many as the context and the limit allow.
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    pub speculation: Speculation,
    pub stop: Vec<String>,
    /// Report token ids and step durations in the summary.
    pub details: bool,
    /// Whether the verifier may reuse prompt work it holds; `None`: yes.
    pub prefix_cache: Option<bool>,
    /// Report each token's log-probability and those of this many most likely tokens at
    /// its position (at most [`crate::params::MAX_LOGPROBS`]); `None`: none.
    pub logprobs: Option<u32>,
    /// Report each prompt token's log-probability (but the first's) and those of this many
    /// most likely tokens at its position ([`Summary::prompt_logprobs`]); `None`: none.
    pub prompt_logprobs: Option<u32>,
    /// A grammar the output must follow.
    pub grammar: Option<Grammar>,
    /// What the output is expected to be (OpenAI's predicted outputs): the verifier drafts
    /// from it; the output stays the model's.
    pub prediction: Option<String>,
    /// How the generation may end (vLLM's `min_tokens`, `ignore_eos`, `stop_token_ids`,
    /// `include_stop_str_in_output`).
    pub ending: Ending,
    /// The API it came through (a metrics label).
    pub api: Api,
    /// Names the request in logs, traces and on the verifier; empty: the gateway makes one.
    pub request_id: String,
    /// The API key it came with (its id, never the key), for logs.
    pub key_id: Option<KeyId>,
}

/// How a generation may end, beyond `max_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ending {
    /// No stop token before this many tokens, and stop strings are looked for only in the
    /// text of the tokens after them (as vLLM does).
    pub min_tokens: u32,
    /// The model's own stop tokens do not end it.
    pub ignore_eos: bool,
    /// More tokens that end it.
    pub stop_token_ids: Vec<u32>,
    /// The text ends after the stop string that ended it rather than before.
    pub include_stop_string: bool,
    /// `max_tokens` past the context window's room ends the generation where the window
    /// does (Anthropic's API) instead of being refused.
    pub at_window: bool,
}

/// Most `stop_token_ids` a request may list.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

impl Ending {
    /// Checks the list's length; the verifier checks the ids against its vocabulary.
    pub fn checked(self) -> Result<Self, GatewayError> {
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(GatewayError::invalid_param(
                "stop_token_ids",
                format!("at most {MAX_STOP_TOKEN_IDS} `stop_token_ids`"),
            ));
        }
        Ok(self)
    }
}

/// The API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Http,
    Grpc,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Api::Http => "http",
            Api::Grpc => "grpc",
        }
    }
}

/// One request in the gateway's metrics, from arrival to its end: counted by outcome when
/// dropped (`cancelled` if no outcome was set: the client went away).
struct RequestRecord {
    api: Api,
    started: Instant,
    first_text: bool,
    /// Tokens generated so far.
    tokens: u64,
    outcome: Option<&'static str>,
    _active: GaugeGuard,
}

impl RequestRecord {
    fn start(api: Api) -> Self {
        Self {
            api,
            started: Instant::now(),
            first_text: false,
            tokens: 0,
            outcome: None,
            _active: GaugeGuard::new(&metrics::gateway().active_requests),
        }
    }

    fn text(&mut self) {
        if !self.first_text {
            self.first_text = true;
            metrics::gateway()
                .time_to_first_token
                .observe(self.started.elapsed().as_secs_f64());
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        self.outcome = Some(outcome);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let m = metrics::gateway();
        let outcome = self.outcome.unwrap_or("cancelled");
        m.requests
            .with_label_values(&[self.api.label(), outcome])
            .inc();
        if outcome == "ok" {
            m.request_duration
                .observe(self.started.elapsed().as_secs_f64());
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    /// An invalid or unsupported request field, named by `param` (as the API spells it).
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("the model `{requested}` does not exist; this server serves `{served}`")]
    ModelNotFound { requested: String, served: String },
    #[error("no verifier is reachable: {0}")]
    Unavailable(String),
    #[error("verifier: {}", .0.message())]
    Verifier(Status),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the gateway is shutting down and its drain time is over: send the request again")]
    ShuttingDown,
}

impl GatewayError {
    /// An invalid or unsupported request field, named as the API spells it.
    pub fn invalid_param(param: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParam {
            param,
            message: message.into(),
        }
    }

    /// The `outcome` label of a request that failed with this error.
    fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_)
            | Self::InvalidParam { .. }
            | Self::PayloadTooLarge(_)
            | Self::ModelNotFound { .. } => "invalid",
            Self::Unavailable(_) | Self::ShuttingDown => "unavailable",
            Self::Verifier(status) => match status.code() {
                Code::ResourceExhausted => "overloaded",
                Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => "invalid",
                Code::Cancelled => "cancelled",
                _ => "error",
            },
            Self::Internal(_) => "error",
        }
    }

    fn from_verifier(status: Status) -> Self {
        match status.code() {
            Code::Unavailable | Code::DeadlineExceeded => {
                Self::Unavailable(status.message().to_string())
            }
            _ => Self::Verifier(status),
        }
    }
}

/// Usage and speculation figures of a finished generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    /// The stop string that ended the generation, if one did.
    pub stop_string: Option<String>,
    pub prompt_tokens: u32,
    /// Prompt tokens the verifier took from its prefix cache (0 when the gateway ended the
    /// generation itself, at a stop string, and the verifier's summary never came).
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub accepted_prediction_tokens: u32,
    pub rejected_prediction_tokens: u32,
    pub steps: u32,
    pub drafters: Vec<DrafterStats>,
    pub seed: u64,
    /// The verifier's timings (zero when the gateway stopped the generation itself).
    pub prompt_time: Duration,
    pub decode_time: Duration,
    pub draft_wait_p50: Duration,
    pub draft_wait_p99: Duration,
    /// With `details`: the generated token ids, and each verify step's duration (µs).
    pub token_ids: Vec<u32>,
    pub step_micros: Vec<u32>,
    /// With [`Generation::prompt_logprobs`]: the prompt's tokens and their
    /// log-probabilities.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// A prompt's tokens with their log-probabilities: the first token has none (nothing comes
/// before it), each other one its own.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    pub first: TokenLogprob,
    pub rest: Vec<Logprobs>,
}

/// What a running generation sends: text pieces, then one summary (or an error).
#[derive(Debug, Clone)]
pub enum Output {
    /// New text, the generated tokens received since the text before, and with
    /// [`Generation::logprobs`] the log-probabilities of the tokens whose text begins in
    /// this text or before it and were not reported yet.
    Text {
        text: String,
        tokens: u32,
        logprobs: Vec<Logprobs>,
    },
    Done(Box<Summary>),
}

pub type OutputStream = mpsc::Receiver<Result<Output, GatewayError>>;

/// The gateway: tokenizer, chat template and limits of the served model, and the way to its
/// verifiers.
pub struct Gateway {
    config: GatewayConfig,
    text: Arc<TextModel>,
    verifiers: Balancer,
    /// One permit per core: prompts tokenized at once (the rest wait their turn, so that
    /// big prompts cannot take every core from the gateway's other work).
    tokenizing: Arc<tokio::sync::Semaphore>,
    /// Triggered when the drain time after shutdown is over: open streams end.
    drained: ShutdownSwitch,
    /// The context window the verifier last said it serves (0: not heard yet).
    verifier_context: AtomicUsize,
}

/// How far Unicode normalization can shrink text (three conjoining jamo, 9 bytes, compose
/// into one Hangul syllable of 3): with the longest token's bytes, it bounds the bytes of
/// text any one token stands for.
const NORMALIZATION_SHRINK: usize = 3;

impl Gateway {
    pub fn new(config: GatewayConfig, mut text: TextModel) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if let Some(t) = text
            .sampling
            .temperature
            .filter(|&t| t > crate::MAX_TEMPERATURE)
        {
            tracing::warn!(
                temperature = t,
                "the model file recommends a temperature over the most a request may set: \
                 not taken"
            );
            text.sampling.temperature = None;
        }
        let defaults = config.sampling_override.or(text.sampling);
        if !defaults.is_empty() {
            tracing::info!(
                temperature = ?defaults.temperature,
                top_k = ?defaults.top_k,
                top_p = ?defaults.top_p,
                min_p = ?defaults.min_p,
                "HTTP requests that set no sampling take the model file's and \
                 --override-generation-config's"
            );
        }
        Self {
            verifiers: Balancer::new(config.verifier_tls.clone()),
            config,
            text: Arc::new(text),
            tokenizing: Arc::new(tokio::sync::Semaphore::new(cores)),
            verifier_context: AtomicUsize::new(0),
            drained: ShutdownSwitch::default(),
        }
    }

    /// Ends every open stream with [`GatewayError::ShuttingDown`] (the drain time is over).
    pub fn end_streams(&self) {
        let open = metrics::gateway().active_requests.get();
        if open > 0 {
            tracing::warn!(
                open,
                "the drain time is over: ending the streams still open"
            );
        }
        self.drained.trigger();
    }

    /// Refuses, before any tokenizing, a prompt with more bytes than the longest prompt
    /// that fits the context window could have, or that must take more tokens than the
    /// window holds by a bound found without tokenizing
    /// ([`sibyl_engine::TextTokenizer::least_tokens`]).
    fn check_prompt_bytes(&self, prompt: &PromptInput) -> Result<(), GatewayError> {
        let tokenizer = &self.text.tokenizer;
        let context = self.context_length();
        let (bytes, least_tokens, param) = match prompt {
            PromptInput::Text(text) => {
                (text.len(), tokenizer.least_tokens(text, context), "prompt")
            }
            PromptInput::Tokens(tokens) => (0, tokens.len(), "prompt"),
            PromptInput::Infill { prefix, suffix } => (
                prefix.len() + suffix.len(),
                tokenizer.least_tokens(prefix, context) + tokenizer.least_tokens(suffix, context),
                "prompt",
            ),
            PromptInput::Chat { messages, options } => (
                messages
                    .iter()
                    .map(|m| {
                        let calls: usize = m
                            .tool_calls
                            .iter()
                            .map(|c| c.function.name.len() + c.function.arguments.to_string().len())
                            .sum();
                        m.content.len() + m.role.len() + calls
                    })
                    .sum::<usize>()
                    + options
                        .tools
                        .iter()
                        .map(|t| t.to_string().len())
                        .sum::<usize>()
                    + options
                        .variables
                        .iter()
                        .map(|(name, value)| name.len() + value.to_string().len())
                        .sum::<usize>(),
                // Trimmed: a chat template may trim what it puts in.
                messages
                    .iter()
                    .map(|m| tokenizer.least_tokens(m.content.trim(), context))
                    .sum(),
                "messages",
            ),
        };
        let per_token = self.text.tokenizer.longest_token_bytes() * NORMALIZATION_SHRINK;
        let limit = context.saturating_sub(1).saturating_mul(per_token);
        if bytes > limit {
            return Err(GatewayError::InvalidParam {
                param,
                message: format!(
                    "the prompt has {bytes} bytes, more than any prompt that fits this \
                     model's context window of {context} tokens could have ({limit})"
                ),
            });
        }
        if least_tokens >= context {
            return Err(GatewayError::InvalidParam {
                param,
                message: format!(
                    "the prompt has at least {least_tokens} tokens; this model's context \
                     window is {context} tokens"
                ),
            });
        }
        Ok(())
    }

    pub fn model_name(&self) -> &str {
        &self.config.model_name
    }

    /// The keys requests need, if any.
    pub fn api_keys(&self) -> Option<&sibyl_proto::auth::ApiKeys> {
        self.config.api_keys.as_deref()
    }

    pub fn sse_keep_alive(&self) -> Duration {
        self.config.sse_keep_alive
    }

    /// How chat answers' thinking is split from their content, if it is.
    pub fn reasoning_parser(&self) -> Option<crate::ReasoningParser> {
        self.config.reasoning_parser
    }

    /// The sampling of HTTP requests that set none: `--override-generation-config`, then
    /// what the model file recommends; each API's own default where neither says.
    pub fn sampling_defaults(&self) -> crate::SamplingDefaults {
        self.config.sampling_override.or(self.text.sampling)
    }

    /// The context window requests get: the model's, or the verifier's when it serves
    /// less (`--max-model-len`).
    pub fn context_length(&self) -> usize {
        let model = self.text.config.context_length;
        match self.verifier_context.load(Ordering::Relaxed) {
            0 => model,
            verifier => verifier.min(model),
        }
    }

    /// Asks a verifier for its status (the gateway's readiness check).
    pub async fn verifier_status(&self) -> Result<pb::VerifierStatus, GatewayError> {
        let mut client = self.client().await?;
        let mut request = tonic::Request::new(pb::GetStatusRequest {});
        sibyl_proto::auth::attach(self.config.internal_token.as_ref(), request.metadata_mut());
        let status = tokio::time::timeout(Duration::from_secs(1), client.get_status(request))
            .await
            .map_err(|_| {
                GatewayError::Unavailable("the verifier did not answer within 1 s".into())
            })?
            .map_err(GatewayError::from_verifier)?
            .into_inner();
        self.verifier_context
            .store(status.context_length as usize, Ordering::Relaxed);
        Ok(status)
    }

    async fn client(&self) -> Result<VerifierClient<tonic::transport::Channel>, GatewayError> {
        let (_, channel) = self
            .verifiers
            .pick(&self.config.verifiers, &[])
            .await
            .map_err(GatewayError::Unavailable)?;
        Ok(VerifierClient::new(channel))
    }

    /// A client of a verifier for `prompt`, not one of `avoid` while there are others, and
    /// its address: with `affinity`, the one that its first [`ROUTING_BLOCK`] tokens go to
    /// (the prompts of a conversation's turns, or behind one system prompt, meet the work
    /// of the ones before in that verifier's prefix cache), unless it is busy
    /// ([`sibyl_proto::client::by_affinity`]); else round-robin.
    async fn client_for(
        &self,
        prompt: &[u32],
        affinity: bool,
        avoid: &[SocketAddr],
    ) -> Result<
        (
            VerifierClient<tonic::transport::Channel>,
            SocketAddr,
            Option<Open>,
        ),
        GatewayError,
    > {
        let verifiers = &self.config.verifiers;
        if !affinity {
            let (addr, channel) = self
                .verifiers
                .pick(verifiers, avoid)
                .await
                .map_err(GatewayError::Unavailable)?;
            return Ok((VerifierClient::new(channel), addr, None));
        }
        let block: Vec<u8> = prompt[..prompt.len().min(ROUTING_BLOCK)]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        let (addr, channel, open) = self
            .verifiers
            .pick_by_affinity(verifiers, fnv1a(&block), avoid)
            .await
            .map_err(GatewayError::Unavailable)?;
        Ok((VerifierClient::new(channel), addr, Some(open)))
    }

    /// Refuses a model name other than the served one (empty or absent: the served one).
    pub fn check_model(&self, model: Option<&str>) -> Result<(), GatewayError> {
        match model {
            Some(model) if !model.is_empty() && model != self.config.model_name => {
                Err(GatewayError::ModelNotFound {
                    requested: model.to_string(),
                    served: self.config.model_name.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The tokens of a predicted output, read as plain text, off the async workers; refused
    /// when they would not fit the context window.
    async fn prediction_tokens(&self, text: String) -> Result<Vec<u32>, GatewayError> {
        let window = self.context_length();
        let too_long = || {
            GatewayError::invalid_param(
                "prediction",
                format!("the prediction is longer than the context window of {window} tokens"),
            )
        };
        if self.text.tokenizer.least_tokens(&text, window + 1) > window {
            return Err(too_long());
        }
        self.off_workers(move |model| model.tokenizer.encode_text_at_most(&text, window))
            .await?
            .map_err(|e| GatewayError::invalid_param("prediction", e.to_string()))?
            .ok_or_else(too_long)
    }

    /// Runs tokenizing `work` on a blocking thread, at most as many at once as the
    /// gateway allows. The permit goes with the work: a request dropped meanwhile frees it
    /// only when its tokenizing is done.
    async fn off_workers<T: Send + 'static>(
        &self,
        work: impl FnOnce(&TextModel) -> T + Send + 'static,
    ) -> Result<T, GatewayError> {
        let model = self.text.clone();
        let permit = self
            .tokenizing
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let done = work(&model);
            drop(permit);
            done
        })
        .await
        .map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// The prompt's tokens (a chat rendered with the model's template), as a generation
    /// would send them: refused when it leaves no room for one token of output.
    pub async fn prompt_tokens(&self, input: PromptInput) -> Result<Vec<u32>, GatewayError> {
        self.check_prompt_bytes(&input)?;
        // A prompt must leave room for one token of output.
        let limit = self.context_length().saturating_sub(1);
        self.off_workers(move |model| tokenize(model, &input, limit))
            .await?
    }

    /// The prompt of a repository-level fill-in-the-middle request (llama.cpp's `/infill`),
    /// cut to fit as llama.cpp cuts it, with a batch of [`INFILL_BATCH`] tokens (at most half
    /// the context window) and the other files in what is left of the window beside
    /// twice `max_tokens`; and whether a piece was cut.
    pub async fn repo_infill_tokens(
        &self,
        files: Vec<InfillFile>,
        prefix: String,
        middle: String,
        suffix: String,
        max_tokens: usize,
    ) -> Result<(Vec<u32>, bool), GatewayError> {
        if self.text.tokenizer.fim_tokens().is_none() {
            return Err(GatewayError::InvalidRequest(
                "this model has no fill-in-the-middle tokens; code models such as \
                 Qwen2.5-Coder have them"
                    .into(),
            ));
        }
        let context = self.context_length();
        let batch = INFILL_BATCH.min(context / 2);
        let budget = InfillBudget {
            batch,
            // Twice the output (at least one token is made), and the BOS and FIM tokens.
            files: context.saturating_sub(
                batch
                    .saturating_add(max_tokens.max(1).saturating_mul(2))
                    .saturating_add(4),
            ),
        };
        self.off_workers(move |model| {
            let infill = RepoInfill {
                files: &files,
                prefix: &prefix,
                middle: &middle,
                suffix: &suffix,
            };
            model
                .tokenizer
                .encode_repo_infill(infill, budget)
                .map_err(|e| {
                    GatewayError::InvalidRequest(format!("cannot tokenize the prompt: {e}"))
                })
        })
        .await?
    }

    /// The text of `tokens` (control tokens left out), for `/detokenize`.
    pub fn detokenize(&self, tokens: &[u32]) -> Result<String, GatewayError> {
        let vocab = self.text.tokenizer.vocab_size();
        if tokens.len() > self.context_length() {
            return Err(GatewayError::invalid_param(
                "tokens",
                format!(
                    "at most {} tokens (the context window)",
                    self.context_length()
                ),
            ));
        }
        if let Some(token) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(GatewayError::invalid_param(
                "tokens",
                format!("token {token} is outside the vocabulary of {vocab}"),
            ));
        }
        self.text
            .tokenizer
            .decode(tokens)
            .map_err(|e| GatewayError::Internal(e.to_string()))
    }

    /// Checks `request`, starts it on a verifier and returns its prompt length and output.
    /// Dropping the output stream cancels the generation on the verifier.
    pub async fn generate(
        &self,
        mut request: Generation,
    ) -> Result<(usize, OutputStream), GatewayError> {
        let mut record = RequestRecord::start(request.api);
        if request.request_id.is_empty() {
            request.request_id = format!("req-{:032x}", rand::random::<u128>());
        }
        let span = tracing::info_span!(
            "generation",
            request_id = %request.request_id,
            api = request.api.label(),
            key_id = request.key_id.as_ref().map(|id| id.0.as_str()),
        );
        match self.start(request).instrument(span.clone()).await {
            Ok((prompt_tokens, events, relay_params)) => {
                let (output, receiver) = mpsc::channel(64);
                let text = self.text.clone();
                let drained = self.drained.stopped();
                let relay = relay(text, events, relay_params, output, record, drained);
                tokio::spawn(relay.instrument(span));
                Ok((prompt_tokens, receiver))
            }
            Err(error) => {
                record.finish(error.outcome());
                let _entered = span.enter();
                tracing::debug!(%error, "request refused");
                Err(error)
            }
        }
    }

    /// Checks `request` and opens its session on a verifier.
    async fn start(
        &self,
        request: Generation,
    ) -> Result<(usize, tonic::Streaming<pb::VerifyEvent>, RelayParams), GatewayError> {
        self.check_model(request.model.as_deref())?;
        let bad_stop = |s: &String| s.is_empty() || s.len() > MAX_STOP_BYTES;
        if request.stop.len() > MAX_STOP_STRINGS || request.stop.iter().any(bad_stop) {
            return Err(GatewayError::InvalidRequest(format!(
                "`stop` takes at most {MAX_STOP_STRINGS} non-empty strings of at most \
                 {MAX_STOP_BYTES} bytes"
            )));
        }
        check_logprobs(request.logprobs, "logprobs")?;
        check_logprobs(request.prompt_logprobs, "prompt_logprobs")?;
        let prompt = self.prompt_tokens(request.prompt).await?;
        let first_prompt_token = request.prompt_logprobs.and(prompt.first().copied());
        let mut sampling = request.sampling;
        // Fixed here so that the gateway can report the seed even when it ends the
        // generation itself (at a stop string).
        let seed = *sampling.seed.get_or_insert_with(rand::random);
        let max_tokens =
            self.max_tokens(prompt.len(), request.max_tokens, request.ending.at_window)?;
        let prediction = match &request.prediction {
            Some(text) => self.prediction_tokens(text.clone()).await?,
            None => Vec::new(),
        };
        let verify = pb::VerifyRequest {
            prediction,
            prompt_tokens: prompt,
            max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
            sampling: Some(sampling.into()),
            speculation: request.speculation.to_wire(),
            tokenizer_fingerprint: sibyl_proto::fingerprint(self.text.tokenizer.fingerprint()),
            step_times: request.details,
            prefix_cache: request.prefix_cache,
            logprobs: request.logprobs,
            prompt_logprobs: request.prompt_logprobs,
            grammar: request.grammar.clone().map(pb::OutputGrammar::from),
            min_tokens: request.ending.min_tokens,
            ignore_eos: request.ending.ignore_eos,
            stop_token_ids: request.ending.stop_token_ids.clone(),
        };
        let prompt_tokens = verify.prompt_tokens.len();
        // A verifier that cannot be reached, refuses to start (UNAVAILABLE: draining, not
        // loaded), or whose connection closes before it answers (CANCELLED: a draining
        // server's GOAWAY overtook the request) has sent nothing for the request: another
        // one is asked.
        let mut tried = Vec::new();
        let (events, open) = loop {
            let affinity = request.prefix_cache != Some(false);
            let (mut client, addr, open) = self
                .client_for(&verify.prompt_tokens, affinity, &tried)
                .await?;
            let mut call = tonic::Request::new(verify.clone());
            sibyl_telemetry::trace::inject(&tracing::Span::current(), call.metadata_mut());
            sibyl_telemetry::trace::set_request_id(call.metadata_mut(), &request.request_id);
            sibyl_proto::auth::attach(self.config.internal_token.as_ref(), call.metadata_mut());
            let answer = tokio::time::timeout(OPEN_TIMEOUT, client.generate(call))
                .await
                .map_err(|_| {
                    GatewayError::Unavailable(format!(
                        "the verifier did not answer within {OPEN_TIMEOUT:?}"
                    ))
                })?;
            match answer {
                Ok(events) => break (events.into_inner(), open),
                Err(status)
                    if matches!(status.code(), Code::Unavailable | Code::Cancelled)
                        && tried.len() + 1 < OPEN_ATTEMPTS =>
                {
                    tracing::debug!(%addr, reason = status.message(), "verifier unavailable; trying another");
                    tried.push(addr);
                }
                Err(status) => return Err(GatewayError::from_verifier(status)),
            }
        };
        let params = RelayParams {
            stops: StopStrings::new(request.stop, request.ending.include_stop_string),
            min_tokens: request.ending.min_tokens,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            seed,
            details: request.details,
            logprobs: request.logprobs.is_some(),
            first_prompt_token,
            _open: open,
        };
        Ok((prompt_tokens, events, params))
    }

    /// How many tokens a generation of a `prompt`-token prompt may make: `requested` (at
    /// most the server's limit, and the window's room unless `at_window` cuts it to that).
    fn max_tokens(
        &self,
        prompt: usize,
        requested: Option<usize>,
        at_window: bool,
    ) -> Result<usize, GatewayError> {
        let context = self.context_length();
        let limit = self.config.max_tokens_limit;
        if prompt >= context {
            return Err(GatewayError::InvalidRequest(format!(
                "the prompt has {prompt} tokens; this model's context window is {context} tokens"
            )));
        }
        let room = context - prompt;
        match requested {
            None => Ok(room.min(limit)),
            Some(0) => Err(GatewayError::invalid_param(
                "max_tokens",
                "`max_tokens` must be at least 1",
            )),
            Some(n) if n > limit => Err(GatewayError::invalid_param(
                "max_tokens",
                format!("`max_tokens` is {n}; this server allows at most {limit}"),
            )),
            Some(n) if n > room && at_window => Ok(room),
            Some(n) if n > room => Err(GatewayError::invalid_param(
                "max_tokens",
                format!(
                    "this model's context window is {context} tokens; the prompt has {prompt} \
                     and `max_tokens` asks for {n} more"
                ),
            )),
            Some(n) => Ok(n),
        }
    }
}

/// Renders (a chat) and tokenizes a prompt: CPU work, run off the async workers. In a chat
/// control tokens count only where the template writes them (content is text). A prompt
/// of more than `limit` tokens is refused as soon as that is known, before the rest of it
/// is tokenized.
fn tokenize(
    text_model: &TextModel,
    prompt: &PromptInput,
    limit: usize,
) -> Result<Vec<u32>, GatewayError> {
    let tokens = match prompt {
        PromptInput::Text(text) => text_model.tokenizer.encode_at_most(text, limit),
        PromptInput::Tokens(tokens) => {
            let vocab = text_model.tokenizer.vocab_size();
            if let Some(token) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(GatewayError::invalid_param(
                    "prompt",
                    format!("token {token} is outside the vocabulary of {vocab} tokens"),
                ));
            }
            Ok((tokens.len() <= limit).then(|| tokens.clone()))
        }
        PromptInput::Infill { prefix, suffix } => {
            if text_model.tokenizer.fim_tokens().is_none() {
                return Err(GatewayError::invalid_param(
                    "suffix",
                    "this model has no fill-in-the-middle tokens; \
                     code models such as Qwen2.5-Coder have them",
                ));
            }
            text_model
                .tokenizer
                .encode_infill_at_most(prefix, suffix, limit)
        }
        PromptInput::Chat { messages, options } => {
            if messages.is_empty() {
                return Err(GatewayError::InvalidRequest("`messages` is empty".into()));
            }
            let template = text_model.chat_template.as_ref().ok_or_else(|| {
                GatewayError::InvalidRequest(
                    "this model has no chat template; use /v1/completions".into(),
                )
            })?;
            let takes_tools = template.tool_calls().is_some();
            let roles: &[&str] = if takes_tools {
                &["system", "user", "assistant", "tool"]
            } else {
                &["system", "user", "assistant"]
            };
            if let Some(m) = messages.iter().find(|m| !roles.contains(&m.role.as_str())) {
                return Err(GatewayError::InvalidRequest(format!(
                    "unsupported message role `{}` ({})",
                    m.role,
                    roles.join(", ")
                )));
            }
            let calls = messages.iter().any(|m| !m.tool_calls.is_empty());
            if !takes_tools && (!options.tools.is_empty() || calls) {
                return Err(GatewayError::invalid_param(
                    if calls { "messages" } else { "tools" },
                    "this model's chat template does not take tools (sibyl reads tool calls \
                     in the format of Qwen2.5, Qwen3 and Hermes templates)",
                ));
            }
            template.encode_with_at_most(&text_model.tokenizer, messages, options, limit)
        }
    }
    .map_err(|e| GatewayError::InvalidRequest(format!("cannot tokenize the prompt: {e}")))?
    .ok_or_else(|| GatewayError::InvalidParam {
        param: match prompt {
            PromptInput::Text(_) | PromptInput::Tokens(_) | PromptInput::Infill { .. } => "prompt",
            PromptInput::Chat { .. } => "messages",
        },
        message: format!(
            "the prompt has more than {limit} tokens; this model's context window is {} tokens",
            limit + 1
        ),
    })?;
    if tokens.is_empty() {
        return Err(GatewayError::InvalidRequest("the prompt is empty".into()));
    }
    Ok(tokens)
}

/// Passes each of `outputs` through `map` to `sender`, from a task of its own, until either
/// side ends: a receiver that goes away ends it at once, not at the next output, and
/// dropping `outputs` then cancels the generation.
pub(crate) fn forward<T, U>(
    mut outputs: mpsc::Receiver<T>,
    sender: mpsc::Sender<U>,
    map: impl Fn(T) -> U + Send + 'static,
) where
    T: Send + 'static,
    U: Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let output = tokio::select! {
                () = sender.closed() => return,
                output = outputs.recv() => output,
            };
            let Some(output) = output else { return };
            if sender.send(map(output)).await.is_err() {
                return;
            }
        }
    });
}

/// What [`relay`] needs besides the streams.
struct RelayParams {
    stops: StopStrings,
    /// Stop strings are looked for only in the text of the tokens after this many.
    min_tokens: u32,
    prompt_tokens: u32,
    seed: u64,
    details: bool,
    /// Whether the verifier sends log-probabilities to relay.
    logprobs: bool,
    /// With prompt log-probabilities asked for: the prompt's first token.
    first_prompt_token: Option<u32>,
    /// Counts the session open at its verifier (affinity routing) while the relay runs.
    _open: Option<Open>,
}

/// Turns the verifier's token stream into text, until it ends, a stop string appears or the
/// client goes away (then dropping `events` cancels the session on the verifier), and
/// records the request's outcome.
async fn relay(
    text: Arc<TextModel>,
    events: tonic::Streaming<pb::VerifyEvent>,
    params: RelayParams,
    output: mpsc::Sender<Result<Output, GatewayError>>,
    mut record: RequestRecord,
    drained: impl std::future::Future<Output = ()>,
) {
    let relayed = tokio::select! {
        relayed = relay_events(text, events, params, &output, &mut record) => relayed,
        () = drained => Err(GatewayError::ShuttingDown),
    };
    let error = match relayed {
        Ok(true) => {
            record.finish("ok");
            tracing::info!(
                completion_tokens = record.tokens,
                seconds = record.started.elapsed().as_secs_f64(),
                "generation finished"
            );
            return;
        }
        Ok(false) => {
            tracing::info!(completion_tokens = record.tokens, "the client went away");
            return;
        }
        Err(error) => error,
    };
    record.finish(error.outcome());
    tracing::warn!(%error, "generation failed");
    let _ = output.send(Err(error)).await;
}

/// The relay's loop: `Ok(true)` when the summary was sent, `Ok(false)` when the client
/// went away, or the error to send.
async fn relay_events(
    text: Arc<TextModel>,
    mut events: tonic::Streaming<pb::VerifyEvent>,
    params: RelayParams,
    output: &mpsc::Sender<Result<Output, GatewayError>>,
    record: &mut RequestRecord,
) -> Result<bool, GatewayError> {
    let RelayParams {
        mut stops,
        min_tokens,
        prompt_tokens,
        seed,
        details,
        logprobs,
        first_prompt_token,
        _open,
    } = params;
    // The prompt's log-probabilities, once they came (with the first tokens, or in the
    // verifier's summary).
    let mut prompt_logprobs: Option<PromptLogprobs> = None;
    let mut take_prompt = |received: &[pb::TokenLogprobs]| {
        if let (Some(first), false, None) =
            (first_prompt_token, received.is_empty(), &prompt_logprobs)
        {
            prompt_logprobs = Some(PromptLogprobs {
                first: token_logprob(&text, first, 0.0),
                rest: received.iter().map(|p| logprobs_of(&text, p)).collect(),
            });
        }
    };
    let generated = &metrics::gateway().generated_tokens;
    let mut detokenizer = Detokenizer::new(&text.tokenizer);
    let mut completion_tokens = 0u32;
    // Tokens received since the last text sent.
    let mut unsent = 0u32;
    let mut token_ids = Vec::new();
    let mut reported = logprobs.then(|| ReportedLogprobs::new(&text));
    loop {
        let event = tokio::select! {
            () = output.closed() => return Ok(false),
            event = events.message() => event,
        };
        let event = match event {
            Ok(Some(pb::VerifyEvent { event: Some(event) })) => event,
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(GatewayError::Internal(
                    "the verifier ended the stream without a summary".into(),
                ))
            }
            Err(status) => return Err(GatewayError::from_verifier(status)),
        };
        match event {
            Event::Tokens(tokens) => {
                take_prompt(&tokens.prompt_logprobs);
                // The text of the first `min_tokens` tokens, where no stop string is looked
                // for, and the text after it.
                let (mut unsearched, mut piece) = (String::new(), String::new());
                if details {
                    token_ids.extend_from_slice(&tokens.tokens);
                }
                generated.inc_by(tokens.tokens.len() as u64);
                record.tokens += tokens.tokens.len() as u64;
                if let Some(reported) = &mut reported {
                    reported.received(&tokens.tokens, &tokens.logprobs)?;
                }
                for token in tokens.tokens {
                    completion_tokens += 1;
                    unsent += 1;
                    if let Some(text) = detokenizer
                        .push(token)
                        .map_err(|e| GatewayError::Internal(e.to_string()))?
                    {
                        if completion_tokens <= min_tokens {
                            unsearched.push_str(&text);
                        } else {
                            piece.push_str(&text);
                        }
                    }
                }
                let (searched, stopped) = stops.push(&piece);
                let piece = unsearched + &searched;
                if !piece.is_empty() {
                    record.text();
                    let text = Output::Text {
                        logprobs: reported
                            .as_mut()
                            .map_or_else(Vec::new, |r| r.sent(piece.len())),
                        text: piece,
                        tokens: std::mem::take(&mut unsent),
                    };
                    if output.send(Ok(text)).await.is_err() {
                        return Ok(false);
                    }
                }
                if stopped {
                    // The verifier's session is cancelled when `events` is dropped; its own
                    // summary never comes, so the gateway reports what it saw: the tokens
                    // received up to the step that held the stop string, no speculation
                    // figures or timings.
                    let summary = Summary {
                        finish_reason: FinishReason::Stop,
                        stop_string: stops.found().map(String::from),
                        prompt_tokens,
                        completion_tokens,
                        seed,
                        token_ids,
                        prompt_logprobs,
                        ..Summary::default()
                    };
                    return Ok(output
                        .send(Ok(Output::Done(Box::new(summary))))
                        .await
                        .is_ok());
                }
            }
            Event::Summary(summary) => {
                take_prompt(&summary.prompt_logprobs);
                let mut rest = detokenizer
                    .finish()
                    .map_err(|e| GatewayError::Internal(e.to_string()))?
                    .unwrap_or_default();
                let (piece, stopped) = if completion_tokens <= min_tokens {
                    (rest, false)
                } else {
                    stops.push(&rest)
                };
                rest = piece;
                if !stopped {
                    rest.push_str(&stops.finish());
                }
                // The tokens whose text starts in this last piece and, unless a stop string
                // cut the text, any left (tokens that stand for no text).
                let logprobs = reported.as_mut().map_or_else(Vec::new, |r| {
                    let mut logprobs = r.sent(rest.len());
                    if !stopped {
                        logprobs.extend(r.rest());
                    }
                    logprobs
                });
                if !rest.is_empty() || !logprobs.is_empty() {
                    record.text();
                    let text = Output::Text {
                        text: rest,
                        tokens: unsent,
                        logprobs,
                    };
                    if output.send(Ok(text)).await.is_err() {
                        return Ok(false);
                    }
                }
                let done = Output::Done(Box::new(Summary {
                    token_ids,
                    prompt_logprobs,
                    stop_string: stops.found().map(String::from),
                    ..Summary::from_verifier(summary, stopped)
                }));
                return Ok(output.send(Ok(done)).await.is_ok());
            }
        }
    }
}

impl Summary {
    fn from_verifier(summary: pb::VerifySummary, stopped_by_string: bool) -> Self {
        let accepted: u64 = summary.drafters.iter().map(|d| d.accepted_tokens).sum();
        let proposed: u64 = summary.drafters.iter().map(|d| d.proposed_tokens).sum();
        let finish_reason = if stopped_by_string {
            FinishReason::Stop
        } else {
            summary.finish_reason().into()
        };
        Self {
            finish_reason,
            stop_string: None,
            prompt_tokens: summary.prompt_tokens,
            cached_tokens: summary.cached_tokens,
            completion_tokens: summary.completion_tokens,
            accepted_prediction_tokens: u32::try_from(accepted).unwrap_or(u32::MAX),
            rejected_prediction_tokens: u32::try_from(proposed - accepted.min(proposed))
                .unwrap_or(u32::MAX),
            steps: summary.steps,
            seed: summary.seed,
            prompt_time: sibyl_proto::std_duration(summary.prompt_time.as_ref()),
            decode_time: sibyl_proto::std_duration(summary.decode_time.as_ref()),
            draft_wait_p50: sibyl_proto::std_duration(summary.draft_wait_p50.as_ref()),
            draft_wait_p99: sibyl_proto::std_duration(summary.draft_wait_p99.as_ref()),
            drafters: summary.drafters.into_iter().map(Into::into).collect(),
            token_ids: Vec::new(),
            step_micros: summary.step_micros,
            prompt_logprobs: None,
        }
    }
}

/// Token `token`'s entry: its bytes, and `logprob`.
fn token_logprob(text: &TextModel, token: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        token,
        bytes: text.tokenizer.token_bytes(token).to_vec(),
        logprob,
    }
}

/// A token's log-probability as the verifier sent it, with the most likely tokens' (at
/// most [`MAX_LOGPROBS`]), and their bytes.
fn logprobs_of(text: &TextModel, p: &pb::TokenLogprobs) -> Logprobs {
    Logprobs {
        chosen: token_logprob(text, p.token, p.logprob),
        top: p
            .top
            .iter()
            .take(MAX_LOGPROBS as usize)
            .map(|t| token_logprob(text, t.token, t.logprob))
            .collect(),
    }
}

/// The log-probabilities of a generation's tokens on their way to the client: each token is
/// reported with the text that holds its start, so tokens whose text a stop string cut off
/// are never reported.
struct ReportedLogprobs<'a> {
    text: &'a TextModel,
    /// Received, not reported yet, each with the offset of its first byte in the output.
    pending: std::collections::VecDeque<(Logprobs, usize)>,
    /// Bytes of the received tokens' text.
    received_bytes: usize,
    /// Bytes of text sent.
    sent_bytes: usize,
}

impl<'a> ReportedLogprobs<'a> {
    fn new(text: &'a TextModel) -> Self {
        Self {
            text,
            pending: std::collections::VecDeque::new(),
            received_bytes: 0,
            sent_bytes: 0,
        }
    }

    /// A step's tokens and the verifier's log-probabilities of them (one each).
    fn received(
        &mut self,
        tokens: &[u32],
        logprobs: &[pb::TokenLogprobs],
    ) -> Result<(), GatewayError> {
        if logprobs.len() != tokens.len() || logprobs.iter().zip(tokens).any(|(p, &t)| p.token != t)
        {
            return Err(GatewayError::Internal(format!(
                "the verifier sent {} log-probabilities for {} tokens",
                logprobs.len(),
                tokens.len()
            )));
        }
        for p in logprobs {
            let logprobs = logprobs_of(self.text, p);
            let length = logprobs.chosen.bytes.len();
            self.pending.push_back((logprobs, self.received_bytes));
            self.received_bytes += length;
        }
        Ok(())
    }

    /// `bytes` more of text were sent: the tokens whose text starts in what was sent.
    fn sent(&mut self, bytes: usize) -> Vec<Logprobs> {
        self.sent_bytes += bytes;
        let mut out = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|&(_, start)| start < self.sent_bytes)
        {
            out.extend(self.pending.pop_front().map(|(p, _)| p));
        }
        out
    }

    /// The generation ended without a stop string: every token not reported yet.
    fn rest(&mut self) -> Vec<Logprobs> {
        self.pending.drain(..).map(|(p, _)| p).collect()
    }
}
