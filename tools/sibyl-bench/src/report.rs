//! Rendering the results: `results.json`, `report.md` and the charts, each written whole.

use crate::results::{Results, Summary};
use std::path::Path;

impl Results {
    /// Writes `results.json`, `report.md`, `speedup.svg` and (with figures per concurrency)
    /// `concurrency.svg` into `dir`, each replaced whole (written aside, then renamed), so an
    /// interruption never leaves half a file.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        replace(&dir.join("results.json"), json.as_bytes())?;
        replace(&dir.join("report.md"), self.markdown().as_bytes())?;
        replace(
            &dir.join("speedup.svg"),
            crate::chart::svg(self)?.as_bytes(),
        )?;
        if let Some(svg) = crate::chart::concurrency_svg(self)? {
            replace(&dir.join("concurrency.svg"), svg.as_bytes())?;
        }
        Ok(())
    }

    /// `report.md`: the results as tables a person reads.
    pub fn markdown(&self) -> String {
        let s = &self.setup;
        let mut out = String::from("# sibyl bench\n\n");
        let prompts = self.items.iter().filter(|r| r.config == "plain").count();
        out.push_str(&format!(
            "- date: {}\n- model: {}\n- backend: {}\n- machine: {} ({} CPUs), {} threads\n\
             - {} prompts, at most {} tokens each, temperature {}, seed {}\n- datasets: {}\n\
             - command: `{}`\n- sibyl {}\n",
            s.date,
            s.model,
            s.backend,
            s.machine.cpu_model,
            s.machine.cpus,
            s.machine.threads,
            prompts,
            s.max_tokens,
            s.temperature,
            s.seed,
            s.datasets.join(", "),
            s.command,
            s.sibyl_version,
        ));
        if let Some(d) = &s.speculation {
            out.push_str(&format!(
                "- speculation: draft budget {}, depth {}, min value {}, exempt {}; n-gram max {}, \
                 branches {}\n",
                d.draft_budget,
                d.draft_depth,
                d.draft_min_value,
                d.draft_exempt,
                d.ngram_max,
                d.ngram_branches
            ));
        }
        if s.repeat > 1 {
            out.push_str(&format!(
                "- each prompt run {} times under each config, in alternating order; per \
                 config the run of median decode speed is kept\n",
                s.repeat
            ));
        }
        if s.build != "release" {
            out.push_str(&format!(
                "- **{} build**: the timings mean little\n",
                s.build
            ));
        }
        if self.interrupted {
            out.push_str("\n**Interrupted**: these results hold the prompts finished before.\n");
        }
        if !self.failures.is_empty() {
            out.push_str(&format!(
                "\n**{} prompts failed** and are left out:\n\n",
                self.failures.len()
            ));
            for f in &self.failures {
                out.push_str(&format!(
                    "- `{}` ({}), config {}: {}\n",
                    cell(&f.id),
                    cell(&f.category),
                    f.config,
                    cell(&f.error)
                ));
            }
        }
        out.push_str(
            "\n## Speedup over plain decoding\n\nDecode tokens/s (prompt processing apart, the \
             first token of each turn left out); speedup is the geometric mean of per-prompt \
             ratios; MAT is mean accepted tokens per verify step, a stop token counted.\n\n\
             | category | prompts | plain tok/s |",
        );
        let speculative: Vec<&String> = self.speculative().collect();
        let mut rule = String::from("|---|---:|---:|");
        for name in &speculative {
            out.push_str(&format!(
                " {name} tok/s | {name} speedup | {name} MAT | {name} identical |"
            ));
            rule.push_str("---:|---:|---:|---:|");
        }
        out.push('\n');
        out.push_str(&rule);
        out.push('\n');
        let rows = self
            .category_names
            .iter()
            .map(|c| (c.as_str(), Some(c)))
            .chain([("**overall**", None)]);
        for (label, category) in rows {
            let label = cell(label);
            let summary = |config: &str| {
                self.configs.get(config).map(|r| match category {
                    Some(c) => r.categories.get(c).unwrap_or(&r.overall).clone(),
                    None => r.overall.clone(),
                })
            };
            let Some(plain) = summary("plain") else {
                continue;
            };
            out.push_str(&format!(
                "| {label} | {} | {:.2} |",
                plain.total, plain.tokens_per_s
            ));
            for name in &speculative {
                if let Some(x) = summary(name) {
                    out.push_str(&format!(
                        " {:.2} | {} | {:.2} | {} |",
                        x.tokens_per_s,
                        ratio(x.speedup_geomean),
                        x.mean_accepted_tokens,
                        identical(&x)
                    ));
                }
            }
            out.push('\n');
        }
        let multi_turn = self
            .configs
            .get("plain")
            .map_or(0, |r| r.overall.multi_turn);
        if multi_turn > 0 {
            out.push_str(&format!(
                "\n## Later turns\n\nThe turns after the first of the {multi_turn} prompts with \
                 several: each one's context holds the turns before it and their answers. Decode \
                 tokens/s, and the geometric mean of per-prompt ratios to plain decoding.\n\n\
                 | config | tok/s | speedup |\n|---|---:|---:|\n"
            ));
            for name in &self.config_names {
                if let Some(r) = self.configs.get(name) {
                    let o = &r.overall;
                    let speedup = if name == "plain" {
                        "1.00x".to_string()
                    } else {
                        ratio(o.later_turns_speedup_geomean)
                    };
                    out.push_str(&format!(
                        "| {name} | {:.2} | {speedup} |\n",
                        o.later_turns_tokens_per_s
                    ));
                }
            }
        }
        out.push_str(
            "\n## Per config, all prompts\n\n| config | tok/s | speedup | prompts from / to | MAT \
             | verify step p50 | verify step p99 | prompt tok/s | identical |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for name in &self.config_names {
            if let Some(r) = self.configs.get(name) {
                let o = &r.overall;
                out.push_str(&format!(
                    "| {name} | {:.2} | {} | {} / {} | {:.2} | {:.1} ms | {:.1} ms | {:.1} | {} |\n",
                    o.tokens_per_s,
                    ratio(o.speedup_geomean),
                    ratio(o.speedup_min),
                    ratio(o.speedup_max),
                    o.mean_accepted_tokens,
                    o.step_p50_ms,
                    o.step_p99_ms,
                    o.prompt_tokens_per_s,
                    identical(o)
                ));
            }
        }
        if s.repeat > 1 {
            out.push_str(
                "\n## Run to run\n\nEach prompt's fastest run over its slowest under one config \
                 (decode tokens/s): how far a per-prompt ratio can move by the machine's noise \
                 and the drafters' state alone.\n\n| config | median over prompts | widest |\n\
                 |---|---:|---:|\n",
            );
            for name in &self.config_names {
                if let Some(r) = self.configs.get(name) {
                    out.push_str(&format!(
                        "| {name} | {} | {} |\n",
                        ratio(r.overall.run_spread_median),
                        ratio(r.overall.run_spread_max)
                    ));
                }
            }
        }
        out.push_str(
            "\n## Drafters\n\n| config | drafter | proposed | accepted | acceptance | \
             share of accepted | steps drafted | drafting s |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
        );
        for name in &speculative {
            if let Some(r) = self.configs.get(*name) {
                for (kind, d) in &r.drafters {
                    out.push_str(&format!(
                        "| {name} | {kind} | {} | {} | {:.1}% | {:.1}% | {} | {:.2} |\n",
                        d.proposed,
                        d.accepted,
                        d.acceptance_rate * 100.0,
                        d.accepted_share * 100.0,
                        d.asked_steps,
                        d.drafting_s,
                    ));
                }
            }
        }
        out.push_str("\n## Outputs against plain decoding\n\n");
        if s.temperature != 0.0 {
            out.push_str("Not compared: at temperature above 0 outputs are samples.\n");
        } else if self.mismatches.is_empty() && self.items.is_empty() {
            out.push_str("No prompt finished.\n");
        } else if self.mismatches.is_empty() {
            out.push_str("Every output is identical to plain decoding, token for token.\n");
        } else {
            out.push_str(&format!(
                "**{} outputs differ from plain decoding:**\n\n",
                self.mismatches.len()
            ));
            for m in &self.mismatches {
                out.push_str(&format!(
                    "- `{}` ({}), config {}: turn {}, first differing token at position {}\n",
                    cell(&m.id),
                    cell(&m.category),
                    m.config,
                    m.turn,
                    m.position
                ));
            }
        }
        out.push_str("\n![speedup per category](speedup.svg)\n");
        out.push_str(&crate::concurrency::markdown(self));
        out.push_str(&crate::prefix::markdown(self));
        out
    }
}

/// Text safe in a table cell: no pipes or line breaks.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.2}x"))
}

fn identical(summary: &Summary) -> String {
    summary
        .identical
        .map_or_else(|| "-".into(), |n| format!("{n}/{}", summary.total))
}

fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let aside = path.with_extension("partial");
    std::fs::write(&aside, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", aside.display()))?;
    std::fs::rename(&aside, path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_stay_in_their_cell() {
        assert_eq!(cell("a|b\nc"), "a\\|b c");
    }
}
