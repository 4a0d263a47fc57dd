//! Speculative decoding through the services against the same in process, side by side in
//! one run: does the network cost anything?
//!
//! Phase 1 runs `sibyl_decode::generate` with the n-gram drafter in this process. Phase 2
//! starts `sibyl drafter`, `sibyl verifier` and `sibyl gateway` as separate processes on
//! loopback and sends the same prompts through the gateway's gRPC API. Phase 3 repeats phase 1
//! to show the machine's drift. Reports decode tokens/s of each (the first token excluded:
//! both time from the first token to the last), the ratio, whether the texts are identical,
//! and the verifier's draft wait per step (p50, p99).
//!
//! `cargo build --release --workspace --all-targets && CANDLE_NUM_THREADS=2 \
//!  target/release/examples/services_bench --data humanevalfix.jsonl \
//!  [--category python_bugfix] [--limit 8] [--max-tokens 128] [--model qwen2.5-coder-1.5b]`

use sibyl_decode::{generate, GenerationConfig};
use sibyl_engine::{load, ChatMessage, Detokenizer, LoadOptions};
use sibyl_ngram::NgramDrafter;
use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_spec::{Drafter, SamplingConfig, TreeLimits};
use sibyl_tests::{generate_text, RoleProcesses};
use std::io::BufRead;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

#[derive(clap::Parser)]
struct BenchArgs {
    /// Prompts: JSONL in `sibyl bench`'s format (HumanEvalFix, for instance).
    #[arg(long)]
    data: String,
    #[arg(long, default_value = "python_bugfix")]
    category: String,
    /// First N items of the category.
    #[arg(long, default_value_t = 8)]
    limit: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value = "qwen2.5-coder-1.5b")]
    model: String,
}

/// One generation's figures.
struct Run {
    text: String,
    tokens: usize,
    /// From the first token to the last.
    decode: Duration,
    steps: usize,
}

fn main() -> anyhow::Result<()> {
    let args = <BenchArgs as clap::Parser>::parse();
    let path = sibyl_models::locate_in_user_cache(&args.model, &sibyl_models::NoProgress)?;
    let mut items = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(&args.data)?).lines() {
        let item: serde_json::Value = serde_json::from_str(&line?)?;
        if item["category"] == args.category.as_str() {
            items.push((
                item["id"].as_str().unwrap_or("?").to_string(),
                item["prompt"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    items.truncate(args.limit);
    println!(
        "model {}, {} items of {}, greedy, max {} tokens, n-gram drafter, threads {}",
        args.model,
        items.len(),
        args.category,
        args.max_tokens,
        std::env::var("CANDLE_NUM_THREADS").unwrap_or_else(|_| "all cores".into())
    );

    let in_process = |items: &[(String, String)]| -> anyhow::Result<Vec<Run>> {
        let loaded = load(&path, &LoadOptions::default())?;
        let template = loaded
            .chat_template
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no chat template"))?;
        let config = GenerationConfig {
            max_tokens: args.max_tokens,
            sampling: SamplingConfig::greedy(),
            tree: TreeLimits::default(),
            learning: None,
            stop_tokens: loaded.tokenizer.stop_tokens().to_vec(),
            prefix_cache: true,
            logprobs: None,
        };
        let mut runs = Vec::new();
        for (_, text) in items {
            let prompt = loaded
                .tokenizer
                .encode(&template.render(&[ChatMessage::new("user", text)])?)?;
            let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(NgramDrafter::default())];
            let mut first = None;
            let report = generate(&loaded.model, &prompt, &config, &mut drafters, |_| {
                first.get_or_insert_with(Instant::now);
                ControlFlow::Continue(())
            })?;
            let ended = Instant::now();
            let mut detokenizer = Detokenizer::new(&loaded.tokenizer);
            let mut text = String::new();
            for &token in &report.tokens {
                text.push_str(&detokenizer.push(token)?.unwrap_or_default());
            }
            text.push_str(&detokenizer.finish()?.unwrap_or_default());
            runs.push(Run {
                text,
                tokens: report.tokens.len(),
                decode: first.map_or(Duration::ZERO, |f| ended - f),
                steps: report.steps,
            });
        }
        Ok(runs)
    };

    let first = in_process(&items)?;

    let sibyl = std::env::current_exe()?
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("sibyl"))
        .ok_or_else(|| anyhow::anyhow!("cannot find the sibyl binary"))?;
    let model = path.to_string_lossy().into_owned();
    let roles = RoleProcesses::spawn(&sibyl, &model, 1)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let (second, waits) = runtime.block_on(async {
        roles.wait_until_serving(Duration::from_secs(300)).await?;
        let mut client = GatewayClient::connect(format!("http://{}", roles.gateway)).await?;
        let mut runs = Vec::new();
        let mut waits = Vec::new();
        for (_, text) in &items {
            let request = pb::GenerateRequest {
                input: Some(pb::generate_request::Input::Chat(pb::ChatConversation {
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: text.clone(),
                    }],
                    ..Default::default()
                })),
                max_tokens: args.max_tokens as u32,
                sampling: Some(pb::SamplingParams::default()),
                ..pb::GenerateRequest::default()
            };
            let mut first = None;
            let (text, summary) = generate_text(&mut client, request, |_| {
                first.get_or_insert_with(Instant::now);
            })
            .await?;
            let ended = Instant::now();
            waits.push((
                sibyl_proto::std_duration(summary.draft_wait_p50.as_ref()),
                sibyl_proto::std_duration(summary.draft_wait_p99.as_ref()),
            ));
            runs.push(Run {
                text,
                tokens: summary.usage.unwrap_or_default().completion_tokens as usize,
                decode: first.map_or(Duration::ZERO, |f| ended - f),
                steps: summary.steps as usize,
            });
        }
        anyhow::Ok((runs, waits))
    })?;
    drop(roles);

    let third = in_process(&items)?;

    println!("id | tokens | steps in-process | steps gateway | in-process tok/s | gateway tok/s | in-process again tok/s | identical");
    let rate =
        |run: &Run| (run.tokens.saturating_sub(1)) as f64 / run.decode.as_secs_f64().max(1e-9);
    let mut identical = 0;
    for (i, (id, _)) in items.iter().enumerate() {
        let same = first[i].text == second[i].text && first[i].text == third[i].text;
        identical += usize::from(same);
        println!(
            "{id} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {same}",
            second[i].tokens,
            first[i].steps,
            second[i].steps,
            rate(&first[i]),
            rate(&second[i]),
            rate(&third[i]),
        );
    }
    let total = |runs: &[Run]| {
        let tokens: usize = runs.iter().map(|r| r.tokens.saturating_sub(1)).sum();
        let secs: f64 = runs.iter().map(|r| r.decode.as_secs_f64()).sum();
        tokens as f64 / secs
    };
    let (a, b, c) = (total(&first), total(&second), total(&third));
    println!(
        "decode tok/s: in-process {a:.2}, gateway {b:.2}, in-process again {c:.2}; gateway / in-process {:.3}x (against the mean of both in-process runs); {identical}/{} identical",
        b / ((a + c) / 2.0),
        items.len()
    );
    let mut p50: Vec<Duration> = waits.iter().map(|w| w.0).collect();
    p50.sort();
    let p99 = waits.iter().map(|w| w.1).max().unwrap_or_default();
    let steps: usize = second.iter().map(|r| r.steps).sum();
    let extra = second
        .iter()
        .map(|r| r.decode)
        .sum::<Duration>()
        .as_secs_f64()
        - (first
            .iter()
            .chain(&third)
            .map(|r| r.decode)
            .sum::<Duration>()
            .as_secs_f64()
            / 2.0);
    println!(
        "draft wait per step: median of per-request p50 {:?}, largest per-request p99 {:?}; wall time difference per step {:.2} ms",
        p50.get(p50.len() / 2).copied().unwrap_or_default(),
        p99,
        extra * 1000.0 / steps.max(1) as f64
    );
    Ok(())
}
