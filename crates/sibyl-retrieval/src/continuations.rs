//! The continuations that retrieval and suffix drafting propose: what followed the
//! occurrences of a match, counted into a trie, the most frequent paths kept.

use crate::TokenId;

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
