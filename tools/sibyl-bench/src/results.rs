//! What a benchmark run found: one record per prompt and config, summaries per category and
//! overall (written out by `report`).

use crate::machine::Machine;
use serde::Serialize;
use sibyl_decode::{FinishReason, GenerationReport};
use std::collections::BTreeMap;
use std::time::Duration;

/// Draft tokens of one drafter kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DraftCounts {
    pub proposed: u64,
    pub accepted: u64,
    /// Steps that had this drafter's drafts.
    pub asked: u64,
    /// Seconds spent drafting in this process (0 for remote drafters).
    pub drafting_s: f64,
}

impl std::ops::AddAssign for DraftCounts {
    fn add_assign(&mut self, other: Self) {
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.asked += other.asked;
        self.drafting_s += other.drafting_s;
    }
}

/// One prompt (all its turns) under one config.
#[derive(Debug, Clone, Serialize)]
pub struct ItemRecord {
    pub id: String,
    pub category: String,
    pub config: String,
    pub turns: usize,
    /// Generated tokens, all turns (stop tokens excluded).
    pub tokens: usize,
    pub prompt_tokens: usize,
    /// Of those, tokens served by the prefix cache (`--prefix-cache` runs only).
    pub cached_tokens: usize,
    /// Prompt processing, apart from generation.
    pub prompt_s: f64,
    /// Generation from the first token (which prompt processing yields) to the last.
    pub decode_s: f64,
    /// Verify steps (forward passes after the prompt), the first token's included.
    pub steps: usize,
    /// Tokens after each turn's first over `decode_s`.
    pub tokens_per_s: f64,
    /// `tokens_per_s` of every run of this prompt under this config, in run order (one
    /// unless `--repeat`); the other figures are those of the run of median speed.
    pub runs_tokens_per_s: Vec<f64>,
    /// This prompt's tokens/s over plain's.
    pub speedup: Option<f64>,
    /// The same, of the turns after the first alone (prompts of several turns: each such
    /// turn's context holds the earlier turns and their answers).
    pub later_turns_speedup: Option<f64>,
    /// Whether the output equals plain's token for token, every turn (temperature 0 only).
    pub identical: Option<bool>,
    /// Where it first differs from plain's: the turn (from 1) and the token in that turn.
    pub first_difference: Option<Difference>,
    /// Verify-step latency (the first token's sampling left out).
    pub step_p50_ms: f64,
    pub step_p99_ms: f64,
    pub drafters: BTreeMap<String, DraftCounts>,
    /// Tokens accepted, counting a stop token (MAT's numerator).
    #[serde(skip)]
    pub accepted: usize,
    /// Tokens after each turn's first (the numerator of tokens/s).
    #[serde(skip)]
    pub decoded: usize,
    #[serde(skip)]
    pub outputs: Vec<Vec<u32>>,
    #[serde(skip)]
    pub step_times: Vec<Duration>,
    /// Each turn's prompt processing (its time to first token), seconds.
    #[serde(skip)]
    pub turn_prompt_s: Vec<f64>,
    /// `decoded` and `decode_s` of the turns after the first.
    #[serde(skip)]
    pub later_decoded: usize,
    #[serde(skip)]
    pub later_decode_s: f64,
}

/// The first token where an output differs from plain decoding's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The turn, from 1.
    pub turn: usize,
    /// The generated token of that turn, from 0.
    pub position: usize,
}

impl ItemRecord {
    /// The record of one prompt's turns, in order.
    pub fn new(id: &str, category: &str, config: &str, turns: &[GenerationReport]) -> Self {
        let mut record = Self {
            id: id.to_string(),
            category: category.to_string(),
            config: config.to_string(),
            turns: turns.len(),
            tokens: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            prompt_s: 0.0,
            decode_s: 0.0,
            steps: 0,
            tokens_per_s: 0.0,
            runs_tokens_per_s: Vec::new(),
            speedup: None,
            later_turns_speedup: None,
            identical: None,
            first_difference: None,
            step_p50_ms: 0.0,
            step_p99_ms: 0.0,
            drafters: BTreeMap::new(),
            accepted: 0,
            decoded: 0,
            outputs: Vec::new(),
            step_times: Vec::new(),
            turn_prompt_s: Vec::new(),
            later_decoded: 0,
            later_decode_s: 0.0,
        };
        for turn in turns.iter().skip(1) {
            record.later_decoded += turn.tokens.len().saturating_sub(1);
            record.later_decode_s += turn.decode_time.as_secs_f64();
        }
        for turn in turns {
            record.tokens += turn.tokens.len();
            record.decoded += turn.tokens.len().saturating_sub(1);
            // Spec-Bench counts the stop token among the accepted ones: plain decoding then
            // accepts exactly one token per step.
            record.accepted +=
                turn.tokens.len() + usize::from(turn.finish_reason == FinishReason::Stop);
            record.prompt_tokens += turn.prompt_tokens;
            record.cached_tokens += turn.cached_tokens;
            record.prompt_s += turn.prompt_time.as_secs_f64();
            record.turn_prompt_s.push(turn.prompt_time.as_secs_f64());
            record.decode_s += turn.decode_time.as_secs_f64();
            record.steps += turn.steps;
            record.outputs.push(turn.tokens.clone());
            record
                .step_times
                .extend_from_slice(turn.step_times.get(1..).unwrap_or_default());
            for drafter in &turn.drafters {
                let counts = record.drafters.entry(drafter.kind.clone()).or_default();
                *counts += DraftCounts {
                    proposed: drafter.proposed,
                    accepted: drafter.accepted,
                    asked: drafter.asked,
                    drafting_s: drafter.drafting_time.as_secs_f64(),
                };
            }
        }
        record.tokens_per_s = rate(record.decoded, record.decode_s);
        record.runs_tokens_per_s = vec![record.tokens_per_s];
        (record.step_p50_ms, record.step_p99_ms) = percentiles_ms(&mut record.step_times.clone());
        record
    }

    /// Compares with plain's record of the same prompt: speedup, and (when `exact`) whether
    /// the tokens are identical, turn by turn.
    pub fn compare(&mut self, plain: &ItemRecord, exact: bool) {
        self.speedup = (plain.tokens_per_s > 0.0).then(|| self.tokens_per_s / plain.tokens_per_s);
        let later = |r: &ItemRecord| rate(r.later_decoded, r.later_decode_s);
        self.later_turns_speedup =
            (self.turns > 1 && later(plain) > 0.0).then(|| later(self) / later(plain));
        if !exact {
            return;
        }
        self.first_difference = self
            .outputs
            .iter()
            .zip(&plain.outputs)
            .enumerate()
            .find_map(|(turn, (ours, theirs))| {
                let position = ours
                    .iter()
                    .zip(theirs)
                    .position(|(a, b)| a != b)
                    .or_else(|| {
                        (ours.len() != theirs.len()).then(|| ours.len().min(theirs.len()))
                    })?;
                Some(Difference {
                    turn: turn + 1,
                    position,
                })
            });
        self.identical = Some(self.first_difference.is_none());
    }
}

/// A config's figures over a set of prompts.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Tokens after each turn's first over decode seconds, all prompts together.
    pub tokens_per_s: f64,
    /// Geometric mean over prompts of the per-prompt speedup over plain.
    pub speedup_geomean: Option<f64>,
    /// Prompts of several turns, and the geometric mean of their later turns' speedup.
    pub multi_turn: usize,
    pub later_turns_speedup_geomean: Option<f64>,
    /// Tokens/s of those later turns, all such prompts together.
    pub later_turns_tokens_per_s: f64,
    /// The smallest and largest per-prompt speedup.
    pub speedup_min: Option<f64>,
    pub speedup_max: Option<f64>,
    /// Of prompts run several times (`--repeat`), each one's fastest run over its slowest:
    /// the median over prompts and the widest. The noise a per-prompt ratio carries.
    pub run_spread_median: Option<f64>,
    pub run_spread_max: Option<f64>,
    /// Mean accepted tokens per verify step, a stop token counted (MAT; 1.00 for plain).
    pub mean_accepted_tokens: f64,
    /// Prompts whose output equals plain's (temperature 0 only).
    pub identical: Option<usize>,
    pub total: usize,
    pub tokens: usize,
    pub prompt_tokens_per_s: f64,
    pub step_p50_ms: f64,
    pub step_p99_ms: f64,
    pub drafters: BTreeMap<String, DrafterSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrafterSummary {
    pub proposed: u64,
    pub accepted: u64,
    /// Accepted over proposed.
    pub acceptance_rate: f64,
    /// This drafter's share of the draft tokens accepted from all drafters.
    pub accepted_share: f64,
    /// Verify steps that had this drafter's drafts.
    pub asked_steps: u64,
    /// Seconds spent drafting in this process (0 for remote drafters).
    pub drafting_s: f64,
}

impl Summary {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a ItemRecord>, exact: bool) -> Self {
        let (mut tokens, mut decoded, mut accepted, mut decode_s, mut steps) = (0, 0, 0, 0.0, 0);
        let (mut prompt_tokens, mut prompt_s) = (0, 0.0);
        let (mut total, mut identical, mut log_speedups, mut speedups) = (0, 0, 0.0, 0);
        let (mut speedup_min, mut speedup_max) = (None::<f64>, None::<f64>);
        let (mut multi_turn, mut later_decoded, mut later_decode_s) = (0, 0, 0.0);
        let mut later_speedups = Vec::new();
        let mut spreads = Vec::new();
        let mut step_times = Vec::new();
        let mut drafts: BTreeMap<String, DraftCounts> = BTreeMap::new();
        for record in records {
            total += 1;
            tokens += record.tokens;
            decoded += record.decoded;
            accepted += record.accepted;
            decode_s += record.decode_s;
            steps += record.steps;
            prompt_tokens += record.prompt_tokens;
            prompt_s += record.prompt_s;
            identical += usize::from(record.identical == Some(true));
            if let Some(speedup) = record.speedup.filter(|s| *s > 0.0) {
                log_speedups += speedup.ln();
                speedups += 1;
                speedup_min = Some(speedup_min.map_or(speedup, |m| m.min(speedup)));
                speedup_max = Some(speedup_max.map_or(speedup, |m| m.max(speedup)));
            }
            if record.turns > 1 {
                multi_turn += 1;
                later_decoded += record.later_decoded;
                later_decode_s += record.later_decode_s;
                later_speedups.extend(record.later_turns_speedup.filter(|s| *s > 0.0));
            }
            spreads.extend(run_spread(&record.runs_tokens_per_s));
            step_times.extend_from_slice(&record.step_times);
            for (kind, counts) in &record.drafters {
                let sum = drafts.entry(kind.clone()).or_default();
                *sum += *counts;
            }
        }
        let (step_p50_ms, step_p99_ms) = percentiles_ms(&mut step_times);
        let all_accepted: u64 = drafts.values().map(|c| c.accepted).sum();
        Self {
            tokens_per_s: rate(decoded, decode_s),
            speedup_geomean: (speedups > 0).then(|| (log_speedups / speedups as f64).exp()),
            multi_turn,
            later_turns_speedup_geomean: (!later_speedups.is_empty()).then(|| {
                let logs: f64 = later_speedups.iter().map(|s| s.ln()).sum();
                (logs / later_speedups.len() as f64).exp()
            }),
            later_turns_tokens_per_s: rate(later_decoded, later_decode_s),
            speedup_min,
            speedup_max,
            run_spread_max: spreads.iter().copied().reduce(f64::max),
            run_spread_median: median(&mut spreads),
            mean_accepted_tokens: if steps > 0 {
                accepted as f64 / steps as f64
            } else {
                0.0
            },
            identical: exact.then_some(identical),
            total,
            tokens,
            prompt_tokens_per_s: rate(prompt_tokens, prompt_s),
            step_p50_ms,
            step_p99_ms,
            drafters: drafts
                .iter()
                .map(|(kind, c)| {
                    let acceptance_rate = if c.proposed > 0 {
                        c.accepted as f64 / c.proposed as f64
                    } else {
                        0.0
                    };
                    let summary = DrafterSummary {
                        proposed: c.proposed,
                        accepted: c.accepted,
                        acceptance_rate,
                        accepted_share: if all_accepted > 0 {
                            c.accepted as f64 / all_accepted as f64
                        } else {
                            0.0
                        },
                        asked_steps: c.asked,
                        drafting_s: c.drafting_s,
                    };
                    (kind.clone(), summary)
                })
                .collect(),
        }
    }
}

/// A config's summaries.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigResults {
    pub overall: Summary,
    pub categories: BTreeMap<String, Summary>,
    /// The overall draft counts per drafter kind (as in `overall`).
    pub drafters: BTreeMap<String, DrafterSummary>,
    /// Figures per concurrency, ascending (`--concurrency`; absent without it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub concurrency: Vec<super::concurrency::Figures>,
    /// With the prefix cache against without (`--prefix-cache`; absent without it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache: Option<super::prefix::CacheFigures>,
}

/// A prompt whose output differs from plain decoding.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub id: String,
    pub category: String,
    pub config: String,
    /// The turn (from 1) and its first differing generated token (from 0).
    pub turn: usize,
    pub position: usize,
}

/// How the run was set up.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub sibyl_version: String,
    /// When the run started (UTC).
    pub date: String,
    pub command: String,
    pub model: String,
    /// `in-process`, or the gateway's URL.
    pub backend: String,
    pub machine: Machine,
    pub max_tokens: usize,
    pub temperature: f32,
    pub seed: u64,
    /// Runs of each prompt under each config; the run of median decode speed is kept.
    pub repeat: usize,
    pub datasets: Vec<String>,
    /// The draft settings of an in-process run (a gateway's are the servers').
    pub speculation: Option<Speculation>,
    /// `release`, or `debug` (whose figures mean little).
    pub build: String,
}

/// The draft settings of an in-process run.
#[derive(Debug, Clone, Serialize)]
pub struct Speculation {
    pub draft_budget: usize,
    pub draft_depth: usize,
    pub draft_min_value: f64,
    pub draft_exempt: usize,
    pub ngram_max: usize,
    pub ngram_branches: usize,
    /// `adaptive` or `fixed`.
    pub draft_sizing: String,
    /// Datastores of the retrieval drafter.
    pub datastores: Vec<String>,
    /// The LM drafter's model, when a config uses it.
    pub draft_model: Option<String>,
}

/// A prompt that could not run under a config (the prompt is left out of every summary).
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub id: String,
    pub category: String,
    pub config: String,
    pub error: String,
}

/// `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    #[serde(flatten)]
    pub setup: Setup,
    /// Set when the run was interrupted: the results hold the prompts finished before.
    pub interrupted: bool,
    /// Config names in the order given.
    pub config_names: Vec<String>,
    /// Categories in the order they first appear.
    pub category_names: Vec<String>,
    pub configs: BTreeMap<String, ConfigResults>,
    pub mismatches: Vec<Mismatch>,
    pub failures: Vec<Failure>,
    pub items: Vec<ItemRecord>,
}

impl Results {
    /// Summarizes `items` (every config of each finished prompt).
    pub fn new(
        setup: Setup,
        config_names: Vec<String>,
        items: Vec<ItemRecord>,
        failures: Vec<Failure>,
    ) -> Self {
        let exact = setup.temperature == 0.0;
        let mut category_names: Vec<String> = Vec::new();
        for item in &items {
            if !category_names.contains(&item.category) {
                category_names.push(item.category.clone());
            }
        }
        let configs = config_names
            .iter()
            .map(|name| {
                let of = |category: Option<&str>| {
                    let records = items
                        .iter()
                        .filter(|r| r.config == *name && category.is_none_or(|c| r.category == c));
                    Summary::of(records, exact)
                };
                let overall = of(None);
                let categories = category_names
                    .iter()
                    .map(|c| (c.clone(), of(Some(c))))
                    .collect();
                let drafters = overall.drafters.clone();
                let results = ConfigResults {
                    overall,
                    categories,
                    drafters,
                    concurrency: Vec::new(),
                    prefix_cache: None,
                };
                (name.clone(), results)
            })
            .collect();
        let mismatches = items
            .iter()
            .filter_map(|r| {
                r.first_difference.map(|d| Mismatch {
                    id: r.id.clone(),
                    category: r.category.clone(),
                    config: r.config.clone(),
                    turn: d.turn,
                    position: d.position,
                })
            })
            .collect();
        Self {
            setup,
            interrupted: false,
            config_names,
            category_names,
            configs,
            mismatches,
            failures,
            items,
        }
    }

    /// The speculative configs (all but plain), in order.
    pub fn speculative(&self) -> impl Iterator<Item = &String> {
        self.config_names.iter().filter(|n| *n != "plain")
    }
}

/// The median of `values` (the smaller middle one of an even count), or none of none.
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len().checked_sub(1)? / 2).copied()
}

/// A prompt's fastest run over its slowest, where it ran more than once.
fn run_spread(runs: &[f64]) -> Option<f64> {
    let slowest = runs.iter().copied().reduce(f64::min)?;
    let fastest = runs.iter().copied().reduce(f64::max)?;
    (runs.len() > 1 && slowest > 0.0).then(|| fastest / slowest)
}

fn rate(count: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Median and 99th percentile (nearest rank: the smallest value with at least that share
/// of values at or below it), in milliseconds.
fn percentiles_ms(times: &mut [Duration]) -> (f64, f64) {
    if times.is_empty() {
        return (0.0, 0.0);
    }
    times.sort();
    let at = |q: f64| {
        let rank = ((q * times.len() as f64).ceil() as usize).clamp(1, times.len());
        times[rank - 1].as_secs_f64() * 1e3
    };
    (at(0.5), at(0.99))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        config: &str,
        category: &str,
        tokens: Vec<u32>,
        decode_s: f64,
        steps: usize,
    ) -> ItemRecord {
        let report = GenerationReport {
            tokens,
            prompt_tokens: 10,
            cached_tokens: 0,
            finish_reason: sibyl_decode::FinishReason::Length,
            steps,
            prompt_time: Duration::from_secs(1),
            decode_time: Duration::from_secs_f64(decode_s),
            step_times: (1..=steps as u64).map(Duration::from_millis).collect(),
            drafters: Vec::new(),
            seed: 0,
        };
        ItemRecord::new("id", category, config, &[report])
    }

    #[test]
    fn compare_finds_the_first_difference_and_the_speedup() {
        let plain = record("plain", "c", vec![1, 2, 3, 4], 2.0, 4);
        let mut same = record("x", "c", vec![1, 2, 3, 4], 1.0, 2);
        same.compare(&plain, true);
        assert_eq!((same.identical, same.first_difference), (Some(true), None));
        // 3 tokens after the first in 1 s against 3 in 2 s.
        assert_eq!(same.speedup, Some(2.0));
        let at = |position| Some(Difference { turn: 1, position });
        let mut changed = record("x", "c", vec![1, 2, 9, 4], 1.0, 2);
        changed.compare(&plain, true);
        assert_eq!(
            (changed.identical, changed.first_difference),
            (Some(false), at(2))
        );
        let mut shorter = record("x", "c", vec![1, 2], 1.0, 2);
        shorter.compare(&plain, true);
        assert_eq!(shorter.first_difference, at(2));
        let mut sampled = record("x", "c", vec![5], 1.0, 1);
        sampled.compare(&plain, false);
        assert_eq!((sampled.identical, sampled.first_difference), (None, None));
    }

    #[test]
    fn summaries_are_geometric_means_of_prompt_ratios() {
        let mut records = Vec::new();
        for (decode_s, plain_s) in [(1.0, 2.0), (4.0, 2.0)] {
            let plain = record("plain", "c", vec![1; 8], plain_s, 8);
            let mut x = record("x", "c", vec![1; 8], decode_s, 2);
            x.compare(&plain, true);
            records.push(x);
        }
        let summary = Summary::of(&records, true);
        // Ratios 2 and 0.5: geometric mean 1, while throughput is 2 x 7 tokens / 5 s.
        assert!((summary.speedup_geomean.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(
            (summary.speedup_min, summary.speedup_max),
            (Some(0.5), Some(2.0))
        );
        assert!((summary.tokens_per_s - 2.8).abs() < 1e-12);
        assert_eq!(summary.mean_accepted_tokens, 4.0);
        assert_eq!((summary.identical, summary.total), (Some(2), 2));
        // Step times 1 (the first token's, left out) and 2 ms in each record.
        assert_eq!((summary.step_p50_ms, summary.step_p99_ms), (2.0, 2.0));
        assert_eq!(Summary::of(&records, false).identical, None);
    }

    #[test]
    fn later_turns_are_measured_apart() {
        let turn = |tokens: usize, decode_s: f64| GenerationReport {
            tokens: vec![1; tokens],
            prompt_tokens: 10,
            cached_tokens: 0,
            finish_reason: sibyl_decode::FinishReason::Length,
            steps: tokens,
            prompt_time: Duration::ZERO,
            decode_time: Duration::from_secs_f64(decode_s),
            step_times: Vec::new(),
            drafters: Vec::new(),
            seed: 0,
        };
        let plain = ItemRecord::new("id", "c", "plain", &[turn(5, 1.0), turn(9, 2.0)]);
        // The first turn as fast as plain's, the second twice as fast.
        let mut x = ItemRecord::new("id", "c", "x", &[turn(5, 1.0), turn(9, 1.0)]);
        x.compare(&plain, true);
        assert_eq!(x.later_turns_speedup, Some(2.0));
        let mut single = record("x", "c", vec![1; 4], 1.0, 4);
        single.compare(&record("plain", "c", vec![1; 4], 1.0, 4), true);
        assert_eq!(single.later_turns_speedup, None);
        let summary = Summary::of([&x, &single], true);
        assert_eq!(summary.multi_turn, 1);
        assert_eq!(summary.later_turns_speedup_geomean, Some(2.0));
        assert_eq!(summary.later_turns_tokens_per_s, 8.0);
    }

    #[test]
    fn a_stop_token_counts_as_accepted() {
        let mut report = GenerationReport {
            tokens: vec![1, 2, 3],
            prompt_tokens: 10,
            cached_tokens: 0,
            finish_reason: sibyl_decode::FinishReason::Stop,
            steps: 4,
            prompt_time: Duration::ZERO,
            decode_time: Duration::from_secs(1),
            step_times: Vec::new(),
            drafters: Vec::new(),
            seed: 0,
        };
        // Plain decoding: three tokens and the stop token in four steps.
        let plain = ItemRecord::new("id", "c", "plain", &[report.clone()]);
        assert_eq!(Summary::of([&plain], true).mean_accepted_tokens, 1.0);
        report.finish_reason = sibyl_decode::FinishReason::Length;
        report.steps = 3;
        let length = ItemRecord::new("id", "c", "plain", &[report]);
        assert_eq!(Summary::of([&length], true).mean_accepted_tokens, 1.0);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut times: Vec<Duration> = (1..=4).map(Duration::from_millis).collect();
        assert_eq!(percentiles_ms(&mut times), (2.0, 4.0));
        let mut times: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        assert_eq!(percentiles_ms(&mut times), (100.0, 198.0));
        assert_eq!(percentiles_ms(&mut []), (0.0, 0.0));
    }
}
