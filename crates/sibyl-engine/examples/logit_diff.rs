//! Our logits against candle-transformers' `quantized_qwen2` on the same file and text
//! (teacher-forced): how far apart they are, and where their most likely tokens differ,
//! how close the top two were. Explains greedy outputs that part after a kernel change.
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release -p sibyl-engine --example logit_diff -- \
//!      --model qwen2.5-coder-1.5b --text FILE...` (each FILE: a prompt, then the text scored)

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2;
use sibyl_engine::{load, LoadOptions, LogitRows, TreeInput};
use sibyl_spec::argmax;
use std::io::Seek;

#[derive(clap::Parser)]
struct DiffArgs {
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    model: String,
    /// Text files to score.
    #[arg(long, num_args = 1..)]
    text: Vec<std::path::PathBuf>,
}

/// The two largest values of `row`, largest first.
fn top_two(row: &[f32]) -> (f32, f32) {
    row.iter()
        .fold((f32::NEG_INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            if v > a {
                (v, a)
            } else {
                (a, b.max(v))
            }
        })
}

fn main() -> anyhow::Result<()> {
    let args = <DiffArgs as clap::Parser>::parse();
    let path = sibyl_models::locate_in_user_cache(&args.model, &sibyl_models::NoProgress)?;
    let loaded = load(&path, &LoadOptions::default())?;
    let model = &loaded.model;
    let vocab = model.vocab_size();
    for file in &args.text {
        let text = std::fs::read_to_string(file)?;
        let tokens = loaded.tokenizer.encode(&text)?;
        let mut cache = model.new_cache();
        let mut ours = Vec::new();
        for chunk in tokens.chunks(16) {
            ours.extend(model.forward(&mut cache, &TreeInput::chain(chunk), LogitRows::All)?);
        }
        let mut gguf = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut gguf)?;
        let mut reference =
            quantized_qwen2::ModelWeights::from_gguf(content, &mut gguf, &Device::Cpu)?;
        let (mut max_diff, mut sum_diff, mut parted) = (0f32, 0f64, Vec::new());
        for (position, &token) in tokens.iter().enumerate() {
            let x = Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?;
            let theirs = reference
                .forward(&x, position)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let row = &ours[position * vocab..(position + 1) * vocab];
            let diff = row
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            max_diff = max_diff.max(diff);
            sum_diff += f64::from(diff);
            if argmax(row) != argmax(&theirs) {
                let (a, b) = top_two(&theirs);
                let (c, d) = top_two(row);
                parted.push((position, a - b, c - d, a));
            }
        }
        println!(
            "{}: {} tokens; largest logit difference {max_diff:.4}, mean of per-position maxima {:.4}; most likely token differs at {} positions",
            file.display(),
            tokens.len(),
            sum_diff / tokens.len() as f64,
            parted.len()
        );
        for (position, gap_theirs, gap_ours, top) in parted {
            println!("  position {position}: top-two gap {gap_theirs:.4} (reference), {gap_ours:.4} (ours); top logit {top:.2}");
        }
        // The reference against itself: the same prefix in one forward (candle's kernels
        // for many rows) and token by token (its kernels for one row).
        let mut step_by_step = Vec::new();
        let ends: Vec<usize> = (1..=4).map(|i| tokens.len() * i / 4).collect();
        gguf.rewind()?;
        let content = gguf_file::Content::read(&mut gguf)?;
        let mut one = quantized_qwen2::ModelWeights::from_gguf(content, &mut gguf, &Device::Cpu)?;
        for (position, &token) in tokens.iter().enumerate() {
            let x = Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?;
            let logits = one.forward(&x, position)?.flatten_all()?.to_vec1::<f32>()?;
            if ends.contains(&(position + 1)) {
                step_by_step.push(logits);
            }
        }
        for (end, single) in ends.iter().zip(&step_by_step) {
            gguf.rewind()?;
            let content = gguf_file::Content::read(&mut gguf)?;
            let mut whole =
                quantized_qwen2::ModelWeights::from_gguf(content, &mut gguf, &Device::Cpu)?;
            let x = Tensor::new(&tokens[..*end], &Device::Cpu)?.unsqueeze(0)?;
            let batched = whole.forward(&x, 0)?.flatten_all()?.to_vec1::<f32>()?;
            let diff = batched
                .iter()
                .zip(single)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let ours_row = &ours[(end - 1) * vocab..*end * vocab];
            let ours_diff = ours_row
                .iter()
                .zip(single)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("  reference after {end} tokens, in one forward against token by token: largest difference {diff:.4} (ours against token by token: {ours_diff:.4})");
        }
    }
    Ok(())
}
