//! A rule on which tokens may come next, such as a grammar the output must follow (JSON
//! that matches a schema). Like the penalties it is applied to every row of a verify tree
//! for the path above that row's node, so a speculative run emits exactly what plain
//! decoding under the same rule emits.

use crate::TokenId;

/// Most whitespace a JSON grammar lets the model put between two JSON tokens (a regular
/// expression, llguidance's `whitespace_pattern`): without a bound a small model can loop
/// on newlines until `max_tokens`. Schemas from `response_format` and tool calls alike.
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{0,20}";

/// Which tokens may follow a sequence. The decode loop calls [`TokenConstraint::mask`] for
/// each row it chooses a token from, with the tokens chosen since the last
/// [`TokenConstraint::record`] (each path extends or replaces the previous one), and
/// `record` with the tokens each step emitted, every one allowed by the mask it was
/// chosen under.
pub trait TokenConstraint: Send {
    /// Sets to negative infinity in `row` (the logits after the recorded tokens and then
    /// `path`) every token that may not come next; leaves at least one.
    fn mask(&mut self, path: &[TokenId], row: &mut [f32]) -> Result<(), String>;

    /// Records tokens the generation emitted.
    fn record(&mut self, tokens: &[TokenId]) -> Result<(), String>;

    /// How many of `tokens`, following the recorded ones, the rule allows in a row. Drafts
    /// are cut there: a token it forbids can never be accepted. By default, all.
    fn allowed_prefix(&mut self, tokens: &[TokenId]) -> usize {
        tokens.len()
    }
}

/// Several constraints, applied in order: each masks what the ones before it left.
impl TokenConstraint for Vec<Box<dyn TokenConstraint>> {
    fn mask(&mut self, path: &[TokenId], row: &mut [f32]) -> Result<(), String> {
        self.iter_mut().try_for_each(|c| c.mask(path, row))
    }

    fn record(&mut self, tokens: &[TokenId]) -> Result<(), String> {
        self.iter_mut().try_for_each(|c| c.record(tokens))
    }

    fn allowed_prefix(&mut self, tokens: &[TokenId]) -> usize {
        self.iter_mut()
            .map(|c| c.allowed_prefix(tokens))
            .min()
            .unwrap_or(tokens.len())
    }
}

/// No stop token before `min` tokens were generated (vLLM's `min_tokens`), unless a
/// constraint before it left nothing else.
#[derive(Debug, Clone)]
pub struct MinTokens {
    min: usize,
    stop_tokens: Vec<TokenId>,
    recorded: usize,
}

impl MinTokens {
    pub fn new(min: usize, stop_tokens: Vec<TokenId>) -> Self {
        Self {
            min,
            stop_tokens,
            recorded: 0,
        }
    }
}

impl TokenConstraint for MinTokens {
    fn mask(&mut self, path: &[TokenId], row: &mut [f32]) -> Result<(), String> {
        if self.recorded + path.len() >= self.min {
            return Ok(());
        }
        let other_left = row
            .iter()
            .enumerate()
            .any(|(t, l)| *l > f32::NEG_INFINITY && !self.stop_tokens.contains(&(t as TokenId)));
        if other_left {
            for &token in &self.stop_tokens {
                if let Some(logit) = row.get_mut(token as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, tokens: &[TokenId]) -> Result<(), String> {
        self.recorded += tokens.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_tokens_holds_stop_tokens_back_for_the_path_too_unless_nothing_else_is_left() {
        let mut min = MinTokens::new(3, vec![0]);
        let mut row = vec![1.0f32; 3];
        min.mask(&[2], &mut row).unwrap();
        assert_eq!(row, vec![f32::NEG_INFINITY, 1.0, 1.0]);
        min.record(&[1, 2]).unwrap();
        let mut row = vec![1.0f32; 3];
        min.mask(&[], &mut row).unwrap();
        assert_eq!(row[0], f32::NEG_INFINITY, "2 of 3 tokens so far");
        let mut row = vec![1.0f32; 3];
        min.mask(&[2], &mut row).unwrap();
        assert_eq!(row, vec![1.0; 3], "3 tokens with the path");
        let mut only_stop = vec![1.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
        MinTokens::new(5, vec![0])
            .mask(&[], &mut only_stop)
            .unwrap();
        assert_eq!(only_stop[0], 1.0);
    }

    #[test]
    fn constraints_in_a_list_each_mask_what_the_others_left() {
        let mut both: Vec<Box<dyn TokenConstraint>> = vec![
            Box::new(MinTokens::new(1, vec![0])),
            Box::new(MinTokens::new(2, vec![1])),
        ];
        let mut row = vec![0.0f32; 3];
        both.mask(&[], &mut row).unwrap();
        assert_eq!(row, vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]);
        both.record(&[2]).unwrap();
        let mut row = vec![0.0f32; 3];
        both.mask(&[], &mut row).unwrap();
        assert_eq!(row, vec![0.0, f32::NEG_INFINITY, 0.0]);
    }
}
