//! The prefix cache: what finished sessions computed (prompt and output), kept so that a
//! later prompt starting with the same tokens starts from their keys and values.
//!
//! Entries are whole sequences, found by the longest common prefix with a new prompt and
//! copied into the new session's cache, so a running session never shares memory with an
//! entry and an entry can be evicted at any time. A sequence that extends an entry replaces
//! it; the least recently used entries are evicted first to stay within the byte budget.
//! Keys and values of a position depend only on the tokens up to it, and the engine computes
//! them the same whatever else is in the pass, so a copied prefix is exactly what computing
//! it again would give.

use sibyl_engine::KvCache;
use sibyl_spec::TokenId;

/// Finished sequences' KV caches, within a byte budget (see the module doc).
#[derive(Debug)]
pub struct PrefixCache {
    budget: usize,
    entries: Vec<Entry>,
    /// Counts uses, to order entries by their last use.
    clock: u64,
    evictions: u64,
}

#[derive(Debug)]
struct Entry {
    /// The tokens of every cached position.
    tokens: Vec<TokenId>,
    cache: KvCache,
    used: u64,
}

/// The longest cached prefix of a prompt.
pub struct Hit<'a> {
    pub cache: &'a KvCache,
    /// Positions of `cache` that the prompt shares.
    pub len: usize,
    /// Which entry it is (for [`PrefixCache::used`]).
    pub entry: usize,
}

impl PrefixCache {
    /// An empty cache that holds at most `budget` bytes of keys and values.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: Vec::new(),
            clock: 0,
            evictions: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.cache.size_in_bytes()).sum()
    }

    /// Entries evicted to stay within the budget, since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Whether it keeps anything (a budget of 0 keeps nothing).
    pub fn keeps(&self) -> bool {
        self.budget > 0
    }

    /// Sequences held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry sharing the longest prefix with `tokens`; `None` when no entry shares a
    /// first token. Call [`PrefixCache::used`] when it is copied from.
    pub fn longest(&self, tokens: &[TokenId]) -> Option<Hit<'_>> {
        let (best, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, tokens)))
            .max_by_key(|&(i, len)| (len, std::cmp::Reverse(i)))?;
        (len > 0).then(|| Hit {
            cache: &self.entries[best].cache,
            len,
            entry: best,
        })
    }

    /// Counts entry `entry` of a [`Hit`] as used now (the last evicted).
    pub fn used(&mut self, entry: usize) {
        self.clock += 1;
        if let Some(entry) = self.entries.get_mut(entry) {
            entry.used = self.clock;
        }
    }

    /// Keeps `cache`, whose positions hold `tokens` (a longer `tokens` is cut to the cache),
    /// replacing the entries it extends and evicting the least recently used ones beyond the
    /// budget. A sequence that an entry already holds only counts as a use of that entry; one
    /// larger than the whole budget keeps as much of its start as fits.
    pub fn insert(&mut self, tokens: &[TokenId], mut cache: KvCache) {
        let tokens = &tokens[..tokens.len().min(cache.len())];
        cache.truncate(tokens.len());
        self.clock += 1;
        if let Some(holder) = self
            .entries
            .iter_mut()
            .find(|e| e.tokens.starts_with(tokens))
        {
            holder.used = self.clock;
            return;
        }
        let fits = self.budget / cache.bytes_per_token().max(1);
        if fits == 0 || tokens.is_empty() {
            return;
        }
        cache.truncate(fits);
        cache.shrink_to_fit();
        let tokens = &tokens[..tokens.len().min(fits)];
        self.entries.retain(|e| !tokens.starts_with(&e.tokens));
        self.entries.push(Entry {
            tokens: tokens.to_vec(),
            cache,
            used: self.clock,
        });
        let mut bytes = self.bytes();
        while bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
            else {
                break;
            };
            bytes -= self.entries.swap_remove(oldest).cache.size_in_bytes();
            self.evictions += 1;
        }
    }
}

/// How many leading tokens `a` and `b` share.
pub(crate) fn common_prefix(a: &[TokenId], b: &[TokenId]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sibyl_engine::testkit::{tiny_model, TinyModelConfig};
    use sibyl_engine::{LogitRows, Model, TreeInput};

    fn cached(model: &Model, tokens: &[TokenId]) -> KvCache {
        let mut cache = model.new_cache();
        model
            .forward(&mut cache, &TreeInput::chain(tokens), LogitRows::None)
            .unwrap();
        cache
    }

    #[test]
    fn the_longest_prefix_is_found_and_extensions_replace_what_they_extend() {
        let model = tiny_model(&TinyModelConfig::default()).unwrap();
        let mut store = PrefixCache::new(usize::MAX);
        assert!(store.longest(&[1, 2, 3]).is_none());
        store.insert(&[1, 2, 3, 4], cached(&model, &[1, 2, 3, 4]));
        store.insert(&[1, 2, 9], cached(&model, &[1, 2, 9]));
        let hit = store.longest(&[1, 2, 3, 7]).unwrap();
        assert_eq!((hit.len, hit.cache.len()), (3, 4));
        assert_eq!(store.longest(&[1, 2, 9, 9]).unwrap().len, 3);
        assert!(store.longest(&[5, 1, 2]).is_none());
        // An extension replaces the entry; a prefix of an entry adds nothing.
        store.insert(&[1, 2, 3, 4, 5], cached(&model, &[1, 2, 3, 4, 5]));
        store.insert(&[1, 2], cached(&model, &[1, 2]));
        assert_eq!(store.len(), 2);
        assert_eq!(store.longest(&[1, 2, 3, 4, 5, 6]).unwrap().len, 5);
        // Tokens beyond the cache's positions are not claimed.
        store.insert(&[7, 7, 7], cached(&model, &[7]));
        assert_eq!(store.longest(&[7, 7, 7]).unwrap().len, 1);
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_budget_holds() {
        let model = tiny_model(&TinyModelConfig::default()).unwrap();
        let per_token = model.new_cache().bytes_per_token();
        let mut store = PrefixCache::new(10 * per_token);
        store.insert(&[1, 1, 1, 1], cached(&model, &[1, 1, 1, 1]));
        store.insert(&[2, 2, 2, 2], cached(&model, &[2, 2, 2, 2]));
        let hit = store.longest(&[1]).unwrap().entry;
        store.used(hit);
        store.insert(&[3, 3, 3, 3], cached(&model, &[3, 3, 3, 3]));
        assert!(store.bytes() <= 10 * per_token);
        assert_eq!(store.evictions(), 1);
        assert!(store.longest(&[2]).is_none(), "2 was used least recently");
        assert!(store.longest(&[1]).is_some() && store.longest(&[3]).is_some());
        // A sequence larger than the budget keeps its start.
        let long: Vec<TokenId> = (0..14).collect();
        store.insert(&long, cached(&model, &long));
        assert_eq!(store.len(), 1);
        assert_eq!(store.longest(&long).unwrap().len, 10);
        assert_eq!(store.bytes(), 10 * per_token);
        // No budget, no entries.
        let mut none = PrefixCache::new(0);
        none.insert(&[1, 2], cached(&model, &[1, 2]));
        assert!(none.is_empty());
    }
}
