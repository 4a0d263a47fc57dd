//! Prompt-lookup n-gram drafting (LLMA, prompt lookup decoding), and the same lookup in a
//! client's predicted output ([`PredictionDrafter`]).
//!
//! The longest suffix of the context that occurred earlier in the context (the prompt and
//! the session's own output) proposes the tokens that followed it. Lengths are tried from
//! `max_ngram` down to `min_ngram`; distinct continuations become separate branches, most
//! recent occurrence first. Each branch carries the length of its match as evidence: an
//! eight-token match in code being copied is accepted far more often than a one-token one.

use sibyl_spec::{Drafter, Proposal, TokenId};

/// Limits of the n-gram drafter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NgramConfig {
    /// Longest suffix tried.
    pub max_ngram: usize,
    /// Shortest suffix tried (at least 1).
    pub min_ngram: usize,
    /// Most branches proposed per call.
    pub max_branches: usize,
    /// Most occurrences examined per suffix length (the most recent ones), which bounds the
    /// work per call on long, repetitive contexts.
    pub max_matches: usize,
}

impl Default for NgramConfig {
    fn default() -> Self {
        Self {
            max_ngram: 8,
            min_ngram: 1,
            max_branches: 3,
            max_matches: 64,
        }
    }
}

/// An n-gram drafter over one session's context.
#[derive(Debug, Clone, Default)]
pub struct NgramDrafter {
    config: NgramConfig,
}

impl NgramDrafter {
    pub fn new(config: NgramConfig) -> Self {
        let min_ngram = config.min_ngram.max(1);
        Self {
            config: NgramConfig {
                min_ngram,
                max_ngram: config.max_ngram.max(min_ngram),
                ..config
            },
        }
    }

    /// Continuations of the longest matching suffixes, each at most `max_tokens` long, with
    /// the length of the suffix that matched as evidence.
    pub fn lookup(&self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let mut branches: Vec<Proposal> = Vec::new();
        if max_tokens == 0 || self.config.max_branches == 0 {
            return branches;
        }
        let len = context.len();
        for n in (self.config.min_ngram..=self.config.max_ngram).rev() {
            if n >= len {
                continue;
            }
            let suffix = &context[len - n..];
            let mut matches = 0usize;
            // Occurrences ending before the suffix itself, most recent first.
            for start in (0..len - n).rev() {
                if &context[start..start + n] != suffix {
                    continue;
                }
                matches += 1;
                let follow = start + n;
                let end = (follow + max_tokens).min(len);
                let continuation = &context[follow..end];
                if continuation.is_empty() {
                    continue;
                }
                add_branch(&mut branches, continuation, n);
                if branches.len() >= self.config.max_branches || matches >= self.config.max_matches
                {
                    break;
                }
            }
            if branches.len() >= self.config.max_branches {
                break;
            }
        }
        branches
    }
}

impl Drafter for NgramDrafter {
    fn kind(&self) -> &str {
        "ngram"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.lookup(context, max_tokens)
    }
}

/// Adds `continuation` (found after a match of `n` tokens) to `branches`, unless a branch
/// already starts with its first token: a longer continuation with the same start then
/// replaces a shorter one.
fn add_branch(branches: &mut Vec<Proposal>, continuation: &[TokenId], n: usize) {
    let known = branches
        .iter_mut()
        .find(|b| b.tokens.first() == continuation.first());
    match known {
        Some(branch)
            if branch.tokens.len() < continuation.len()
                && continuation.starts_with(&branch.tokens) =>
        {
            branch.tokens = continuation.to_vec();
        }
        Some(_) => {}
        None => branches.push(Proposal::greedy(continuation.to_vec()).with_evidence(n as u32)),
    }
}

/// Drafts from what the client expects the output to be (OpenAI's predicted outputs: the
/// file being edited, the last version of an answer). Before the first output token it
/// proposes the prediction's start; then the longest suffix of the output (up to
/// `max_ngram` tokens) that occurs in the prediction proposes what follows it there,
/// nearest first to where the output has got to in it (where the last match was, moved on
/// as far as the output has grown since), so that an edit that skips or inserts text
/// picks the prediction up again a few tokens later. The evidence is the
/// match's length (0 at the start), learned apart from the other drafters'.
#[derive(Debug, Clone)]
pub struct PredictionDrafter {
    prediction: Vec<TokenId>,
    /// Tokens of the context before the output.
    prompt_len: usize,
    config: NgramConfig,
    /// The prediction's position after the last proposal's match, and the output's length
    /// then: where the prediction is expected to go on is that far ahead of it as the
    /// output has grown since.
    cursor: (usize, usize),
}

impl PredictionDrafter {
    pub fn new(prediction: Vec<TokenId>, prompt_len: usize) -> Self {
        Self {
            prediction,
            prompt_len,
            config: NgramDrafter::default().config,
            cursor: (0, 0),
        }
    }

    /// Continuations in the prediction of the longest suffix of the output in `context`.
    pub fn lookup(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let mut branches: Vec<Proposal> = Vec::new();
        let prediction = &self.prediction;
        if max_tokens == 0 || prediction.is_empty() {
            return branches;
        }
        let output = context.get(self.prompt_len..).unwrap_or_default();
        if output.is_empty() {
            let start = &prediction[..max_tokens.min(prediction.len())];
            return vec![Proposal::greedy(start.to_vec())];
        }
        // One pass: at each place the output's last token occurs, how many of the output's
        // latest tokens match there (at most `max_ngram`); the longest matches win.
        let longest = self.config.max_ngram.min(output.len());
        let matched = |end: usize| {
            (1..=longest.min(end))
                .take_while(|&k| prediction[end - k] == output[output.len() - k])
                .last()
                .unwrap_or(0)
        };
        let mut best = 0;
        let mut ends = Vec::new();
        for end in 1..prediction.len() {
            let n = matched(end);
            if n < self.config.min_ngram.max(best) {
                continue;
            }
            if n > best {
                best = n;
                ends.clear();
            }
            ends.push(end);
        }
        // Nearest first to where the prediction is expected to go on (ahead first of two
        // as near).
        let (at, seen) = self.cursor;
        let expected = at + output.len().saturating_sub(seen);
        ends.sort_by_key(|&end| (end.abs_diff(expected), end < expected));
        if let Some(&first) = ends.first() {
            self.cursor = (first, output.len());
        }
        for &end in ends.iter().take(self.config.max_matches) {
            let continuation = &prediction[end..(end + max_tokens).min(prediction.len())];
            add_branch(&mut branches, continuation, best);
            if branches.len() >= self.config.max_branches {
                break;
            }
        }
        branches
    }
}

impl Drafter for PredictionDrafter {
    fn kind(&self) -> &str {
        "prediction"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.lookup(context, max_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_suffix_match_proposes_what_followed() {
        let drafter = NgramDrafter::default();
        // "a b c d e ... a b c" -> "d e"
        let context = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        let branches = drafter.lookup(&context, 2);
        assert_eq!(branches[0].tokens, vec![4, 5]);
        assert_eq!(branches[0].evidence, 3, "the length of the match");
    }

    #[test]
    fn several_matches_give_several_branches_most_recent_first() {
        let drafter = NgramDrafter::new(NgramConfig {
            max_ngram: 2,
            min_ngram: 2,
            max_branches: 4,
            max_matches: 64,
        });
        let context = [7, 8, 1, 0, 7, 8, 2, 0, 7, 8];
        let branches = drafter.lookup(&context, 3);
        let tokens: Vec<_> = branches.iter().map(|b| b.tokens.clone()).collect();
        assert_eq!(tokens, vec![vec![2, 0, 7], vec![1, 0, 7]]);
    }

    #[test]
    fn no_match_no_proposal() {
        let drafter = NgramDrafter::default();
        assert!(drafter.lookup(&[1, 2, 3, 4], 5).is_empty());
        assert!(drafter.lookup(&[], 5).is_empty());
        assert!(drafter.lookup(&[1, 1, 1], 0).is_empty());
    }

    #[test]
    fn continuation_never_runs_past_the_context() {
        let drafter = NgramDrafter::default();
        let branches = drafter.lookup(&[5, 5, 5, 5], 10);
        assert_eq!(branches.len(), 1);
        let tokens = &branches[0].tokens;
        assert!(tokens.len() <= 3 && tokens.iter().all(|&t| t == 5));
    }

    #[test]
    fn a_prediction_is_proposed_from_its_start_then_followed_where_the_output_is() {
        let prompt = [100, 101, 102];
        let prediction = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        let mut drafter = PredictionDrafter::new(prediction, prompt.len());
        assert_eq!(drafter.lookup(&prompt, 4)[0].tokens, vec![1, 2, 3, 4]);
        // The output follows the prediction: what comes next there.
        let branches = drafter.lookup(&[100, 101, 102, 1, 2], 3);
        assert_eq!(branches[0].tokens, vec![3, 4, 5]);
        assert_eq!(branches[0].evidence, 2);
        // An edit: the output skipped 3 and 4 and wrote 42; at 5 it is picked up again.
        assert!(drafter.lookup(&[100, 101, 102, 1, 2, 42], 3).is_empty());
        let branches = drafter.lookup(&[100, 101, 102, 1, 2, 42, 5], 3);
        assert_eq!(branches[0].tokens, vec![6, 7, 8]);
        // The end of the prediction proposes nothing; the prompt is not searched.
        assert!(drafter.lookup(&[100, 101, 102, 9], 3).is_empty());
        assert!(drafter.lookup(&[100, 101, 102, 101], 3).is_empty());
    }

    #[test]
    fn of_repeated_text_the_match_nearest_ahead_of_the_last_is_taken_first() {
        // Two lines alike but for their last token: `7 8 1` then `7 8 2`.
        let prediction = vec![7, 8, 1, 0, 7, 8, 2, 0];
        let mut drafter = PredictionDrafter::new(prediction, 0);
        let first = drafter.lookup(&[7, 8], 2);
        assert_eq!(first[0].tokens, vec![1, 0]);
        assert_eq!(first[1].tokens, vec![2, 0]);
        // Past the first line, the second line's ending comes first.
        let second = drafter.lookup(&[7, 8, 1, 0, 7, 8], 2);
        assert_eq!(second[0].tokens, vec![2, 0]);
        // Matches of equal length: the one where the output has got to in the prediction.
        let mut drafter = PredictionDrafter::new(vec![7, 8, 1, 0, 7, 8, 2, 0], 0);
        assert_eq!(drafter.lookup(&[9, 7, 8], 2)[0].tokens, vec![1, 0]);
        // Five tokens later (one of them an edit) the output is at the second line.
        let later = drafter.lookup(&[9, 7, 8, 1, 0, 5, 7, 8], 2);
        assert_eq!(later[0].tokens, vec![2, 0]);
    }

    #[test]
    fn branch_count_is_bounded() {
        let drafter = NgramDrafter::new(NgramConfig {
            max_ngram: 1,
            min_ngram: 1,
            max_branches: 2,
            max_matches: 64,
        });
        let context = [0, 1, 0, 2, 0, 3, 0, 4, 0];
        assert_eq!(drafter.lookup(&context, 1).len(), 2);
    }
}
