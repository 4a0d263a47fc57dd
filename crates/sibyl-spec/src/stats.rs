//! Pearson's chi-square goodness of fit, for the tests that check sampled output against the
//! exact target distribution (here and in the crates built on this one).

/// The chi-square statistic of `observed` counts against `expected` probabilities (one per
/// outcome, in the same order), outcomes expected fewer than 5 times pooled into one cell,
/// and the critical value at p = 0.001 for its degrees of freedom. Returns
/// `(statistic, critical)`: a sampler that follows `expected` gives `statistic < critical`
/// in all but one run in a thousand.
pub fn chi_square(expected: &[f64], observed: &[usize]) -> (f64, f64) {
    assert_eq!(
        expected.len(),
        observed.len(),
        "one probability per outcome"
    );
    let runs = observed.iter().sum::<usize>() as f64;
    let (mut stat, mut cells, mut pooled_e, mut pooled_o) = (0.0, 0usize, 0.0, 0.0);
    for (p, &o) in expected.iter().zip(observed) {
        let e = p * runs;
        if e < 5.0 {
            pooled_e += e;
            pooled_o += o as f64;
        } else {
            stat += (o as f64 - e).powi(2) / e;
            cells += 1;
        }
    }
    if pooled_e > 0.0 {
        stat += (pooled_o - pooled_e).powi(2) / pooled_e;
        cells += 1;
    }
    (
        stat,
        critical_at_one_in_a_thousand(cells.saturating_sub(1).max(1)),
    )
}

/// Upper 0.001 quantile of the chi-square distribution with `df` degrees of freedom
/// (Wilson-Hilferty approximation, z = 3.09).
fn critical_at_one_in_a_thousand(df: usize) -> f64 {
    let df = df as f64;
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + 3.090_232 * a.sqrt()).powi(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_fit_passes_and_a_skewed_one_fails() {
        let expected = [0.5, 0.3, 0.2];
        let (stat, _) = chi_square(&expected, &[5000, 3000, 2000]);
        assert_eq!(stat, 0.0);
        let (stat, critical) = chi_square(&expected, &[5400, 2800, 1800]);
        assert!(stat > critical);
    }

    #[test]
    fn critical_values_are_close_to_the_exact_quantiles() {
        // Exact 0.999 quantiles: 13.82 (df 2), 29.59 (df 10), 59.70 (df 30), 149.45 (df 100).
        for (df, exact) in [(2, 13.82), (10, 29.59), (30, 59.70), (100, 149.45)] {
            let approx = critical_at_one_in_a_thousand(df);
            assert!((approx - exact).abs() / exact < 0.03, "df {df}: {approx}");
        }
    }

    #[test]
    fn rare_outcomes_are_pooled() {
        // 0.0001 and 0.0002 of 10,000 runs are expected 1 and 2 times: one pooled cell.
        let expected = [0.5997, 0.4, 0.0001, 0.0002];
        let (stat, _) = chi_square(&expected, &[5997, 4000, 3, 0]);
        assert!(stat.abs() < 1e-9, "{stat}");
    }
}
