//! A small language model as a drafter: Qwen2.5-Coder-0.5B drafting for the 1.5B target
//! (one tokenizer), with a KV cache of its own. It drafts its most likely tokens (point
//! masses for the verifier), or with a temperature it samples from its own distribution cut
//! to the top k and sends that distribution with each token, so that the verifier's
//! rejection sampling (`min(1, p/q)`, residual `max(0, p - q)`) stays exact.
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

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sibyl_engine::{EngineError, KvCache, LogitRows, Model, TreeInput};
use sibyl_spec::{Drafter, Proposal, SparseDist, TokenId};
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
    /// 0: draft the most likely token. Above 0: sample at this temperature from the
    /// drafter's `top_k` most likely tokens and send that distribution with the token.
    pub temperature: f32,
    /// Tokens in a sampled draft's distribution.
    pub top_k: usize,
    /// Seed of the sampling; the draws after a context depend only on it and the context,
    /// so a seeded generation is reproducible.
    pub seed: u64,
}

impl Default for LmConfig {
    fn default() -> Self {
        Self {
            max_tokens: 8,
            min_confidence: 0.3,
            adapt_length: true,
            chunk: 256,
            temperature: 0.0,
            top_k: 8,
            seed: 0,
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
    /// The last block: the context length it followed, its tokens, and whether the caller
    /// asked for fewer tokens than the block length.
    last: Option<(usize, Vec<TokenId>, bool)>,
    /// Moving average of how many tokens of a block were accepted.
    accepted: f64,
    /// Logits after the whole cache, computed by [`Drafter::catch_up`] and not yet used.
    ready: Option<Vec<f32>>,
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
            ready: None,
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

    /// Forgets everything computed.
    fn reset(&mut self) {
        self.cache.truncate(0);
        self.cached.clear();
        self.ready = None;
    }

    /// Draft tokens that fit in the drafter's context window after `context`.
    fn room(&self, context: &[TokenId]) -> usize {
        self.model
            .config()
            .context_length
            .saturating_sub(context.len() + 1)
    }

    /// Whether every token of `context` is in the drafter's vocabulary.
    fn vocabulary_holds(&self, context: &[TokenId]) -> bool {
        let vocab = self.model.vocab_size();
        context.iter().all(|&t| (t as usize) < vocab)
    }

    /// Tokens of `context` that are in the cache (computed, not redrafted).
    pub fn cached_len(&self) -> usize {
        self.cached.len()
    }

    /// Counts how many tokens of the last block `context` kept.
    fn observe(&mut self, context: &[TokenId]) {
        let Some((at, block, cut)) = self.last.take() else {
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
        // A block the caller asked to be shorter than ours, kept whole, does not say how
        // much of a longer one would have been.
        if cut && kept == block.len() {
            return;
        }
        self.accepted += SMOOTHING * (kept as f64 - self.accepted);
    }

    /// Brings the cache to `context` and returns the logits after it, with the number of
    /// context tokens computed: the common prefix with what is cached is kept, the rest
    /// computed (the last token again when the cache holds it all, to get the logits; they
    /// are kept, so a [`Drafter::catch_up`] followed by [`Drafter::propose`] on the same
    /// context computes nothing twice).
    fn catch_up_to(&mut self, context: &[TokenId]) -> Result<(Vec<f32>, usize), EngineError> {
        if let Some(logits) = self.ready.take() {
            if self.cached == context {
                return Ok((logits, 0));
            }
        }
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
        Ok((logits, rest.len()))
    }

    /// A block after `context`: its tokens and, when sampling, the distribution each was
    /// drawn from.
    fn draft(&mut self, context: &[TokenId], length: usize) -> Result<Proposal, EngineError> {
        let (mut logits, _) = self.catch_up_to(context)?;
        let sampling = self.config.temperature > 0.0;
        let mut rng = ChaCha8Rng::seed_from_u64(context_seed(self.config.seed, context));
        let mut tokens = Vec::with_capacity(length);
        let mut dists = Vec::with_capacity(if sampling { length } else { 0 });
        let mut first_probability = 0.0f32;
        while tokens.len() < length {
            let (token, probability) = if sampling {
                let Some(dist) = top_k(&logits, self.config.temperature, self.config.top_k) else {
                    break;
                };
                let token = draw(&dist, &mut rng);
                let probability = dist.prob(token);
                if !tokens.is_empty() && probability < self.config.min_confidence {
                    break;
                }
                dists.push(dist);
                (token, probability)
            } else {
                most_likely(&logits)
            };
            if !sampling && !tokens.is_empty() && probability < self.config.min_confidence {
                break;
            }
            if tokens.is_empty() {
                first_probability = probability;
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
        Ok(Proposal {
            tokens,
            probs: sampling.then_some(dists),
            // Its confidence in the first token, in sixteenths.
            evidence: (first_probability.clamp(0.0, 1.0) * EVIDENCE_SCALE) as u32,
        })
    }
}

/// The drafter's confidence in a block's first token, a probability, is sent as evidence
/// in steps of 1/16.
const EVIDENCE_SCALE: f32 = 16.0;

/// A seed for the draws after `context`: the configured seed mixed with the context length
/// and its last tokens (splitmix64 steps).
fn context_seed(seed: u64, context: &[TokenId]) -> u64 {
    let mut state = seed ^ (context.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &token in context.iter().rev().take(8) {
        state = (state ^ u64::from(token)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        state = (state ^ (state >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        state = (state ^ (state >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        state ^= state >> 31;
    }
    state
}

/// The softmax at `temperature` of the `k` largest finite logits (ties to the lowest id),
/// the rest zero. `None` when no logit is finite.
pub fn top_k(logits: &[f32], temperature: f32, k: usize) -> Option<SparseDist> {
    let mut order: Vec<usize> = (0..logits.len())
        .filter(|&i| logits[i].is_finite())
        .collect();
    if order.is_empty() {
        return None;
    }
    let k = k.clamp(1, order.len());
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    if k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
        order.truncate(k);
    }
    let max = order
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / f64::from(temperature.max(1e-6));
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - f64::from(max)) * inv_t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let entries = order
        .iter()
        .zip(&weights)
        .map(|(&i, &w)| (i as TokenId, (w / total) as f32))
        .collect();
    SparseDist::new(entries)
}

/// A token drawn from `dist` (its probabilities as listed, normalised).
fn draw(dist: &SparseDist, rng: &mut impl Rng) -> TokenId {
    let entries = dist.entries();
    let total: f64 = entries.iter().map(|&(_, p)| f64::from(p)).sum();
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for &(token, p) in entries {
        acc += f64::from(p);
        if target < acc && p > 0.0 {
            return token;
        }
    }
    entries
        .iter()
        .rev()
        .find(|&&(_, p)| p > 0.0)
        .map_or(entries[0].0, |&(token, _)| token)
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

    fn catch_up(&mut self, context: &[TokenId]) -> usize {
        if context.is_empty() || self.room(context) == 0 || !self.vocabulary_holds(context) {
            return 0;
        }
        match self.catch_up_to(context) {
            Ok((logits, computed)) => {
                self.ready = Some(logits);
                computed
            }
            Err(_) => {
                self.reset();
                0
            }
        }
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.observe(context);
        let length = self.block_length().min(max_tokens).min(self.room(context));
        if context.is_empty() || length == 0 {
            return Vec::new();
        }
        if !self.vocabulary_holds(context) {
            return Vec::new();
        }
        let cut = max_tokens < self.block_length();
        match self.draft(context, length) {
            Ok(proposal) if !proposal.tokens.is_empty() => {
                self.last = Some((context.len(), proposal.tokens.clone(), cut));
                vec![proposal]
            }
            Ok(_) => Vec::new(),
            // A draft is only a guess: on a model error, start over next time.
            Err(_) => {
                self.reset();
                Vec::new()
            }
        }
    }
}
