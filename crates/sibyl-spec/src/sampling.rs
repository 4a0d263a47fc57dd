use crate::penalties::{Penalties, PenaltyError};
use crate::TokenId;
use rand::Rng;

/// How the target's next token is chosen. `temperature == 0` is greedy (argmax).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p` (`None`: 1).
    pub top_p: Option<f32>,
    /// Keep the tokens at least `min_p` times as likely as the most likely one, after
    /// temperature and before top-k and top-p (`None`: all).
    pub min_p: Option<f32>,
    /// Seed of the request's random stream.
    pub seed: u64,
    /// Bias and penalties applied to the logits before any of the above.
    pub penalties: Penalties,
    /// llama.cpp's order: top-k, top-p, then min-p see the model's own probabilities and
    /// temperature applies to the tokens they keep. Otherwise (vLLM's order) temperature
    /// comes first, then min-p, top-k, top-p.
    pub filters_first: bool,
}

/// A sampling parameter outside its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("top_k must be at least 1")]
    TopK,
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("the target's logits for node {node} are missing or not {vocab} wide")]
    Logits { node: usize, vocab: usize },
    #[error(transparent)]
    Penalty(#[from] PenaltyError),
    #[error("the output constraint failed: {0}")]
    Constraint(String),
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            seed: 0,
            penalties: Penalties::default(),
            filters_first: false,
        }
    }

    /// Checks every parameter for a vocabulary of `vocab` tokens; call once when a request
    /// arrives.
    pub fn validate(&self, vocab: usize) -> Result<(), SamplingError> {
        self.penalties.validate(vocab)?;
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(SamplingError::TopP(p));
            }
        }
        if self.top_k == Some(0) {
            return Err(SamplingError::TopK);
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(SamplingError::MinP(p));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Index of the largest logit; the lowest index wins a tie and NaN never wins.
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as TokenId
}

/// The target's distribution over the next token after temperature, top-k and top-p,
/// dense over the vocabulary, in f64 so residuals stay accurate.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetDistribution {
    probs: Vec<f64>,
    total: f64,
}

/// Keeps the weights of at least `min_p` times the largest (weights relative to the
/// largest, which is 1).
fn keep_min_p(probs: &mut [f64], min_p: f32) {
    for p in probs.iter_mut() {
        if *p < f64::from(min_p) {
            *p = 0.0;
        }
    }
}

/// Keeps exactly the `k` largest weights: ties at the threshold go to the lowest token ids.
fn keep_top_k(probs: &mut [f64], k: usize) {
    if k >= probs.len() {
        return;
    }
    let mut sorted = probs.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    let kept = probs.iter().filter(|&&p| p > threshold).count();
    let mut ties_left = k - kept;
    for p in probs.iter_mut() {
        if *p < threshold {
            *p = 0.0;
        } else if *p == threshold {
            if ties_left > 0 {
                ties_left -= 1;
            } else {
                *p = 0.0;
            }
        }
    }
}

/// Keeps the smallest set of largest weights whose share of the total reaches `top_p`.
fn keep_top_p(probs: &mut [f64], top_p: f32) {
    let total: f64 = probs.iter().sum();
    let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut mass = 0.0;
    let mut cut = order.len();
    for (rank, &i) in order.iter().enumerate() {
        mass += probs[i] / total;
        if mass >= f64::from(top_p) {
            cut = rank + 1;
            break;
        }
    }
    for &i in &order[cut..] {
        probs[i] = 0.0;
    }
}

impl TargetDistribution {
    /// Builds the distribution from raw logits. `config` must be validated and not greedy.
    pub fn new(logits: &[f32], config: &SamplingConfig) -> Self {
        let inv_t = 1.0 / f64::from(config.temperature.max(1e-6));
        let max = logits
            .iter()
            .copied()
            .filter(|v| !v.is_nan())
            .fold(f32::NEG_INFINITY, f32::max);
        let weights = |scale: f64| {
            logits.iter().map(move |&l| {
                if l.is_nan() || max == f32::NEG_INFINITY {
                    0.0
                } else {
                    ((f64::from(l) - f64::from(max)) * scale).exp()
                }
            })
        };
        let min_p = config.min_p.filter(|&p| p > 0.0);
        let top_k = config.top_k;
        let top_p = config.top_p.filter(|&p| p < 1.0);
        let mut probs: Vec<f64>;
        if config.filters_first {
            probs = weights(1.0).collect();
            top_k.inspect(|&k| keep_top_k(&mut probs, k));
            top_p.inspect(|&p| keep_top_p(&mut probs, p));
            min_p.inspect(|&p| keep_min_p(&mut probs, p));
            for (p, tempered) in probs.iter_mut().zip(weights(inv_t)) {
                if *p > 0.0 {
                    *p = tempered;
                }
            }
        } else {
            probs = weights(inv_t).collect();
            min_p.inspect(|&p| keep_min_p(&mut probs, p));
            top_k.inspect(|&k| keep_top_k(&mut probs, k));
            top_p.inspect(|&p| keep_top_p(&mut probs, p));
        }
        let total = probs.iter().sum();
        Self { probs, total }
    }

    /// Normalised probability of `token`.
    pub fn prob(&self, token: TokenId) -> f64 {
        match self.probs.get(token as usize) {
            Some(&p) if self.total > 0.0 => p / self.total,
            _ => 0.0,
        }
    }

    /// Draws a token.
    pub fn sample<R: Rng>(&self, rng: &mut R) -> TokenId {
        let target = rng.random::<f64>() * self.total;
        let mut acc = 0.0;
        let mut last_nonzero = 0usize;
        for (i, &p) in self.probs.iter().enumerate() {
            if p > 0.0 {
                acc += p;
                last_nonzero = i;
                if acc > target {
                    return i as TokenId;
                }
            }
        }
        last_nonzero as TokenId
    }

    /// Removes a rejected point-mass candidate: the residual `max(0, p - 1[token])`.
    pub(crate) fn remove(&mut self, token: TokenId) {
        if let Some(p) = self.probs.get_mut(token as usize) {
            self.total -= *p;
            *p = 0.0;
        }
    }

    /// Replaces the distribution with the normalised residual `max(0, p - q)` after a draft
    /// drawn from `q` was rejected. Returns false when nothing is left (then `p` is kept).
    pub(crate) fn subtract(&mut self, q: &crate::SparseDist) -> bool {
        if self.total <= 0.0 {
            return false;
        }
        let mut residual = self.probs.clone();
        let mut total = 0.0;
        for p in residual.iter_mut() {
            *p /= self.total;
        }
        for &(token, q) in q.entries() {
            if let Some(p) = residual.get_mut(token as usize) {
                *p = (*p - f64::from(q)).max(0.0);
            }
        }
        for p in &residual {
            total += p;
        }
        if total <= 1e-12 {
            return false;
        }
        self.probs = residual;
        self.total = total;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p: None,
            seed: 1,
            penalties: Penalties::default(),
            filters_first: false,
        }
    }

    #[test]
    fn softmax_with_temperature() {
        let d = TargetDistribution::new(&[0.0, (2.0f32).ln()], &config(1.0, None, None));
        assert!((d.prob(0) - 1.0 / 3.0).abs() < 1e-9);
        assert!((d.prob(1) - 2.0 / 3.0).abs() < 1e-9);
        let hot = TargetDistribution::new(&[0.0, (2.0f32).ln()], &config(0.5, None, None));
        assert!((hot.prob(1) - 0.8).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_truncate() {
        let logits = [1.0f32, 3.0, 2.0, 0.0];
        let k = TargetDistribution::new(&logits, &config(1.0, Some(2), None));
        assert_eq!(k.prob(0), 0.0);
        assert_eq!(k.prob(3), 0.0);
        assert!(k.prob(1) > k.prob(2) && k.prob(2) > 0.0);
        let p = TargetDistribution::new(&logits, &config(1.0, None, Some(0.5)));
        assert_eq!(p.prob(1), 1.0);
    }

    #[test]
    fn min_p_keeps_tokens_as_likely_as_a_share_of_the_top_one_after_temperature() {
        // Weights 1, e^-1, e^-2, e^-3 against the top token at temperature 1.
        let logits = [0.0f32, 3.0, 2.0, 1.0];
        let min_p = |temperature, p| {
            let config = SamplingConfig {
                min_p: Some(p),
                ..config(temperature, None, None)
            };
            let d = TargetDistribution::new(&logits, &config);
            (0..4).filter(|&t| d.prob(t) > 0.0).count()
        };
        assert_eq!(min_p(1.0, 0.3), 2);
        assert_eq!(min_p(1.0, 0.1), 3);
        // Hotter, the tail is nearer the top.
        assert_eq!(min_p(4.0, 0.3), 4);
        assert_eq!(min_p(1.0, 1.0), 1);
        assert!(SamplingConfig {
            min_p: Some(1.5),
            ..config(1.0, None, None)
        }
        .validate(4)
        .is_err());
    }

    #[test]
    fn llama_cpp_order_filters_the_model_s_probabilities_then_applies_temperature() {
        // Weights 1, e^-1, e^-2, e^-3 against the top token at temperature 1.
        let logits = [0.0f32, 3.0, 2.0, 1.0];
        let kept = |d: &TargetDistribution| (0..4).filter(|&t| d.prob(t) > 0.0).count();
        let first = |config: SamplingConfig| SamplingConfig {
            filters_first: true,
            ..config
        };
        // min-p 0.3 of e^0 keeps two tokens whatever the temperature; tempered first, four.
        let hot = SamplingConfig {
            min_p: Some(0.3),
            ..config(4.0, None, None)
        };
        assert_eq!(kept(&TargetDistribution::new(&logits, &hot)), 4);
        let d = TargetDistribution::new(&logits, &first(hot));
        assert_eq!(kept(&d), 2);
        // The two kept share the mass at temperature 4: 1 against e^-1/4.
        let ratio = (-0.25f64).exp();
        assert!((d.prob(1) - 1.0 / (1.0 + ratio)).abs() < 1e-9);
        assert!((d.prob(2) - ratio / (1.0 + ratio)).abs() < 1e-9);
        // top-p 0.7 of the model's shares (0.64, 0.24, ...) needs two tokens; of the shares
        // at temperature 0.5 (0.87, ...), one.
        let cold = config(0.5, None, Some(0.7));
        assert_eq!(kept(&TargetDistribution::new(&logits, &cold)), 1);
        let d = TargetDistribution::new(&logits, &first(cold));
        assert_eq!(kept(&d), 2);
        let ratio = (-2.0f64).exp();
        assert!((d.prob(1) - 1.0 / (1.0 + ratio)).abs() < 1e-9);
        // top-k is the same either way.
        let k = config(0.5, Some(3), None);
        assert_eq!(
            TargetDistribution::new(&logits, &k),
            TargetDistribution::new(&logits, &first(k.clone()))
        );
    }

    #[test]
    fn invalid_parameters_are_refused() {
        assert!(config(-0.1, None, None).validate(10).is_err());
        assert!(config(f32::NAN, None, None).validate(10).is_err());
        assert!(config(1.0, Some(0), None).validate(10).is_err());
        assert!(config(1.0, None, Some(0.0)).validate(10).is_err());
        assert!(config(1.0, None, Some(1.5)).validate(10).is_err());
        assert!(config(0.7, Some(40), Some(0.9)).validate(10).is_ok());
    }

    #[test]
    fn argmax_prefers_the_lowest_index_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }
}
