use crate::continuations::frequent_continuations;
use crate::datastore::Datastore;
use crate::TokenId;
use sibyl_spec::{Drafter, Proposal};
use std::sync::Arc;

/// Limits of the retrieval drafter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrievalConfig {
    /// Longest context suffix looked up.
    pub max_suffix: usize,
    /// Shortest context suffix looked up (at least 1).
    pub min_suffix: usize,
    /// Most branches proposed per call.
    pub max_branches: usize,
    /// Most occurrences read per lookup, spread evenly over all of them: bounds the work on
    /// a suffix that occurs everywhere.
    pub max_matches: usize,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            max_suffix: 16,
            min_suffix: 2,
            max_branches: 3,
            max_matches: 512,
        }
    }
}

/// One continuation: its tokens, how many occurrences of the context suffix support its
/// first token, and the length of that suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Continuation {
    pub tokens: Vec<TokenId>,
    pub support: usize,
    pub matched: usize,
}

/// The continuations of the longest suffix of `context` (from `max_suffix` tokens down to
/// `min_suffix`) that occurs in `store`: the occurrences' next tokens, counted in a trie,
/// become up to `max_branches` branches, most frequent first token first; each branch
/// follows the most frequent next token while at least two occurrences agree (or there is
/// only one occurrence), for at most `max_tokens` tokens.
pub fn lookup(
    store: &Datastore,
    context: &[TokenId],
    max_tokens: usize,
    config: &RetrievalConfig,
) -> Vec<Continuation> {
    if max_tokens == 0 || config.max_branches == 0 {
        return Vec::new();
    }
    let text = store.text();
    let separator = store.separator();
    let min_suffix = config.min_suffix.max(1);
    for length in (min_suffix..=config.max_suffix.min(context.len())).rev() {
        let suffix = &context[context.len() - length..];
        let range = store.find(suffix);
        if range.is_empty() {
            continue;
        }
        let occurrences = range.len();
        let reads = occurrences.min(config.max_matches.max(1));
        // Evenly spread over the range: every rank when there are few.
        let followers = (0..reads)
            .filter_map(|i| store.position(range.start + i * occurrences / reads))
            .map(|position| {
                let follow = (position + length).min(text.len());
                let end = (follow + max_tokens).min(text.len());
                let continuation = &text[follow..end];
                let cut = continuation
                    .iter()
                    .position(|&t| t == separator)
                    .unwrap_or(continuation.len());
                &continuation[..cut]
            });
        let branches: Vec<Continuation> = frequent_continuations(followers, config.max_branches)
            .into_iter()
            .map(|(tokens, support)| Continuation {
                tokens,
                support,
                matched: length,
            })
            .collect();
        if !branches.is_empty() {
            return branches;
        }
    }
    Vec::new()
}

/// Drafts from one or more datastores (REST): the continuations of every store, the best
/// supported first.
#[derive(Debug, Clone)]
pub struct RetrievalDrafter {
    stores: Vec<Arc<Datastore>>,
    config: RetrievalConfig,
}

impl RetrievalDrafter {
    pub fn new(stores: Vec<Arc<Datastore>>, config: RetrievalConfig) -> Self {
        Self { stores, config }
    }
}

impl Drafter for RetrievalDrafter {
    fn kind(&self) -> &str {
        "retrieval"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let mut all: Vec<Continuation> = self
            .stores
            .iter()
            .flat_map(|store| lookup(store, context, max_tokens, &self.config))
            .collect();
        // Stable: among equals, earlier stores and earlier branches first.
        all.sort_by_key(|c| std::cmp::Reverse(c.support));
        all.into_iter()
            .take(self.config.max_branches)
            .map(|c| Proposal::greedy(c.tokens).with_evidence(c.matched as u32))
            .collect()
    }
}
