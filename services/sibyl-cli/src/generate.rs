//! `sibyl generate`: one generation from a prompt, streamed to stdout.

use anyhow::Context;
use clap::Args;
use sibyl_decode::{GenerationConfig, GenerationReport};
use sibyl_engine::{ChatMessage, Detokenizer};
use sibyl_ngram::PredictionDrafter;
use sibyl_setup::args::{DeviceArgs, ModelArgs, SamplingArgs, SpeculationArgs};
use sibyl_setup::{draft_kinds, init_threads, load_model, DrafterSources};
use sibyl_spec::SamplingConfig;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::ops::ControlFlow;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,

    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,

    /// Fill in the middle: the prompt is the code before a gap, this the code after it;
    /// the model writes what goes between (code models with fill-in-the-middle tokens).
    #[arg(long, conflicts_with = "chat")]
    pub suffix: Option<String>,

    /// A file holding what the output is expected to be (the text being edited, an earlier
    /// version of the answer): drafted from beside the other drafters, never copied; the
    /// output is the model's whatever the file holds. Unused with `--draft none`.
    #[arg(long)]
    pub prediction_file: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub device: DeviceArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    #[command(flatten)]
    pub speculation: SpeculationArgs,
}

/// Everything `generate` needs, checked before any model is touched.
pub struct GenerateConfig {
    pub prompt: String,
    pub chat: bool,
    pub suffix: Option<String>,
    /// The text of `--prediction-file`.
    pub prediction: Option<String>,
    pub model: ModelArgs,
    pub device: sibyl_engine::Device,
    pub generation: GenerationConfig,
    pub speculation: SpeculationArgs,
}

impl TryFrom<GenerateArgs> for GenerateConfig {
    type Error = anyhow::Error;

    fn try_from(args: GenerateArgs) -> anyhow::Result<Self> {
        let seed = args.sampling.seed.unwrap_or_else(|| {
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        });
        let sampling = SamplingConfig {
            temperature: args.sampling.temperature,
            top_k: args.sampling.top_k,
            top_p: args.sampling.top_p,
            min_p: args.sampling.min_p,
            seed,
            penalties: args.sampling.penalties(),
            filters_first: false,
        };
        sampling
            .validate(usize::MAX)
            .context("invalid sampling parameters")?;
        args.speculation.lm.config()?;
        draft_kinds(&args.speculation.draft)?;
        Ok(Self {
            prompt: args.prompt,
            chat: args.chat,
            suffix: args.suffix,
            prediction: args
                .prediction_file
                .map(|path| {
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("--prediction-file {}", path.display()))
                })
                .transpose()?,
            model: args.model,
            device: args.device.device,
            generation: GenerationConfig {
                max_tokens: args.sampling.max_tokens,
                sampling,
                tree: args.speculation.tree.limits(),
                learning: args.speculation.tree.draft_sizing.learning(),
                stop_tokens: Vec::new(),
                prefix_cache: true,
                logprobs: None,
            },
            speculation: args.speculation,
        })
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut config = GenerateConfig::try_from(args)?;
    init_threads(config.model.threads);
    let loaded = load_model(&config.model, config.device)?;
    let prompt = if let Some(suffix) = &config.suffix {
        loaded
            .tokenizer
            .encode_infill_at_most(&config.prompt, suffix, usize::MAX)
            .context("--suffix")?
            .unwrap_or_default()
    } else if config.chat {
        let template = loaded
            .chat_template
            .as_ref()
            .context("--chat: this model file has no chat template")?;
        let text = template.render(&[ChatMessage::new("user", &config.prompt)])?;
        loaded.tokenizer.encode(&text)?
    } else {
        loaded.tokenizer.encode(&config.prompt)?
    };
    config.generation.stop_tokens = loaded.tokenizer.stop_tokens().to_vec();
    let speculation = &config.speculation;
    let kinds = draft_kinds(&speculation.draft)?;
    let sources = DrafterSources::open(speculation, &kinds, &loaded)?;
    let generation = &config.generation;
    sources.measure(generation.learning.as_ref(), generation.tree.max_depth);
    let mut drafters = sources.drafters(&kinds)?;
    if let (Some(text), false) = (&config.prediction, kinds.is_empty()) {
        let tokens = loaded.tokenizer.encode_text(text)?;
        drafters.push(Box::new(PredictionDrafter::new(tokens, prompt.len())));
    }
    let mut detokenizer = Detokenizer::new(&loaded.tokenizer);
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let report = sibyl_decode::generate(
        &loaded.model,
        &prompt,
        &config.generation,
        &mut drafters,
        |tokens| {
            for &token in tokens {
                let text = match detokenizer.push(token) {
                    Ok(text) => text,
                    Err(error) => {
                        write_error = Some(anyhow::Error::from(error));
                        return ControlFlow::Break(());
                    }
                };
                if let Some(text) = text {
                    if let Err(error) = stdout.write_all(text.as_bytes()) {
                        write_error = Some(error.into());
                        return ControlFlow::Break(());
                    }
                }
            }
            let _ = stdout.flush();
            ControlFlow::Continue(())
        },
    )?;
    if let Some(error) = write_error {
        return Err(error);
    }
    if let Some(rest) = detokenizer.finish()? {
        stdout.write_all(rest.as_bytes())?;
    }
    writeln!(stdout)?;
    drop(stdout);
    eprintln!("{}", summary(&report));
    Ok(())
}

/// The stderr summary of a generation.
pub fn summary(report: &GenerationReport) -> String {
    let mut text = format!(
        "generated {} tokens in {:.2} s ({:.2} tokens/s), prompt {} tokens in {:.2} s; \
         {} verify steps, {:.2} mean accepted tokens per step; finish: {:?}; seed {}",
        report.tokens.len(),
        report.decode_time.as_secs_f64(),
        report.tokens_per_second(),
        report.prompt_tokens,
        report.prompt_time.as_secs_f64(),
        report.steps,
        report.mean_accepted_tokens(),
        report.finish_reason,
        report.seed,
    );
    for drafter in &report.drafters {
        let rate = if drafter.proposed > 0 {
            drafter.accepted as f64 / drafter.proposed as f64
        } else {
            0.0
        };
        text.push_str(&format!(
            "\n{}: {} draft tokens proposed, {} accepted ({:.0}%); drafted at {} of {} steps \
             in {:.2} s",
            drafter.kind,
            drafter.proposed,
            drafter.accepted,
            rate * 100.0,
            drafter.asked,
            report.steps.saturating_sub(1),
            drafter.drafting_time.as_secs_f64(),
        ));
    }
    text
}
