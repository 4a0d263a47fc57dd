//! Speculative against plain decoding on public bug-fix prompts, side by side in one run.
//!
//! For each prompt, plain and n-gram speculation run back to back (alternating which goes
//! first) with the same model; reports tokens/s of each, the per-prompt speedup (geometric
//! mean), mean accepted tokens per step, and whether the outputs are identical.
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release -p sibyl-decode --example humanevalfix -- \
//!      [--data ../shared/data/humanevalfix.jsonl] [--category python_bugfix] [--limit 20] \
//!      [--max-tokens 256] [--model qwen2.5-coder-1.5b] [--budget 16] [--depth 10] [--min-value 0.15] [--exempt 1]`

use sibyl_decode::{generate, GenerationConfig, GenerationReport};
use sibyl_engine::{load, ChatMessage, LoadOptions};
use sibyl_ngram::NgramDrafter;
use sibyl_spec::{Drafter, SamplingConfig};
use std::io::BufRead;
use std::ops::ControlFlow;

/// Plain against n-gram speculation on one category of a benchmark file.
#[derive(clap::Parser)]
struct BenchArgs {
    #[arg(long, default_value = "../shared/data/humanevalfix.jsonl")]
    data: String,
    #[arg(long, default_value = "python_bugfix")]
    category: String,
    /// First N items of the category.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Draft tree budget (nodes).
    #[arg(long, default_value_t = 16)]
    budget: usize,
    /// Draft depth.
    #[arg(long, default_value_t = 10)]
    depth: usize,
    /// Smallest estimated acceptance a draft node needs.
    #[arg(long, default_value_t = 0.15)]
    min_value: f64,
    /// Most likely nodes kept whatever their estimate.
    #[arg(long, default_value_t = 1)]
    exempt: usize,
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    model: String,
}

fn main() -> anyhow::Result<()> {
    let BenchArgs {
        data,
        category,
        limit,
        max_tokens,
        budget,
        depth,
        min_value,
        exempt,
        model: model_name,
    } = <BenchArgs as clap::Parser>::parse();
    let path = sibyl_models::locate(
        &model_name,
        &sibyl_models::cache_dir(),
        &sibyl_models::NoProgress,
    )?;
    let loaded = load(&path, &LoadOptions::default())?;
    let template = loaded
        .chat_template
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no chat template"))?;
    let mut items = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(&data)?).lines() {
        let item: serde_json::Value = serde_json::from_str(&line?)?;
        if item["category"] == category.as_str() {
            items.push((
                item["id"].as_str().unwrap_or("?").to_string(),
                item["prompt"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    items.truncate(limit);
    let config = |budget, depth| GenerationConfig {
        max_tokens,
        sampling: SamplingConfig::greedy(),
        draft_budget: budget,
        max_draft_depth: depth,
        min_draft_value: min_value,
        exempt_draft_nodes: exempt,
        stop_tokens: loaded.tokenizer.stop_tokens().to_vec(),
    };
    let run = |prompt: &[u32], speculate: bool| -> anyhow::Result<GenerationReport> {
        let mut drafters: Vec<Box<dyn Drafter>> = if speculate {
            vec![Box::new(NgramDrafter::default())]
        } else {
            Vec::new()
        };
        let cfg = if speculate {
            config(budget, depth)
        } else {
            config(0, 0)
        };
        Ok(generate(
            &loaded.model,
            prompt,
            &cfg,
            &mut drafters,
            |_| ControlFlow::Continue(()),
        )?)
    };
    println!(
        "model {model_name}, {} items of {category}, greedy, max {max_tokens} tokens, budget {budget}, depth {depth}, min value {min_value}, exempt {exempt}, threads {}",
        items.len(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "all cores".into())
    );
    println!("id | tokens | plain tok/s | ngram tok/s | speedup | MAT | identical");
    let (mut log_sum, mut plain_tokens, mut plain_secs, mut spec_tokens, mut spec_secs) =
        (0.0, 0usize, 0.0, 0usize, 0.0);
    let (mut steps, mut identical) = (0usize, 0usize);
    for (index, (id, text)) in items.iter().enumerate() {
        let prompt = loaded
            .tokenizer
            .encode(&template.render(&[ChatMessage::new("user", text)])?)?;
        let (plain, spec) = if index % 2 == 0 {
            let p = run(&prompt, false)?;
            (p, run(&prompt, true)?)
        } else {
            let s = run(&prompt, true)?;
            (run(&prompt, false)?, s)
        };
        let speedup = spec.tokens_per_second() / plain.tokens_per_second();
        log_sum += speedup.ln();
        plain_tokens += plain.tokens.len();
        plain_secs += plain.decode_time.as_secs_f64();
        spec_tokens += spec.tokens.len();
        spec_secs += spec.decode_time.as_secs_f64();
        steps += spec.steps;
        let same = plain.tokens == spec.tokens;
        identical += usize::from(same);
        println!(
            "{id} | {} | {:.2} | {:.2} | {speedup:.2}x | {:.2} | {same}",
            spec.tokens.len(),
            plain.tokens_per_second(),
            spec.tokens_per_second(),
            spec.mean_accepted_tokens(),
        );
    }
    let n = items.len().max(1) as f64;
    println!(
        "overall: plain {:.2} tok/s, ngram {:.2} tok/s, throughput ratio {:.2}x, per-prompt speedup geomean {:.2}x, MAT {:.2}, identical {identical}/{}",
        plain_tokens as f64 / plain_secs,
        spec_tokens as f64 / spec_secs,
        (spec_tokens as f64 / spec_secs) / (plain_tokens as f64 / plain_secs),
        (log_sum / n).exp(),
        spec_tokens as f64 / steps.max(1) as f64,
        items.len()
    );
    if identical != items.len() {
        anyhow::bail!("outputs differ from plain decoding");
    }
    Ok(())
}
