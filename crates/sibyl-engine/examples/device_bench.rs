//! The tensor engine on a device, with random weights of a real model's shape (no model
//! file needed): what a prompt, a decoding step, a verification chain or tree and a batch of
//! sessions cost, and a check that a row's logits are the same bits alone, in a chain and
//! beside other sessions. Exits with an error if they are not.
//!
//! `cargo run --release --workspace --features sibyl-engine/cuda --example device_bench -- \
//!      --device cuda`
//! (`--device cpu` runs the tensor engine on the CPU, slowly: for trying the example.)

use candle_core::quantized::GgmlDType;
use sibyl_engine::testkit::{tiny_model_on, TinyModelConfig};
use sibyl_engine::{Architecture, KvCache, LogitRows, Sequence, TreeInput};
use sibyl_spec::argmax;
use std::time::Instant;

#[derive(clap::Parser)]
struct Args {
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Qwen2.5-1.5B's shape (`1.5b`), or a small one (`small`) for a quick try.
    #[arg(long, default_value = "1.5b")]
    shape: String,
    /// Tokens of context before every measured step.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Measured repetitions of each step (the median is reported).
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Weight storage type: q4k, q6k or q8_0.
    #[arg(long, default_value = "q4k")]
    dtype: String,
    /// Also time a decoding step of the CPU engine on this machine's cores, same weights.
    #[arg(long)]
    compare_cpu: bool,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Milliseconds of `step` (median of `rounds`), run once first to warm up.
fn time(rounds: usize, mut step: impl FnMut()) -> f64 {
    step();
    median(
        (0..rounds)
            .map(|_| {
                let start = Instant::now();
                step();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

/// A tree of `branches` chains of `depth` nodes under one root.
fn tree(tokens: &[u32], branches: usize, depth: usize) -> TreeInput {
    let mut nodes = vec![tokens[0]];
    let mut parents = vec![None];
    for b in 0..branches {
        for d in 0..depth {
            nodes.push(tokens[(1 + b * depth + d) % tokens.len()]);
            parents.push(Some(if d == 0 { 0 } else { nodes.len() - 2 }));
        }
    }
    TreeInput::tree(nodes, parents)
}

fn main() -> anyhow::Result<()> {
    let args = <Args as clap::Parser>::parse();
    let device = match args.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => candle_core::Device::new_cuda(0)?,
        other => anyhow::bail!("--device {other}: use cpu or cuda"),
    };
    let dtype = match args.dtype.as_str() {
        "q4k" => GgmlDType::Q4K,
        "q6k" => GgmlDType::Q6K,
        "q8_0" => GgmlDType::Q8_0,
        other => anyhow::bail!("--dtype {other}: use q4k, q6k or q8_0"),
    };
    let config = match args.shape.as_str() {
        "1.5b" => TinyModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 151_936,
            hidden_size: 1536,
            intermediate_size: 8960,
            num_layers: 28,
            num_heads: 12,
            num_kv_heads: 2,
            head_dim: None,
            context_length: 32_768,
            dtype,
            seed: 1,
            random_blocks: true,
        },
        "small" => TinyModelConfig {
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 512,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 1,
            context_length: 4096,
            dtype,
            random_blocks: true,
            ..TinyModelConfig::default()
        },
        other => anyhow::bail!("--shape {other}: use 1.5b or small"),
    };
    let start = Instant::now();
    let model = tiny_model_on(&config, &device)?;
    println!(
        "device {:?}, shape {}, {:?}: {:.2} GB of weights, built in {:.1} s",
        args.device,
        args.shape,
        dtype,
        model.weights_size_in_bytes() as f64 / 1e9,
        start.elapsed().as_secs_f64()
    );
    let vocab = model.vocab_size() as u32;
    let tokens: Vec<u32> = (0..args.context + 256)
        .map(|i| ((i as u64 * 7919 + 13) % vocab as u64) as u32)
        .collect();
    let prompt = &tokens[..args.context];

    // The prompt, in one pass (logits of the last row, so that the time includes the work).
    let mut cache = model.new_cache();
    let start = Instant::now();
    model.forward(&mut cache, &TreeInput::chain(prompt), LogitRows::Last)?;
    let prefill = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "prompt of {} tokens: {prefill:.1} ms ({:.0} tokens/s)",
        args.context,
        args.context as f64 * 1e3 / prefill
    );

    let rounds = args.rounds;
    let step_on = |cache: &mut KvCache, input: &TreeInput| {
        let logits = model.forward(cache, input, LogitRows::All).unwrap();
        cache.truncate(args.context);
        logits
    };
    let one = time(rounds, || {
        step_on(&mut cache, &TreeInput::chain(&tokens[args.context..][..1]));
    });
    println!(
        "decoding step (1 row): {one:.2} ms ({:.1} tokens/s)",
        1e3 / one
    );
    println!("chains (rows: ms, cost against 1 row):");
    for k in [2, 4, 8, 16, 32, 64, 128, 256] {
        let input = TreeInput::chain(&tokens[args.context..][..k]);
        let ms = time(rounds, || {
            step_on(&mut cache, &input);
        });
        println!("  {k:>3}: {ms:.2} ms, {:.2}x", ms / one);
    }
    let input = tree(&tokens[args.context..], 4, 15);
    let ms = time(rounds, || {
        step_on(&mut cache, &input);
    });
    println!(
        "tree of 61 nodes (4 branches of 15): {ms:.2} ms, {:.2}x",
        ms / one
    );

    println!("sessions in one pass (sessions x rows: ms, tokens/s if every row is accepted):");
    for (sessions, rows) in [(8, 1), (32, 1), (64, 1), (4, 8), (8, 8)] {
        let mut caches: Vec<KvCache> = (0..sessions).map(|_| cache.prefix(args.context)).collect();
        let input = TreeInput::chain(&tokens[args.context..][..rows]);
        let ms = time(rounds, || {
            let mut batch: Vec<Sequence<'_>> = caches
                .iter_mut()
                .map(|cache| Sequence {
                    cache,
                    input: &input,
                    rows: LogitRows::All,
                })
                .collect();
            model.forward_batch(&mut batch).unwrap();
            drop(batch);
            for cache in &mut caches {
                cache.truncate(args.context);
            }
        });
        println!(
            "  {sessions:>2} x {rows}: {ms:.2} ms, {:.0} tokens/s",
            (sessions * rows) as f64 * 1e3 / ms
        );
    }

    if args.compare_cpu {
        let start = Instant::now();
        let cpu = sibyl_engine::testkit::tiny_model(&config)?;
        let mut cpu_cache = cpu.new_cache();
        cpu.forward(&mut cpu_cache, &TreeInput::chain(prompt), LogitRows::Last)?;
        let prepared = start.elapsed().as_secs_f64();
        let input = TreeInput::chain(&tokens[args.context..][..1]);
        let cpu_one = time(rounds.min(9), || {
            cpu.forward(&mut cpu_cache, &input, LogitRows::All).unwrap();
            cpu_cache.truncate(args.context);
        });
        println!(
            "CPU engine, {} threads: decoding step {cpu_one:.2} ms ({:.1} tokens/s); this \
             device {:.2}x faster (model and prompt on the CPU took {prepared:.1} s)",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            1e3 / cpu_one,
            cpu_one / one
        );
    }

    // Invariance: the rows of a chain, and of a session beside others, against one row at a
    // time; and greedy decoding verified in chains of 8 against plain greedy decoding.
    let continuation = &tokens[args.context..][..8];
    let chain = step_on(&mut cache, &TreeInput::chain(continuation));
    let mut single = cache.prefix(args.context);
    let alone: Vec<f32> = continuation
        .iter()
        .flat_map(|&t| {
            model
                .forward(&mut single, &TreeInput::chain(&[t]), LogitRows::All)
                .unwrap()
        })
        .collect();
    let mut others: Vec<KvCache> = (0..3).map(|i| cache.prefix(args.context - i * 7)).collect();
    let mut mine = cache.prefix(args.context);
    let input = TreeInput::chain(continuation);
    let other_inputs: Vec<TreeInput> = (0..3).map(|i| tree(&tokens[i..], 2, 3 + i)).collect();
    let mut batch = vec![Sequence {
        cache: &mut mine,
        input: &input,
        rows: LogitRows::All,
    }];
    for (cache, input) in others.iter_mut().zip(&other_inputs) {
        batch.push(Sequence {
            cache,
            input,
            rows: LogitRows::All,
        });
    }
    let batched = model.forward_batch(&mut batch)?.swap_remove(0);
    let finite = chain.iter().all(|v| v.is_finite());
    println!(
        "bit-identical: chain against one row at a time {}, beside 3 other sessions {}; \
         logits finite {finite}",
        chain == alone,
        batched == alone
    );

    let steps = 32;
    let mut plain_cache = cache.prefix(args.context);
    let mut plain = vec![tokens[args.context]];
    for _ in 0..steps {
        let last = *plain.last().unwrap();
        let logits = model.forward(&mut plain_cache, &TreeInput::chain(&[last]), LogitRows::All)?;
        plain.push(argmax(&logits));
    }
    // Verification of the right continuation in chains of 8: every row's choice is kept.
    let mut spec_cache = cache.prefix(args.context);
    let mut spec = vec![tokens[args.context]];
    while spec.len() <= steps {
        let from = spec.len() - 1;
        let draft = &plain[from..(from + 8).min(plain.len() - 1)];
        let logits = model.forward(&mut spec_cache, &TreeInput::chain(draft), LogitRows::All)?;
        let vocab = vocab as usize;
        for row in logits.chunks(vocab) {
            spec.push(argmax(row));
        }
    }
    spec.truncate(plain.len());
    println!(
        "greedy decoding verified in chains of 8 equals plain greedy decoding: {}",
        spec == plain
    );
    if chain != alone || batched != alone || spec != plain || !finite {
        anyhow::bail!("batch invariance does not hold on this device");
    }
    Ok(())
}
