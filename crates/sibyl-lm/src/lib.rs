//! A small language model as a drafter: Qwen2.5-Coder-0.5B drafting for the 1.5B target
//! (one tokenizer), greedily, with a KV cache of its own.
//!
//! The cache follows the context it is asked about: tokens it already holds (the prompt, the
//! accepted tokens, its own earlier drafts that were accepted) are not computed again; on a
//! rejection it is truncated to the common prefix and goes on from there (a rebase). Thanks
//! to the engine's batch invariance the drafts after a rebase are exactly those of a drafter
//! started from scratch on the same context.
//!
//! Each block stops early when the drafter's own probability of its next token falls below
//! [`LmConfig::min_confidence`], and the block length follows how many of its recent draft
//! tokens were accepted.

use sibyl_engine::{EngineError, KvCache, LogitRows, Model, TreeInput};
use sibyl_spec::{Drafter, Proposal, TokenId};
use std::sync::Arc;

/// Limits of the LM drafter.
#[derive(Debug, Clone, PartialEq)]
pub struct LmConfig {
    /// Longest block (the verifier's depth limit applies too).
    pub max_tokens: usize,
    /// A block stops before a token whose probability under the drafter is below this
    /// (its first token is always drafted).
    pub min_confidence: f32,
    /// Follow recent acceptance: a block is about two tokens longer than the drafts the
    /// target accepted lately. Off: always `max_tokens`.
    pub adapt_length: bool,
    /// Context tokens computed per forward pass when catching up (a prompt).
    pub chunk: usize,
}

impl Default for LmConfig {
    fn default() -> Self {
        Self {
            max_tokens: 8,
            min_confidence: 0.3,
            adapt_length: true,
            chunk: 256,
        }
    }
}

/// Weight of the newest block in the moving average of accepted draft tokens.
const SMOOTHING: f64 = 0.3;

/// A drafter running a small model in this process. One per session (it holds a cache).
pub struct LmDrafter {
    model: Arc<Model>,
    config: LmConfig,
    cache: KvCache,
    /// The tokens whose keys and values are in `cache`, in order.
    cached: Vec<TokenId>,
    /// The last block: the context length it followed and its tokens.
    last: Option<(usize, Vec<TokenId>)>,
    /// Moving average of how many tokens of a block were accepted.
    accepted: f64,
}

impl LmDrafter {
    pub fn new(model: Arc<Model>, config: LmConfig) -> Self {
        let cache = model.new_cache();
        let accepted = config.max_tokens as f64 / 2.0;
        Self {
            model,
            config,
            cache,
            cached: Vec::new(),
            last: None,
            accepted,
        }
    }

    /// The length of the next block.
    pub fn block_length(&self) -> usize {
        let max = self.config.max_tokens.max(1);
        if !self.config.adapt_length {
            return max;
        }
        ((self.accepted.round() as usize) + 2).clamp(1, max)
    }

    /// Tokens of `context` that are in the cache (computed, not redrafted).
    pub fn cached_len(&self) -> usize {
        self.cached.len()
    }

    /// Counts how many tokens of the last block `context` kept.
    fn observe(&mut self, context: &[TokenId]) {
        let Some((at, block)) = self.last.take() else {
            return;
        };
        if context.len() <= at || context.get(..at).is_none() {
            return;
        }
        let kept = context[at..]
            .iter()
            .zip(&block)
            .take_while(|(a, b)| a == b)
            .count();
        self.accepted += SMOOTHING * (kept as f64 - self.accepted);
    }

    /// Brings the cache to `context` minus its last token and returns the logits after the
    /// whole context: the common prefix with what is cached is kept, the rest computed.
    fn catch_up(&mut self, context: &[TokenId]) -> Result<Vec<f32>, EngineError> {
        let common = self
            .cached
            .iter()
            .zip(context)
            .take_while(|(a, b)| a == b)
            .count()
            // The last token is fed again to get the logits after it.
            .min(context.len() - 1);
        self.cache.truncate(common);
        self.cached.truncate(common);
        let rest = &context[common..];
        let mut logits = Vec::new();
        let chunks = rest.chunks(self.config.chunk.max(1));
        let count = chunks.len();
        for (i, chunk) in chunks.enumerate() {
            let rows = if i + 1 == count {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            logits = self
                .model
                .forward(&mut self.cache, &TreeInput::chain(chunk), rows)?;
            self.cached.extend_from_slice(chunk);
        }
        Ok(logits)
    }

    fn draft(&mut self, context: &[TokenId], length: usize) -> Result<Vec<TokenId>, EngineError> {
        let mut logits = self.catch_up(context)?;
        let mut tokens = Vec::with_capacity(length);
        while tokens.len() < length {
            let (token, probability) = most_likely(&logits);
            if !tokens.is_empty() && probability < self.config.min_confidence {
                break;
            }
            tokens.push(token);
            if tokens.len() == length {
                break;
            }
            logits = self.model.forward(
                &mut self.cache,
                &TreeInput::chain(&[token]),
                LogitRows::Last,
            )?;
            self.cached.push(token);
        }
        Ok(tokens)
    }
}

/// The most likely token of `logits` and its probability (softmax). Ties and NaNs as in
/// [`sibyl_spec::argmax`].
fn most_likely(logits: &[f32]) -> (TokenId, f32) {
    let token = sibyl_spec::argmax(logits);
    let best = logits.get(token as usize).copied().unwrap_or(0.0);
    let total: f32 = logits
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| (v - best).exp())
        .sum();
    let probability = if total > 0.0 { 1.0 / total } else { 0.0 };
    (token, probability)
}

impl Drafter for LmDrafter {
    fn kind(&self) -> &str {
        "lm"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.observe(context);
        let room = self
            .model
            .config()
            .context_length
            .saturating_sub(context.len() + 1);
        let length = self.block_length().min(max_tokens).min(room);
        if context.is_empty() || length == 0 {
            return Vec::new();
        }
        if context
            .iter()
            .any(|&t| t as usize >= self.model.vocab_size())
        {
            return Vec::new();
        }
        match self.draft(context, length) {
            Ok(tokens) if !tokens.is_empty() => {
                self.last = Some((context.len(), tokens.clone()));
                vec![Proposal::greedy(tokens)]
            }
            Ok(_) => Vec::new(),
            // A draft is only a guess: on a model error, start over next time.
            Err(_) => {
                self.cache.truncate(0);
                self.cached.clear();
                Vec::new()
            }
        }
    }
}
