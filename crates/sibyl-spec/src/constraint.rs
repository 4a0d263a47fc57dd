//! A rule on which tokens may come next, such as a grammar the output must follow (JSON
//! that matches a schema). Like the penalties it is applied to every row of a verify tree
//! for the path above that row's node, so a speculative run emits exactly what plain
//! decoding under the same rule emits.

use crate::TokenId;

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
