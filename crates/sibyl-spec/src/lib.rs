//! The speculative algorithm of sibyl, as plain data and pure functions.
//!
//! Drafters propose token blocks ([`Proposal`]); [`TreeBuilder`] merges them into one
//! [`TokenTree`] (shared prefixes once) cut to a node budget; the target model scores every
//! node; [`verify`] walks the tree and returns the accepted path plus the target's own next
//! token ([`Outcome`]). Greedy verification is exact argmax matching; sampled verification is
//! lossless rejection sampling (point-mass drafts: "sample the target, accept on match";
//! drafts with probabilities: `min(1, p/q)` with residual resampling, siblings in turn).
//!
//! Nothing here knows about models, threads or the network: every rule can be tested with
//! hand-made numbers.

mod acceptance;
mod constraint;
mod cost;
mod inbox;
mod logprobs;
mod penalties;
mod sampling;
pub mod stats;
mod tree;
mod verify;

pub use acceptance::AcceptanceStats;
pub use constraint::{MinTokens, TokenConstraint, JSON_WHITESPACE};
pub use cost::{
    choose_batch_draft_nodes, choose_draft_length, choose_draft_nodes, BatchDrafts, DraftCosts,
    StepCosts, MIN_GAIN,
};
pub use inbox::{AnchoredBlock, BlockRejection, DraftInbox, InboxLimits};
pub use logprobs::{TokenLogprobs, MAX_TOP_LOGPROBS};
pub use penalties::{
    Penalties, PenaltyError, TokenHistory, MAX_BIASED_TOKENS, MAX_LOGIT_BIAS, MAX_PENALTY,
    MAX_REPETITION_PENALTY,
};
pub use sampling::{argmax, SamplingConfig, SamplingError, TargetDistribution};
pub use tree::{Candidate, Node, Proposal, SparseDist, TokenTree, TreeBuilder, TreeLimits};
pub use verify::{verify, Outcome, PositionRng};

/// A token id of the target model's vocabulary.
pub type TokenId = u32;

/// Index of a drafter in the session's list of drafters (low-cardinality, stable per session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DrafterId(pub usize);

/// Something that proposes continuations of a token context, in process.
///
/// Drafters in the verifier's own process implement it; a remote drafter (the drafter role)
/// streams blocks that the verifier turns into the same proposals. Either way the decode
/// loop only sees proposals, which it treats as untrusted input.
pub trait Drafter: Send {
    /// Short, low-cardinality name of the drafter kind (`ngram`, `retrieval`, `suffix`, `lm`).
    fn kind(&self) -> &str;

    /// Proposes continuations of `context` (the whole sequence so far, prompt included).
    /// At most `max_tokens` tokens per branch are useful; longer branches are cut.
    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal>;

    /// Does what [`Drafter::propose`] would first do to follow `context` (a small model
    /// computes its cache for the tokens it has not seen, and its next token's logits), so
    /// that its cost can be measured apart from drafting. Returns how many context tokens
    /// it computed; nothing to do (0) for drafters without such work.
    fn catch_up(&mut self, _context: &[TokenId]) -> usize {
        0
    }

    /// The session ended with `context` (prompt and every accepted token): what a drafter
    /// that learns from finished generations keeps. Nothing to do for most drafters.
    fn finish(&mut self, _context: &[TokenId]) {}
}
