//! Suffix drafting (SuffixDecoding): every finished generation, prompt and output, goes into
//! one index that all sessions share; a session's drafts come from the longest matches of
//! its context's suffix in that index and in its own context so far, the continuations of
//! all equally long matches counted into a tree of the most frequent ones.
//!
//! The index is a bounded token store with hash chains (as in LZ77 compressors): each
//! position links to the previous one that ends the same [`ANCHOR`] tokens, so the
//! occurrences of the context's last tokens are found newest first, and each is extended
//! backwards to its match length. Appending a document costs a hash insertion per token;
//! the oldest documents are evicted past [`SuffixConfig::max_tokens`].
//!
//! The index can be written to a snapshot file and read back ([`SuffixIndex::save`],
//! [`SuffixIndex::restore`]), and tells a listener of every generation that finishes in this
//! process ([`SuffixIndex::on_add`]), so that other processes can index it too
//! ([`SuffixIndex::add_shared`]).

mod snapshot;

pub use snapshot::{Saved, SnapshotError};

use crate::continuations::frequent_continuations;
use crate::TokenId;
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_spec::{Drafter, Proposal};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

/// Tokens a match starts from: occurrences are found by their last `ANCHOR` tokens.
pub const ANCHOR: usize = 3;

/// Ends every document in the store; no model has a token of this id.
const SEPARATOR: TokenId = TokenId::MAX;

/// Limits of suffix drafting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuffixConfig {
    /// Most tokens the shared index holds (documents and their separators); the oldest
    /// documents are evicted past it. A document longer than this keeps its last tokens.
    pub max_tokens: usize,
    /// Longest match measured (tokens); longer ones count as this long.
    pub max_match: usize,
    /// Most occurrences examined per call (the newest ones), in the index and in the
    /// session's own context each.
    pub max_matches: usize,
    /// Most branches proposed per call.
    pub max_branches: usize,
}

impl Default for SuffixConfig {
    fn default() -> Self {
        Self {
            max_tokens: 4 << 20,
            max_match: 64,
            max_matches: 256,
            max_branches: 3,
        }
    }
}

/// One place where the context's suffix occurs: how long the match is, and where what
/// followed it starts (a position in a [`Corpus`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Occurrence {
    matched: usize,
    follow: u64,
}

/// Documents of tokens, each ended by [`SEPARATOR`], with a hash chain through the
/// positions that end equal [`ANCHOR`]-token windows. Positions are global: they keep
/// counting as old documents are evicted.
#[derive(Debug, Default)]
struct Corpus {
    /// Tokens from global position `offset` on; those before `start` are evicted and
    /// dropped at the next compaction.
    tokens: Vec<TokenId>,
    /// Per token: how far back the previous position ending the same window is (0: none).
    chain: Vec<u32>,
    /// Per window: the newest position that ends it.
    heads: HashMap<[TokenId; ANCHOR], u64>,
    offset: u64,
    start: u64,
    /// The global end (after its separator) of every closed document, oldest first.
    ends: VecDeque<u64>,
    /// Tokens since the last [`SEPARATOR`] (the open document).
    open: usize,
    /// Documents evicted so far.
    evicted: u64,
}

impl Corpus {
    /// Global position after the last token.
    fn end(&self) -> u64 {
        self.offset + self.tokens.len() as u64
    }

    /// Live tokens (evicted ones not counted).
    fn len(&self) -> usize {
        (self.end() - self.start) as usize
    }

    fn token(&self, position: u64) -> TokenId {
        self.tokens[(position - self.offset) as usize]
    }

    /// Appends `tokens` to the open document.
    fn extend(&mut self, tokens: &[TokenId]) {
        self.tokens.reserve(tokens.len());
        self.chain.reserve(tokens.len());
        for &token in tokens {
            let position = self.end();
            self.tokens.push(token);
            self.open += 1;
            let mut back = 0;
            if self.open >= ANCHOR {
                let at = self.tokens.len() - ANCHOR;
                let window: [TokenId; ANCHOR] = self.tokens[at..]
                    .try_into()
                    .expect("a slice of ANCHOR tokens");
                if let Some(previous) = self.heads.insert(window, position) {
                    back = u32::try_from(position - previous).unwrap_or(0);
                }
            }
            self.chain.push(back);
        }
    }

    /// Drops the open document's tokens from `len` (a global position) on, undoing their
    /// hash chain links newest first.
    fn truncate_open(&mut self, len: u64) {
        while self.end() > len && self.open > 0 {
            let position = self.end() - 1;
            if self.open >= ANCHOR {
                let at = self.tokens.len() - ANCHOR;
                let window: [TokenId; ANCHOR] = self.tokens[at..]
                    .try_into()
                    .expect("a slice of ANCHOR tokens");
                let back = self.chain[self.tokens.len() - 1];
                if back == 0 {
                    self.heads.remove(&window);
                } else {
                    self.heads.insert(window, position - u64::from(back));
                }
            }
            self.tokens.pop();
            self.chain.pop();
            self.open -= 1;
        }
    }

    /// Ends the open document.
    fn close(&mut self) {
        self.tokens.push(SEPARATOR);
        self.chain.push(0);
        self.open = 0;
        self.ends.push_back(self.end());
    }

    /// Evicts the oldest closed documents until at most `max` tokens are live, and drops
    /// what was evicted once it is a quarter of what is kept.
    fn evict(&mut self, max: usize) {
        while self.len() > max {
            let Some(end) = self.ends.pop_front() else {
                break;
            };
            self.start = end;
            self.evicted += 1;
        }
        let dead = (self.start - self.offset) as usize;
        if dead > 0 && dead >= self.tokens.len() / 4 {
            self.tokens.drain(..dead);
            self.chain.drain(..dead);
            self.offset = self.start;
            let start = self.start;
            self.heads.retain(|_, position| *position >= start);
        }
    }

    /// Where the suffix of `context` occurs, newest first, at most `max_matches` of them,
    /// each with its match length (up to `max_match`) and a non-empty continuation.
    fn occurrences(
        &self,
        context: &[TokenId],
        max_match: usize,
        max_matches: usize,
        found: &mut Vec<Occurrence>,
    ) {
        if context.len() < ANCHOR {
            return;
        }
        let window: [TokenId; ANCHOR] = context[context.len() - ANCHOR..]
            .try_into()
            .expect("a slice of ANCHOR tokens");
        let Some(&newest) = self.heads.get(&window) else {
            return;
        };
        let mut position = newest;
        for _ in 0..max_matches {
            if position < self.start {
                break;
            }
            let follow = position + 1;
            if follow < self.end() && self.token(follow) != SEPARATOR {
                found.push(Occurrence {
                    matched: self.match_length(context, position, max_match),
                    follow,
                });
            }
            let back = self.chain[(position - self.offset) as usize];
            if back == 0 {
                break;
            }
            position -= u64::from(back);
        }
    }

    /// How many tokens of `context`'s end equal those ending at `position` (at least the
    /// window, which the chain guarantees), up to `max_match`.
    fn match_length(&self, context: &[TokenId], position: u64, max_match: usize) -> usize {
        let mut matched = ANCHOR;
        while matched < max_match.min(context.len()) {
            let Some(at) = position.checked_sub(matched as u64) else {
                break;
            };
            if at < self.start || self.token(at) != context[context.len() - 1 - matched] {
                break;
            }
            matched += 1;
        }
        matched
    }

    /// What follows `follow`: up to `depth` tokens, to the end of its document.
    fn continuation(&self, follow: u64, depth: usize) -> impl Iterator<Item = TokenId> + '_ {
        let from = (follow - self.offset) as usize;
        self.tokens[from..]
            .iter()
            .copied()
            .take_while(|&t| t != SEPARATOR)
            .take(depth)
    }
}

/// What is told of every document a session of this process adds.
type Listener = Box<dyn Fn(&[TokenId]) + Send + Sync>;

/// The index every session of a process (or a drafter role) shares: finished generations,
/// prompt and output, newest kept.
pub struct SuffixIndex {
    corpus: RwLock<Corpus>,
    config: SuffixConfig,
    /// Documents added so far (by sessions, peers or a snapshot): what changed since a
    /// snapshot is told by this.
    added: AtomicU64,
    listener: OnceLock<Listener>,
}

impl std::fmt::Debug for SuffixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SuffixIndex")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What an index holds and has done, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SuffixStats {
    /// Tokens held (documents and their separators).
    pub tokens: usize,
    /// Documents held.
    pub documents: usize,
    /// Documents added since the index was made.
    pub added: u64,
    /// Documents evicted since the index was made.
    pub evicted: u64,
}

impl SuffixIndex {
    pub fn new(config: SuffixConfig) -> Self {
        Self {
            corpus: RwLock::new(Corpus::default()),
            config,
            added: AtomicU64::new(0),
            listener: OnceLock::new(),
        }
    }

    pub fn config(&self) -> &SuffixConfig {
        &self.config
    }

    /// Adds one document a session of this process finished (a prompt and what was
    /// generated after it), and tells the listener; the oldest documents go when the index
    /// is full. A document shorter than [`ANCHOR`] + 1 tokens could never propose anything
    /// and is not kept.
    pub fn add(&self, document: &[TokenId]) {
        if self.store(document) {
            if let Some(listener) = self.listener.get() {
                listener(document);
            }
        }
    }

    /// Adds a document another process finished (see [`SuffixIndex::on_add`]); the
    /// listener is not told. Says whether it was kept.
    pub fn add_shared(&self, document: &[TokenId]) -> bool {
        self.store(document)
    }

    /// `listener` is told of every document [`SuffixIndex::add`] keeps from now on (called
    /// on the adding thread: it should only queue the document). Only the first listener
    /// set is kept; says whether it was this one.
    pub fn on_add(&self, listener: impl Fn(&[TokenId]) + Send + Sync + 'static) -> bool {
        self.listener.set(Box::new(listener)).is_ok()
    }

    /// Keeps `document` (its newest tokens, if it is longer than the index); says whether it
    /// was kept. One holding the separator's id, which no vocabulary has, is not.
    fn store(&self, document: &[TokenId]) -> bool {
        if document.len() <= ANCHOR || document.contains(&SEPARATOR) {
            return false;
        }
        // Room for its separator; the newest tokens of one that would not fit.
        let keep = document.len().min(self.config.max_tokens.saturating_sub(1));
        let document = &document[document.len() - keep..];
        let mut corpus = self.corpus.write().unwrap_or_else(|e| e.into_inner());
        corpus.extend(document);
        corpus.close();
        corpus.evict(self.config.max_tokens);
        self.added.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Tokens held (documents and their separators).
    pub fn tokens(&self) -> usize {
        self.corpus.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Documents held.
    pub fn documents(&self) -> usize {
        let corpus = self.corpus.read().unwrap_or_else(|e| e.into_inner());
        corpus.ends.len()
    }

    /// A copy of the documents held, oldest first (the index is locked while they are
    /// copied: at most `max_tokens` tokens).
    pub fn held(&self) -> Vec<Vec<TokenId>> {
        let corpus = self.corpus.read().unwrap_or_else(|e| e.into_inner());
        let live = (corpus.start - corpus.offset) as usize;
        corpus.tokens[live..]
            .split(|&t| t == SEPARATOR)
            .filter(|d| !d.is_empty())
            .map(<[TokenId]>::to_vec)
            .collect()
    }

    /// What the index holds and has done.
    pub fn stats(&self) -> SuffixStats {
        let corpus = self.corpus.read().unwrap_or_else(|e| e.into_inner());
        SuffixStats {
            tokens: corpus.len(),
            documents: corpus.ends.len(),
            added: self.added.load(Ordering::Relaxed),
            evicted: corpus.evicted,
        }
    }
}

/// A session's suffix drafter: matches in the shared index and in the session's own
/// context; when the session ends (the drafter is dropped), its context joins the index.
#[derive(Debug)]
pub struct SuffixDrafter {
    shared: Arc<SuffixIndex>,
    /// The session's context so far, one open document.
    own: Corpus,
    /// Matches shorter than [`ANCHOR`] in the session's own context, where there is no
    /// longer one anywhere.
    short: NgramDrafter,
}

impl SuffixDrafter {
    pub fn new(shared: Arc<SuffixIndex>) -> Self {
        Self {
            shared,
            own: Corpus::default(),
            short: NgramDrafter::new(NgramConfig {
                max_ngram: ANCHOR - 1,
                min_ngram: 1,
                ..NgramConfig::default()
            }),
        }
    }

    /// Brings the session's own index up to `context`: it grows by accepted tokens, and a
    /// remote drafter's also by the drafts it assumes, dropped again when they are not
    /// accepted. What no longer matches is taken back, the rest kept.
    fn follow(&mut self, context: &[TokenId]) {
        let seen = &self.own.tokens;
        let common = if context.len() >= seen.len() && context[..seen.len()] == seen[..] {
            seen.len()
        } else {
            seen.iter().zip(context).take_while(|(a, b)| a == b).count()
        };
        self.own.truncate_open(common as u64);
        self.own.extend(&context[common..]);
    }

    /// Continuations of the longest matches of `context`'s suffix, with the match length
    /// as evidence. Only the longest matches count: their continuations go into a tree,
    /// each branch following what most of them continue with, as deep as twice the match
    /// (copying grows with the evidence for it). Without a match of [`ANCHOR`] tokens, the
    /// n-gram drafter's shorter ones in the session's own context.
    pub fn lookup(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.follow(context);
        let config = &self.shared.config;
        if max_tokens == 0 || config.max_branches == 0 {
            return Vec::new();
        }
        let mut own = Vec::new();
        self.own
            .occurrences(context, config.max_match, config.max_matches, &mut own);
        let shared = self.shared.corpus.read().unwrap_or_else(|e| e.into_inner());
        let mut found = Vec::new();
        shared.occurrences(context, config.max_match, config.max_matches, &mut found);
        let Some(best) = own.iter().chain(&found).map(|o| o.matched).max() else {
            return self.short.lookup(context, max_tokens);
        };
        let depth = max_tokens.min(2 * best);
        let longest = |o: &&Occurrence| o.matched == best;
        let mut followers: Vec<Vec<TokenId>> = own
            .iter()
            .filter(longest)
            .map(|o| self.own.continuation(o.follow, depth).collect())
            .collect();
        followers.extend(
            found
                .iter()
                .filter(longest)
                .map(|o| shared.continuation(o.follow, depth).collect()),
        );
        frequent_continuations(followers.iter().map(Vec::as_slice), config.max_branches)
            .into_iter()
            .map(|(tokens, _support)| {
                Proposal::greedy(tokens).with_evidence(u32::try_from(best).unwrap_or(u32::MAX))
            })
            .collect()
    }
}

impl Drafter for SuffixDrafter {
    fn kind(&self) -> &str {
        "suffix"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.lookup(context, max_tokens)
    }

    /// What the index gets when the drafter is dropped: the whole sequence, the last
    /// step's tokens included and drafts never verified left out.
    fn finish(&mut self, context: &[TokenId]) {
        self.follow(context);
    }
}

impl Drop for SuffixDrafter {
    fn drop(&mut self) {
        self.shared.add(&self.own.tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(max_tokens: usize) -> Arc<SuffixIndex> {
        Arc::new(SuffixIndex::new(SuffixConfig {
            max_tokens,
            ..SuffixConfig::default()
        }))
    }

    fn tokens_of(proposals: &[Proposal]) -> Vec<Vec<TokenId>> {
        proposals.iter().map(|p| p.tokens.clone()).collect()
    }

    #[test]
    fn a_finished_session_drafts_for_the_next_one() {
        let shared = index(1 << 20);
        let mut first = SuffixDrafter::new(shared.clone());
        // The first session sees its prompt, then its output; nothing to match yet.
        assert!(first.propose(&[1, 2, 3, 4], 8).is_empty());
        assert!(first.propose(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 8).is_empty());
        drop(first);
        assert_eq!(shared.documents(), 1);
        assert_eq!(shared.tokens(), 10, "nine tokens and the separator");
        // A later session with the same start gets the first one's continuation, as deep as
        // twice the match, with the match length as evidence.
        let mut second = SuffixDrafter::new(shared.clone());
        let drafts = second.propose(&[7, 1, 2, 3, 4], 8);
        assert_eq!(tokens_of(&drafts), vec![vec![5, 6, 7, 8, 9]]);
        assert_eq!(drafts[0].evidence, 4);
        let drafts = second.propose(&[7, 1, 2, 3], 2);
        assert_eq!(tokens_of(&drafts), vec![vec![4, 5]]);
    }

    #[test]
    fn only_the_longest_matches_count_and_the_most_frequent_continuation_leads() {
        let shared = index(1 << 20);
        shared.add(&[9, 1, 2, 3, 4, 10, 11]);
        shared.add(&[8, 1, 2, 3, 4, 10, 12]);
        shared.add(&[7, 0, 2, 3, 4, 20, 21]);
        shared.add(&[6, 0, 2, 3, 4, 20, 21]);
        shared.add(&[5, 0, 2, 3, 4, 20, 21]);
        let mut drafter = SuffixDrafter::new(shared);
        // "1 2 3 4" matches twice (4 tokens); "0 2 3 4" three times but the context has 1.
        let drafts = drafter.propose(&[1, 2, 3, 4], 8);
        assert_eq!(
            tokens_of(&drafts),
            vec![vec![10]],
            "10, then 11 and 12 once each"
        );
        assert_eq!(drafts[0].evidence, 4);
        let drafts = drafter.propose(&[42, 0, 2, 3, 4], 8);
        assert_eq!(tokens_of(&drafts), vec![vec![20, 21]]);
    }

    #[test]
    fn the_session_matches_its_own_context_too() {
        let mut drafter = SuffixDrafter::new(index(1 << 20));
        let drafts = drafter.propose(&[1, 2, 3, 4, 5, 9, 1, 2, 3], 4);
        assert_eq!(tokens_of(&drafts), vec![vec![4, 5, 9, 1]]);
        // Its own occurrence at the end proposes nothing; a context that shares nothing
        // with what it saw starts it again.
        assert!(drafter.propose(&[4, 4, 5, 6], 4).is_empty());
    }

    #[test]
    fn tokens_taken_back_leave_the_own_index_as_if_never_seen() {
        let mut drafter = SuffixDrafter::new(index(1 << 20));
        let context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3];
        let want = drafter.propose(&context, 4);
        // Drafts assumed after it, then dropped: the same proposals as before, and the same
        // index as one that saw only the context.
        drafter.propose(&[&context[..], &[9, 1, 2, 3, 6, 1, 2, 3]].concat(), 4);
        assert_eq!(tokens_of(&drafter.propose(&context, 4)), tokens_of(&want));
        let mut fresh = SuffixDrafter::new(index(1 << 20));
        fresh.propose(&context, 4);
        assert_eq!(drafter.own.heads, fresh.own.heads);
        assert_eq!(drafter.own.chain, fresh.own.chain);
        // A context that shares only its start with what was seen keeps that start.
        drafter.propose(&[1, 2, 3, 7, 1, 2, 3], 4);
        assert_eq!(drafter.own.tokens, [1, 2, 3, 7, 1, 2, 3]);
    }

    #[test]
    fn the_index_gets_the_finished_sequence_not_drafts_assumed_past_it() {
        let shared = index(1 << 20);
        let mut drafter = SuffixDrafter::new(shared.clone());
        // A remote session's drafter saw the context with two drafts assumed after it; the
        // session ended with other tokens accepted.
        drafter.propose(&[1, 2, 3, 4, 5, 90, 91], 4);
        drafter.finish(&[1, 2, 3, 4, 5, 6]);
        drop(drafter);
        let corpus = shared.corpus.read().unwrap();
        assert_eq!(corpus.tokens, [1, 2, 3, 4, 5, 6, SEPARATOR]);
    }

    #[test]
    fn shorter_matches_come_from_the_own_context() {
        let mut drafter = SuffixDrafter::new(index(1 << 20));
        // Only "5 6" occurs before: a match of two tokens.
        let drafts = drafter.propose(&[5, 6, 1, 2, 9, 5, 6], 3);
        assert_eq!(tokens_of(&drafts), vec![vec![1, 2, 9]]);
        assert_eq!(drafts[0].evidence, 2);
    }

    #[test]
    fn matches_never_cross_documents() {
        let shared = index(1 << 20);
        shared.add(&[1, 2, 3, 4]);
        shared.add(&[5, 6, 7, 8]);
        let mut drafter = SuffixDrafter::new(shared);
        // "2 3 4" ends the first document: nothing follows it.
        assert!(drafter.propose(&[12, 2, 3, 4], 4).is_empty());
        // "4 5 6" spans the two: not a match.
        assert!(drafter.propose(&[14, 4, 5, 6], 4).is_empty());
    }

    #[test]
    fn the_oldest_documents_go_when_the_index_is_full() {
        let shared = index(12);
        shared.add(&[1, 2, 3, 4, 5]);
        shared.add(&[6, 7, 8, 9, 10]);
        assert_eq!(shared.tokens(), 12);
        shared.add(&[11, 12, 13, 14, 15]);
        assert_eq!((shared.documents(), shared.tokens()), (2, 12));
        let mut drafter = SuffixDrafter::new(shared.clone());
        assert!(drafter.propose(&[1, 2, 3], 2).is_empty(), "evicted");
        assert_eq!(
            tokens_of(&drafter.propose(&[6, 7, 8], 2)),
            vec![vec![9, 10]]
        );
        // A document longer than the index keeps its newest tokens.
        let long: Vec<TokenId> = (100..200).collect();
        shared.add(&long);
        assert_eq!((shared.documents(), shared.tokens()), (1, 12));
        assert_eq!(
            tokens_of(&drafter.propose(&[190, 191, 192], 3)),
            vec![vec![193, 194, 195]]
        );
        // Many documents later, memory stays bounded by the limit.
        for i in 0..1000u32 {
            shared.add(&[i, i + 1, i + 2, i + 3, i + 4]);
        }
        assert!(shared.tokens() <= 12);
        let corpus = shared.corpus.read().unwrap();
        assert!(corpus.tokens.len() <= 12 + 12 / 4 + 6);
        assert!(corpus.heads.len() <= corpus.tokens.len());
    }

    #[test]
    fn an_index_that_evicted_drafts_as_one_that_only_ever_held_what_is_left() {
        // Documents over a small alphabet, so that windows recur across documents and an
        // evicted document's windows also occur in kept ones.
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % n) as TokenId
        };
        let documents: Vec<Vec<TokenId>> = (0..60)
            .map(|_| (0..4 + next(12)).map(|_| next(4)).collect())
            .collect();
        let evicting = index(64);
        for document in &documents {
            evicting.add(document);
        }
        let kept = evicting.documents();
        assert!(kept < documents.len(), "some were evicted");
        let fresh = index(1 << 20);
        for document in &documents[documents.len() - kept..] {
            fresh.add(document);
        }
        for _ in 0..300 {
            let context: Vec<TokenId> = (0..3 + next(6)).map(|_| next(4)).collect();
            let mut a = SuffixDrafter::new(evicting.clone());
            let mut b = SuffixDrafter::new(fresh.clone());
            assert_eq!(a.lookup(&context, 6), b.lookup(&context, 6), "{context:?}");
            // Their own contexts must not join the indexes.
            std::mem::forget(a);
            std::mem::forget(b);
        }
    }

    #[test]
    fn held_documents_are_the_live_ones_oldest_first() {
        let shared = index(12);
        shared.add(&[1, 2, 3, 4, 5]);
        shared.add(&[6, 7, 8, 9, 10]);
        shared.add(&[11, 12, 13, 14, 15]);
        assert_eq!(shared.held(), [[6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]);
    }

    #[test]
    fn short_or_empty_input_proposes_nothing() {
        let shared = index(1 << 20);
        shared.add(&[]);
        shared.add(&[1, 2, 3]);
        assert_eq!(shared.documents(), 0);
        let mut drafter = SuffixDrafter::new(shared);
        assert!(drafter.propose(&[], 4).is_empty());
        assert!(drafter.propose(&[1, 2], 4).is_empty());
        assert!(drafter.propose(&[1, 2, 3, 1, 2, 3], 0).is_empty());
    }
}
