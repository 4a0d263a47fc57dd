use sibyl_engine::{EngineError, LogitRows, Model, TreeInput};
use sibyl_spec::{
    verify, AcceptanceStats, Drafter, DrafterId, SamplingConfig, SamplingError, TokenId, TokenTree,
    TreeBuilder,
};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Prompt tokens processed per forward pass.
const PROMPT_CHUNK: usize = 256;

/// Trust in a drafter's second, third... proposal relative to the one before.
const ALTERNATIVE_DISCOUNT: f64 = 0.5;

/// Parameters of one generation.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens to generate (stop tokens excluded).
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Most draft nodes verified per step (the tree budget).
    pub draft_budget: usize,
    /// Most draft tokens on one branch.
    pub max_draft_depth: usize,
    /// Draft nodes whose estimated chance of acceptance is below this are not verified...
    pub min_draft_value: f64,
    /// ...except the this many most likely ones (at least one), which cost little to verify.
    pub exempt_draft_nodes: usize,
    /// Tokens that end the generation; they are not emitted.
    pub stop_tokens: Vec<TokenId>,
}

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
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("model: {0}")]
    Engine(#[from] EngineError),
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
}

/// What a generation produced and how.
#[derive(Debug, Clone)]
pub struct GenerationReport {
    pub tokens: Vec<TokenId>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// Verify steps (forward passes after the prompt), the first token's included.
    pub steps: usize,
    pub prompt_time: Duration,
    pub decode_time: Duration,
    /// Duration of each verify step (draft, forward, verify, cache update).
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

    /// Generated tokens per second of decoding, prompt processing excluded.
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.decode_time.as_secs_f64();
        if secs > 0.0 {
            self.tokens.len() as f64 / secs
        } else {
            0.0
        }
    }
}

/// Generates from `prompt` with `model`, speculating with `drafters` (none: plain decoding).
/// `on_tokens` receives the tokens of each step as soon as they are accepted and may stop
/// the generation by returning `ControlFlow::Break`.
pub fn generate(
    model: &Model,
    prompt: &[TokenId],
    config: &GenerationConfig,
    drafters: &mut [Box<dyn Drafter>],
    mut on_tokens: impl FnMut(&[TokenId]) -> ControlFlow<()>,
) -> Result<GenerationReport, GenerateError> {
    config.sampling.validate()?;
    let vocab = model.vocab_size();
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

    let started = Instant::now();
    let mut cache = model.new_cache();
    let chunks: Vec<&[TokenId]> = prompt.chunks(PROMPT_CHUNK).collect();
    let mut logits = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let rows = if i + 1 == chunks.len() {
            LogitRows::Last
        } else {
            LogitRows::None
        };
        logits = model.forward(&mut cache, &TreeInput::chain(chunk), rows)?;
    }
    let prompt_time = started.elapsed();

    let decode_started = Instant::now();
    let mut stats = vec![AcceptanceStats::default(); drafters.len()];
    let mut context = prompt.to_vec();
    let mut output: Vec<TokenId> = Vec::new();
    let mut step_times = Vec::new();
    // The first token comes from the prompt's last logits: a root-only step.
    let first = verify(
        &TokenTree::root_only(*context.last().unwrap_or(&0)),
        &logits,
        vocab,
        &config.sampling,
        prompt.len() - 1,
    )?;
    let mut steps = 1;
    step_times.push(decode_started.elapsed());
    let mut finish = emit(
        &[first.next_token],
        config,
        &mut output,
        &mut context,
        &mut on_tokens,
    );

    while finish.is_none() {
        if context.len() >= limit {
            finish = Some(FinishReason::Length);
            break;
        }
        let step_started = Instant::now();
        let root = *context.last().unwrap_or(&0);
        let room = limit - context.len();
        let depth = config.max_draft_depth.min(room.saturating_sub(1));
        let mut builder = TreeBuilder::new(root, vocab, config.draft_budget, depth)
            .with_min_value(config.min_draft_value, config.exempt_draft_nodes);
        if depth > 0 && config.draft_budget > 0 {
            for (i, drafter) in drafters.iter_mut().enumerate() {
                // A drafter lists its best guess first; each later branch is trusted less.
                let mut score = stats[i].rate();
                for proposal in drafter.propose(&context, depth) {
                    builder.add(DrafterId(i), score, proposal);
                    score *= ALTERNATIVE_DISCOUNT;
                }
            }
        }
        let tree = builder.build();
        let prefix_len = cache.len();
        let input = TreeInput::tree(tree.tokens(), tree.parents());
        let logits = model.forward(&mut cache, &input, LogitRows::All)?;
        let outcome = verify(&tree, &logits, vocab, &config.sampling, prefix_len)?;
        let mut kept = vec![0];
        kept.extend_from_slice(&outcome.path);
        cache.keep_path(prefix_len, tree.len(), &kept)?;
        record(&tree, &outcome.path, &mut stats);
        steps += 1;
        step_times.push(step_started.elapsed());
        finish = emit(
            &outcome.emitted(&tree),
            config,
            &mut output,
            &mut context,
            &mut on_tokens,
        );
    }

    Ok(GenerationReport {
        tokens: output,
        prompt_tokens: prompt.len(),
        finish_reason: finish.unwrap_or(FinishReason::Length),
        steps,
        prompt_time,
        decode_time: decode_started.elapsed(),
        step_times,
        drafters: drafters
            .iter()
            .zip(&stats)
            .map(|(d, s)| DrafterReport {
                kind: d.kind().to_string(),
                proposed: s.proposed,
                accepted: s.accepted,
            })
            .collect(),
        seed: config.sampling.seed,
    })
}

/// Credits each drafter with its nodes in the tree, with the levels of the accepted path
/// where it had a guess (a child of the root or of an accepted node), and with those levels
/// where its guess was the one accepted.
fn record(tree: &TokenTree, path: &[usize], stats: &mut [AcceptanceStats]) {
    let mut proposed = vec![0usize; stats.len()];
    let mut reached = vec![0usize; stats.len()];
    let mut accepted = vec![0usize; stats.len()];
    for node in &tree.nodes()[1..] {
        if let Some(DrafterId(d)) = node.source {
            proposed[d] += 1;
        }
    }
    let levels = std::iter::once(0).chain(path.iter().copied());
    for (level, parent) in levels.enumerate() {
        let chosen = path.get(level).copied();
        let mut guessed = vec![false; stats.len()];
        for child in tree.children(parent) {
            if let Some(DrafterId(d)) = tree.nodes()[child].source {
                guessed[d] = true;
            }
        }
        for (d, &g) in guessed.iter().enumerate() {
            if g {
                reached[d] += 1;
            }
        }
        if let Some(DrafterId(d)) = chosen.and_then(|c| tree.nodes()[c].source) {
            accepted[d] += 1;
        }
    }
    for (d, s) in stats.iter_mut().enumerate() {
        if proposed[d] > 0 {
            s.record(proposed[d], reached[d], accepted[d]);
        }
    }
}

/// Appends a step's tokens up to a stop token or the token limit; says if generation ends.
fn emit(
    tokens: &[TokenId],
    config: &GenerationConfig,
    output: &mut Vec<TokenId>,
    context: &mut Vec<TokenId>,
    on_tokens: &mut impl FnMut(&[TokenId]) -> ControlFlow<()>,
) -> Option<FinishReason> {
    let mut finish = None;
    let mut take = tokens.len();
    if let Some(stop) = tokens.iter().position(|t| config.stop_tokens.contains(t)) {
        take = stop;
        finish = Some(FinishReason::Stop);
    }
    let room = config.max_tokens - output.len();
    if take >= room {
        take = room;
        finish = Some(finish.unwrap_or(FinishReason::Length));
    }
    let accepted = &tokens[..take];
    output.extend_from_slice(accepted);
    context.extend_from_slice(accepted);
    if !accepted.is_empty() && on_tokens(accepted).is_break() {
        return Some(FinishReason::Cancelled);
    }
    finish
}
