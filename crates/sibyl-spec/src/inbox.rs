//! Blocks of draft tokens from one remote drafter, waiting for the verifier's next step.
//!
//! Remote drafters draft ahead of the verifier's feedback. Each block is anchored at the
//! length of the accepted sequence the drafter knew when it drafted, and its branches start
//! there: a branch drafted ahead repeats the tokens the drafter assumed would be accepted, then
//! adds its new guesses. By the time the verifier looks at a block the sequence has usually
//! moved on; a branch is still useful when it agrees with everything accepted since its
//! anchor, and the agreeing part is cut off (the block is rebased). Checking the whole
//! history this way means a block drafted on a wrong assumption can never be mistaken for a
//! fresh one. Everything a drafter sends is untrusted: every block is checked on arrival and
//! the inbox holds a bounded number of them.

use crate::{Proposal, TokenId};
use std::collections::VecDeque;

/// One block as a drafter sent it: alternative continuations of the sequence at `anchor`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AnchoredBlock {
    /// Length of the accepted sequence the branches continue.
    pub anchor: usize,
    /// The drafter's best branch first. A branch may end where the drafter's knowledge ends
    /// (nothing new to propose after its assumed tokens); an empty list says the drafter
    /// has nothing to propose at `anchor` itself.
    pub branches: Vec<Proposal>,
}

/// What the verifier accepts from a drafter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    pub vocab_size: usize,
    /// Most tokens in one branch, assumed and new together.
    pub max_branch_tokens: usize,
    /// Most branches in one block.
    pub max_branches: usize,
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
    #[error(
        "the block cannot continue the accepted sequence of {accepted} tokens (anchor {anchor})"
    )]
    Stale { anchor: usize, accepted: usize },
    #[error("anchor {anchor} is past the accepted sequence of {accepted} tokens")]
    FromTheFuture { anchor: usize, accepted: usize },
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
        let checked = self.check(&block, context);
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

    fn check(&self, block: &AnchoredBlock, context: &[TokenId]) -> Result<(), BlockRejection> {
        let limits = &self.limits;
        if block.branches.len() > limits.max_branches {
            return Err(BlockRejection::TooManyBranches {
                count: block.branches.len(),
                limit: limits.max_branches,
            });
        }
        for branch in &block.branches {
            if branch.tokens.len() > limits.max_branch_tokens {
                return Err(BlockRejection::BranchTooLong {
                    len: branch.tokens.len(),
                    limit: limits.max_branch_tokens,
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
        if block.anchor > context.len() {
            return Err(BlockRejection::FromTheFuture {
                anchor: block.anchor,
                accepted: context.len(),
            });
        }
        if !speaks_for(block, context) {
            return Err(BlockRejection::Stale {
                anchor: block.anchor,
                accepted: context.len(),
            });
        }
        Ok(())
    }

    /// Forgets blocks that no longer agree with `context`.
    fn prune(&mut self, context: &[TokenId]) {
        self.blocks.retain(|block| speaks_for(block, context));
    }

    /// True when this drafter has spoken for the next position: a block whose best branch
    /// agrees with everything accepted since its anchor (whether or not it has tokens
    /// beyond), or an empty block anchored at the end of `context`.
    pub fn ready(&self, context: &[TokenId]) -> bool {
        self.blocks.iter().any(|block| {
            if block.anchor > context.len() {
                return false;
            }
            match block.branches.first() {
                None => block.anchor == context.len(),
                Some(best) => agrees(block.anchor, best, context),
            }
        })
    }

    /// The proposals for the step after `context`: the branches of the newest block that
    /// continue `context`, with the part already accepted cut off.
    pub fn take(&mut self, context: &[TokenId]) -> Vec<Proposal> {
        self.prune(context);
        self.blocks
            .iter()
            .rev()
            .map(|block| rebase(block, context))
            .find(|proposals| !proposals.is_empty())
            .unwrap_or_default()
    }
}

/// True when `branch`, anchored at `anchor`, agrees with `context` from the anchor to its
/// end (it may end exactly there or go on).
fn agrees(anchor: usize, branch: &Proposal, context: &[TokenId]) -> bool {
    let overlap = context.len() - anchor;
    branch.tokens.len() >= overlap && branch.tokens[..overlap] == context[anchor..]
}

/// True when some branch of `block` can still say something about the position after
/// `context`.
fn speaks_for(block: &AnchoredBlock, context: &[TokenId]) -> bool {
    if block.anchor > context.len() {
        return false;
    }
    if block.branches.is_empty() {
        return block.anchor == context.len();
    }
    block
        .branches
        .iter()
        .any(|branch| agrees(block.anchor, branch, context))
}

/// The branches of `block` that go on past `context`, with the part already accepted cut off.
fn rebase(block: &AnchoredBlock, context: &[TokenId]) -> Vec<Proposal> {
    if block.anchor > context.len() {
        return Vec::new();
    }
    let overlap = context.len() - block.anchor;
    block
        .branches
        .iter()
        .filter(|branch| branch.tokens.len() > overlap && agrees(block.anchor, branch, context))
        .map(|branch| Proposal {
            tokens: branch.tokens[overlap..].to_vec(),
            probs: branch.probs.as_ref().map(|p| p[overlap..].to_vec()),
            evidence: branch.evidence,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> InboxLimits {
        InboxLimits {
            vocab_size: 100,
            max_branch_tokens: 8,
            max_branches: 2,
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
    fn a_block_drafted_on_a_wrong_assumption_is_never_used() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        // Drafted ahead: assumes 3, 4 are accepted, then guesses 5, 6.
        inbox.push(block(2, &[&[3, 4, 5, 6]]), &context).unwrap();
        // The verifier accepted 3 and then chose 8 instead of 4: the sequence is as long as
        // the assumed one, but the block's history is wrong.
        let accepted = [1, 2, 3, 8];
        assert!(!inbox.ready(&accepted));
        assert!(inbox.take(&accepted).is_empty());
        let as_assumed = [1, 2, 3, 4];
        let mut inbox = DraftInbox::new(limits());
        inbox.push(block(2, &[&[3, 4, 5, 6]]), &context).unwrap();
        assert_eq!(inbox.take(&as_assumed), vec![Proposal::greedy(vec![5, 6])]);
    }

    #[test]
    fn the_newest_block_that_continues_wins() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        inbox.push(block(2, &[&[3, 4, 5]]), &context).unwrap();
        inbox.push(block(2, &[&[3, 4, 5, 6, 7]]), &context).unwrap();
        assert_eq!(
            inbox.take(&context),
            vec![Proposal::greedy(vec![3, 4, 5, 6, 7])]
        );
        let advanced = [1, 2, 3, 4, 5];
        assert_eq!(inbox.take(&advanced), vec![Proposal::greedy(vec![6, 7])]);
    }

    #[test]
    fn a_branch_ending_where_the_sequence_ends_means_ready_with_nothing() {
        let mut inbox = DraftInbox::new(limits());
        let context = [1, 2];
        assert!(!inbox.ready(&context));
        inbox.push(block(2, &[]), &context).unwrap();
        assert!(inbox.ready(&context));
        assert!(inbox.take(&context).is_empty());
        let mut inbox = DraftInbox::new(limits());
        inbox.push(block(1, &[&[2]]), &context).unwrap();
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
            block(12, &[&[2; 8]]),
            block(21, &[&[1]]),
            block(19, &[]),
            AnchoredBlock {
                anchor: 20,
                branches: vec![Proposal {
                    tokens: vec![1, 2],
                    probs: Some(Vec::new()),
                    evidence: 0,
                }],
            },
        ];
        for case in cases {
            assert!(inbox.push(case, &context).is_err());
        }
        assert_eq!((inbox.received(), inbox.dropped()), (8, 8));
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
