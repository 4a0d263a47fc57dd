//! Blocks of draft tokens from one remote drafter, waiting for the verifier's next step.
//!
//! Remote drafters draft ahead: each block is anchored at the absolute position it extends,
//! and by the time the verifier looks at it the accepted sequence may have moved on. A block
//! behind the sequence is still useful when its tokens agree with what was accepted in
//! between (it is rebased: the agreeing part is cut off); a block that disagrees or is
//! exhausted is dropped. Everything a drafter sends is untrusted, so every block is checked
//! and the inbox holds a bounded number of them.

use crate::{Proposal, TokenId};
use std::collections::VecDeque;

/// One block as a drafter sent it: alternative continuations of the sequence at `anchor`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AnchoredBlock {
    /// Length of the sequence the branches continue.
    pub anchor: usize,
    /// The drafter's best branch first; empty means "nothing to propose here".
    pub branches: Vec<Proposal>,
}

/// What the verifier accepts from a drafter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    pub vocab_size: usize,
    /// Most tokens in one branch.
    pub max_block_tokens: usize,
    /// Most branches in one block.
    pub max_branches: usize,
    /// Most tokens a block's anchor may be ahead of the accepted sequence.
    pub max_tokens_ahead: usize,
    /// Most blocks held; the oldest is dropped to make room.
    pub capacity: usize,
}

/// Why a block was dropped on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockRejection {
    #[error("token {token} is outside the vocabulary of {vocab}")]
    TokenOutOfVocabulary { token: TokenId, vocab: usize },
    #[error("a branch of {len} tokens is over the limit of {limit}")]
    BranchTooLong { len: usize, limit: usize },
    #[error("{count} branches are over the limit of {limit}")]
    TooManyBranches { count: usize, limit: usize },
    #[error("a branch has {dists} distributions for {tokens} tokens")]
    DistributionCount { tokens: usize, dists: usize },
    #[error("anchor {anchor} is behind the accepted sequence of {accepted} tokens")]
    Stale { anchor: usize, accepted: usize },
    #[error("anchor {anchor} is too far ahead of the accepted sequence of {accepted} tokens")]
    TooFarAhead { anchor: usize, accepted: usize },
}

/// The blocks of one drafter in one session.
#[derive(Debug, Clone)]
pub struct DraftInbox {
    limits: InboxLimits,
    blocks: VecDeque<AnchoredBlock>,
    received: u64,
    dropped: u64,
}

impl DraftInbox {
    pub fn new(limits: InboxLimits) -> Self {
        Self {
            limits,
            blocks: VecDeque::new(),
            received: 0,
            dropped: 0,
        }
    }

    /// Blocks received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Blocks dropped unused on arrival or pushed out by newer ones.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Blocks held now (at most the capacity).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Checks `block` against the limits and the accepted sequence `context`, and keeps it.
    pub fn push(
        &mut self,
        block: AnchoredBlock,
        context: &[TokenId],
    ) -> Result<(), BlockRejection> {
        self.received += 1;
        let checked = self.check(&block, context.len());
        if checked.is_err() {
            self.dropped += 1;
            return checked;
        }
        self.prune(context);
        while self.blocks.len() >= self.limits.capacity.max(1) {
            self.blocks.pop_front();
            self.dropped += 1;
        }
        self.blocks.push_back(block);
        Ok(())
    }

    fn check(&self, block: &AnchoredBlock, accepted: usize) -> Result<(), BlockRejection> {
        let limits = &self.limits;
        if block.branches.len() > limits.max_branches {
            return Err(BlockRejection::TooManyBranches {
                count: block.branches.len(),
                limit: limits.max_branches,
            });
        }
        for branch in &block.branches {
            if branch.tokens.len() > limits.max_block_tokens {
                return Err(BlockRejection::BranchTooLong {
                    len: branch.tokens.len(),
                    limit: limits.max_block_tokens,
                });
            }
            if let Some(&token) = branch
                .tokens
                .iter()
                .find(|&&t| t as usize >= limits.vocab_size)
            {
                return Err(BlockRejection::TokenOutOfVocabulary {
                    token,
                    vocab: limits.vocab_size,
                });
            }
            if let Some(dists) = &branch.probs {
                if dists.len() != branch.tokens.len() {
                    return Err(BlockRejection::DistributionCount {
                        tokens: branch.tokens.len(),
                        dists: dists.len(),
                    });
                }
            }
        }
        if block.anchor > accepted.saturating_add(limits.max_tokens_ahead) {
            return Err(BlockRejection::TooFarAhead {
                anchor: block.anchor,
                accepted,
            });
        }
        let longest = block.branches.iter().map(|b| b.tokens.len()).max();
        if block.anchor < accepted && block.anchor + longest.unwrap_or(0) <= accepted {
            return Err(BlockRejection::Stale {
                anchor: block.anchor,
                accepted,
            });
        }
        Ok(())
    }

    /// Forgets blocks that can no longer continue `context`.
    fn prune(&mut self, context: &[TokenId]) {
        self.blocks
            .retain(|block| block.anchor >= context.len() || !rebase(block, context).is_empty());
    }

    /// True when this drafter has spoken for the next step: a block anchored exactly at the
    /// end of `context`, or an older block whose best branch still continues it.
    pub fn ready(&self, context: &[TokenId]) -> bool {
        self.blocks.iter().any(|block| {
            block.anchor == context.len()
                || (block.anchor < context.len()
                    && block
                        .branches
                        .first()
                        .is_some_and(|best| continues(block.anchor, best, context)))
        })
    }

    /// The proposals for the step after `context`: the branches of the newest usable block
    /// (the highest anchor not past the end of `context`), rebased to continue `context`.
    pub fn take(&mut self, context: &[TokenId]) -> Vec<Proposal> {
        self.prune(context);
        let best = self
            .blocks
            .iter()
            .enumerate()
            .filter(|(_, block)| block.anchor <= context.len())
            .max_by_key(|&(i, block)| (block.anchor, i));
        best.map(|(_, block)| rebase(block, context))
            .unwrap_or_default()
    }
}

/// True when `branch`, anchored at `anchor`, agrees with `context` up to its end and has
/// tokens left after it.
fn continues(anchor: usize, branch: &Proposal, context: &[TokenId]) -> bool {
    let overlap = context.len() - anchor;
    branch.tokens.len() > overlap && branch.tokens[..overlap] == context[anchor..]
}

/// The branches of `block` (anchored at or before the end of `context`) that continue
/// `context`, with the part already accepted cut off.
fn rebase(block: &AnchoredBlock, context: &[TokenId]) -> Vec<Proposal> {
    if block.anchor > context.len() {
        return Vec::new();
    }
    let overlap = context.len() - block.anchor;
    block
        .branches
        .iter()
        .filter(|branch| continues(block.anchor, branch, context))
        .map(|branch| Proposal {
            tokens: branch.tokens[overlap..].to_vec(),
            probs: branch.probs.as_ref().map(|p| p[overlap..].to_vec()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InboxLimits {
        InboxLimits {
            vocab_size: 100,
            max_block_tokens: 8,
            max_branches: 2,
            max_tokens_ahead: 16,
            capacity: 4,
        }
    }

    fn block(anchor: usize, branches: &[&[TokenId]]) -> AnchoredBlock {
        AnchoredBlock {
            anchor,
            branches: branches
                .iter()
                .map(|b| Proposal::greedy(b.to_vec()))
                .collect(),
        }
    }

    #[test]
    fn block_at_the_end_of_the_sequence_is_taken_as_is() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2, 3];
        inbox.push(block(3, &[&[4, 5], &[6]]), &context).unwrap();
        assert!(inbox.ready(&context));
        let proposals = inbox.take(&context);
        assert_eq!(
            proposals,
            vec![Proposal::greedy(vec![4, 5]), Proposal::greedy(vec![6])]
        );
    }

    #[test]
    fn block_behind_is_rebased_when_it_agrees_and_dropped_when_not() {
        let mut inbox = DraftInbox::new(limits());
        inbox
            .push(block(2, &[&[3, 4, 5], &[9, 9, 9]]), &[1, 2])
            .unwrap();
        let context = [1, 2, 3];
        assert!(inbox.ready(&context));
        assert_eq!(inbox.take(&context), vec![Proposal::greedy(vec![4, 5])]);
        let diverged = [1, 2, 7];
        assert!(!inbox.ready(&diverged));
        assert!(inbox.take(&diverged).is_empty());
        assert!(inbox.is_empty());
    }

    #[test]
    fn newest_usable_anchor_wins_and_future_blocks_wait() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        inbox.push(block(2, &[&[3, 4, 5]]), &context).unwrap();
        inbox.push(block(5, &[&[6, 7]]), &context).unwrap();
        assert_eq!(inbox.take(&context), vec![Proposal::greedy(vec![3, 4, 5])]);
        let advanced = [1, 2, 3, 4, 5];
        assert_eq!(inbox.take(&advanced), vec![Proposal::greedy(vec![6, 7])]);
    }

    #[test]
    fn empty_block_at_the_end_means_ready_with_nothing() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        assert!(!inbox.ready(&context));
        inbox.push(block(2, &[]), &context).unwrap();
        assert!(inbox.ready(&context));
        assert!(inbox.take(&context).is_empty());
    }

    #[test]
    fn garbage_is_rejected_and_counted() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1; 20];
        let cases = [
            block(20, &[&[100]]),
            block(20, &[&[1; 9]]),
            block(20, &[&[1], &[2], &[3]]),
            block(10, &[&[1, 1]]),
            block(37, &[&[1]]),
            AnchoredBlock {
                anchor: 20,
                branches: vec![Proposal {
                    tokens: vec![1, 2],
                    probs: Some(Vec::new()),
                }],
            },
        ];
        for case in cases {
            assert!(inbox.push(case, &context).is_err());
        }
        assert_eq!((inbox.received(), inbox.dropped()), (6, 6));
        assert!(inbox.is_empty());
    }

    #[test]
    fn a_flood_keeps_the_newest_blocks_within_capacity() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        for token in 0..50 {
            inbox.push(block(2, &[&[token]]), &context).unwrap();
            assert!(inbox.len() <= 4);
        }
        assert_eq!(inbox.dropped(), 46);
        assert_eq!(inbox.take(&context), vec![Proposal::greedy(vec![49])]);
    }
}
