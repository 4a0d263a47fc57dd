//! Drafting ahead: the drafter does not wait for the verifier between blocks. It assumes its
//! own best branch will be accepted and drafts the next block from there, up to a limit;
//! when an advance shows the verifier accepted something else, it rebases on what was
//! accepted.
//!
//! Every block is anchored at the end of the accepted sequence the drafter knows, and its
//! branches repeat the assumed tokens before the new guesses, so the verifier can check the
//! whole assumption against what it really accepted.

use sibyl_spec::{AnchoredBlock, Drafter, Proposal, SparseDist, TokenId};

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
    /// The drafter's distribution for each assumed token past `accepted` (`None`: a point
    /// mass or unknown).
    assumed_dists: Vec<Option<SparseDist>>,
    /// The last block had nothing to propose: drafting further ahead waits for an advance.
    stalled: bool,
}

impl Drop for DraftAhead {
    /// The session is over: the drafter learns its accepted sequence, not what was
    /// assumed past it.
    fn drop(&mut self) {
        self.drafter.finish(&self.accepted);
    }
}

impl DraftAhead {
    pub fn new(drafter: Box<dyn Drafter>, context: Vec<TokenId>, limits: AheadLimits) -> Self {
        Self {
            drafter,
            limits,
            assumed: context.clone(),
            assumed_dists: Vec::new(),
            accepted: context,
            stalled: false,
        }
    }

    /// True when another block may be drafted now.
    pub fn can_draft(&self) -> bool {
        !self.stalled && self.assumed.len() - self.accepted.len() < self.limits.max_tokens_ahead
    }

    /// Drafts the block at the end of the assumed sequence and assumes its best branch. The
    /// block is anchored at the end of the accepted sequence; when there is nothing to
    /// propose, its one branch is the assumed tokens alone (or there is no branch when
    /// nothing is assumed either).
    pub fn next_block(&mut self) -> AnchoredBlock {
        let room = self.limits.max_tokens_ahead - (self.assumed.len() - self.accepted.len());
        let max_tokens = self.limits.max_block_tokens.min(room.max(1));
        let mut guesses = self.drafter.propose(&self.assumed, max_tokens);
        guesses.truncate(self.limits.max_branches);
        for guess in &mut guesses {
            guess.tokens.truncate(max_tokens);
            if let Some(probs) = &mut guess.probs {
                probs.truncate(max_tokens);
            }
        }
        guesses.retain(|guess| !guess.tokens.is_empty());
        let prefix = &self.assumed[self.accepted.len()..];
        let branches: Vec<Proposal> = guesses
            .iter()
            .map(|guess| {
                let mut tokens = prefix.to_vec();
                tokens.extend_from_slice(&guess.tokens);
                let probs = match (
                    &guess.probs,
                    self.assumed_dists
                        .iter()
                        .cloned()
                        .collect::<Option<Vec<_>>>(),
                ) {
                    (Some(new), Some(mut known)) if new.len() == guess.tokens.len() => {
                        known.extend(new.iter().cloned());
                        Some(known)
                    }
                    _ => None,
                };
                Proposal {
                    tokens,
                    probs,
                    evidence: guess.evidence,
                }
            })
            .collect();
        let block = AnchoredBlock {
            anchor: self.accepted.len(),
            branches: if branches.is_empty() && !prefix.is_empty() {
                vec![Proposal::greedy(prefix.to_vec())]
            } else {
                branches
            },
        };
        match guesses.into_iter().next() {
            Some(best) => {
                let dists: Vec<Option<SparseDist>> = match best.probs {
                    Some(probs) => probs.into_iter().map(Some).collect(),
                    None => vec![None; best.tokens.len()],
                };
                self.assumed.extend_from_slice(&best.tokens);
                self.assumed_dists.extend(dists);
            }
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
        if on_track {
            self.assumed_dists
                .drain(..tokens.len().min(self.assumed_dists.len()));
        } else {
            self.assumed.clone_from(&self.accepted);
            self.assumed_dists.clear();
            self.stalled = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sibyl_spec::Proposal;
    use std::sync::Arc;

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
    fn drafts_ahead_up_to_the_limit_repeating_what_it_assumed() {
        let mut ahead = DraftAhead::new(Box::new(Counting), vec![0], limits());
        let mut blocks = Vec::new();
        while ahead.can_draft() {
            blocks.push(ahead.next_block());
        }
        let anchors: Vec<usize> = blocks.iter().map(|b| b.anchor).collect();
        assert_eq!(anchors, vec![1, 1]);
        assert_eq!(blocks[0].branches[0].tokens, vec![1, 2, 3]);
        assert_eq!(blocks[1].branches[0].tokens, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn stays_on_track_when_its_guess_is_accepted_and_rebases_when_not() {
        let mut ahead = DraftAhead::new(Box::new(Counting), vec![0], limits());
        ahead.next_block();
        ahead.next_block();
        assert!(!ahead.can_draft());
        ahead.advance(1, &[1, 2, 3, 4]).unwrap();
        assert!(ahead.can_draft());
        let block = ahead.next_block();
        assert_eq!(block.anchor, 5);
        assert_eq!(block.branches[0].tokens, vec![5, 6, 7, 8, 9]);
        ahead.advance(5, &[9]).unwrap();
        let block = ahead.next_block();
        assert_eq!(block.anchor, 6);
        assert_eq!(block.branches[0].tokens, vec![10, 11, 12]);
    }

    /// Counts like [`Counting`], and keeps what it is told at the end of the session.
    struct Finishing(std::sync::Arc<std::sync::Mutex<Vec<TokenId>>>);

    impl Drafter for Finishing {
        fn kind(&self) -> &str {
            "finishing"
        }

        fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
            Counting.propose(context, max_tokens)
        }

        fn finish(&mut self, context: &[TokenId]) {
            *self.0.lock().unwrap() = context.to_vec();
        }
    }

    #[test]
    fn a_finished_session_leaves_its_accepted_sequence_not_its_assumed_drafts() {
        let finished = std::sync::Arc::default();
        let mut ahead = DraftAhead::new(
            Box::new(Finishing(Arc::clone(&finished))),
            vec![0],
            limits(),
        );
        ahead.next_block();
        ahead.advance(1, &[1, 2, 7]).unwrap();
        ahead.next_block();
        drop(ahead);
        assert_eq!(*finished.lock().unwrap(), vec![0, 1, 2, 7]);
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
