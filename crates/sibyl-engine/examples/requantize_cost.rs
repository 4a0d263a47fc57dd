//! What load-time re-quantization (Q4_1/Q5_0/Q5_1 to Q8_0) costs and buys, side by side:
//! decoding speed and logits of the same file loaded both ways.
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release -p sibyl-engine --example requantize_cost -- \
//!      [--model qwen2.5-coder-0.5b] [--tokens 48]`

use sibyl_engine::{load, LoadOptions, LogitRows, Model, TreeInput};
use sibyl_spec::argmax;
use std::time::Instant;

/// Greedy decoding: the tokens, every step's logits, and the median milliseconds per token.
fn decode(
    model: &Model,
    prompt: &[u32],
    count: usize,
) -> anyhow::Result<(Vec<u32>, Vec<Vec<f32>>, f64)> {
    let mut cache = model.new_cache();
    let first = model.forward(&mut cache, &TreeInput::chain(prompt), LogitRows::Last)?;
    let mut tokens = vec![argmax(&first)];
    let mut rows = vec![first];
    let mut times = Vec::new();
    while tokens.len() < count {
        let t = Instant::now();
        let logits = model.forward(
            &mut cache,
            &TreeInput::chain(&[*tokens.last().unwrap_or(&0)]),
            LogitRows::All,
        )?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        tokens.push(argmax(&logits));
        rows.push(logits);
    }
    times.sort_by(f64::total_cmp);
    Ok((tokens, rows, times[times.len() / 2]))
}

/// The same file loaded as it is and with slow types converted to Q8_0.
#[derive(clap::Parser)]
struct CostArgs {
    #[arg(long, default_value = "qwen2.5-coder-0.5b")]
    model: String,
    /// Tokens decoded per prompt and load.
    #[arg(long, default_value_t = 48)]
    tokens: usize,
}

fn main() -> anyhow::Result<()> {
    let CostArgs {
        model: name,
        tokens: count,
    } = <CostArgs as clap::Parser>::parse();
    let path = sibyl_models::locate_in_user_cache(&name, &sibyl_models::NoProgress)?;
    let converted = load(&path, &LoadOptions::default())?;
    let original = load(
        &path,
        &LoadOptions {
            requantize_slow_types: false,
            ..LoadOptions::default()
        },
    )?;
    let prompts = [
        "<|im_start|>user\nWrite a Python function that merges two sorted lists.<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nExplain what a mutex is in two sentences.<|im_end|>\n<|im_start|>assistant\n",
        "def quicksort(items):\n",
    ];
    println!(
        "model {name}; threads {}",
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "all cores".into())
    );
    println!("prompt | ms/token original | ms/token Q8_0 | speedup | identical greedy tokens | max logit diff / largest logit");
    for (i, text) in prompts.iter().enumerate() {
        let prompt = converted.tokenizer.encode(text)?;
        let (a_tokens, a_rows, a_ms) = decode(&original.model, &prompt, count)?;
        let (b_tokens, b_rows, b_ms) = decode(&converted.model, &prompt, count)?;
        let same = a_tokens
            .iter()
            .zip(&b_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        // Logits compared while both decoded the same sequence.
        let (mut diff, mut top) = (0f32, 0f32);
        for (a, b) in a_rows.iter().zip(&b_rows).take(same.max(1)) {
            for (x, y) in a.iter().zip(b) {
                diff = diff.max((x - y).abs());
                top = top.max(x.abs());
            }
        }
        println!(
            "{i} | {a_ms:.1} | {b_ms:.1} | {:.2}x | {same}/{count} | {diff:.3} / {top:.1}",
            a_ms / b_ms
        );
    }
    Ok(())
}
