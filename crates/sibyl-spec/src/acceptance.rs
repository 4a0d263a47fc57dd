/// Running estimate of how often a drafter's tokens are accepted, used to rank its branches
/// when the tree has to be cut to the verify budget.
#[derive(Debug, Clone)]
pub struct AcceptanceStats {
    /// Draft tokens of this drafter that were placed in a verified tree.
    pub proposed: u64,
    /// Draft tokens of this drafter that the target accepted.
    pub accepted: u64,
    rate: f64,
}

impl Default for AcceptanceStats {
    fn default() -> Self {
        Self {
            proposed: 0,
            accepted: 0,
            rate: Self::PRIOR,
        }
    }
}

impl AcceptanceStats {
    /// Acceptance assumed before anything has been measured.
    pub const PRIOR: f64 = 0.6;
    /// Weight of the newest step in the moving average.
    const SMOOTHING: f64 = 0.2;

    /// Statistics that start from the estimate `rate` instead of [`Self::PRIOR`] (what
    /// earlier sessions measured for this kind of drafter).
    pub fn starting_at(rate: f64) -> Self {
        Self {
            rate: if rate.is_finite() {
                rate.clamp(0.0, 1.0)
            } else {
                Self::PRIOR
            },
            ..Self::default()
        }
    }

    /// Records one verify step: `proposed` of this drafter's tokens were in the tree; at
    /// `reached` levels of the accepted path it had a guess, and at `accepted` of those its
    /// guess was accepted.
    pub fn record(&mut self, proposed: usize, reached: usize, accepted: usize) {
        self.proposed += proposed as u64;
        self.accepted += accepted as u64;
        if reached > 0 {
            let step_rate = accepted as f64 / reached as f64;
            self.rate += Self::SMOOTHING * (step_rate - self.rate);
        }
    }

    /// Estimated probability that this drafter's best guess for the next level is accepted
    /// once the level before was, in [0.01, 1]. The floor is low enough that two drafters
    /// that are always wrong are not worth a node (see [`crate::MIN_GAIN`]).
    pub fn rate(&self) -> f64 {
        self.rate.clamp(0.01, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_follows_measured_acceptance_and_stays_in_bounds() {
        let mut stats = AcceptanceStats::default();
        for _ in 0..100 {
            stats.record(4, 1, 0);
        }
        assert!(stats.rate() <= 0.01 + 1e-12);
        for _ in 0..100 {
            stats.record(4, 4, 4);
        }
        assert!(stats.rate() > 0.99);
        assert_eq!(stats.proposed, 800);
        assert_eq!(stats.accepted, 400);
    }
}
