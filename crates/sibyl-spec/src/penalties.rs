//! Changes a request makes to the target's logits before a token is chosen from them:
//! OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty`, and the repetition
//! penalty of vLLM and llama.cpp. The penalties count the tokens before a row's position,
//! which in a verify tree include the draft path down to that row's node: every row is
//! adjusted for its own path ([`TokenHistory::adjust`]), so a speculative run emits exactly
//! what plain decoding of the adjusted model emits.

use crate::TokenId;
use std::collections::{HashMap, HashSet};

/// Largest `|presence|` and `|frequency|` penalty (OpenAI's range).
pub const MAX_PENALTY: f32 = 2.0;
/// Largest repetition penalty (llama.cpp's and vLLM's are unbounded; past this every
/// repeated token is already out of reach).
pub const MAX_REPETITION_PENALTY: f32 = 100.0;
/// Largest `|bias|` of one token (OpenAI's range).
pub const MAX_LOGIT_BIAS: f32 = 100.0;
/// Most tokens one request may bias.
pub const MAX_BIASED_TOKENS: usize = 1024;

/// What a request adds to the target's logits. [`Penalties::default`] changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    /// Subtracted from the logit of every token the generation has emitted.
    pub presence: f32,
    /// Subtracted from a token's logit once per time the generation has emitted it.
    pub frequency: f32,
    /// Divides the positive logits and multiplies the negative ones of every token in the
    /// prompt or the output; 1 changes nothing.
    pub repetition: f32,
    /// Added to these tokens' logits before the penalties.
    pub logit_bias: Vec<(TokenId, f32)>,
}

impl Default for Penalties {
    fn default() -> Self {
        Self {
            presence: 0.0,
            frequency: 0.0,
            repetition: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// A penalty or bias outside its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PenaltyError {
    #[error("the presence penalty must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {0}")]
    Presence(f32),
    #[error("the frequency penalty must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {0}")]
    Frequency(f32),
    #[error(
        "the repetition penalty must be above 0 and at most {MAX_REPETITION_PENALTY}, got {0}"
    )]
    Repetition(f32),
    #[error("a logit bias must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, got {0}")]
    Bias(f32),
    #[error("at most {MAX_BIASED_TOKENS} tokens can be biased, not {0}")]
    TooManyBiases(usize),
    #[error("biased token {token} is outside the vocabulary of {vocab}")]
    BiasToken { token: TokenId, vocab: usize },
}

impl Penalties {
    /// Whether applying these changes nothing.
    pub fn is_neutral(&self) -> bool {
        self.presence == 0.0
            && self.frequency == 0.0
            && self.repetition == 1.0
            && self.logit_bias.is_empty()
    }

    /// Checks every value, and that biased tokens are in a vocabulary of `vocab` tokens.
    pub fn validate(&self, vocab: usize) -> Result<(), PenaltyError> {
        let in_range = |p: f32| p.is_finite() && p.abs() <= MAX_PENALTY;
        if !in_range(self.presence) {
            return Err(PenaltyError::Presence(self.presence));
        }
        if !in_range(self.frequency) {
            return Err(PenaltyError::Frequency(self.frequency));
        }
        let r = self.repetition;
        if !(r.is_finite() && r > 0.0 && r <= MAX_REPETITION_PENALTY) {
            return Err(PenaltyError::Repetition(r));
        }
        if self.logit_bias.len() > MAX_BIASED_TOKENS {
            return Err(PenaltyError::TooManyBiases(self.logit_bias.len()));
        }
        for &(token, bias) in &self.logit_bias {
            if !(bias.is_finite() && bias.abs() <= MAX_LOGIT_BIAS) {
                return Err(PenaltyError::Bias(bias));
            }
            if token as usize >= vocab {
                return Err(PenaltyError::BiasToken { token, vocab });
            }
        }
        Ok(())
    }
}

/// The tokens a request's penalties count: how often each was emitted and, with a
/// repetition penalty, which are in the prompt.
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    output: HashMap<TokenId, u32>,
    prompt: HashSet<TokenId>,
}

impl TokenHistory {
    /// The history before the first generated token. The prompt is kept only where
    /// `penalties` has a repetition penalty, the one penalty that counts it.
    pub fn new(prompt: &[TokenId], penalties: &Penalties) -> Self {
        let prompt = if penalties.repetition == 1.0 {
            HashSet::new()
        } else {
            prompt.iter().copied().collect()
        };
        Self {
            output: HashMap::new(),
            prompt,
        }
    }

    /// Records emitted tokens.
    pub fn extend(&mut self, tokens: &[TokenId]) {
        for &token in tokens {
            *self.output.entry(token).or_insert(0) += 1;
        }
    }

    /// Applies `penalties` to `row`, the logits of the position after this history and then
    /// `path` (tokens chosen since, not yet recorded). Each token's change depends only on
    /// its total count, so the result is the same however the tokens are split between the
    /// history and `path`.
    pub fn adjust(&self, penalties: &Penalties, row: &mut [f32], path: &[TokenId]) {
        for &(token, bias) in &penalties.logit_bias {
            if let Some(logit) = row.get_mut(token as usize) {
                *logit += bias;
            }
        }
        let count = |token: TokenId| {
            self.output.get(&token).copied().unwrap_or(0)
                + path.iter().filter(|&&t| t == token).count() as u32
        };
        // Each token once: the output's, then the path's not yet seen.
        let mut path_only: Vec<TokenId> = Vec::new();
        for &token in path {
            if !self.output.contains_key(&token) && !path_only.contains(&token) {
                path_only.push(token);
            }
        }
        let emitted = || self.output.keys().copied().chain(path_only.iter().copied());
        if penalties.repetition != 1.0 {
            let r = penalties.repetition;
            let repeated = self
                .prompt
                .iter()
                .copied()
                .chain(emitted().filter(|t| !self.prompt.contains(t)));
            for token in repeated {
                if let Some(logit) = row.get_mut(token as usize) {
                    *logit = if *logit > 0.0 { *logit / r } else { *logit * r };
                }
            }
        }
        if penalties.presence != 0.0 || penalties.frequency != 0.0 {
            for token in emitted() {
                if let Some(logit) = row.get_mut(token as usize) {
                    *logit -= penalties.frequency * count(token) as f32 + penalties.presence;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn penalties(presence: f32, frequency: f32, repetition: f32) -> Penalties {
        Penalties {
            presence,
            frequency,
            repetition,
            logit_bias: Vec::new(),
        }
    }

    #[test]
    fn openai_penalties_subtract_presence_and_count_times_frequency() {
        let p = penalties(0.5, 0.25, 1.0);
        let mut history = TokenHistory::new(&[0, 1], &p);
        history.extend(&[2, 2, 3]);
        let mut row = vec![1.0f32; 5];
        history.adjust(&p, &mut row, &[2]);
        // Prompt tokens 0 and 1 are not counted by these penalties; 2 was emitted 3 times.
        assert_eq!(row, vec![1.0, 1.0, 1.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 1.0]);
    }

    #[test]
    fn repetition_divides_positive_and_multiplies_negative_logits_of_prompt_and_output() {
        let p = penalties(0.0, 0.0, 2.0);
        let mut history = TokenHistory::new(&[0, 1], &p);
        history.extend(&[1, 2]);
        let mut row = vec![4.0f32, -4.0, 4.0, 4.0, 4.0];
        history.adjust(&p, &mut row, &[3, 3]);
        // Once per token, however often it occurred.
        assert_eq!(row, vec![2.0, -8.0, 2.0, 2.0, 4.0]);
    }

    #[test]
    fn bias_comes_before_the_penalties_and_ignores_nothing_else() {
        let p = Penalties {
            repetition: 2.0,
            logit_bias: vec![(0, 2.0), (4, -100.0)],
            ..Penalties::default()
        };
        let history = TokenHistory::new(&[0], &p);
        let mut row = vec![1.0f32; 5];
        history.adjust(&p, &mut row, &[]);
        assert_eq!(row, vec![1.5, 1.0, 1.0, 1.0, -99.0]);
    }

    #[test]
    fn the_split_between_history_and_path_does_not_change_a_row() {
        let p = Penalties {
            presence: 0.3,
            frequency: 0.7,
            repetition: 1.3,
            logit_bias: vec![(5, 1.5)],
        };
        let tokens = [3u32, 5, 3, 7, 3, 9, 5];
        let prompt = [1u32, 3, 4];
        let base: Vec<f32> = (0..12).map(|i| (i as f32 - 5.0) * 0.37).collect();
        let mut rows = Vec::new();
        for split in 0..=tokens.len() {
            let mut history = TokenHistory::new(&prompt, &p);
            history.extend(&tokens[..split]);
            let mut row = base.clone();
            history.adjust(&p, &mut row, &tokens[split..]);
            rows.push(row);
        }
        assert!(rows.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(rows[0], base);
    }

    #[test]
    fn values_out_of_range_are_refused() {
        assert!(Penalties::default().is_neutral());
        assert!(Penalties::default().validate(10).is_ok());
        assert!(penalties(2.5, 0.0, 1.0).validate(10).is_err());
        assert!(penalties(0.0, f32::NAN, 1.0).validate(10).is_err());
        assert!(penalties(0.0, 0.0, 0.0).validate(10).is_err());
        assert!(penalties(0.0, 0.0, -1.0).validate(10).is_err());
        let bias = |logit_bias| Penalties {
            logit_bias,
            ..Penalties::default()
        };
        assert!(bias(vec![(9, 100.0)]).validate(10).is_ok());
        assert_eq!(
            bias(vec![(10, 1.0)]).validate(10),
            Err(PenaltyError::BiasToken {
                token: 10,
                vocab: 10
            })
        );
        assert!(bias(vec![(1, 101.0)]).validate(10).is_err());
        assert!(bias(vec![(1, 1.0); MAX_BIASED_TOKENS + 1])
            .validate(10)
            .is_err());
    }
}
