//! What a verify step costs, learned online, and how many draft nodes pay for themselves.
//!
//! A forward pass over n tree nodes costs about one decoding step on a GPU whatever n is,
//! but on a CPU it grows with n (on 2 AVX2 cores, 8 nodes cost about twice one step). So
//! the size of each step's tree is chosen for the most expected tokens per second: with the
//! nodes ranked by their chance of being accepted, take the first j when
//! `(1 + sum of their chances) / cost(1 + j)` beats plain decoding, `1 / cost(1)`, by a
//! margin; otherwise the step is plain decoding.
//!
//! A drafter that runs on the verifier's own cores (a small model in the same process) costs
//! time before the step, and that time is lost whether its tokens are accepted or not. So
//! such a drafter is asked for as many tokens as are expected to pay for their drafting and
//! their nodes, given the drafts the cheap drafters already offered: none when those are
//! better value ([`choose_draft_length`]).

use std::collections::HashMap;

/// Node-count buckets: 1, 2, 3-4, 5-8, 9-16, 17-32, 33-64, 65 and more.
const NODE_BUCKETS: usize = 8;
/// Context-length buckets (attention over the cached prefix grows with it): under 512,
/// 1024, 1536, 2048, 3072, 4096, 6144, and the rest.
const CONTEXT_BUCKETS: usize = 8;

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
        1024..1536 => 2,
        1536..2048 => 3,
        2048..3072 => 4,
        3072..4096 => 5,
        4096..6144 => 6,
        _ => 7,
    }
}

impl StepCosts {
    /// These costs, no longer changed by [`StepCosts::record`]: for costs measured
    /// elsewhere, and for tests that must not depend on the machine's speed.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Records a step over `nodes` rows (tree nodes, root included, and prompt tokens) that
    /// took `seconds`, its rows attending to `context` earlier tokens on average (a verify
    /// step's context length; more for a prompt chunk late in a long prompt). Non-finite or
    /// negative times are ignored.
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

    /// Whether any step was measured (else [`StepCosts::estimate`] is in units of a plain
    /// step, not seconds).
    pub fn measured(&self) -> bool {
        self.buckets.iter().flatten().any(Option::is_some)
    }

    /// Whether a step after `context` tokens was measured (else its cost is inferred from
    /// other context lengths, which may be far off).
    pub fn measured_at(&self, context: usize) -> bool {
        self.buckets[context_bucket(context)]
            .iter()
            .any(Option::is_some)
    }

    /// Estimated cost of a step over `nodes` nodes after `context` tokens, in seconds, or
    /// in units of one plain step while nothing is measured. Never decreases with `nodes`.
    ///
    /// Between the sizes measured at this context length it interpolates. Outside them, and
    /// at a context length not measured yet, it follows the shape of the curve at the
    /// context length measured over the widest range of sizes (what extra rows cost changes
    /// little with the context), and only where nothing covers the size, the prior slope.
    pub fn estimate(&self, nodes: usize, context: usize) -> f64 {
        let nodes = nodes.max(1) as f64;
        let bucket = context_bucket(context);
        let reference = self.reference(bucket);
        let points = self.points(bucket);
        let (Some(&(first_n, first_s)), Some(&(last_n, last_s))) = (points.first(), points.last())
        else {
            return match reference {
                Some(other) => estimate_in(&self.points(other), nodes),
                None => prior(nodes),
            };
        };
        let shape = reference.map(|other| self.points(other));
        match shape {
            Some(shape) if nodes < first_n => {
                first_s * estimate_in(&shape, nodes) / estimate_in(&shape, first_n)
            }
            Some(shape) if nodes > last_n => {
                last_s * estimate_in(&shape, nodes) / estimate_in(&shape, last_n)
            }
            _ => estimate_in(&points, nodes),
        }
    }

    /// The measured points of a context bucket, by size, made non-decreasing (a bigger tree
    /// never costs less).
    fn points(&self, bucket: usize) -> Vec<(f64, f64)> {
        let mut points: Vec<(f64, f64)> = Vec::with_capacity(NODE_BUCKETS);
        for &(n, s) in self.buckets[bucket].iter().flatten() {
            let floor = points.last().map_or(0.0, |p| p.1);
            points.push((n, s.max(floor)));
        }
        points
    }

    /// Another context bucket whose measurements span the most sizes (the nearest of
    /// equals), to lend its curve's shape to `bucket`.
    fn reference(&self, bucket: usize) -> Option<usize> {
        (0..CONTEXT_BUCKETS)
            .filter(|&b| b != bucket)
            .filter_map(|b| {
                let points = self.points(b);
                let span = points.last()?.0 / points.first()?.0;
                Some((b, span))
            })
            .min_by(|a, b| {
                b.1.total_cmp(&a.1)
                    .then(a.0.abs_diff(bucket).cmp(&b.0.abs_diff(bucket)))
            })
            .map(|(b, _)| b)
    }
}

/// The cost of a step of one plain step's size plus [`PRIOR_SLOPE`] per extra node.
fn prior(nodes: f64) -> f64 {
    1.0 + PRIOR_SLOPE * (nodes - 1.0)
}

/// Cost of `nodes` from one bucket's `points` (not empty): interpolated between them; below
/// them scaled by the prior; beyond them along the mean slope of the measured points, or
/// the prior's where that is steeper (rows grow dearer as the pass stops being bound by
/// reading weights, so the mean slope up to the largest measured size is the least the
/// next rows cost; the prior alone made trees larger than any measured look cheap).
fn estimate_in(points: &[(f64, f64)], nodes: f64) -> f64 {
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
    let measured_slope = if last_n > first_n {
        (last_s - first_s) / (last_n - first_n)
    } else {
        0.0
    };
    last_s + measured_slope.max(unit * PRIOR_SLOPE) * (nodes - last_n)
}

/// How many of `values` (each draft node's estimated chance of acceptance, best first, so
/// that every prefix is a tree) to verify, given `cost(n)`, the cost of a step over `n`
/// nodes with the root. 0 means a plain step: no prefix is expected to beat plain decoding
/// by [`MIN_GAIN`]. With `explore`, at least one node is verified when there is one, so a
/// drafter whose estimate fell low can show it has become useful again. This is
/// [`choose_batch_draft_nodes`] for a batch of one session.
pub fn choose_draft_nodes(values: &[f64], cost: impl Fn(usize) -> f64, explore: bool) -> usize {
    choose_batch_draft_nodes(&[BatchDrafts { values, explore }], 1, cost)[0]
}

/// One session's draft nodes in a batched step: their chances, best first (every prefix is
/// a tree), and whether it verifies at least one of them whatever they are worth.
#[derive(Debug, Clone, Copy)]
pub struct BatchDrafts<'a> {
    pub values: &'a [f64],
    pub explore: bool,
}

/// How many draft nodes each session of a batched step verifies. The step already has
/// `rows` rows (each session's root, prompt chunks, sessions sized otherwise); `cost(n)` is
/// the cost of a forward pass of `n` rows. The nodes of all sessions are taken best first
/// (each session's in its own order), and the count that gives the most expected tokens per
/// unit of cost is kept: `(sessions + sum of chances) / cost(rows + nodes)`, where no draft
/// at all must be beaten by [`MIN_GAIN`]. So speculation shrinks as the batch grows (each
/// row costs more once the pass is no longer bound by reading weights) and comes back as it
/// falls. An exploring session gets one node when it got none.
pub fn choose_batch_draft_nodes(
    sessions: &[BatchDrafts<'_>],
    rows: usize,
    cost: impl Fn(usize) -> f64,
) -> Vec<usize> {
    let base = sessions.len() as f64;
    let plain = base / cost(rows).max(f64::MIN_POSITIVE);
    let mut taken = vec![0usize; sessions.len()];
    let mut order = Vec::new();
    let mut best = (0usize, plain * MIN_GAIN);
    let mut expected = base;
    loop {
        let next = sessions
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.values.get(taken[i]).map(|&v| (i, v.clamp(0.0, 1.0))))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
        let Some((session, value)) = next else {
            break;
        };
        taken[session] += 1;
        order.push(session);
        expected += value;
        let rate = expected / cost(rows + order.len()).max(f64::MIN_POSITIVE);
        if rate > best.1 {
            best = (order.len(), rate);
        }
    }
    let mut chosen = vec![0usize; sessions.len()];
    for &session in &order[..best.0] {
        chosen[session] += 1;
    }
    for (count, s) in chosen.iter_mut().zip(sessions) {
        if *count == 0 && s.explore && !s.values.is_empty() {
            *count = 1;
        }
    }
    chosen
}

/// Each measurement of a drafter multiplies the weight of the earlier ones in its kind's
/// costs by this: about the last 20 count.
const DRAFT_DECAY: f64 = 0.95;

/// Weight of the newest block in a drafter kind's moving average of seconds per token.
const DRAFT_SMOOTHING: f64 = 0.2;

/// A decayed least-squares line `seconds = fixed + per_token * tokens`, for the time a
/// drafter takes to catch up with `tokens` new context tokens (one forward pass: a fixed
/// part, like a decoding step of its model, and a part per token).
#[derive(Debug, Clone, Copy, Default)]
struct Line {
    weight: f64,
    x: f64,
    xx: f64,
    y: f64,
    xy: f64,
}

impl Line {
    fn add(&mut self, x: f64, y: f64) {
        for (sum, sample) in [
            (&mut self.weight, 1.0),
            (&mut self.x, x),
            (&mut self.xx, x * x),
            (&mut self.y, y),
            (&mut self.xy, x * y),
        ] {
            *sum = *sum * DRAFT_DECAY + sample;
        }
    }

    /// The line's value at `x`: the fit; where the samples cannot tell a slope (all at one
    /// size, as after a first call) the line through the origin, which is optimistic for
    /// smaller sizes so that they get measured; where the slope comes out negative (noise)
    /// the mean. Never negative.
    fn at(&self, x: f64) -> f64 {
        let variance = self.weight * self.xx - self.x * self.x;
        let mean = self.y / self.weight.max(f64::MIN_POSITIVE);
        if variance <= 1e-9 * self.weight * self.xx.max(1.0) {
            return (self.xy / self.xx.max(f64::MIN_POSITIVE) * x).max(0.0);
        }
        let slope = (self.weight * self.xy - self.x * self.y) / variance;
        if slope <= 0.0 {
            return mean.max(0.0);
        }
        let fixed = (self.y - slope * self.x) / self.weight;
        if fixed < 0.0 {
            // Through the origin instead.
            return (self.xy / self.xx * x).max(0.0);
        }
        fixed + slope * x
    }
}

/// What one drafter kind costs the verifier when it runs on its cores.
#[derive(Debug, Clone, Copy, Default)]
struct KindCosts {
    catch_up: Line,
    /// Moving average of the seconds per drafted token after the first.
    per_token: Option<f64>,
}

/// What drafting costs the verifier when the drafter runs on its cores (in the same
/// process), per drafter kind, in two parts: catching up with the context that grew since
/// its last call (a small model computes its cache for those tokens and its first draft
/// token with them; the whole prompt at its first call of a generation), and each further
/// drafted token (one forward pass of its model each).
#[derive(Debug, Clone, Default)]
pub struct DraftCosts {
    kinds: HashMap<String, KindCosts>,
    frozen: bool,
}

impl DraftCosts {
    /// These costs, no longer changed by the `record` methods (for tests).
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Records that a drafter of `kind` took `seconds` to catch up with `new` tokens.
    /// Non-finite or negative times are ignored.
    pub fn record_catch_up(&mut self, kind: &str, seconds: f64, new: usize) {
        if self.frozen || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let costs = self.kinds.entry(kind.to_string()).or_default();
        costs.catch_up.add(new as f64, seconds);
    }

    /// Records that a drafter of `kind`, caught up, took `seconds` for `passes` more
    /// forward passes of its model (a block of n tokens takes n - 1 after the catch-up's,
    /// or n when it stopped early). No pass tells nothing; non-finite or negative times are
    /// ignored.
    pub fn record_drafting(&mut self, kind: &str, seconds: f64, passes: usize) {
        if self.frozen || !seconds.is_finite() || seconds < 0.0 || passes == 0 {
            return;
        }
        let sample = seconds / passes as f64;
        let costs = self.kinds.entry(kind.to_string()).or_default();
        costs.per_token = Some(match costs.per_token {
            Some(mean) => mean + DRAFT_SMOOTHING * (sample - mean),
            None => sample,
        });
    }

    /// Estimated seconds for a drafter of `kind` to catch up with `new` tokens and draft a
    /// block of `length` tokens, once it was measured catching up (a further token costs
    /// what catching up with one does until one is measured).
    pub fn estimate(&self, kind: &str, new: usize, length: usize) -> Option<f64> {
        let costs = self.kinds.get(kind)?;
        (costs.catch_up.weight > 0.0).then(|| {
            let per_token = costs.per_token.unwrap_or_else(|| costs.catch_up.at(1.0));
            costs.catch_up.at(new as f64) + per_token * length.saturating_sub(1) as f64
        })
    }
}

/// How many tokens to ask of a drafter that takes `drafting(n)` seconds of the verifier's
/// time to draft a block of `n` tokens (0: not worth asking). `at_hand` are the chances of
/// the draft nodes the other drafters already offer (best first, as [`choose_draft_nodes`]
/// takes them), `chances` the drafter's estimated chance that its first 1, 2, ... tokens are
/// all accepted, and `cost(n)` the cost of a step over `n` nodes with the root, in seconds.
///
/// Both the tree the step would verify of the drafts at hand and the drafter's block are
/// counted: the block's drafting time and one node per token. Where both are right they
/// propose the same tokens, so the drafts at hand add to the block's expected length only
/// where its first token is wrong (as if the two were independent). A length is chosen only
/// when it beats the drafts at hand (or plain decoding) by [`MIN_GAIN`]. A drafter that
/// takes a plain step per token is never asked: no block can pay for itself.
pub fn choose_draft_length(
    at_hand: &[f64],
    chances: &[f64],
    drafting: impl Fn(usize) -> f64,
    cost: impl Fn(usize) -> f64,
) -> usize {
    let rate = |expected: f64, seconds: f64| (1.0 + expected) / seconds.max(f64::MIN_POSITIVE);
    // The tree the step would verify of the drafts at hand (none: a plain step).
    let nodes = choose_draft_nodes(at_hand, &cost, false);
    let expected_at_hand: f64 = at_hand[..nodes].iter().map(|v| v.clamp(0.0, 1.0)).sum();
    let rate_at_hand = rate(expected_at_hand, cost(1 + nodes));
    let first = chances.first().map_or(0.0, |c| c.clamp(0.0, 1.0));
    let mut best = (0usize, rate_at_hand * MIN_GAIN);
    let mut drafted = 0.0;
    for (i, chance) in chances.iter().enumerate() {
        let length = i + 1;
        drafted += chance.clamp(0.0, 1.0);
        let seconds = drafting(length).max(0.0) + cost(1 + nodes + length);
        let together =
            drafted.max(expected_at_hand) + (1.0 - first) * drafted.min(expected_at_hand);
        let r = rate(together, seconds);
        if r > best.1 {
            best = (length, r);
        }
    }
    best.0
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
        assert_eq!(context_bucket(4096), 6);
        assert_eq!(context_bucket(100_000), CONTEXT_BUCKETS - 1);
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
        // Past the largest measured size: the mean slope of the measured sizes.
        let slope = (0.2 - 0.1) / 15.0;
        assert!((costs.estimate(32, 100) - (0.2 + slope * 16.0)).abs() < 1e-6);
        // Where they are flatter than the prior (a GPU's), the prior's slope.
        let mut flat = StepCosts::default();
        flat.record(1, 100, 0.100);
        flat.record(8, 100, 0.101);
        let expected = 0.101 + 0.1 * PRIOR_SLOPE * 8.0;
        assert!((flat.estimate(16, 100) - expected).abs() < 1e-6);
        // A context length not measured yet borrows the nearest measured one's costs.
        assert!((costs.estimate(8, 3000) - 0.2).abs() < 1e-6);
        assert!(costs.measured());
        assert!(costs.measured_at(100) && !costs.measured_at(3000));
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
    fn sizes_not_measured_at_one_context_follow_the_curve_measured_at_another() {
        // At a short context, rows cost 15% of a step each (as on AVX2 CPUs).
        let mut costs = StepCosts::default();
        for n in [1, 2, 4, 8, 16, 32] {
            costs.record(n, 100, 0.1 * (1.0 + 0.15 * (n - 1) as f64));
        }
        // At a longer one only 21-row passes were measured (prompt chunks beside a stream):
        // one row is inferred from the short context's curve, not from the 5% prior.
        costs.record(21, 700, 0.8);
        let one = costs.estimate(1, 700);
        let expected = 0.8 * 0.1 / (0.1 * 4.0);
        assert!((one - expected).abs() < 1e-3, "{one} against {expected}");
        // Larger than measured there: the same shape.
        let thirty = costs.estimate(30, 700);
        let expected = 0.8 * (1.0 + 0.15 * 29.0) / (1.0 + 0.15 * 20.0);
        assert!(
            (thirty - expected).abs() < 1e-3,
            "{thirty} against {expected}"
        );
        // Never decreasing with size, at either context.
        for context in [100, 700, 5000] {
            let mut previous = 0.0;
            for n in 1..100 {
                let c = costs.estimate(n, context);
                assert!(c >= previous, "{context} {n}");
                previous = c;
            }
        }
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

    #[test]
    fn a_batch_speculates_less_as_rows_grow_dear() {
        // A pass costs one unit up to 16 rows (reading weights), then a tenth per row.
        let cost = |n: usize| 1.0 + 0.1 * n.saturating_sub(16) as f64;
        let good = [0.9, 0.8, 0.7, 0.6, 0.5];
        let weak = [0.2, 0.1];
        let one = choose_batch_draft_nodes(
            &[BatchDrafts {
                values: &good,
                explore: false,
            }],
            1,
            cost,
        );
        assert_eq!(one, vec![5]);
        // Eight sessions fill half the cheap rows with their roots: the best nodes take the
        // rest, and the weak ones are left out.
        let eight: Vec<BatchDrafts> = (0..8)
            .map(|i| BatchDrafts {
                values: if i % 2 == 0 { &good } else { &weak },
                explore: false,
            })
            .collect();
        let chosen = choose_batch_draft_nodes(&eight, 8, cost);
        assert_eq!(chosen.iter().sum::<usize>(), 8, "{chosen:?}");
        assert!(chosen.iter().step_by(2).all(|&n| n == 2), "{chosen:?}");
        assert!(
            chosen.iter().skip(1).step_by(2).all(|&n| n == 0),
            "{chosen:?}"
        );
        // When every row costs a unit, nothing weak is worth a row; an exploring session
        // still gets one node.
        let linear = |n: usize| n as f64;
        let explore = [
            BatchDrafts {
                values: &weak,
                explore: true,
            },
            BatchDrafts {
                values: &weak,
                explore: false,
            },
        ];
        assert_eq!(choose_batch_draft_nodes(&explore, 2, linear), vec![1, 0]);
        // One session of a batch is choose_draft_nodes.
        for values in [&good[..], &weak[..], &[]] {
            let alone = choose_draft_nodes(values, cost, false);
            let batch = choose_batch_draft_nodes(
                &[BatchDrafts {
                    values,
                    explore: false,
                }],
                1,
                cost,
            );
            assert_eq!(batch, vec![alone]);
        }
    }

    #[test]
    fn an_expensive_drafter_is_asked_only_where_it_pays() {
        // CPU-like steps of 1 s plus 15% per node; a small model accepted 85% per level.
        let cpu = |n: usize| 1.0 + 0.15 * (n - 1) as f64;
        let small_model: Vec<f64> = (1..=8).map(|d| 0.85f64.powi(d)).collect();
        let per_token = |seconds: f64| move |n: usize| seconds * n as f64;
        // Nothing at hand: at half a step per token, a short block pays.
        let asked = choose_draft_length(&[], &small_model, per_token(0.5), cpu);
        assert!((1..=4).contains(&asked), "{asked}");
        // Free drafting: a longer block.
        assert!(choose_draft_length(&[], &small_model, per_token(0.0), cpu) > asked);
        // A prompt-lookup chain that is almost sure: not worth drafting beside it.
        assert_eq!(
            choose_draft_length(&[0.97; 8], &small_model, per_token(0.5), cpu),
            0
        );
        // A weak match at hand does not stop it.
        assert!(choose_draft_length(&[0.1], &small_model, per_token(0.5), cpu) > 0);
        // Catching up first with many tokens (here 3 steps) does.
        let after_a_prompt = |n: usize| 3.0 + 0.5 * n as f64;
        assert_eq!(
            choose_draft_length(&[], &small_model, after_a_prompt, cpu),
            0
        );
        // A plain step per token never pays, even for tokens sure to be accepted, nor does a
        // drafter that is always wrong.
        assert_eq!(choose_draft_length(&[], &[1.0; 8], per_token(1.0), cpu), 0);
        assert_eq!(
            choose_draft_length(&[], &[0.01; 8], per_token(0.05), cpu),
            0
        );
        assert_eq!(choose_draft_length(&[], &[], per_token(0.0), cpu), 0);
    }

    #[test]
    fn drafting_time_is_told_apart_from_catching_up() {
        let mut costs = DraftCosts::default();
        assert_eq!(costs.estimate("lm", 1, 1), None, "nothing measured yet");
        // Catching up: one forward pass of 20 ms plus 2 ms per token; each further drafted
        // token 19 ms.
        for new in [1, 3, 2, 200, 5, 1, 4] {
            costs.record_catch_up("lm", 0.020 + 0.002 * new as f64, new);
        }
        // Until a further token is measured, it costs what catching up with one does.
        assert!((costs.estimate("lm", 1, 3).unwrap() - 3.0 * 0.022).abs() < 1e-9);
        costs.record_drafting("lm", 0.5, 0);
        for passes in [1, 4, 2] {
            costs.record_drafting("lm", 0.019 * passes as f64, passes);
        }
        costs.record_catch_up("lm", f64::NAN, 4);
        costs.record_drafting("lm", -1.0, 4);
        let estimate = |new, length| costs.estimate("lm", new, length).unwrap();
        assert!((estimate(1, 1) - 0.022).abs() < 1e-9, "{}", estimate(1, 1));
        assert!((estimate(100, 4) - (0.220 + 3.0 * 0.019)).abs() < 1e-9);
        // Catch-ups all of one size: their mean at that size, in proportion elsewhere.
        let mut same = DraftCosts::default();
        same.record_catch_up("lm", 0.02, 3);
        same.record_catch_up("lm", 0.04, 3);
        same.record_drafting("lm", 0.01, 1);
        let mean = same.estimate("lm", 3, 1).unwrap();
        assert!((mean - 0.03).abs() < 0.002, "{mean}");
        assert!((same.estimate("lm", 6, 1).unwrap() - 2.0 * mean).abs() < 1e-9);
        assert_eq!(same.estimate("ngram", 1, 1), None);
        let frozen = costs.clone().frozen();
        let mut changed = frozen.clone();
        changed.record_catch_up("lm", 9.0, 1);
        changed.record_drafting("lm", 9.0, 1);
        assert_eq!(changed.estimate("lm", 7, 3), frozen.estimate("lm", 7, 3));
    }
}
