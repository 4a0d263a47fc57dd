//! Drafting ahead: the drafter does not wait for the verifier between blocks. It assumes its
//! own best branch will be accepted and drafts the next block from there, up to a limit;
//! when an advance shows the verifier accepted something else, it rebases on what was
//! accepted.

use sibyl_spec::{AnchoredBlock, Drafter, TokenId};

/// Limits the verifier set when it opened the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AheadLimits {
    pub max_block_tokens: usize,
    pub max_branches: usize,
    /// Most tokens the drafter's assumed sequence may run ahead of the accepted one.
    pub max_tokens_ahead: usize,
    /// Most tokens the accepted sequence may hold.
    pub max_context: usize,
}

/// An advance that does not follow what the drafter was told before.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvanceError {
    #[error("advance at position {position}, but the sequence has {len} tokens")]
    Position { position: u64, len: usize },
    #[error("an advance must carry at least one token")]
    Empty,
    #[error("the sequence would exceed {limit} tokens")]
    TooLong { limit: usize },
}

/// One session of a drafter, drafting ahead of the verifier.
pub struct DraftAhead {
    drafter: Box<dyn Drafter>,
    limits: AheadLimits,
    /// What the verifier has accepted.
    accepted: Vec<TokenId>,
    /// The sequence the next block extends: `accepted` plus the best branches sent since.
    assumed: Vec<TokenId>,
    /// The last block had nothing to propose: drafting further ahead waits for an advance.
    stalled: bool,
}

impl DraftAhead {
    pub fn new(drafter: Box<dyn Drafter>, context: Vec<TokenId>, limits: AheadLimits) -> Self {
        Self {
            drafter,
            limits,
            assumed: context.clone(),
            accepted: context,
            stalled: false,
        }
    }

    /// True when another block may be drafted now.
    pub fn can_draft(&self) -> bool {
        !self.stalled && self.assumed.len() - self.accepted.len() < self.limits.max_tokens_ahead
    }

    /// Drafts the block at the end of the assumed sequence and assumes its best branch.
    /// An empty block (no branches) says the drafter has nothing to propose there.
    pub fn next_block(&mut self) -> AnchoredBlock {
        let room = self.limits.max_tokens_ahead - (self.assumed.len() - self.accepted.len());
        let max_tokens = self.limits.max_block_tokens.min(room.max(1));
        let mut branches = self.drafter.propose(&self.assumed, max_tokens);
        branches.truncate(self.limits.max_branches);
        for branch in &mut branches {
            branch.tokens.truncate(max_tokens);
            if let Some(probs) = &mut branch.probs {
                probs.truncate(max_tokens);
            }
        }
        branches.retain(|branch| !branch.tokens.is_empty());
        let block = AnchoredBlock {
            anchor: self.assumed.len(),
            branches,
        };
        match block.branches.first() {
            Some(best) => self.assumed.extend_from_slice(&best.tokens),
            None => self.stalled = true,
        }
        block
    }

    /// Takes the tokens the verifier accepted at `position`; rebases when they differ from
    /// what was assumed.
    pub fn advance(&mut self, position: u64, tokens: &[TokenId]) -> Result<(), AdvanceError> {
        if position != self.accepted.len() as u64 {
            return Err(AdvanceError::Position {
                position,
                len: self.accepted.len(),
            });
        }
        if tokens.is_empty() {
            return Err(AdvanceError::Empty);
        }
        if self.accepted.len() + tokens.len() > self.limits.max_context {
            return Err(AdvanceError::TooLong {
                limit: self.limits.max_context,
            });
        }
        self.accepted.extend_from_slice(tokens);
        let on_track = self.assumed.len() >= self.accepted.len()
            && self.assumed[..self.accepted.len()] == self.accepted[..];
        if !on_track {
            self.assumed.clone_from(&self.accepted);
            self.stalled = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sibyl_spec::Proposal;

    /// Proposes the next `n` integers after the last token (a perfectly predictable text).
    struct Counting;

    impl Drafter for Counting {
        fn kind(&self) -> &str {
            "counting"
        }

        fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
            let last = *context.last().unwrap_or(&0);
            vec![Proposal::greedy(
                (1..=max_tokens as u32).map(|i| last + i).collect(),
            )]
        }
    }

    fn limits() -> AheadLimits {
        AheadLimits {
            max_block_tokens: 3,
            max_branches: 2,
            max_tokens_ahead: 6,
            max_context: 100,
        }
    }

    #[test]
    fn drafts_ahead_up_to_the_limit_without_feedback() {
        let mut ahead = DraftAhead::new(Box::new(Counting), vec![0], limits());
        let mut anchors = Vec::new();
        while ahead.can_draft() {
            let block = ahead.next_block();
            anchors.push(block.anchor);
        }
        assert_eq!(anchors, vec![1, 4]);
    }

    #[test]
    fn stays_on_track_when_its_guess_is_accepted_and_rebases_when_not() {
        let mut ahead = DraftAhead::new(Box::new(Counting), vec![0], limits());
        ahead.next_block();
        ahead.next_block();
        assert!(!ahead.can_draft());
        ahead.advance(1, &[1, 2, 3, 4]).unwrap();
        assert!(ahead.can_draft());
        assert_eq!(ahead.next_block().anchor, 7);
        ahead.advance(5, &[9]).unwrap();
        let block = ahead.next_block();
        assert_eq!(block.anchor, 6);
        assert_eq!(block.branches[0].tokens, vec![10, 11, 12]);
    }

    #[test]
    fn advances_out_of_order_are_refused() {
        let mut ahead = DraftAhead::new(Box::new(Counting), vec![0], limits());
        assert!(ahead.advance(3, &[1]).is_err());
        assert!(ahead.advance(1, &[]).is_err());
        assert!(ahead.advance(1, &[0; 100]).is_err());
        assert!(ahead.advance(1, &[1]).is_ok());
    }
}
