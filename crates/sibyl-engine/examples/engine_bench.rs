//! Engine benchmark, side by side in one run: plain decoding against candle-transformers'
//! `quantized_qwen2` on the same file, and the cost of one forward over k chained tokens.
//!
//! `CANDLE_NUM_THREADS=2 cargo run --release --example engine_bench -- \
//!      [--model qwen2.5-coder-1.5b] [--tokens 24] [--rounds 3] [--chains 1,2,4,8]
//!      [--sessions 1,2,4,8] [--context 600]`

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2;
use sibyl_engine::{load, LoadOptions, LogitRows, Sequence, TreeInput};
use sibyl_spec::argmax;
use std::time::Instant;

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Decoding speed against candle-transformers, and the cost curve of k-token forwards.
#[derive(clap::Parser)]
struct BenchArgs {
    /// Catalog name or GGUF path (a qwen2 model: the reference is `quantized_qwen2`).
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    model: String,
    /// Tokens decoded per round and engine.
    #[arg(long, default_value_t = 24)]
    tokens: usize,
    /// Rounds, alternating the two engines.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Skip candle-transformers.
    #[arg(long)]
    no_reference: bool,
    /// Chain lengths of the verification curve.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3,4,5,6,8,10,12,16,20,24,32"
    )]
    chains: Vec<usize>,
    /// Batch sizes of the sessions curve: one forward over c sessions, one token each,
    /// each with its own cache of the prompt (what the verifier's scheduler runs).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    sessions: Vec<usize>,
    /// Tokens of context before every measured step: the prompt repeated to this length
    /// (attention reads more of the cache as it grows). Default: the prompt as it is.
    #[arg(long, default_value_t = 0)]
    context: usize,
}

/// The longest chain measured: the prompt's last tokens, reversed.
const MAX_CHAIN: usize = 32;

fn main() -> anyhow::Result<()> {
    let args = <BenchArgs as clap::Parser>::parse();
    let (model_name, tokens, rounds) = (args.model, args.tokens, args.rounds);
    if let Some(k) = args.chains.iter().find(|&&k| k == 0 || k > MAX_CHAIN) {
        anyhow::bail!("chain length {k} is outside 1..={MAX_CHAIN}");
    }
    let with_reference = !args.no_reference;
    let path = sibyl_models::locate_in_user_cache(&model_name, &sibyl_models::NoProgress)?;
    let loaded = load(&path, &LoadOptions::default())?;
    let model = &loaded.model;
    let mut prompt = loaded.tokenizer.encode(
        "<|im_start|>user\nWrite a Python function that parses an ISO 8601 date string and \
         returns a datetime object, with error handling.<|im_end|>\n<|im_start|>assistant\n",
    )?;
    if args.context > prompt.len() {
        prompt = prompt.iter().cycle().take(args.context).copied().collect();
    }
    println!(
        "model {model_name}: {} layers, hidden {}, weights {:.0} MiB; prompt {} tokens; threads {}",
        model.config().num_layers,
        model.config().hidden_size,
        model.weights_size_in_bytes() as f64 / (1 << 20) as f64,
        prompt.len(),
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "all cores".into())
    );

    let mut reference = if with_reference {
        let mut file = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut file)?;
        Some(quantized_qwen2::ModelWeights::from_gguf(
            content,
            &mut file,
            &Device::Cpu,
        )?)
    } else {
        None
    };

    // Plain decoding, alternating ours and the reference each round.
    let mut ours_ms = Vec::new();
    let mut ref_ms = Vec::new();
    for round in 0..rounds {
        let mut cache = model.new_cache();
        let logits = model.forward(&mut cache, &TreeInput::chain(&prompt), LogitRows::Last)?;
        let mut next = argmax(&logits);
        for _ in 0..tokens {
            let t = Instant::now();
            let logits = model.forward(&mut cache, &TreeInput::chain(&[next]), LogitRows::All)?;
            ours_ms.push(t.elapsed().as_secs_f64() * 1e3);
            next = argmax(&logits);
        }
        if let Some(reference) = reference.as_mut() {
            let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = reference.forward(&x, 0)?.flatten_all()?.to_vec1::<f32>()?;
            let mut next = argmax(&logits);
            for i in 0..tokens {
                let t = Instant::now();
                let x = Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?;
                let logits = reference
                    .forward(&x, prompt.len() + i)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                ref_ms.push(t.elapsed().as_secs_f64() * 1e3);
                next = argmax(&logits);
            }
        }
        eprintln!("round {} done", round + 1);
    }
    let ours = median(&mut ours_ms);
    println!(
        "decode, ours: median {ours:.1} ms/token ({:.2} tokens/s)",
        1e3 / ours
    );
    if !ref_ms.is_empty() {
        let theirs = median(&mut ref_ms);
        println!(
            "decode, candle-transformers quantized_qwen2: median {theirs:.1} ms/token ({:.2} tokens/s)",
            1e3 / theirs
        );
        println!("decode speed, ours / reference: {:.2}x", theirs / ours);
    }

    // Forward over k chained tokens after the prompt, relative to one step.
    let mut cache = model.new_cache();
    model.forward(&mut cache, &TreeInput::chain(&prompt), LogitRows::None)?;
    let chain: Vec<u32> = prompt.iter().rev().take(MAX_CHAIN).copied().collect();
    let mut one = f64::NAN;
    println!("k | median ms | k tokens / 1 step");
    for &k in &args.chains {
        let mut times = Vec::new();
        for _ in 0..(rounds * 2 + 1) {
            let t = Instant::now();
            model.forward(&mut cache, &TreeInput::chain(&chain[..k]), LogitRows::All)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            cache.truncate(prompt.len());
        }
        let m = median(&mut times);
        if k == 1 {
            one = m;
        }
        if one.is_nan() {
            // No one-token step measured to compare with.
            println!("{k} | {m:.1} | -");
        } else {
            println!("{k} | {m:.1} | {:.2}x", m / one);
        }
    }

    // One forward over c sessions (one token each, each after its own copy of the prompt),
    // relative to one session: the cost(c) of the verifier's batched decoding steps.
    if args.sessions.contains(&0) {
        anyhow::bail!("a batch has at least one session");
    }
    let mut caches: Vec<_> = (0..args.sessions.iter().copied().max().unwrap_or(0))
        .map(|_| cache.prefix(cache.len()))
        .collect();
    let tokens: Vec<TreeInput> = chain.iter().map(|&t| TreeInput::chain(&[t])).collect();
    let mut alone = f64::NAN;
    println!("c | median ms | c sessions / 1 session");
    for &c in &args.sessions {
        let mut times = Vec::new();
        for _ in 0..(rounds * 2 + 1) {
            let mut batch: Vec<Sequence<'_>> = caches
                .iter_mut()
                .take(c)
                .zip(tokens.iter().cycle())
                .map(|(cache, input)| Sequence {
                    cache,
                    input,
                    rows: LogitRows::All,
                })
                .collect();
            let t = Instant::now();
            model.forward_batch(&mut batch)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
            for cache in caches.iter_mut().take(c) {
                cache.truncate(prompt.len());
            }
        }
        let m = median(&mut times);
        if c == 1 {
            alone = m;
        }
        if alone.is_nan() {
            println!("{c} | {m:.1} | -");
        } else {
            println!("{c} | {m:.1} | {:.2}x", m / alone);
        }
    }
    Ok(())
}
