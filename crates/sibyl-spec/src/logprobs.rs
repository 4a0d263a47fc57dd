//! Log-probabilities of the tokens a generation emits (the OpenAI API's `logprobs`).

use crate::TokenId;

/// Most alternatives a request may ask for at each token (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The target model's log-probabilities at one emitted token: natural logs of its
/// distribution there before temperature, top-k and top-p (what the model itself gives
/// each token), so they do not depend on how the token was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: TokenId,
    pub logprob: f32,
    /// The most likely tokens there, most likely first; a tie goes to the lower id.
    pub top: Vec<(TokenId, f32)>,
}

impl TokenLogprobs {
    /// `token`'s log-probability in the softmax of `logits`, and the `top` most likely
    /// tokens'. The sum runs in f64, so a position's figures are the same wherever its
    /// logits are (they are bit-identical alone and in a batch).
    pub fn new(logits: &[f32], token: TokenId, top: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
        let log_total = f64::from(max) + sum.ln();
        let logprob = |v: f32| (f64::from(v) - log_total) as f32;
        let at = |t: TokenId| logits.get(t as usize).copied().unwrap_or(f32::NEG_INFINITY);
        Self {
            token,
            logprob: logprob(at(token)),
            top: most_likely(logits, top.min(MAX_TOP_LOGPROBS))
                .into_iter()
                .map(|t| (t, logprob(at(t))))
                .collect(),
        }
    }
}

/// The `n` largest logits' indices, largest first, the lower index first on a tie; NaN
/// never counts.
fn most_likely(logits: &[f32], n: usize) -> Vec<TokenId> {
    let mut best: Vec<(f32, TokenId)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (i, &v) in logits.iter().enumerate() {
        // Not NaN, and larger than the smallest kept (ties keep the earlier index).
        if v.is_nan() || (best.len() == n && v <= best[n - 1].0) {
            continue;
        }
        let at = best.partition_point(|&(kept, _)| kept >= v);
        best.insert(at, (v, i as TokenId));
        best.truncate(n);
    }
    best.into_iter().map(|(_, t)| t).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_of_a_softmax() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, f32::NEG_INFINITY];
        let p = TokenLogprobs::new(&logits, 2, 3);
        let total: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        assert!((f64::from(p.logprob) - (2.0 - total.ln())).abs() < 1e-6);
        // Ties in order of id, then the rest.
        let top: Vec<TokenId> = p.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(top, vec![1, 3, 2]);
        assert_eq!(p.top[0].1, p.top[1].1);
        let exp_sum: f64 = (0..5)
            .map(|t| f64::from(TokenLogprobs::new(&logits, t, 0).logprob).exp())
            .sum();
        assert!((exp_sum - 1.0).abs() < 1e-6);
        assert_eq!(TokenLogprobs::new(&logits, 4, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn top_is_capped_and_skips_nan() {
        let logits: Vec<f32> = (0..100)
            .map(|i| if i == 7 { f32::NAN } else { i as f32 })
            .collect();
        let p = TokenLogprobs::new(&logits[..50], 0, 500);
        assert_eq!(p.top.len(), MAX_TOP_LOGPROBS);
        assert_eq!(p.top[0].0, 49);
        let p = TokenLogprobs::new(&[f32::NAN, 0.5, 0.25], 1, 5);
        assert_eq!(
            p.top.iter().map(|&(t, _)| t).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }
}
