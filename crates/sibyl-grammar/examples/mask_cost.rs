//! What a JSON-schema constraint costs the step loop per token, on a real vocabulary:
//! building the engine for it, compiling a schema, and for each token of a JSON answer
//! the mask of its row (the engine's mask and setting the forbidden logits) and recording
//! it. For comparison, what the penalties cost a row (all three, with a bias) after a
//! long prompt and output.
//!
//! `cargo run --release -p sibyl-grammar --example mask_cost -- MODEL.gguf`

use sibyl_grammar::GrammarCompiler;
use sibyl_spec::{Penalties, TokenConstraint, TokenHistory, TokenId};
use std::time::{Duration, Instant};

const SCHEMA: &str = r#"{
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "arguments": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
            "required": ["name", "type"]
        }},
        "returns": {"type": "string"},
        "raises": {"type": "array", "items": {"type": "string"}}
    },
    "required": ["name", "arguments", "returns", "raises"]
}"#;

const ANSWER: &str = r#"{
  "name": "read_config",
  "arguments": [
    {"name": "path", "type": "str"},
    {"name": "strict", "type": "bool"}
  ],
  "returns": "dict",
  "raises": ["ValueError", "FileNotFoundError"]
}"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: mask_cost MODEL.gguf")?;
    let text = sibyl_engine::load_text(std::path::Path::new(&path))?;
    let tokenizer = &text.tokenizer;
    let vocab = text.config.vocab_size;
    let started = Instant::now();
    let tokens = (0..vocab as TokenId)
        .map(|id| (tokenizer.token_bytes(id).to_vec(), tokenizer.is_control(id)));
    let compiler = GrammarCompiler::new(tokens, tokenizer.stop_tokens())?;
    println!("engine for {vocab} tokens: {:?}", started.elapsed());
    let answer = tokenizer.encode(ANSWER)?;
    for round in 0..3 {
        let started = Instant::now();
        let mut constraint = compiler.json_schema(SCHEMA)?;
        let compiled = started.elapsed();
        let mut masks = Vec::new();
        let mut records = Vec::new();
        let mut row = vec![0.0f32; vocab];
        for &token in &answer {
            row.fill(0.0);
            let started = Instant::now();
            constraint.mask(&[], &mut row)?;
            masks.push(started.elapsed());
            if !row[token as usize].is_finite() {
                return Err(format!("the grammar forbids token {token} of the answer").into());
            }
            let started = Instant::now();
            constraint.record(&[token])?;
            records.push(started.elapsed());
        }
        masks.sort();
        let mean = masks.iter().sum::<Duration>() / masks.len() as u32;
        let record_mean = records.iter().sum::<Duration>() / records.len() as u32;
        println!(
            "round {round}: schema compiled in {compiled:?}; {} tokens: mask mean {mean:?}, \
             p50 {:?}, p99 {:?}, max {:?}; record mean {record_mean:?}",
            answer.len(),
            percentile(&masks, 0.5),
            percentile(&masks, 0.99),
            masks[masks.len() - 1],
        );
    }
    // Penalties after a 4,000-token prompt and 1,000 tokens of output, as verify applies
    // them: a copy of the row, then the adjustment for a path of 4 tokens.
    let prompt: Vec<TokenId> = (0..4_000u32).map(|i| (i * 7919) % vocab as u32).collect();
    let output: Vec<TokenId> = (0..1_000u32)
        .map(|i| (i * 104_729) % vocab as u32)
        .collect();
    let penalties = Penalties {
        presence: 0.5,
        frequency: 0.5,
        repetition: 1.1,
        logit_bias: vec![(11, -100.0)],
    };
    let mut history = TokenHistory::new(&prompt, &penalties);
    history.extend(&output);
    let logits: Vec<f32> = (0..vocab).map(|i| (i % 97) as f32 * 0.1).collect();
    let mut row = Vec::with_capacity(vocab);
    let mut times = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        row.clear();
        row.extend_from_slice(&logits);
        history.adjust(&penalties, &mut row, &output[..4]);
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "penalties, 4000-token prompt and 1000 of output: a row {:?} p50, {:?} p99",
        percentile(&times, 0.5),
        percentile(&times, 0.99),
    );
    Ok(())
}
