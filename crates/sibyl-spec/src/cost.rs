//! What a verify step costs, learned online, and how many draft nodes pay for themselves.
//!
//! A forward pass over n tree nodes costs about one decoding step on a GPU whatever n is,
//! but on a CPU it grows with n (on 2 AVX2 cores, 8 nodes cost about twice one step). So
//! the size of each step's tree is chosen for the most expected tokens per second: with the
//! nodes ranked by their chance of being accepted, take the first j when
//! `(1 + sum of their chances) / cost(1 + j)` beats plain decoding, `1 / cost(1)`, by a
//! margin; otherwise the step is plain decoding.

/// Node-count buckets: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65 and more.
const NODE_BUCKETS: usize = 8;
/// Context-length buckets (attention over the cached prefix grows with it): under 512,
/// under 1024, under 2048, under 4096, the rest.
const CONTEXT_BUCKETS: usize = 5;

/// Cost of each extra node, relative to a plain step, assumed until a size is measured:
/// low enough that speculation is tried on any machine, and measured on the first steps.
const PRIOR_SLOPE: f64 = 0.05;
/// Weight of the newest measurement in a bucket's moving average.
const SMOOTHING: f64 = 0.1;
/// How much faster (expected tokens per second) a tree must be than plain decoding to be
/// verified: below it, the gain is within the noise of the estimates.
pub const MIN_GAIN: f64 = 1.05;

/// Moving averages of measured step times by tree size and context length.
#[derive(Debug, Clone, Default)]
pub struct StepCosts {
    /// Per context bucket and node bucket: mean node count and mean seconds.
    buckets: [[Option<(f64, f64)>; NODE_BUCKETS]; CONTEXT_BUCKETS],
    frozen: bool,
}

fn node_bucket(nodes: usize) -> usize {
    let nodes = nodes.max(1);
    ((usize::BITS - (nodes - 1).leading_zeros()) as usize).min(NODE_BUCKETS - 1)
}

fn context_bucket(context: usize) -> usize {
    match context {
        0..512 => 0,
        512..1024 => 1,
        1024..2048 => 2,
        2048..4096 => 3,
        _ => 4,
    }
}

impl StepCosts {
    /// These costs, no longer changed by [`StepCosts::record`]: for costs measured
    /// elsewhere, and for tests that must not depend on the machine's speed.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Records a step over `nodes` tree nodes (root included) after `context` tokens that
    /// took `seconds`. Non-finite or negative times are ignored.
    pub fn record(&mut self, nodes: usize, context: usize, seconds: f64) {
        if self.frozen || !seconds.is_finite() || seconds < 0.0 || nodes == 0 {
            return;
        }
        let slot = &mut self.buckets[context_bucket(context)][node_bucket(nodes)];
        let nodes = nodes as f64;
        *slot = Some(match *slot {
            None => (nodes, seconds),
            Some((n, s)) => (n + SMOOTHING * (nodes - n), s + SMOOTHING * (seconds - s)),
        });
    }

    /// Estimated cost of a step over `nodes` nodes after `context` tokens, in seconds, or
    /// in units of one plain step while nothing at this context length is measured. Never
    /// decreases with `nodes`.
    pub fn estimate(&self, nodes: usize, context: usize) -> f64 {
        let nodes = nodes.max(1) as f64;
        // Measured points, by size, made non-decreasing (a bigger tree never costs less).
        let mut points: Vec<(f64, f64)> = Vec::with_capacity(NODE_BUCKETS);
        for &(n, s) in self.buckets[context_bucket(context)].iter().flatten() {
            let floor = points.last().map_or(0.0, |p| p.1);
            points.push((n, s.max(floor)));
        }
        let prior = |n: f64| 1.0 + PRIOR_SLOPE * (n - 1.0);
        let Some(&(first_n, first_s)) = points.first() else {
            return prior(nodes);
        };
        // One plain step's cost, measured or scaled from the smallest measured size.
        let unit = first_s / prior(first_n);
        if nodes <= first_n {
            return first_s.min(unit * prior(nodes));
        }
        for pair in points.windows(2) {
            let ((n0, s0), (n1, s1)) = (pair[0], pair[1]);
            if nodes <= n1 {
                return s0 + (s1 - s0) * (nodes - n0) / (n1 - n0).max(1e-9);
            }
        }
        let &(last_n, last_s) = points.last().unwrap_or(&(first_n, first_s));
        last_s + unit * PRIOR_SLOPE * (nodes - last_n)
    }
}

/// How many of `values` (each draft node's estimated chance of acceptance, best first, so
/// that every prefix is a tree) to verify, given `cost(n)`, the cost of a step over `n`
/// nodes with the root. 0 means a plain step: no prefix is expected to beat plain decoding
/// by [`MIN_GAIN`]. With `explore`, at least one node is verified when there is one, so a
/// drafter whose estimate fell low can show it has become useful again.
pub fn choose_draft_nodes(values: &[f64], cost: impl Fn(usize) -> f64, explore: bool) -> usize {
    let plain = 1.0 / cost(1).max(f64::MIN_POSITIVE);
    let mut best = (0usize, plain * MIN_GAIN);
    let mut expected = 1.0;
    for (j, value) in values.iter().enumerate() {
        expected += value.clamp(0.0, 1.0);
        let rate = expected / cost(j + 2).max(f64::MIN_POSITIVE);
        if rate > best.1 {
            best = (j + 1, rate);
        }
    }
    if best.0 == 0 && explore {
        values.len().min(1)
    } else {
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_size() {
        let buckets: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 1000]
            .into_iter()
            .map(node_bucket)
            .collect();
        assert_eq!(buckets, vec![0, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 7]);
        assert_eq!(context_bucket(0), 0);
        assert_eq!(context_bucket(4096), 4);
    }

    #[test]
    fn estimates_follow_measurements_and_never_decrease_with_size() {
        let mut costs = StepCosts::default();
        assert!((costs.estimate(9, 100) - 1.4).abs() < 1e-9, "prior");
        for _ in 0..50 {
            costs.record(1, 100, 0.100);
            costs.record(8, 100, 0.200);
            // A noisy, cheaper bigger tree does not make bigger trees look cheaper.
            costs.record(16, 100, 0.150);
        }
        assert!((costs.estimate(1, 100) - 0.1).abs() < 1e-6);
        assert!((costs.estimate(8, 100) - 0.2).abs() < 1e-6);
        let middle = costs.estimate(4, 100);
        assert!(middle > 0.1 && middle < 0.2, "{middle}");
        assert!((costs.estimate(16, 100) - 0.2).abs() < 1e-6);
        // Past the largest measured size: the prior slope per extra node.
        assert!((costs.estimate(32, 100) - (0.2 + 0.1 * PRIOR_SLOPE * 16.0)).abs() < 1e-6);
        // Another context length has its own measurements.
        assert!((costs.estimate(8, 3000) - (1.0 + 7.0 * PRIOR_SLOPE)).abs() < 1e-9);
        let mut previous = 0.0;
        for n in 1..80 {
            let c = costs.estimate(n, 100);
            assert!(c >= previous, "{n}");
            previous = c;
        }
        costs.record(4, 100, f64::NAN);
        costs.record(4, 100, -1.0);
        assert_eq!(costs.estimate(4, 100), middle);
        let frozen = costs.frozen();
        let mut changed = frozen.clone();
        changed.record(4, 100, 9.0);
        assert_eq!(changed.estimate(4, 100), frozen.estimate(4, 100));
    }

    #[test]
    fn a_size_below_the_smallest_measured_is_scaled_by_the_prior() {
        let mut costs = StepCosts::default();
        costs.record(11, 0, 1.5);
        let one = costs.estimate(1, 0);
        assert!((one - 1.0).abs() < 1e-9, "{one}");
    }

    #[test]
    fn speculation_is_chosen_only_where_it_pays() {
        // CPU-like: each node costs 15% of a step.
        let cpu = |n: usize| 1.0 + 0.15 * (n - 1) as f64;
        assert_eq!(choose_draft_nodes(&[0.02, 0.01], cpu, false), 0);
        assert_eq!(choose_draft_nodes(&[0.02, 0.01], cpu, true), 1);
        assert_eq!(choose_draft_nodes(&[], cpu, true), 0);
        // Sure tokens pay for themselves all the way.
        assert_eq!(choose_draft_nodes(&[1.0; 10], cpu, false), 10);
        // A chain accepted with 0.6 per level: the first few levels pay, later ones not.
        let chain: Vec<f64> = (1..=10).map(|d| 0.6f64.powi(d)).collect();
        let chosen = choose_draft_nodes(&chain, cpu, false);
        assert!((2..=4).contains(&chosen), "{chosen}");
        // GPU-like: nodes are almost free, so every plausible one goes in.
        let gpu = |n: usize| 1.0 + 0.001 * (n - 1) as f64;
        assert_eq!(choose_draft_nodes(&chain, gpu, false), 10);
    }
}
