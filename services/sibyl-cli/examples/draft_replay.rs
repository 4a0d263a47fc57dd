//! How much prompt-lookup (n-gram) drafting can give on a dataset, whatever the policy that
//! sizes the trees: plain greedy outputs are generated once (kept in a cache file), then the
//! n-gram drafter is replayed at every position of them, offline.
//!
//! It prints, per match length, how often the drafter's best branch is accepted level by
//! level, and the speedup over plain decoding of the best sizing of each step, knowing
//! those rates and a step-cost curve: this engine's, measured here, and a flat one (every
//! tree costs one step, as on a GPU). Last, the bound of any policy on any machine: every
//! branch of every step verified 16 tokens deep at the price of one token (the drafting
//! itself taken as free too).
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release -p sibyl-cli --example draft_replay -- \
//!      --dataset humanevalfix.jsonl --category python_bugfix --limit 20 \
//!      --cache /tmp/humanevalfix-20.json`

use sibyl_engine::{load, ChatMessage, LoadOptions, LogitRows, TreeInput};
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_spec::TokenId;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Parser)]
struct ReplayArgs {
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    model: String,
    /// A JSONL file of prompts (`prompt`, `category`), rendered as one chat turn.
    #[arg(long)]
    dataset: PathBuf,
    #[arg(long)]
    category: Option<String>,
    #[arg(long, default_value_t = 20)]
    limit: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Where the plain outputs are kept: read when it exists, written otherwise.
    #[arg(long)]
    cache: PathBuf,
    /// Longest n-gram tried, as `--ngram-max` of `sibyl generate`.
    #[arg(long, default_value_t = 8)]
    ngram_max: usize,
}

/// Most draft tokens replayed per position.
const MAX_DEPTH: usize = 16;

/// A prompt and its plain greedy output.
type Sample = (Vec<TokenId>, Vec<TokenId>);

/// The drafter's proposals at a position (all zero when it has none): the length of its
/// best branch's match, how many of that branch's tokens the plain answer goes on with, and
/// its length; and the most tokens any of its branches got right.
#[derive(Debug, Clone, Copy, Default)]
struct Replayed {
    matched: usize,
    kept: usize,
    len: usize,
    kept_by_any: usize,
}

fn main() -> anyhow::Result<()> {
    let args = <ReplayArgs as clap::Parser>::parse();
    let path = sibyl_models::locate_in_user_cache(&args.model, &sibyl_models::NoProgress)?;
    let loaded = load(&path, &LoadOptions::default())?;
    let samples: Vec<Sample> = if args.cache.exists() {
        serde_json::from_str(&std::fs::read_to_string(&args.cache)?)?
    } else {
        let template = loaded
            .chat_template
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the model has no chat template"))?;
        let config = sibyl_decode::GenerationConfig::plain(
            args.max_tokens,
            loaded.tokenizer.stop_tokens().to_vec(),
        );
        let mut samples = Vec::new();
        for line in std::fs::read_to_string(&args.dataset)?.lines() {
            let item: serde_json::Value = serde_json::from_str(line)?;
            if args
                .category
                .as_deref()
                .is_some_and(|c| item["category"] != c)
            {
                continue;
            }
            if samples.len() == args.limit {
                break;
            }
            let prompt = item["prompt"].as_str().unwrap_or_default();
            let text = template.render(&[ChatMessage::new("user", prompt)])?;
            let tokens = loaded.tokenizer.encode(&text)?;
            let report = sibyl_decode::generate(&loaded.model, &tokens, &config, &mut [], |_| {
                ControlFlow::Continue(())
            })?;
            eprintln!("{}: {} tokens", item["id"], report.tokens.len());
            samples.push((tokens, report.tokens));
        }
        std::fs::write(&args.cache, serde_json::to_string(&samples)?)?;
        samples
    };

    // At every position: the longest match length and how many tokens of its best branch
    // the plain output continues with.
    // Every position of every answer, replayed once: the drafter as `sibyl generate` runs it.
    let drafter = NgramDrafter::new(NgramConfig {
        max_ngram: args.ngram_max,
        ..NgramConfig::default()
    });
    let replayed: Vec<Vec<Replayed>> = samples
        .iter()
        .map(|(prompt, output)| {
            let mut context = prompt.clone();
            (0..output.len())
                .map(|i| {
                    let branches = drafter.lookup(&context, MAX_DEPTH);
                    context.push(output[i]);
                    let kept = |tokens: &[TokenId]| {
                        tokens
                            .iter()
                            .zip(&output[i..])
                            .take_while(|(a, b)| a == b)
                            .count()
                    };
                    let Some(best) = branches.first() else {
                        return Replayed::default();
                    };
                    Replayed {
                        matched: best.evidence as usize,
                        kept: kept(&best.tokens),
                        len: best.tokens.len(),
                        kept_by_any: branches.iter().map(|b| kept(&b.tokens)).max().unwrap_or(0),
                    }
                })
                .collect()
        })
        .collect();
    // kept[n][k]: positions whose match had length n and whose best branch kept k tokens.
    let mut kept = vec![vec![0usize; MAX_DEPTH + 1]; args.ngram_max + 1];
    for position in replayed.iter().flatten() {
        kept[position.matched][position.kept] += 1;
    }
    let positions: usize = replayed.iter().map(Vec::len).sum();
    // rates[n][d]: chance that level d + 1 is accepted once level d was.
    let rates: Vec<Vec<f64>> = kept
        .iter()
        .map(|hist| {
            (1..=MAX_DEPTH)
                .map(|d| {
                    let reached: usize = hist[d - 1..].iter().sum();
                    let accepted: usize = hist[d..].iter().sum();
                    accepted as f64 / reached.max(1) as f64
                })
                .collect()
        })
        .collect();
    println!("{} samples, {positions} positions", samples.len());
    println!("match | positions | mean kept | acceptance of level 1, 2, ... given the one before");
    for (n, hist) in kept.iter().enumerate() {
        let count: usize = hist.iter().sum();
        if count == 0 {
            continue;
        }
        let mean = hist.iter().enumerate().map(|(k, c)| k * c).sum::<usize>() as f64 / count as f64;
        let levels: Vec<String> = rates[n].iter().map(|r| format!("{r:.2}")).collect();
        println!("{n} | {count} | {mean:.2} | {}", levels.join(" "));
    }

    // This engine's step costs relative to one token, chains of 1..=MAX_DEPTH + 1.
    let prompt = &samples.first().map(|s| s.0.clone()).unwrap_or_default();
    let mut measured = Vec::new();
    let mut cache = loaded.model.new_cache();
    loaded
        .model
        .forward(&mut cache, &TreeInput::chain(prompt), LogitRows::None)?;
    let base = cache.len();
    for k in 1..=MAX_DEPTH + 1 {
        let mut times = Vec::new();
        for _ in 0..5 {
            let chain: Vec<TokenId> = prompt.iter().copied().cycle().take(k).collect();
            let started = Instant::now();
            loaded
                .model
                .forward(&mut cache, &TreeInput::chain(&chain), LogitRows::All)?;
            times.push(started.elapsed().as_secs_f64());
            cache.truncate(base);
        }
        times.sort_by(f64::total_cmp);
        measured.push(times[2]);
    }
    let measured: Vec<f64> = measured.iter().map(|t| t / measured[0]).collect();
    let flat = vec![1.0; MAX_DEPTH + 1];
    let curve: Vec<String> = measured.iter().map(|c| format!("{c:.2}")).collect();
    println!(
        "step cost of 1..{} tokens here: {}",
        MAX_DEPTH + 1,
        curve.join(" ")
    );
    for (name, costs) in [("this engine", &measured), ("flat", &flat)] {
        for max_depth in [4, 8, 16] {
            let speedup = replay(&replayed, &rates, costs, max_depth);
            println!("{name}, at most {max_depth} draft tokens: speedup {speedup:.2}x");
        }
    }
    // The bound of bounds: every branch the drafter has, 16 tokens deep, verified at the
    // price of one step.
    let (tokens, steps) = decode(&replayed, |position| (1.0, position.kept_by_any));
    println!(
        "flat, every branch {MAX_DEPTH} tokens deep: speedup {:.2}x",
        tokens as f64 / steps
    );
    Ok(())
}

/// Decodes every answer again with the best chain length of each step for the expected
/// tokens per cost (knowing the acceptance `rates` per match length, not the answer), and
/// returns tokens per plain step's cost.
fn replay(replayed: &[Vec<Replayed>], rates: &[Vec<f64>], costs: &[f64], max_depth: usize) -> f64 {
    let (tokens, cost) = decode(replayed, |branch| {
        let (mut length, mut best, mut expected, mut chance) = (0, 1.0 / costs[0], 1.0, 1.0);
        for d in 1..=max_depth.min(branch.len) {
            chance *= rates[branch.matched][d - 1];
            expected += chance;
            if expected / costs[d] > best {
                (length, best) = (d, expected / costs[d]);
            }
        }
        (costs[length], branch.kept.min(length))
    });
    tokens as f64 / cost
}

/// Decodes every answer again, `step` giving at each position the step's cost and the draft
/// tokens it accepts; returns the tokens and the total cost.
fn decode(replayed: &[Vec<Replayed>], step: impl Fn(&Replayed) -> (f64, usize)) -> (usize, f64) {
    let (mut tokens, mut cost) = (0usize, 0.0);
    for answer in replayed {
        let mut i = 0;
        while i < answer.len() {
            let (spent, accepted) = step(&answer[i]);
            let advance = (accepted + 1).min(answer.len() - i);
            cost += spent;
            i += advance;
            tokens += advance;
        }
    }
    (tokens, cost)
}
