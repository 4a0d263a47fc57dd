use crate::args::{
    DeviceArgs, DraftKind, LmArgs, ModelArgs, NgramArgs, RetrievalArgs, SamplingArgs,
    SpeculationArgs, NEEDS_DATASTORE,
};
use anyhow::{bail, Context};
use clap::Args;
use sibyl_decode::{GenerationConfig, GenerationReport, SharedLearning};
use sibyl_engine::{ChatMessage, Detokenizer, LoadOptions};
use sibyl_engine::{LoadedModel, Model, TextTokenizer};
use sibyl_lm::{LmConfig, LmDrafter};
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_retrieval::{
    Datastore, RetrievalConfig, RetrievalDrafter, SuffixDrafter, SuffixIndex, TokenizerId,
};
use sibyl_spec::{Drafter, SamplingConfig};
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,

    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,

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
            seed,
        };
        sampling.validate().context("invalid sampling parameters")?;
        args.speculation.lm.config()?;
        draft_kinds(&args.speculation.draft)?;
        Ok(Self {
            prompt: args.prompt,
            chat: args.chat,
            model: args.model,
            device: args.device.device,
            generation: GenerationConfig {
                max_tokens: args.sampling.max_tokens,
                sampling,
                tree: args.speculation.tree.limits(),
                learning: args.speculation.tree.draft_sizing.learning(),
                stop_tokens: Vec::new(),
                prefix_cache: true,
            },
            speculation: args.speculation,
        })
    }
}

/// The drafter kinds of `--draft`, each once; `none` alone means none.
pub fn draft_kinds(draft: &[DraftKind]) -> anyhow::Result<Vec<DraftKind>> {
    if draft.contains(&DraftKind::None) {
        if draft.len() > 1 {
            bail!("--draft none cannot be combined with drafters");
        }
        return Ok(Vec::new());
    }
    let mut kinds = Vec::new();
    for &kind in draft {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// What a datastore records of the tokenizer it was built with (and must match to draft):
/// the tokenizer's fingerprint and the model's vocabulary size.
pub fn tokenizer_id(tokenizer: &TextTokenizer, vocab_size: usize) -> TokenizerId {
    TokenizerId {
        fingerprint: tokenizer.fingerprint(),
        vocab_size: u32::try_from(vocab_size).unwrap_or(u32::MAX),
    }
}

/// The settings of every drafter kind.
pub struct DrafterSettings<'a> {
    pub ngram: &'a NgramArgs,
    pub retrieval: &'a RetrievalArgs,
    pub lm: &'a LmArgs,
}

impl<'a> From<&'a SpeculationArgs> for DrafterSettings<'a> {
    fn from(speculation: &'a SpeculationArgs) -> Self {
        Self {
            ngram: &speculation.ngram,
            retrieval: &speculation.retrieval,
            lm: &speculation.lm,
        }
    }
}

/// What in-process drafters are made from, opened once per process: the n-gram settings,
/// the retrieval datastores, the LM drafter's model and the suffix drafter's index of the
/// generations finished so far.
#[derive(Clone)]
pub struct DrafterSources {
    pub ngram: NgramConfig,
    pub datastores: Vec<Arc<Datastore>>,
    pub lm: Option<(Arc<Model>, LmConfig)>,
    pub suffix: Arc<SuffixIndex>,
}

impl std::fmt::Debug for DrafterSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrafterSources")
            .field("ngram", &self.ngram)
            .field("datastores", &self.datastores)
            .field("lm", &self.lm.as_ref().map(|(_, config)| config))
            .field("suffix", &self.suffix.config())
            .finish()
    }
}

impl DrafterSources {
    /// Checks the settings and opens what `kinds` need: the datastores (refusing ones built
    /// for another tokenizer than `loaded`'s), the LM drafter's model (refusing one of
    /// another tokenizer).
    pub fn open<'a>(
        args: impl Into<DrafterSettings<'a>>,
        kinds: &[DraftKind],
        loaded: &LoadedModel,
    ) -> anyhow::Result<Self> {
        let args = args.into();
        let datastores = if kinds.contains(&DraftKind::Retrieval) {
            let vocab = loaded.model.vocab_size();
            args.retrieval
                .open(tokenizer_id(&loaded.tokenizer, vocab))?
        } else {
            Vec::new()
        };
        let lm = if kinds.contains(&DraftKind::Lm) {
            Some((args.lm.load(&loaded.tokenizer)?, args.lm.config()?))
        } else {
            None
        };
        Ok(Self {
            ngram: args.ngram.config(),
            datastores,
            lm,
            suffix: Arc::new(SuffixIndex::new(args.retrieval.suffix())),
        })
    }

    /// One drafter of each of `kinds`.
    pub fn drafters(&self, kinds: &[DraftKind]) -> anyhow::Result<Vec<Box<dyn Drafter>>> {
        kinds.iter().map(|&kind| self.drafter(kind)).collect()
    }

    /// A new drafter of `kind` (each generation has its own).
    pub fn drafter(&self, kind: DraftKind) -> anyhow::Result<Box<dyn Drafter>> {
        Ok(match kind {
            DraftKind::None => bail!("`none` is not a drafter"),
            DraftKind::Ngram => Box::new(NgramDrafter::new(self.ngram.clone())),
            DraftKind::Retrieval => {
                if self.datastores.is_empty() {
                    bail!(NEEDS_DATASTORE);
                }
                Box::new(RetrievalDrafter::new(
                    self.datastores.clone(),
                    RetrievalConfig::default(),
                ))
            }
            DraftKind::Lm => {
                let Some((model, config)) = &self.lm else {
                    bail!("the LM drafter's model is not loaded");
                };
                Box::new(LmDrafter::new(model.clone(), config.clone()))
            }
            DraftKind::Suffix => Box::new(SuffixDrafter::new(self.suffix.clone())),
        })
    }

    /// Times the LM drafter, when its model is loaded and tree sizes are chosen from
    /// measured costs (`learning`), before any generation asks it for up to `depth` tokens
    /// ([`sibyl_decode::measure_drafter`]): its first call is then weighed like the rest.
    pub fn measure(&self, learning: Option<&SharedLearning>, depth: usize) {
        let Some(learning) = learning else { return };
        if let Ok(mut drafter) = self.drafter(DraftKind::Lm) {
            let started = std::time::Instant::now();
            sibyl_decode::measure_drafter(learning, drafter.as_mut(), depth);
            let ms = started.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(ms, "timed the LM drafter");
        }
    }

    /// A new, empty index for suffix drafters, with this process's settings.
    pub fn new_suffix_index(&self) -> Arc<SuffixIndex> {
        Arc::new(SuffixIndex::new(self.suffix.config().clone()))
    }

    /// The kinds these sources can make: retrieval only with a datastore, the LM drafter
    /// only with its model loaded.
    pub fn available(&self) -> Vec<DraftKind> {
        let mut kinds = vec![DraftKind::Ngram, DraftKind::Suffix];
        if !self.datastores.is_empty() {
            kinds.push(DraftKind::Retrieval);
        }
        if self.lm.is_some() {
            kinds.push(DraftKind::Lm);
        }
        kinds
    }
}

/// Sets the compute thread count for the whole process. Must run before any model work:
/// candle sizes its thread pool from `CANDLE_NUM_THREADS` when the pool first starts.
pub fn init_threads(threads: Option<usize>) {
    if let Some(threads) = threads {
        // SAFETY: called at the start of `run`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", threads.to_string()) };
    }
}

/// Finds (fetching if needed) and loads the model of `args`.
pub fn load_model(
    args: &ModelArgs,
    device: sibyl_engine::Device,
) -> anyhow::Result<sibyl_engine::LoadedModel> {
    let path = args.locate()?;
    let options = LoadOptions {
        requantize_slow_types: !args.keep_slow_types,
        device,
    };
    Ok(sibyl_engine::load(&path, &options)?)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut config = GenerateConfig::try_from(args)?;
    init_threads(config.model.threads);
    let loaded = load_model(&config.model, config.device)?;
    let prompt_text = if config.chat {
        let template = loaded
            .chat_template
            .as_ref()
            .context("--chat: this model file has no chat template")?;
        template.render(&[ChatMessage::new("user", &config.prompt)])?
    } else {
        config.prompt.clone()
    };
    let prompt = loaded.tokenizer.encode(&prompt_text)?;
    config.generation.stop_tokens = loaded.tokenizer.stop_tokens().to_vec();
    let speculation = &config.speculation;
    let kinds = draft_kinds(&speculation.draft)?;
    let sources = DrafterSources::open(speculation, &kinds, &loaded)?;
    let generation = &config.generation;
    sources.measure(generation.learning.as_ref(), generation.tree.max_depth);
    let mut drafters = sources.drafters(&kinds)?;
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
