//! What a JSON-schema constraint costs the step loop per token, on a real vocabulary:
//! building the engine for it, compiling a schema, and for each token of a JSON answer
//! the mask of its row (the engine's mask and setting the forbidden logits) and recording
//! it.
//!
//! `cargo run --release -p sibyl-grammar --example mask_cost -- MODEL.gguf`

use sibyl_grammar::GrammarCompiler;
use sibyl_spec::{TokenConstraint, TokenId};
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
    Ok(())
}
