//! `sibyl bench --prefix-cache`: each config's prompts again, in the same order, with the
//! prefix cache on (in process, one that starts empty; through a gateway, the verifier's),
//! against the run with it off: time to first token of first and later turns, prompt time,
//! and a gate that every output is the one the run without the cache gave.

use super::backend::{Backend, BenchConfig};
use super::dataset::Item;
use super::results::{median, ItemRecord, Results};
use serde::Serialize;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// A config's figures with the prefix cache off (the main run) and on.
#[derive(Debug, Clone, Serialize)]
pub struct CacheFigures {
    /// Requests (turns) of each run.
    pub requests: usize,
    /// Time to first token (prompt processing) of first turns, median.
    pub first_turn_ttft_p50_ms: OffOn,
    /// Of second and later turns (which follow the model's answer); absent without them.
    pub later_turn_ttft_p50_ms: Option<OffOn>,
    /// All prompt processing, seconds.
    pub prompt_s: OffOn,
    pub prompt_tokens: usize,
    /// Prompt tokens the cache served in the run with it on.
    pub cached_tokens: usize,
    /// Completion tokens over the time of prompt processing and generation, all requests.
    pub tokens_per_s: OffOn,
    /// Whether every output equals the one without the cache.
    pub identical: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differing: Vec<String>,
}

/// A figure without the prefix cache and with it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OffOn {
    pub off: f64,
    pub on: f64,
}

impl OffOn {
    /// How many times lower the figure is with the cache.
    pub fn lower(&self) -> f64 {
        if self.on > 0.0 {
            self.off / self.on
        } else {
            f64::INFINITY
        }
    }
}

impl CacheFigures {
    /// Compares `on` (records with the cache) with the same prompts' records in `off`.
    pub fn of(off: &[&ItemRecord], on: &[ItemRecord]) -> Self {
        let pairs: Vec<(&ItemRecord, &ItemRecord)> = on
            .iter()
            .filter_map(|on| off.iter().find(|o| o.id == on.id).map(|off| (*off, on)))
            .collect();
        let turn_ttfts = |pick: &dyn Fn(&ItemRecord) -> &[f64]| {
            let mut values: Vec<f64> = pairs.iter().flat_map(|(o, _)| pick(o)).copied().collect();
            let off = median(&mut values).unwrap_or(0.0);
            values = pairs.iter().flat_map(|(_, n)| pick(n)).copied().collect();
            (off, median(&mut values).unwrap_or(0.0))
        };
        let (first_off, first_on) =
            turn_ttfts(&|r| &r.turn_prompt_s[..r.turn_prompt_s.len().min(1)]);
        let later = pairs.iter().any(|(o, _)| o.turn_prompt_s.len() > 1);
        let (later_off, later_on) = turn_ttfts(&|r| r.turn_prompt_s.get(1..).unwrap_or_default());
        let rate = |records: &mut dyn Iterator<Item = &ItemRecord>| {
            let (tokens, seconds) = records.fold((0, 0.0), |(t, s), r| {
                (t + r.tokens, s + r.prompt_s + r.decode_s)
            });
            if seconds > 0.0 {
                tokens as f64 / seconds
            } else {
                0.0
            }
        };
        let differing: Vec<String> = pairs
            .iter()
            .filter_map(|(o, n)| {
                let turn = o.outputs.iter().zip(&n.outputs).position(|(a, b)| a != b);
                let shorter = o.outputs.len().min(n.outputs.len());
                let turn = turn.or((o.outputs.len() != n.outputs.len()).then_some(shorter))?;
                Some(format!("{} turn {}", o.id, turn + 1))
            })
            .collect();
        Self {
            requests: pairs.iter().map(|(_, n)| n.turns).sum(),
            first_turn_ttft_p50_ms: OffOn {
                off: first_off * 1e3,
                on: first_on * 1e3,
            },
            later_turn_ttft_p50_ms: later.then_some(OffOn {
                off: later_off * 1e3,
                on: later_on * 1e3,
            }),
            prompt_s: OffOn {
                off: pairs.iter().map(|(o, _)| o.prompt_s).sum(),
                on: pairs.iter().map(|(_, n)| n.prompt_s).sum(),
            },
            prompt_tokens: pairs.iter().map(|(_, n)| n.prompt_tokens).sum(),
            cached_tokens: pairs.iter().map(|(_, n)| n.cached_tokens).sum(),
            tokens_per_s: OffOn {
                off: rate(&mut pairs.iter().map(|(o, _)| *o)),
                on: rate(&mut pairs.iter().map(|(_, n)| *n)),
            },
            identical: differing.is_empty(),
            differing,
        }
    }

    /// `plain with the prefix cache: later turns' TTFT 2400 ms → 310 ms (7.7x lower), prompt
    /// time 41.2 s → 12.0 s (3.4x lower), identical`.
    pub fn line(&self, config: &str) -> String {
        let later = self
            .later_turn_ttft_p50_ms
            .map(|t| {
                format!(
                    "later turns' TTFT {:.0} ms → {:.0} ms ({:.1}x lower), ",
                    t.off,
                    t.on,
                    t.lower()
                )
            })
            .unwrap_or_default();
        format!(
            "{config} with the prefix cache: {later}prompt time {:.1} s → {:.1} s ({:.1}x \
             lower), {}",
            self.prompt_s.off,
            self.prompt_s.on,
            self.prompt_s.lower(),
            if self.identical {
                "identical".to_string()
            } else {
                format!("{} DIFFER", self.differing.len())
            }
        )
    }
}

/// Runs, for each config, the prompts it finished in the main run again with the prefix
/// cache on, adding its figures to `results`; sets `results.interrupted` when interrupted.
pub fn sweep(
    backend: &mut dyn Backend,
    items: &[Item],
    configs: &[BenchConfig],
    results: &mut Results,
    out: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    let finished: Vec<&Item> = items
        .iter()
        .filter(|i| results.items.iter().any(|r| r.id == i.id))
        .collect();
    let turns: usize = finished.iter().map(|i| i.turns.len()).sum();
    let progress = super::progress_bar((turns * configs.len()) as u64);
    for config in configs {
        progress.set_message(format!("{} with the prefix cache", config.name));
        backend.set_prefix_cache(true);
        backend.forget_drafter_state();
        let mut on = Vec::new();
        for item in &finished {
            match super::run_item(backend, item, config, interrupted, &progress)? {
                Some(record) => on.push(record),
                None => {
                    backend.set_prefix_cache(false);
                    progress.finish_and_clear();
                    results.interrupted = true;
                    return results.write(out);
                }
            }
        }
        backend.set_prefix_cache(false);
        let off: Vec<&ItemRecord> = results
            .items
            .iter()
            .filter(|r| r.config == config.name)
            .collect();
        let figures = CacheFigures::of(&off, &on);
        super::print_line(&progress, figures.line(&config.name));
        if let Some(config) = results.configs.get_mut(&config.name) {
            config.prefix_cache = Some(figures);
        }
        results.write(out)?;
    }
    progress.finish_and_clear();
    Ok(())
}

/// Outputs that differ with the prefix cache, all configs.
pub fn mismatches(results: &Results) -> usize {
    results
        .configs
        .values()
        .filter_map(|r| r.prefix_cache.as_ref())
        .map(|f| f.differing.len())
        .sum()
}

/// The report's section on the prefix cache; empty when it was not run.
pub fn markdown(results: &Results) -> String {
    let runs: Vec<(&String, &CacheFigures)> = results
        .config_names
        .iter()
        .filter_map(|name| {
            let figures = results.configs.get(name)?.prefix_cache.as_ref()?;
            Some((name, figures))
        })
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Prefix cache\n\nEach config's prompts again, in the same order, with the prefix \
         cache on, against the run with it off. TTFT: prompt processing of each request \
         (p50); later turns follow the model's own answer; identical: every output equals \
         the one without the cache.\n\n\
         | config | requests | first-turn TTFT off / on | later-turn TTFT off / on | prompt \
         time off / on | cached prompt tokens | tok/s off / on | identical |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, f) in runs {
        let later = f.later_turn_ttft_p50_ms.map_or("-".to_string(), |t| {
            format!("{:.0} / {:.0} ms ({:.1}x)", t.off, t.on, t.lower())
        });
        out.push_str(&format!(
            "| {name} | {} | {:.0} / {:.0} ms | {later} | {:.1} / {:.1} s ({:.1}x) | {} of {} \
             | {:.2} / {:.2} | {} |\n",
            f.requests,
            f.first_turn_ttft_p50_ms.off,
            f.first_turn_ttft_p50_ms.on,
            f.prompt_s.off,
            f.prompt_s.on,
            f.prompt_s.lower(),
            f.cached_tokens,
            f.prompt_tokens,
            f.tokens_per_s.off,
            f.tokens_per_s.on,
            if f.identical {
                "yes".to_string()
            } else {
                format!("**no: {}**", f.differing.join(", "))
            }
        ));
    }
    out
}
