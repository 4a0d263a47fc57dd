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

/// A trie node: a token, how many continuations pass through it, its children.
struct TrieNode {
    token: TokenId,
    count: usize,
    children: Vec<usize>,
}

/// The most frequent continuations among `followers` (what followed each occurrence of a
/// match), counted in a trie: up to `max_branches` branches, the most frequent first token
/// first, each following the most frequent next token while at least two followers agree
/// (or there is only one follower). Each branch comes with how many followers start with
/// its first token.
pub(crate) fn frequent_continuations<'a>(
    followers: impl IntoIterator<Item = &'a [TokenId]>,
    max_branches: usize,
) -> Vec<(Vec<TokenId>, usize)> {
    let mut trie = vec![TrieNode {
        token: 0,
        count: 0,
        children: Vec::new(),
    }];
    for follower in followers {
        let mut node = 0;
        trie[0].count += 1;
        for &token in follower {
            let child = trie[node]
                .children
                .iter()
                .copied()
                .find(|&c| trie[c].token == token);
            node = match child {
                Some(c) => c,
                None => {
                    trie.push(TrieNode {
                        token,
                        count: 0,
                        children: Vec::new(),
                    });
                    let c = trie.len() - 1;
                    trie[node].children.push(c);
                    c
                }
            };
            trie[node].count += 1;
        }
    }
    let min_support = if trie[0].count == 1 { 1 } else { 2 };
    let mut firsts = trie[0].children.clone();
    firsts.sort_by_key(|&c| std::cmp::Reverse(trie[c].count));
    firsts
        .into_iter()
        .take(max_branches)
        .map(|first| {
            let mut tokens = vec![trie[first].token];
            let mut node = first;
            while let Some(&next) = trie[node]
                .children
                .iter()
                .max_by_key(|&&c| (trie[c].count, std::cmp::Reverse(c)))
            {
                if trie[next].count < min_support {
                    break;
                }
                tokens.push(trie[next].token);
                node = next;
            }
            (tokens, trie[first].count)
        })
        .collect()
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
