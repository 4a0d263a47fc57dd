//! What the lookup benchmarks share: a fixed pseudo-random sequence, timed calls and
//! percentiles.

use sibyl_spec::Drafter;
use std::time::Instant;

/// A linear congruential generator: the same numbers on every run.
pub struct Lcg(u64);

impl Lcg {
    pub fn new() -> Self {
        Self(0x9e37_79b9_7f4a_7c15)
    }

    /// A number below `bound` (0 when `bound` is 0).
    pub fn below(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as usize % bound.max(1)
    }
}

/// Prints the count, median, 99th percentile and maximum of `times` (sorted here).
pub fn report(name: &str, unit: &str, times: &mut [f64]) {
    if times.is_empty() {
        println!("{name:<36} none");
        return;
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name:<36} {:>7}  p50 {:>8.1} {unit}  p99 {:>8.1} {unit}  max {:>9.1} {unit}",
        times.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
}

/// Times one call of `drafter` on `context` (drafts of at most 10 tokens) into `times`, in
/// microseconds; returns the tokens it proposed.
pub fn timed_lookup(drafter: &mut dyn Drafter, context: &[u32], times: &mut Vec<f64>) -> usize {
    let began = Instant::now();
    let proposals = drafter.propose(context, 10);
    times.push(began.elapsed().as_secs_f64() * 1e6);
    proposals.iter().map(|p| p.tokens.len()).sum()
}
