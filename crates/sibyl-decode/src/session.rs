use sibyl_engine::{EngineError, KvCache, LogitRows, Model, Sequence, TreeInput};
use sibyl_spec::{
    choose_draft_nodes, verify, AcceptanceStats, DraftCosts, Drafter, DrafterId, Proposal,
    SamplingConfig, SamplingError, StepCosts, TokenConstraint, TokenHistory, TokenId,
    TokenLogprobs, TokenTree, TreeBuilder, TreeLimits, MAX_TOP_LOGPROBS,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod drafting;

use drafting::draft;
use drafting::DrafterCalls;
pub use drafting::{measure_drafter, DraftTiming};

/// Prompt tokens processed per forward pass when a session runs alone.
pub const PROMPT_CHUNK: usize = 256;

/// Most prompt tokens per forward pass when the prompt's log-probabilities were asked for:
/// each gives a row of logits (about 39 MB of them for 64 rows of Qwen2.5's vocabulary).
pub const PROMPT_LOGPROB_ROWS: usize = 64;

/// After this many steps in a row that left out every draft, one step verifies the best
/// draft node anyway, so a drafter whose estimate fell low can show it is right again. On
/// 2 AVX2 cores one node costs about 5% of a step: 0.3% of the time when nothing pays.
const EXPLORE_AFTER: usize = 16;

/// What the sessions of one model learn and share (a process learns it once): what steps
/// cost, and where each drafter kind's acceptance estimate starts in a new session.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    pub costs: StepCosts,
    /// What each in-process drafter kind's tokens take to draft on the verifier's cores.
    pub drafting: DraftCosts,
    /// Where each drafter kind's acceptance estimates start in a new session: where the
    /// last session of that kind left them ([`AcceptanceStats::default`] for a kind not
    /// seen yet).
    pub acceptance: HashMap<String, AcceptanceStats>,
}

/// [`Learned`], shared by the sessions of a process.
pub type SharedLearning = Arc<Mutex<Learned>>;

/// Parameters of one generation.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens to generate (stop tokens excluded).
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// How large each step's draft tree may grow.
    pub tree: TreeLimits,
    /// Adaptive tree size: each step verifies the number of draft nodes expected to give
    /// the most tokens per second by the measured step costs, which may be none (a plain
    /// step), and each drafter kind's acceptance starts where earlier sessions left it.
    /// `None`: every step verifies the whole budget the drafts fill, and every session
    /// starts from [`AcceptanceStats::PRIOR`].
    pub learning: Option<SharedLearning>,
    /// Tokens that end the generation; they are not emitted.
    pub stop_tokens: Vec<TokenId>,
    /// Start from the longest prefix of the prompt that the scheduler holds computed (by
    /// another session or in its prefix cache), and leave this session's work there when
    /// it ends. Lossless either way; off for measuring prompt processing.
    pub prefix_cache: bool,
    /// Also work out each emitted token's log-probability and those of the `n` most likely
    /// tokens at its position, `n` at most [`MAX_TOP_LOGPROBS`] ([`Session::step_logprobs`]).
    pub logprobs: Option<usize>,
}

impl GenerationConfig {
    /// Plain greedy decoding of at most `max_tokens` tokens: no drafts verified.
    pub fn plain(max_tokens: usize, stop_tokens: Vec<TokenId>) -> Self {
        Self {
            max_tokens,
            sampling: SamplingConfig::greedy(),
            tree: TreeLimits::NONE,
            learning: None,
            stop_tokens,
            prefix_cache: true,
            logprobs: None,
        }
    }
}

/// Most tokens that may end one generation (the model's and a request's own).
pub const MAX_STOP_TOKENS: usize = 256;

/// A request that cannot run, or a failure while running it.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("max tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("the prompt has {prompt} tokens; the model's context window is {limit}")]
    PromptTooLong { prompt: usize, limit: usize },
    #[error("prompt token {token} is outside the vocabulary of {vocab}")]
    PromptToken { token: TokenId, vocab: usize },
    #[error("at most {MAX_TOP_LOGPROBS} most likely tokens can be returned per position, not {0}")]
    TooManyLogprobs(usize),
    #[error("stop token {token} is outside the vocabulary of {vocab}")]
    StopToken { token: TokenId, vocab: usize },
    #[error("at most {MAX_STOP_TOKENS} stop tokens, not {0}")]
    TooManyStopTokens(usize),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("model: {0}")]
    Engine(#[from] EngineError),
    /// The batched forward pass this session was part of failed.
    #[error("model (batched step): {0}")]
    Batch(#[source] Arc<EngineError>),
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated, or the context window is full.
    Length,
    /// The caller asked to stop.
    Cancelled,
}

/// Draft statistics of one drafter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrafterReport {
    pub kind: String,
    /// Draft tokens of this drafter placed in verified trees.
    pub proposed: u64,
    /// Of those, tokens the target accepted.
    pub accepted: u64,
    /// Steps that had this drafter's drafts (an in-process drafter is left out of a step
    /// when its drafting is not expected to pay; a remote one when it sent nothing).
    pub asked: u64,
    /// Time spent drafting in this process (zero for remote drafters).
    pub drafting_time: Duration,
}

/// What a generation produced and how.
#[derive(Debug, Clone)]
pub struct GenerationReport {
    pub tokens: Vec<TokenId>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were copied, not computed (prefix cache).
    pub cached_tokens: usize,
    pub finish_reason: FinishReason,
    /// Verify steps (forward passes after the prompt), the first token's included.
    pub steps: usize,
    pub prompt_time: Duration,
    pub decode_time: Duration,
    /// Duration of each verify step (tree building, forward, verify, cache update; the
    /// drafters' own time comes before the step). The first is the first token's, sampled
    /// from the prompt's logits.
    pub step_times: Vec<Duration>,
    pub drafters: Vec<DrafterReport>,
    /// The seed the sampling used.
    pub seed: u64,
}

impl GenerationReport {
    /// Mean tokens emitted per verify step (1.0 for plain decoding).
    pub fn mean_accepted_tokens(&self) -> f64 {
        if self.steps == 0 {
            return 0.0;
        }
        self.tokens.len() as f64 / self.steps as f64
    }

    /// Tokens per second of decoding, prompt processing excluded. The first token comes
    /// from the prompt's forward pass, so it is not counted: the rate is the tokens after
    /// it over the time from it to the end.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.decode_time.as_secs_f64();
        if secs > 0.0 {
            self.tokens.len().saturating_sub(1) as f64 / secs
        } else {
            0.0
        }
    }
}

/// Checks that `prompt` and `config` make a generation `model` can run: the checks of
/// [`Session::new`], for callers that answer before they start the session.
pub fn check_request(
    model: &Model,
    prompt: &[TokenId],
    config: &GenerationConfig,
) -> Result<(), GenerateError> {
    let vocab = model.vocab_size();
    config.sampling.validate(vocab)?;
    let limit = model.config().context_length;
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if config.max_tokens == 0 {
        return Err(GenerateError::ZeroMaxTokens);
    }
    if prompt.len() >= limit {
        return Err(GenerateError::PromptTooLong {
            prompt: prompt.len(),
            limit,
        });
    }
    if let Some(&token) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(GenerateError::PromptToken { token, vocab });
    }
    if let Some(n) = config.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
        return Err(GenerateError::TooManyLogprobs(n));
    }
    if config.stop_tokens.len() > MAX_STOP_TOKENS {
        return Err(GenerateError::TooManyStopTokens(config.stop_tokens.len()));
    }
    if let Some(&token) = config.stop_tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(GenerateError::StopToken { token, vocab });
    }
    Ok(())
}

/// What one step produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Tokens accepted by this step, stop tokens left out (may be empty at the end).
    pub tokens: Vec<TokenId>,
    /// Set when the generation is over.
    pub finish: Option<FinishReason>,
}

/// One generation as a state machine with no model in it: [`Session::prompt_chunk`] and
/// [`Session::plan`] say what the next forward pass should compute for it, and
/// [`Session::commit_prompt`] and [`Session::commit`] take what it computed. Whoever runs
/// the forward pass (the [`Scheduler`](crate::Scheduler), batching many sessions) drives it;
/// [`Session::prefill`] and [`Session::step`] are the same for a session alone.
pub struct Session {
    config: GenerationConfig,
    vocab_size: usize,
    context_length: usize,
    cache: KvCache,
    prompt_tokens: usize,
    /// Prompt tokens in the cache.
    prefilled: usize,
    /// Of those, tokens copied from another sequence's cache.
    cached_tokens: usize,
    context: Vec<TokenId>,
    output: Vec<TokenId>,
    stats: Vec<AcceptanceStats>,
    drafter_kinds: Vec<String>,
    steps: usize,
    step_times: Vec<Duration>,
    /// Steps in a row that had drafts and verified none of them.
    plain_streak: usize,
    /// Per drafter, its calls (in-process drafters: see [`generate`]).
    calls: Vec<DrafterCalls>,
    /// The next step verifies at least one node: a drafter is being probed.
    probing: bool,
    started: Instant,
    prompt_time: Duration,
    decode_started: Option<Instant>,
    /// With [`GenerationConfig::logprobs`]: the last step's tokens' log-probabilities.
    step_logprobs: Vec<TokenLogprobs>,
    /// With [`Session::with_prompt_logprobs`]: how many most likely tokens, and the
    /// log-probabilities of the prompt's tokens after the first, as far as it got.
    prompt_logprobs: Option<(usize, Vec<TokenLogprobs>)>,
    /// What the sampling's penalties count.
    history: TokenHistory,
    /// Rules the output follows (a grammar, a least length), applied in order.
    constraints: Vec<Box<dyn TokenConstraint>>,
}

impl Session {
    /// Checks the request; no model work yet. `drafter_kinds` names the drafters whose
    /// proposals [`Session::plan`] will receive, indexed by [`DrafterId`].
    pub fn new(
        model: &Model,
        prompt: &[TokenId],
        config: GenerationConfig,
        drafter_kinds: Vec<String>,
    ) -> Result<Self, GenerateError> {
        check_request(model, prompt, &config)?;
        let stats = match &config.learning {
            Some(learning) => {
                let learned = lock(learning);
                drafter_kinds
                    .iter()
                    .map(|kind| {
                        learned
                            .acceptance
                            .get(kind)
                            .map_or_else(AcceptanceStats::default, AcceptanceStats::carried_over)
                    })
                    .collect()
            }
            None => vec![AcceptanceStats::default(); drafter_kinds.len()],
        };
        Ok(Self {
            history: TokenHistory::new(prompt, &config.sampling.penalties),
            config,
            vocab_size: model.vocab_size(),
            context_length: model.config().context_length,
            cache: model.new_cache(),
            prompt_tokens: prompt.len(),
            prefilled: 0,
            cached_tokens: 0,
            context: prompt.to_vec(),
            output: Vec::new(),
            calls: vec![DrafterCalls::default(); drafter_kinds.len()],
            probing: false,
            stats,
            drafter_kinds,
            steps: 0,
            step_times: Vec::new(),
            plain_streak: 0,
            started: Instant::now(),
            prompt_time: Duration::ZERO,
            decode_started: None,
            step_logprobs: Vec::new(),
            prompt_logprobs: None,
            constraints: Vec::new(),
        })
    }

    /// Also works out the log-probability the model gives each prompt token after the
    /// first, and those of the `top` most likely tokens at its position (at most
    /// [`MAX_TOP_LOGPROBS`]; [`Session::prompt_logprobs`]): the prompt is then computed
    /// whole, none of it copied from a cache, in chunks of at most
    /// [`PROMPT_LOGPROB_ROWS`] tokens.
    pub fn with_prompt_logprobs(mut self, top: usize) -> Result<Self, GenerateError> {
        if top > MAX_TOP_LOGPROBS {
            return Err(GenerateError::TooManyLogprobs(top));
        }
        self.prompt_logprobs = Some((top, Vec::with_capacity(self.prompt_tokens - 1)));
        Ok(self)
    }

    /// With [`Session::with_prompt_logprobs`]: the prompt's tokens' log-probabilities, from
    /// its second token on, as far as its processing got.
    pub fn prompt_logprobs(&self) -> &[TokenLogprobs] {
        self.prompt_logprobs.as_ref().map_or(&[], |(_, l)| l)
    }

    /// Holds every token of the output to `constraint` too (a grammar, a least length),
    /// after those added before it: each is chosen from the logits they leave, in plain
    /// and verify steps alike.
    pub fn with_constraint(mut self, constraint: Box<dyn TokenConstraint>) -> Self {
        self.constraints.push(constraint);
        self
    }

    /// The constraints as one, if there are any.
    fn constraint(&mut self) -> Option<&mut dyn TokenConstraint> {
        as_one(&mut self.constraints)
    }

    /// Processes the prompt alone, [`PROMPT_CHUNK`] tokens per forward pass, and chooses the
    /// first token. `cancelled` is asked between chunks of the prompt; when it says yes the
    /// step returns with `Cancelled`.
    pub fn prefill(
        &mut self,
        model: &Model,
        cancelled: &mut dyn FnMut() -> bool,
    ) -> Result<Step, GenerateError> {
        loop {
            if cancelled() {
                return Ok(Step {
                    tokens: Vec::new(),
                    finish: Some(FinishReason::Cancelled),
                });
            }
            let Some(chunk) = self.prompt_chunk(PROMPT_CHUNK) else {
                return Err(GenerateError::EmptyPrompt);
            };
            let logits = model.forward(&mut self.cache, &chunk.input, chunk.rows)?;
            if let Some(step) = self.commit_prompt(&chunk, &logits)? {
                return Ok(step);
            }
        }
    }

    /// Whether prompt tokens are still to be processed.
    pub fn prefilling(&self) -> bool {
        self.prefilled < self.prompt_tokens
    }

    /// Prompt tokens in the cache so far (computed or copied).
    pub fn prefilled(&self) -> usize {
        self.prefilled
    }

    /// Whether this session starts from, and leaves, computed prefixes (see
    /// [`GenerationConfig::prefix_cache`]).
    pub fn prefix_cache(&self) -> bool {
        self.config.prefix_cache
    }

    /// How many of the first `len` prompt tokens may be copied from a cache rather than
    /// computed: the prompt's last token is always processed (its logits choose the first
    /// token), and every token when the prompt's log-probabilities were asked for.
    pub fn reusable(&self, len: usize) -> usize {
        if self.prompt_logprobs.is_some() {
            return 0;
        }
        len.min(self.prompt_tokens.saturating_sub(1))
    }

    /// Takes the keys and values of the prompt's first `len` tokens from `cache`, a cache
    /// of the same model over a sequence that starts with them (the prompt's last token
    /// excepted, see [`Session::reusable`]); nothing when that is no further than this
    /// session got, or `cache` is of another shape.
    pub fn reuse_prefix(&mut self, cache: &KvCache, len: usize) {
        let len = self.reusable(len).min(cache.len());
        if !self.prefilling() || len <= self.prefilled {
            return;
        }
        let started = Instant::now();
        if !self.cache.copy_from(cache, len) {
            return;
        }
        if self.prefilled == 0 {
            self.started = started;
        }
        self.cached_tokens += len - self.prefilled;
        self.prefilled = len;
    }

    /// The tokens whose keys and values the cache holds, with the cache, leaving the session
    /// an empty cache: what the session computed, for the prefix cache, once it has ended.
    pub fn take_cache(&mut self) -> (&[TokenId], KvCache) {
        let len = self.cached().0.len();
        let empty = self.cache.prefix(0);
        let cache = std::mem::replace(&mut self.cache, empty);
        (&self.context[..len], cache)
    }

    /// The positions the cache holds, with their tokens.
    pub fn cached(&self) -> (&[TokenId], &KvCache) {
        let len = self.cache.len().min(self.context.len());
        (&self.context[..len], &self.cache)
    }

    /// The next at most `budget` prompt tokens to process (`None` once the prompt is done or
    /// with a zero budget).
    pub fn prompt_chunk(&mut self, budget: usize) -> Option<PromptChunk> {
        let budget = match self.prompt_logprobs {
            Some(_) => budget.min(PROMPT_LOGPROB_ROWS),
            None => budget,
        };
        let end = self.prompt_tokens.min(self.prefilled + budget);
        if end <= self.prefilled {
            return None;
        }
        if self.prefilled == 0 {
            self.started = Instant::now();
        }
        let rows = if self.prompt_logprobs.is_some() {
            LogitRows::All
        } else if end == self.prompt_tokens {
            LogitRows::Last
        } else {
            LogitRows::None
        };
        Some(PromptChunk {
            input: TreeInput::chain(&self.context[self.prefilled..end]),
            rows,
        })
    }

    /// Takes the forward pass of `chunk` (now in the cache); after the prompt's last chunk,
    /// chooses the first token from its `logits` and returns it as the first step.
    pub fn commit_prompt(
        &mut self,
        chunk: &PromptChunk,
        logits: &[f32],
    ) -> Result<Option<Step>, GenerateError> {
        let start = self.prefilled;
        let rows = chunk.input.tokens.len();
        self.prefilled += rows;
        let logits = match &mut self.prompt_logprobs {
            // A row per token of the chunk: each gives the next prompt token's
            // log-probability, the prompt's last one the first token's.
            Some((top, logprobs)) => {
                let vocab = self.vocab_size;
                for row in 0..rows {
                    let (Some(&next), Some(row_logits)) = (
                        self.context[..self.prompt_tokens].get(start + row + 1),
                        logits.get(row * vocab..(row + 1) * vocab),
                    ) else {
                        break;
                    };
                    logprobs.push(TokenLogprobs::new(row_logits, next, *top));
                }
                logits
                    .get(rows.saturating_sub(1) * vocab..)
                    .unwrap_or_default()
            }
            None => logits,
        };
        if self.prefilling() {
            return Ok(None);
        }
        let prompt_len = self.prompt_tokens;
        self.prompt_time = self.started.elapsed();
        let decode_started = Instant::now();
        self.decode_started = Some(decode_started);
        // The first token comes from the prompt's last logits: a root-only step.
        let constraint = as_one(&mut self.constraints);
        let first = verify(
            &TokenTree::root_only(*self.context.last().unwrap_or(&0)),
            logits,
            self.vocab_size,
            &self.config.sampling,
            prompt_len - 1,
            &self.history,
            constraint,
        )?;
        self.record(&[first.next_token])?;
        self.steps = 1;
        self.step_times.push(decode_started.elapsed());
        self.step_logprobs = self.logprobs_of(&[first.next_token], &[0], logits);
        Ok(Some(self.emit(&[first.next_token])))
    }

    /// Asks `drafters`, running in this process, for the next step's drafts: the cheapest
    /// first, each for as many tokens as pay for its time (see [`Session::draft_length`]).
    pub fn draft_in_process(
        &mut self,
        drafters: &mut [Box<dyn Drafter>],
    ) -> Vec<(DrafterId, Vec<Proposal>)> {
        draft(self, drafters)
    }

    /// Tells `drafters`, running in this process, that the session has ended with its
    /// context ([`Drafter::finish`]).
    pub fn finish_in_process(&self, drafters: &mut [Box<dyn Drafter>]) {
        for drafter in drafters {
            drafter.finish(self.context());
        }
    }

    /// What this session learns with the others of its process (adaptive sizing), if it does.
    pub fn learning(&self) -> Option<&SharedLearning> {
        self.config.learning.as_ref()
    }

    /// The cache the next forward pass for this session appends to.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        &mut self.cache
    }

    /// The whole sequence so far: prompt and accepted tokens.
    pub fn context(&self) -> &[TokenId] {
        &self.context
    }

    /// Draft tokens proposed and accepted so far, per drafter (indexed by [`DrafterId`]).
    pub fn drafter_counts(&self) -> Vec<(u64, u64)> {
        self.stats
            .iter()
            .map(|s| (s.proposed, s.accepted))
            .collect()
    }

    /// Duration of the last step (the prompt's first token counts as one).
    pub fn last_step_time(&self) -> Option<Duration> {
        self.step_times.last().copied()
    }

    /// Bytes held by this session's KV cache.
    pub fn cache_bytes(&self) -> usize {
        self.cache.size_in_bytes()
    }

    /// Most draft tokens on one branch that the next step can use (0: no room left).
    pub fn draft_depth(&self) -> usize {
        let room = self.context_length.saturating_sub(self.context.len());
        self.config.tree.max_depth.min(room.saturating_sub(1))
    }

    /// One verify step alone over the drafts of each drafter, best proposal first:
    /// [`Session::plan`], sized for this session alone, one forward pass, and
    /// [`Session::commit`].
    pub fn step(
        &mut self,
        model: &Model,
        proposals: Vec<(DrafterId, Vec<Proposal>)>,
    ) -> Result<Step, GenerateError> {
        let started = Instant::now();
        let Some(mut plan) = self.plan(proposals) else {
            return Ok(self.context_full());
        };
        if let Some(learning) = &self.config.learning {
            let costs = lock(learning).costs.clone();
            let nodes = choose_draft_nodes(
                &plan.values,
                |n| costs.estimate(n, plan.context),
                plan.explore,
            );
            plan.keep_drafts(nodes);
        }
        let input = plan.input();
        let mut batch = [Sequence {
            cache: &mut self.cache,
            input: &input,
            rows: LogitRows::All,
        }];
        let logits = model.forward_batch(&mut batch)?.pop().unwrap_or_default();
        let elapsed = started.elapsed();
        if let Some(learning) = &self.config.learning {
            lock(learning)
                .costs
                .record(plan.tree.len(), plan.context, elapsed.as_secs_f64());
        }
        self.commit(plan, &logits, elapsed)
    }

    /// The step that ends a session whose context window is full.
    pub fn context_full(&self) -> Step {
        Step {
            tokens: Vec::new(),
            finish: Some(FinishReason::Length),
        }
    }

    /// Plans the next verify step over the drafts of each drafter, best proposal first:
    /// their tree with every node that fits the budget, best first, for the caller to cut
    /// ([`PlannedStep::keep_drafts`]) and compute. `None` when the context window is full
    /// (the session is over: [`Session::context_full`]). Proposals are untrusted:
    /// out-of-vocabulary tokens and branches past [`Session::draft_depth`] are cut.
    pub fn plan(&mut self, proposals: Vec<(DrafterId, Vec<Proposal>)>) -> Option<PlannedStep> {
        if self.context.len() >= self.context_length {
            return None;
        }
        let mut had_drafts: Vec<usize> = proposals
            .iter()
            .filter(|(_, drafts)| !drafts.is_empty())
            .map(|(id, _)| id.0)
            .collect();
        had_drafts.sort_unstable();
        had_drafts.dedup();
        for id in had_drafts {
            if let Some(calls) = self.calls.get_mut(id) {
                calls.asked += 1;
            }
        }
        let proposals = match self.constraint() {
            Some(constraint) => allowed(proposals, constraint),
            None => proposals,
        };
        let (builder, branches) = self.builder(proposals);
        let (tree, values) = builder.build_ranked();
        let plan = PlannedStep {
            tree,
            values,
            branches,
            context: self.context.len(),
            prefix_len: self.cache.len(),
            adaptive: self.config.learning.is_some(),
            explore: self.plain_streak >= EXPLORE_AFTER || self.probing,
        };
        self.probing = false;
        Some(plan)
    }

    /// Takes the forward pass of `plan` (its nodes now in the cache, their `logits` one row
    /// each): verifies the tree, keeps the accepted path in the cache, learns from what was
    /// accepted and emits. `elapsed`: the step's time, for the report.
    pub fn commit(
        &mut self,
        plan: PlannedStep,
        logits: &[f32],
        elapsed: Duration,
    ) -> Result<Step, GenerateError> {
        let PlannedStep {
            tree,
            values,
            branches,
            prefix_len,
            ..
        } = plan;
        self.plain_streak = match (values.is_empty(), tree.len()) {
            (false, 1) => self.plain_streak + 1,
            _ => 0,
        };
        let constraint = as_one(&mut self.constraints);
        let outcome = verify(
            &tree,
            logits,
            self.vocab_size,
            &self.config.sampling,
            prefix_len,
            &self.history,
            constraint,
        )?;
        let mut kept = vec![0];
        kept.extend_from_slice(&outcome.path);
        self.cache.keep_path(prefix_len, tree.len(), &kept)?;
        record(&tree, &outcome.path, &branches, &mut self.stats);
        self.steps += 1;
        self.step_times.push(elapsed);
        let emitted = outcome.emitted(&tree);
        self.record(&emitted)?;
        // Each emitted token was chosen from the logits of the node before it.
        self.step_logprobs = self.logprobs_of(&emitted, &kept, logits);
        Ok(self.emit(&emitted))
    }

    /// The tree builder of a step over `proposals`, and where each of its branches came
    /// from. Proposals are untrusted: out-of-vocabulary tokens and branches past
    /// [`Session::draft_depth`] are cut.
    fn builder(
        &self,
        proposals: Vec<(DrafterId, Vec<Proposal>)>,
    ) -> (TreeBuilder, Vec<BranchOrigin>) {
        let root = *self.context.last().unwrap_or(&0);
        let depth = self.draft_depth();
        let mut builder = TreeBuilder::new(root, self.vocab_size, self.config.tree.budget, depth)
            .with_min_value(self.config.tree.min_value, self.config.tree.exempt_nodes);
        let mut branches = Vec::new();
        if depth > 0 && self.config.tree.budget > 0 {
            for (id, drafts) in proposals {
                let Some(stats) = self.stats.get(id.0) else {
                    continue;
                };
                // A drafter lists its best guess first.
                for (rank, proposal) in drafts.into_iter().enumerate() {
                    let evidence = proposal.evidence;
                    let chances = stats.chances(rank, evidence, proposal.tokens.len().min(depth));
                    if builder.add_with_chances(id, chances, proposal).is_some() {
                        branches.push(BranchOrigin {
                            drafter: id.0,
                            rank,
                            evidence,
                        });
                    }
                }
            }
        }
        (builder, branches)
    }

    /// Ends the session and reports it; with adaptive sizing, the next sessions' estimates
    /// of each drafter kind start where this one left them.
    pub fn finish(self, finish_reason: FinishReason) -> GenerationReport {
        if let Some(learning) = &self.config.learning {
            let mut learned = lock(learning);
            for (kind, stats) in self.drafter_kinds.iter().zip(&self.stats) {
                if stats.proposed > 0 {
                    learned
                        .acceptance
                        .insert(kind.clone(), stats.carried_over());
                }
            }
        }
        GenerationReport {
            tokens: self.output,
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            finish_reason,
            steps: self.steps,
            prompt_time: self.prompt_time,
            decode_time: self
                .decode_started
                .map_or(Duration::ZERO, |started| started.elapsed()),
            step_times: self.step_times,
            drafters: self
                .drafter_kinds
                .into_iter()
                .zip(&self.stats)
                .zip(&self.calls)
                .map(|((kind, s), calls)| DrafterReport {
                    kind,
                    proposed: s.proposed,
                    accepted: s.accepted,
                    asked: calls.asked,
                    drafting_time: calls.drafting_time,
                })
                .collect(),
            seed: self.config.sampling.seed,
        }
    }

    /// Log-probabilities of the last step's tokens (what it returned, stop tokens left out),
    /// when [`GenerationConfig::logprobs`] asked for them; else empty.
    pub fn step_logprobs(&self) -> &[TokenLogprobs] {
        &self.step_logprobs
    }

    /// With [`GenerationConfig::logprobs`]: each of `tokens`' log-probabilities in the
    /// logits row `rows[i]` of `logits` it was chosen from.
    fn logprobs_of(
        &self,
        tokens: &[TokenId],
        rows: &[usize],
        logits: &[f32],
    ) -> Vec<TokenLogprobs> {
        let Some(top) = self.config.logprobs else {
            return Vec::new();
        };
        let vocab = self.vocab_size;
        tokens
            .iter()
            .zip(rows)
            .filter_map(|(&token, &row)| {
                let logits = logits.get(row * vocab..(row + 1) * vocab)?;
                Some(TokenLogprobs::new(logits, token, top))
            })
            .collect()
    }

    /// Tells the constraint, if any, what a step chose (all of it: what [`Session::emit`]
    /// cuts off ends the session).
    fn record(&mut self, tokens: &[TokenId]) -> Result<(), GenerateError> {
        match self.constraint() {
            Some(constraint) => constraint
                .record(tokens)
                .map_err(|e| SamplingError::Constraint(e).into()),
            None => Ok(()),
        }
    }

    /// Appends a step's tokens up to a stop token or the token limit.
    fn emit(&mut self, tokens: &[TokenId]) -> Step {
        let mut finish = None;
        let mut take = tokens.len();
        if let Some(stop) = tokens
            .iter()
            .position(|t| self.config.stop_tokens.contains(t))
        {
            take = stop;
            finish = Some(FinishReason::Stop);
        }
        let room = self.config.max_tokens - self.output.len();
        if take >= room {
            take = room;
            finish = Some(finish.unwrap_or(FinishReason::Length));
        }
        let accepted = &tokens[..take];
        self.step_logprobs.truncate(take);
        self.output.extend_from_slice(accepted);
        self.context.extend_from_slice(accepted);
        self.history.extend(accepted);
        if finish.is_none() && self.context.len() >= self.context_length {
            finish = Some(FinishReason::Length);
        }
        Step {
            tokens: accepted.to_vec(),
            finish,
        }
    }
}

/// `constraints` as one, if there are any.
fn as_one(constraints: &mut Vec<Box<dyn TokenConstraint>>) -> Option<&mut dyn TokenConstraint> {
    match constraints.is_empty() {
        true => None,
        false => Some(constraints),
    }
}

/// `proposals` cut where `constraint` forbids a token: such a draft token could never be
/// accepted, and its row would be computed for nothing.
fn allowed(
    proposals: Vec<(DrafterId, Vec<Proposal>)>,
    constraint: &mut dyn TokenConstraint,
) -> Vec<(DrafterId, Vec<Proposal>)> {
    proposals
        .into_iter()
        .map(|(id, drafts)| {
            let drafts = drafts
                .into_iter()
                .filter_map(|mut proposal| {
                    let keep = constraint.allowed_prefix(&proposal.tokens);
                    proposal.tokens.truncate(keep);
                    if let Some(probs) = &mut proposal.probs {
                        probs.truncate(keep);
                    }
                    (keep > 0).then_some(proposal)
                })
                .collect();
            (id, drafts)
        })
        .collect()
}

/// Prompt tokens for one forward pass ([`Session::prompt_chunk`]).
#[derive(Debug, Clone)]
pub struct PromptChunk {
    pub input: TreeInput,
    /// Logits of the last token after the prompt's last chunk, else none.
    pub rows: LogitRows,
}

/// A verify step planned by [`Session::plan`]: its token tree, to be cut to the draft nodes
/// the step can afford and computed.
#[derive(Debug)]
pub struct PlannedStep {
    tree: TokenTree,
    /// Chance of acceptance of each draft node, in node order (best first).
    values: Vec<f64>,
    branches: Vec<BranchOrigin>,
    /// Context length before the step.
    context: usize,
    prefix_len: usize,
    adaptive: bool,
    explore: bool,
}

impl PlannedStep {
    /// Estimated chance of acceptance of each draft node, best first: every prefix is a tree.
    pub fn draft_values(&self) -> &[f64] {
        &self.values
    }

    /// Whether the step's size is chosen from measured costs (else it verifies every node).
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    /// Whether the step verifies at least one draft node whatever it is worth (a drafter is
    /// being probed, or many steps in a row verified none).
    pub fn explore(&self) -> bool {
        self.explore
    }

    /// Context length before the step.
    pub fn context(&self) -> usize {
        self.context
    }

    /// Keeps the first `nodes` draft nodes (0: a plain step).
    pub fn keep_drafts(&mut self, nodes: usize) {
        self.tree.truncate(nodes + 1);
    }

    /// Rows of its forward pass: the root and the draft nodes kept.
    pub fn rows(&self) -> usize {
        self.tree.len()
    }

    /// Tokens the step is expected to give: the root's, and each kept draft node's chance.
    pub fn expected_tokens(&self) -> f64 {
        1.0 + self.values.iter().take(self.rows() - 1).sum::<f64>()
    }

    /// The input of its forward pass.
    pub fn input(&self) -> TreeInput {
        TreeInput::tree(self.tree.tokens(), self.tree.parents())
    }
}

pub(crate) fn lock(learning: &SharedLearning) -> std::sync::MutexGuard<'_, Learned> {
    learning.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a branch of a step's tree came from.
#[derive(Debug)]
struct BranchOrigin {
    drafter: usize,
    /// Its place among its drafter's proposals (0: the best).
    rank: usize,
    evidence: u32,
}

/// Credits each drafter with its nodes in the tree and those the target accepted, and
/// teaches its estimates: every proposal of a node whose parent was accepted (a child of the
/// root or of an accepted node) is an observation at that depth, accepted or not.
fn record(
    tree: &TokenTree,
    path: &[usize],
    branches: &[BranchOrigin],
    stats: &mut [AcceptanceStats],
) {
    let mut proposed = vec![0usize; stats.len()];
    let mut accepted = vec![0usize; stats.len()];
    let on_path = |node: usize| node == 0 || path.contains(&node);
    for (index, node) in tree.nodes().iter().enumerate().skip(1) {
        let Some(DrafterId(source)) = node.source else {
            continue;
        };
        let taken = on_path(index);
        proposed[source] += 1;
        accepted[source] += usize::from(taken);
        if !node.parent.is_some_and(on_path) {
            continue;
        }
        for candidate in &node.candidates {
            if let Some(origin) = branches.get(candidate.branch) {
                if let Some(s) = stats.get_mut(origin.drafter) {
                    s.observe(origin.rank, origin.evidence, node.depth, taken);
                }
            }
        }
    }
    for (d, s) in stats.iter_mut().enumerate() {
        s.count(proposed[d], accepted[d]);
    }
}
