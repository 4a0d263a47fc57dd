//! `sibyl bench`: plain decoding against speculative configs on benchmark prompts, side by
//! side in one run, with an equality gate at temperature 0.

mod backend;
mod chart;
mod concurrency;
mod dataset;
mod machine;
mod prefix;
mod report;
mod results;

use anyhow::{bail, Context};
use backend::{Backend, BenchConfig, InProcess, Remote};
use clap::Args;
use dataset::Item;
use indicatif::{ProgressBar, ProgressStyle};
use machine::Machine;
use results::{Failure, ItemRecord, Results, Setup, Speculation};
use sibyl_decode::GenerationConfig;
use sibyl_engine::ChatMessage;
use sibyl_gateway::PromptInput;
use sibyl_proto::v1 as pb;
use sibyl_setup::args::{
    at_least_one, DeviceArgs, DraftKind, LmArgs, ModelArgs, NgramArgs, RetrievalArgs, TreeArgs,
};
use sibyl_setup::{DrafterSettings, DrafterSources};
use sibyl_spec::{Penalties, SamplingConfig};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// A JSONL file of prompts: one object per line with `id`, `category`, `prompt`,
    /// `format` (chat, completion or infill) and optional `turns` (a conversation) or `suffix`
    /// (infill: the code after the gap the model fills). Repeatable.
    #[arg(long = "dataset", required = true)]
    pub datasets: Vec<PathBuf>,

    /// Only these categories (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,

    /// At most N items per category, the first in file order.
    #[arg(long, value_parser = at_least_one)]
    pub limit: Option<usize>,

    /// Configs to compare, comma-separated: `plain` (speculation off; always run, it is the
    /// baseline), a drafter kind (`ngram`), kinds joined by `+`, or `all`.
    #[arg(long, value_delimiter = ',', default_value = "plain,ngram")]
    pub configs: Vec<String>,

    /// Most tokens generated per turn.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
    pub max_tokens: usize,

    /// Sampling temperature; at 0 (greedy) every output must equal plain decoding's.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,

    /// Seed of the sampling, the same for every prompt and config.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Also run each config's prompts this many at a time through one step scheduler
    /// (continuous batching; with --gateway, that many streams open), for each number in
    /// this comma-separated list (1 is always run too: each output must equal the same
    /// request's at 1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1",
        value_parser = concurrency::parse_level
    )]
    pub concurrency: Vec<usize>,

    /// Then run each config's prompts again, in the same order, with the prefix cache on (in
    /// process one that starts empty; through --gateway the verifier's), and report time to
    /// first token of first and later turns and prompt time against the run without it
    /// (which every run does: each figure includes its own prompt processing). Every output
    /// must be the same.
    #[arg(long)]
    pub prefix_cache: bool,

    /// Keep what drafters learn from one prompt for the next (in process): each config's
    /// suffix drafter indexes the generations of that config's earlier prompts, in item
    /// order, as a server does (each pass over the prompts, at each concurrency and with
    /// the prefix cache, starts empty again). Without it every prompt starts with empty
    /// drafters. Items of several datasets run file by file, so `--dataset humaneval.jsonl
    /// --dataset humanevalfix.jsonl` asks for each function's bug fix after its completion.
    #[arg(long)]
    pub keep_drafter_state: bool,

    /// Run each prompt this many times under each config, the configs' order alternating,
    /// and keep per config the run of median decode speed: per-prompt ratios then move
    /// less with the machine's own run-to-run noise. With --concurrency, each level also
    /// runs this many times, the levels ascending then descending in turn, and its row is
    /// the run of median aggregate tokens/s (every run's rates are listed).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    pub repeat: u64,

    /// Put this file's text before every prompt: as a system message before a chat's turns,
    /// or as the start of a completion prompt (a long shared system prompt).
    #[arg(long, value_name = "FILE")]
    pub system_prompt: Option<PathBuf>,

    /// Measure through the gateway at this URL (`http://HOST:PORT`, its gRPC port) instead
    /// of in this process; `--model` and the speculation settings are then the servers'.
    #[arg(long)]
    pub gateway: Option<String>,

    /// Directory for results.json, report.md and speedup.svg (created if needed).
    #[arg(long)]
    pub out: PathBuf,

    #[command(flatten)]
    pub model: ModelArgs,

    /// Where the target model computes in process (not with --gateway).
    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub tree: TreeArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub lm: LmArgs,
}

/// The configs to run, plain first, each once. `local`: run in this process.
fn configs(names: &[String], local: bool) -> anyhow::Result<Vec<BenchConfig>> {
    let mut configs = vec![BenchConfig::plain()];
    for name in names {
        let config = BenchConfig::parse(name.trim(), local)?;
        if !configs.iter().any(|c| c.name == config.name) {
            configs.push(config);
        }
    }
    Ok(configs)
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        bail!("--temperature must be a number at least 0");
    }
    if args.repeat > 1 && args.keep_drafter_state {
        bail!(
            "--repeat cannot be combined with --keep-drafter-state: a prompt's second run would \
             draft from its first"
        );
    }
    let levels = concurrency::levels(&args.concurrency);
    args.lm.config()?;
    let configs = configs(&args.configs, args.gateway.is_none())?;
    let files = args
        .datasets
        .iter()
        .map(|path| dataset::read(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut items = dataset::select(files, &args.categories, args.limit)?;
    if let Some(path) = &args.system_prompt {
        let system = std::fs::read_to_string(path)
            .with_context(|| format!("--system-prompt: cannot read {}", path.display()))?;
        if system.trim().is_empty() {
            bail!("--system-prompt: {} is empty", path.display());
        }
        for item in &mut items {
            item.system = Some(system.clone());
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; its timings mean little (build with --release)");
    }
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: None,
        top_p: None,
        min_p: None,
        seed: args.seed,
        penalties: Penalties::default(),
        filters_first: false,
    };
    sampling
        .validate(usize::MAX)
        .context("invalid sampling parameters")?;
    let mut backend: Box<dyn Backend> = match &args.gateway {
        Some(url) => {
            let params = pb::SamplingParams {
                temperature: args.temperature,
                top_k: 0,
                top_p: 0.0,
                seed: Some(args.seed),
                ..Default::default()
            };
            Box::new(Remote::connect(url, args.max_tokens, params)?)
        }
        None => {
            sibyl_setup::init_threads(args.model.threads);
            let loaded = sibyl_setup::load_model(&args.model, args.device.device)?;
            let generation = GenerationConfig {
                max_tokens: args.max_tokens,
                sampling,
                tree: args.tree.limits(),
                learning: args.tree.draft_sizing.learning(),
                stop_tokens: loaded.tokenizer.stop_tokens().to_vec(),
                // Each figure includes its prompt's own processing.
                prefix_cache: false,
                logprobs: None,
            };
            // Datastores are opened (and checked) whether or not a config uses them; the LM
            // drafter's model is loaded only for a config that uses it.
            let mut kinds = vec![DraftKind::Retrieval];
            if configs.iter().any(|c| c.uses("lm")) {
                kinds.push(DraftKind::Lm);
            }
            let drafter_args = DrafterSettings {
                ngram: &args.ngram,
                retrieval: &args.retrieval,
                lm: &args.lm,
            };
            let sources = DrafterSources::open(drafter_args, &kinds, &loaded)?;
            sources.measure(generation.learning.as_ref(), generation.tree.max_depth);
            Box::new(InProcess {
                name: model_name(&args.model.model),
                loaded,
                generation,
                sources,
                prefixes: None,
                suffix_indexes: args.keep_drafter_state.then(Default::default),
            })
        }
    };
    for item in &items {
        backend
            .check(&first_prompt(item))
            .with_context(|| format!("the item `{}` cannot run", item.id))?;
    }
    let setup = Setup {
        sibyl_version: env!("CARGO_PKG_VERSION").to_string(),
        date: machine::utc_date(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
        ),
        command: command_line(),
        model: backend.model().to_string(),
        backend: args
            .gateway
            .clone()
            .unwrap_or_else(|| match args.device.device {
                sibyl_engine::Device::Cpu => "in-process".into(),
                device => format!("in-process on {device}"),
            }),
        machine: Machine::this(),
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        repeat: args.repeat as usize,
        datasets: args
            .datasets
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        speculation: args.gateway.is_none().then_some(Speculation {
            draft_budget: args.tree.draft_budget,
            draft_depth: args.tree.draft_depth,
            draft_min_value: args.tree.draft_min_value,
            draft_exempt: args.tree.draft_exempt,
            ngram_max: args.ngram.ngram_max,
            ngram_branches: args.ngram.ngram_branches,
            draft_sizing: format!("{:?}", args.tree.draft_sizing).to_lowercase(),
            datastores: args
                .retrieval
                .datastores
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            draft_model: configs
                .iter()
                .any(|c| c.uses("lm"))
                .then(|| args.lm.draft_model.clone()),
        }),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    };
    let names: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
    // An empty results file first: an unwritable --out fails now, not after a prompt.
    Results::new(setup.clone(), names, Vec::new(), Vec::new()).write(&args.out)?;
    backend.warm_up().context("the warm-up generation failed")?;
    // From here Ctrl-C keeps what was measured (before, it ends the process as usual).
    let interrupted = Arc::new(AtomicBool::new(false));
    watch_interrupt(interrupted.clone());
    let mut results = measure(
        backend.as_mut(),
        &items,
        &configs,
        setup,
        &args.out,
        &interrupted,
    )?;
    if !levels.is_empty() && !results.interrupted {
        let sweep = concurrency::Sweep {
            levels: &levels,
            rounds: args.repeat as usize,
            configs: &configs,
            out: &args.out,
            interrupted: &interrupted,
        };
        sweep.run(backend.as_mut(), &items, &mut results)?;
    }
    if args.prefix_cache && !results.interrupted {
        prefix::sweep(
            backend.as_mut(),
            &items,
            &configs,
            &mut results,
            &args.out,
            &interrupted,
        )?;
    }
    conclude(&results, &args.out)
}

/// An item's first turn as a prompt.
fn first_prompt(item: &Item) -> PromptInput {
    item.prompt(0, &mut Vec::new())
        .unwrap_or_else(|| PromptInput::Text(String::new()))
}

/// Runs every item under every config, writing the results into `out` after each item;
/// stops early, with `interrupted` set in the results, when `interrupted` is set. A prompt
/// that fails under some config is recorded as a failure and left out.
fn measure(
    backend: &mut dyn Backend,
    items: &[Item],
    configs: &[BenchConfig],
    setup: Setup,
    out: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<Results> {
    let names: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
    let exact = setup.temperature == 0.0;
    let repeat = setup.repeat.max(1);
    let runs: usize = items.iter().map(|i| i.turns.len()).sum::<usize>() * configs.len() * repeat;
    let progress = progress_bar(runs as u64);
    let mut records = Vec::new();
    let mut failures = Vec::new();
    let mut stopped = false;
    // Per category, so that each category's ratios get both orders.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    'items: for (index, item) in items.iter().enumerate() {
        // Alternate the order (plain, X, then X, plain) so that drift of the machine
        // cancels in the ratios.
        let count = seen.entry(item.category.as_str()).or_default();
        // Each config's runs of this item.
        let mut runs: Vec<Vec<ItemRecord>> = vec![Vec::new(); configs.len()];
        'rounds: for round in 0..repeat {
            let mut order: Vec<usize> = (0..configs.len()).collect();
            if (*count + round) % 2 == 1 {
                order.reverse();
            }
            for at in order {
                let config = &configs[at];
                progress.set_message(format!("{} ({})", item.id, config.name));
                match run_item(backend, item, config, interrupted, &progress) {
                    Ok(Some(record)) => runs[at].push(record),
                    Ok(None) => {
                        stopped = true;
                        break 'items;
                    }
                    Err(error) => {
                        let error = format!("{error:#}");
                        progress.suspend(|| eprintln!("{} ({}): {error}", item.id, config.name));
                        failures.push(Failure {
                            id: item.id.clone(),
                            category: item.category.clone(),
                            config: config.name.clone(),
                            error,
                        });
                        runs.clear();
                        break 'rounds;
                    }
                }
            }
        }
        *count += repeat;
        let mut done: Vec<ItemRecord> = runs.into_iter().filter_map(median_run).collect();
        if done.len() == configs.len() {
            if let Some(plain) = done.iter().find(|r| r.config == "plain").cloned() {
                for record in &mut done {
                    record.compare(&plain, exact);
                }
            }
            print_line(
                &progress,
                item_line(index + 1, items.len(), item, configs, &done),
            );
            records.extend(done);
        }
        Results::new(
            setup.clone(),
            names.clone(),
            records.clone(),
            failures.clone(),
        )
        .write(out)?;
    }
    progress.finish_and_clear();
    let mut results = Results::new(setup, names, records, failures);
    results.interrupted = stopped;
    results.write(out)?;
    Ok(results)
}

/// Of one config's runs of an item, the one of median decode speed (the slower of the two
/// middle ones of an even count), holding every run's speed in run order.
fn median_run(mut runs: Vec<ItemRecord>) -> Option<ItemRecord> {
    let speeds: Vec<f64> = runs.iter().map(|r| r.tokens_per_s).collect();
    runs.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
    let middle = runs.len().checked_sub(1)? / 2;
    let mut kept = runs.swap_remove(middle);
    kept.runs_tokens_per_s = speeds;
    Some(kept)
}

/// A bar counting `len` generations.
fn progress_bar(len: u64) -> ProgressBar {
    let progress = ProgressBar::new(len);
    progress.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} generations, eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    progress.enable_steady_tick(std::time::Duration::from_secs(1));
    progress
}

/// A line above the bar; on no terminal (a log file, CI), a line instead of the bar.
fn print_line(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// `[3/20] id (category): plain 9.8 tok/s; ngram 14.1 tok/s 1.44x MAT 1.90 identical`.
fn item_line(
    number: usize,
    count: usize,
    item: &Item,
    configs: &[BenchConfig],
    records: &[ItemRecord],
) -> String {
    let mut line = format!("[{number}/{count}] {} ({}):", item.id, item.category);
    for config in configs {
        let Some(r) = records.iter().find(|r| r.config == config.name) else {
            continue;
        };
        line.push_str(&format!(" {} {:.2} tok/s", r.config, r.tokens_per_s));
        if !config.is_plain() {
            if let Some(speedup) = r.speedup {
                line.push_str(&format!(" {speedup:.2}x"));
            }
            line.push_str(&format!(
                " MAT {:.2}",
                r.accepted as f64 / r.steps.max(1) as f64
            ));
            match r.identical {
                Some(true) => line.push_str(" identical"),
                Some(false) => line.push_str(" DIFFERS"),
                None => {}
            }
        }
        line.push(';');
    }
    line.pop();
    line
}

/// Reports a finished (or interrupted) run; an error when it was interrupted, when a prompt
/// failed, or when any output differs from plain decoding.
fn conclude(results: &Results, out: &Path) -> anyhow::Result<()> {
    let prompts = results.items.len() / results.config_names.len().max(1);
    if !results.interrupted {
        // The report is in the files too: a closed stdout (`| head`) is not an error.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", results.markdown()).and_then(|()| stdout.flush());
    }
    for m in &results.mismatches {
        eprintln!(
            "{} ({}): output differs from plain decoding in turn {} from token {}",
            m.id, m.config, m.turn, m.position
        );
    }
    if results.interrupted {
        bail!(
            "interrupted: the results of the {prompts} prompts finished are in {}",
            out.display()
        );
    }
    let concurrency = results.configs.values().any(|r| !r.concurrency.is_empty());
    eprintln!(
        "results of {prompts} prompts in {} (results.json, report.md, speedup.svg{})",
        out.display(),
        if concurrency { ", concurrency.svg" } else { "" }
    );
    if !results.mismatches.is_empty() {
        bail!(
            "{} outputs differ from plain decoding: speculation was not lossless",
            results.mismatches.len()
        );
    }
    let batched = concurrency::mismatches(results);
    if batched > 0 {
        bail!(
            "{batched} outputs under --concurrency differ from the same request's at \
             concurrency 1: batching was not lossless (listed in report.md)"
        );
    }
    let cached = prefix::mismatches(results);
    if cached > 0 {
        bail!(
            "{cached} outputs with the prefix cache differ from the same request's without \
             it: the cache was not lossless (listed in report.md)"
        );
    }
    if !results.failures.is_empty() {
        bail!(
            "{} prompts failed (listed in report.md)",
            results.failures.len()
        );
    }
    Ok(())
}

/// Runs every turn of `item` under `config`; `None` when interrupted.
fn run_item(
    backend: &mut dyn Backend,
    item: &Item,
    config: &BenchConfig,
    interrupted: &AtomicBool,
    progress: &ProgressBar,
) -> anyhow::Result<Option<ItemRecord>> {
    let mut messages = Vec::new();
    let mut turns = Vec::new();
    while let Some(prompt) = item.prompt(turns.len(), &mut messages) {
        let Some((report, answer)) = backend
            .generate(&prompt, config, interrupted)
            .with_context(|| format!("{} ({})", item.id, config.name))?
        else {
            return Ok(None);
        };
        // The next turn follows the model's own answer.
        messages.push(ChatMessage::new("assistant", &answer));
        turns.push(report);
        progress.inc(1);
    }
    Ok(Some(ItemRecord::new(
        &item.id,
        &item.category,
        &config.name,
        &turns,
    )))
}

/// The first Ctrl-C sets `interrupted` (the run stops after writing what it has); a second
/// one ends the process at once.
fn watch_interrupt(interrupted: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: finishing; Ctrl-C again to quit at once");
                interrupted.store(true, Ordering::Relaxed);
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
}

/// A model's name for reports: the catalog name as given, or a model file's stem.
fn model_name(model: &str) -> String {
    let path = std::path::Path::new(model);
    if path.is_file() {
        if let Some(stem) = path.file_stem() {
            return stem.to_string_lossy().into_owned();
        }
    }
    model.to_string()
}

/// This process's command line, quoted for a POSIX shell where needed.
fn command_line() -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    let mut args = vec!["sibyl".to_string()];
    for arg in std::env::args().skip(1) {
        if !arg.is_empty() && arg.chars().all(plain) {
            args.push(arg);
        } else {
            args.push(format!("'{}'", arg.replace('\'', r"'\''")));
        }
    }
    args.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataset::Format;
    use sibyl_engine::LoadOptions;
    use sibyl_ngram::NgramConfig;
    use sibyl_retrieval::{SuffixConfig, SuffixIndex};
    use sibyl_spec::TreeLimits;
    use std::time::Duration;

    /// How [`Altered`] changes a generation: given its config, how many generations that
    /// config made before, the report, and the vocabulary size.
    type Alteration = fn(&BenchConfig, usize, &mut sibyl_decode::GenerationReport, u32);

    /// The real in-process backend, its reports altered.
    struct Altered {
        inner: InProcess,
        alter: Alteration,
        calls: HashMap<String, usize>,
        /// The config and concurrency of each concurrent run, in order.
        levels: Vec<(String, usize)>,
    }

    impl Altered {
        fn new(inner: InProcess, alter: Alteration) -> Self {
            Altered {
                inner,
                alter,
                calls: HashMap::new(),
                levels: Vec::new(),
            }
        }
    }

    /// Under the config named `lossy` the fourth generated token of every turn (or its
    /// last, if shorter) is changed, as a speculation bug would change it.
    fn lossy(backend: InProcess) -> Altered {
        Altered::new(backend, |config, _, report, vocab| {
            let last = report.tokens.len().min(4);
            if config.name == "lossy" && last > 0 {
                let token = &mut report.tokens[last - 1];
                *token = (*token + 1) % vocab;
            }
        })
    }

    /// An empty folder for one test's results.
    fn scratch(name: &str) -> std::path::PathBuf {
        let out = std::env::temp_dir().join(format!("sibyl-bench-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&out).unwrap();
        out
    }

    fn plain_and_ngram() -> Vec<BenchConfig> {
        vec![
            BenchConfig::plain(),
            BenchConfig::parse("ngram", true).unwrap(),
        ]
    }

    impl Backend for Altered {
        fn model(&self) -> &str {
            self.inner.model()
        }

        fn warm_up(&mut self) -> anyhow::Result<()> {
            self.inner.warm_up()
        }

        fn generate(
            &mut self,
            prompt: &PromptInput,
            config: &BenchConfig,
            interrupted: &AtomicBool,
        ) -> anyhow::Result<backend::Generated> {
            let vocab = self.inner.loaded.model.vocab_size() as u32;
            let generated = self.inner.generate(prompt, config, interrupted)?;
            let call = self.calls.entry(config.name.clone()).or_default();
            *call += 1;
            Ok(generated.map(|(mut report, text)| {
                (self.alter)(config, *call - 1, &mut report, vocab);
                (report, text)
            }))
        }

        fn generate_concurrently(
            &mut self,
            run: &concurrency::ConcurrentRun<'_>,
        ) -> anyhow::Result<Option<concurrency::Traces>> {
            self.levels.push((run.config.name.clone(), run.concurrency));
            self.inner.generate_concurrently(run)
        }

        fn set_prefix_cache(&mut self, on: bool) {
            self.inner.set_prefix_cache(on);
        }
    }

    fn setup(model: &str) -> Setup {
        Setup {
            sibyl_version: "test".into(),
            date: "2026-01-01 00:00 UTC".into(),
            command: "sibyl bench".into(),
            model: model.into(),
            backend: "in-process".into(),
            machine: Machine::this(),
            max_tokens: 12,
            temperature: 0.0,
            seed: 0,
            repeat: 1,
            datasets: vec!["test".into()],
            speculation: None,
            build: "release".into(),
        }
    }

    /// The test model in process, the suffix drafter's indexes kept across generations or
    /// not.
    fn in_process(max_tokens: usize, prefix_cache: bool, keep: bool) -> InProcess {
        let path = sibyl_tests::test_model_path().unwrap();
        let loaded = sibyl_engine::load(&path, &LoadOptions::default()).unwrap();
        let generation = GenerationConfig {
            max_tokens,
            sampling: SamplingConfig::greedy(),
            tree: TreeLimits::default(),
            learning: None,
            stop_tokens: loaded.tokenizer.stop_tokens().to_vec(),
            prefix_cache,
            logprobs: None,
        };
        let sources = DrafterSources {
            ngram: NgramConfig::default(),
            datastores: Vec::new(),
            lm: None,
            suffix: Arc::new(SuffixIndex::new(SuffixConfig::default())),
        };
        InProcess {
            name: "smollm2".into(),
            loaded,
            generation,
            sources,
            prefixes: None,
            suffix_indexes: keep.then(Default::default),
        }
    }

    #[test]
    fn kept_drafter_state_carries_a_configs_generations_to_its_next_prompts() {
        let backend = |keep: bool| in_process(32, false, keep);
        let all = configs(&["suffix".into(), "all".into()], true).unwrap();
        let (suffix, other) = (&all[1], &all[2]);
        assert_eq!(
            (suffix.name.as_str(), other.name.as_str()),
            ("suffix", "all")
        );
        let prompt = PromptInput::Text("def fibonacci(n):\n".into());
        let accepted = |backend: &mut InProcess| {
            let (report, _) = backend
                .generate(&prompt, suffix, &AtomicBool::new(false))
                .unwrap()
                .unwrap();
            report.drafters[0].accepted
        };
        // Kept: the second run drafts from the first one's generation.
        let mut kept = backend(true);
        let (first, second) = (accepted(&mut kept), accepted(&mut kept));
        assert!(second >= 24 && second > first, "{first} then {second}");
        // Each config has its own index, kept from one generation to the next.
        assert!(Arc::ptr_eq(
            &kept.suffix_index(suffix),
            &kept.suffix_index(suffix)
        ));
        assert!(!Arc::ptr_eq(
            &kept.suffix_index(suffix),
            &kept.suffix_index(other)
        ));
        // Not kept: every generation starts empty, so the second run drafts as the first.
        let mut fresh = backend(false);
        assert_eq!(accepted(&mut fresh), accepted(&mut fresh));
    }

    #[test]
    fn a_lossy_config_is_caught_and_reported() {
        let mut backend = lossy(in_process(12, true, false));
        let items = vec![
            Item {
                id: "chat-1".into(),
                category: "chat".into(),
                format: Format::Chat,
                turns: vec!["Count from one to ten.".into(), "Now backwards.".into()],
                system: None,
                suffix: None,
            },
            Item {
                id: "code-1".into(),
                category: "code".into(),
                format: Format::Completion,
                turns: vec!["def fibonacci(n):\n".into()],
                system: None,
                suffix: None,
            },
            // Longer than the model's context window: a failure, recorded, and the run
            // goes on.
            Item {
                id: "long-1".into(),
                category: "code".into(),
                format: Format::Completion,
                turns: vec!["word ".repeat(9000)],
                system: None,
                suffix: None,
            },
        ];
        let lossy = BenchConfig {
            name: "lossy".into(),
            drafters: backend::Drafters::Kinds(vec!["ngram".into()]),
        };
        let configs = [plain_and_ngram(), vec![lossy]].concat();
        let out = scratch("lossy");
        let interrupted = AtomicBool::new(false);
        let results = measure(
            &mut backend,
            &items,
            &configs,
            setup("smollm2"),
            &out,
            &interrupted,
        )
        .unwrap();

        // Every prompt under `lossy` differs in its first turn; plain and n-gram agree.
        let mut caught: Vec<(&str, &str, usize)> = results
            .mismatches
            .iter()
            .map(|m| (m.id.as_str(), m.config.as_str(), m.turn))
            .collect();
        caught.sort();
        assert_eq!(caught, [("chat-1", "lossy", 1), ("code-1", "lossy", 1)]);
        assert!(results.mismatches.iter().all(|m| m.position <= 3));
        assert_eq!(results.failures.len(), 1);
        let failure = &results.failures[0];
        assert_eq!(failure.id, "long-1");
        assert!(
            failure.error.contains("context window"),
            "{}",
            failure.error
        );
        let error = conclude(&results, &out).unwrap_err().to_string();
        assert!(
            error.contains("2 outputs differ from plain decoding"),
            "{error}"
        );

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(json["configs"]["lossy"]["overall"]["identical"], 0);
        assert_eq!(json["configs"]["lossy"]["overall"]["total"], 2);
        assert_eq!(json["configs"]["ngram"]["overall"]["identical"], 2);
        assert_eq!(
            json["configs"]["plain"]["overall"]["mean_accepted_tokens"],
            1.0
        );
        assert_eq!(
            json["configs"]["lossy"]["categories"]["chat"]["identical"],
            0
        );
        let items = json["items"].as_array().unwrap();
        assert_eq!(items.len(), 6);
        for item in items {
            let lossy = item["config"] == "lossy";
            assert_eq!(item["identical"], !lossy, "{item}");
            assert_eq!(item["turns"], if item["id"] == "chat-1" { 2 } else { 1 });
        }
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            report.contains("**2 outputs differ from plain decoding:**"),
            "{report}"
        );
        assert!(
            report.contains("`chat-1` (chat), config lossy: turn 1, first differing token at"),
            "{report}"
        );
        assert!(report.contains("| **overall** | 2 |"), "{report}");
        // chat-1's second turn, apart.
        assert!(
            report.contains("## Later turns\n\nThe turns after the first of the 1 prompts"),
            "{report}"
        );
        assert!(
            report.contains("**1 prompts failed** and are left out"),
            "{report}"
        );
        let svg = std::fs::read_to_string(out.join("speedup.svg")).unwrap();
        for label in ["chat", "code", "overall", "ngram", "lossy"] {
            assert!(svg.contains(label), "{label} missing from the chart");
        }
    }

    /// One code prompt as a completion.
    fn one_completion() -> Vec<Item> {
        vec![Item {
            id: "code-1".into(),
            category: "code".into(),
            format: Format::Completion,
            turns: vec!["def fibonacci(n):\n".into()],
            system: None,
            suffix: None,
        }]
    }

    #[test]
    fn repeated_runs_keep_the_run_of_median_speed() {
        // The n-gram config's three runs decode in 3, 1 and 2 seconds.
        let mut backend = Altered::new(in_process(12, false, false), |config, call, report, _| {
            if config.name == "ngram" {
                report.decode_time = Duration::from_secs([3, 1, 2][call % 3]);
            }
        });
        let items = one_completion();
        let configs = plain_and_ngram();
        let out = scratch("repeat");
        let setup = Setup {
            repeat: 3,
            ..setup("smollm2")
        };
        let results = measure(
            &mut backend,
            &items,
            &configs,
            setup,
            &out,
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(backend.calls["plain"], 3);
        assert_eq!(backend.calls["ngram"], 3);
        assert_eq!(results.items.len(), 2, "one record per config");
        let ngram = results.items.iter().find(|r| r.config == "ngram").unwrap();
        assert_eq!(ngram.decode_s, 2.0);
        assert_eq!(ngram.identical, Some(true));
        // Every run's speed is kept, in run order: the fastest is three times the slowest.
        let decoded = ngram.tokens_per_s * ngram.decode_s;
        let speeds: Vec<f64> = [3.0, 1.0, 2.0].iter().map(|s| decoded / s).collect();
        assert_eq!(ngram.runs_tokens_per_s, speeds);
        let spread = results.configs["ngram"].overall.run_spread_max.unwrap();
        assert!((spread - 3.0).abs() < 1e-9, "{spread}");
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("each prompt run 3 times"), "{report}");
        assert!(report.contains("| ngram | 3.00x | 3.00x |"), "{report}");
    }

    #[test]
    fn repeated_sweeps_alternate_levels_and_configs_and_keep_every_run() {
        let mut backend = Altered::new(in_process(8, false, false), |_, _, _, _| {});
        let items = one_completion();
        let configs = plain_and_ngram();
        let out = scratch("sweep");
        let interrupted = AtomicBool::new(false);
        let mut results = measure(
            &mut backend,
            &items,
            &configs,
            setup("smollm2"),
            &out,
            &interrupted,
        )
        .unwrap();
        let sweep = concurrency::Sweep {
            levels: &[1, 2],
            rounds: 3,
            configs: &configs,
            out: &out,
            interrupted: &interrupted,
        };
        sweep.run(&mut backend, &items, &mut results).unwrap();
        // Levels 1, 2, 2, 1, 1, 2; at each, both configs, in alternating order.
        let expected = [
            ("plain", 1),
            ("ngram", 1),
            ("ngram", 2),
            ("plain", 2),
            ("plain", 2),
            ("ngram", 2),
            ("ngram", 1),
            ("plain", 1),
            ("plain", 1),
            ("ngram", 1),
            ("ngram", 2),
            ("plain", 2),
        ];
        let expected: Vec<(String, usize)> =
            expected.iter().map(|&(c, l)| (c.to_string(), l)).collect();
        assert_eq!(backend.levels, expected);
        let rows = &results.configs["ngram"].concurrency;
        let levels: Vec<usize> = rows.iter().map(|f| f.concurrency).collect();
        assert_eq!(levels, [1, 2]);
        for row in rows.iter().chain(&results.configs["plain"].concurrency) {
            assert!(row.identical, "{row:?}");
            assert_eq!(row.decode_by_run.len(), 3);
            let mut rates = row.aggregate_by_run.clone();
            rates.sort_by(f64::total_cmp);
            assert_eq!(rates.len(), 3);
            assert_eq!(row.aggregate_tokens_per_s, rates[1], "the median run's row");
        }
        let report = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(report.contains("Tokens/s of every run"), "{report}");
        assert!(
            report.contains("- plain at concurrency 2: aggregate "),
            "{report}"
        );
        std::fs::remove_dir_all(&out).ok();
    }

    #[test]
    fn plain_always_runs_first_and_once() {
        let names = |list: &[&str]| {
            configs(
                &list.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                true,
            )
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
        };
        assert_eq!(names(&["ngram"]), ["plain", "ngram"]);
        assert_eq!(names(&["ngram", "plain", "ngram"]), ["plain", "ngram"]);
        assert!(configs(&["oracle".to_string()], true).is_err());
    }
}
