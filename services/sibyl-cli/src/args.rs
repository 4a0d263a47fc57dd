use clap::{Args, ValueEnum};

/// Which model to run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A catalog name (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b, smollm2-135m) or the path of a
    /// GGUF file. Catalog models missing from the cache are fetched and checked first.
    #[arg(long, env = "SIBYL_MODEL", default_value = sibyl_models::DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads (default: `CANDLE_NUM_THREADS`, else all cores).
    #[arg(long, env = "SIBYL_THREADS")]
    pub threads: Option<usize>,

    /// Keep Q4_1/Q5_0/Q5_1 tensors as they are instead of converting them to Q8_0 at load
    /// (slower: those types have no SIMD kernels).
    #[arg(long, env = "SIBYL_KEEP_SLOW_TYPES")]
    pub keep_slow_types: bool,
}

/// The drafters of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DraftKind {
    /// Plain decoding, one token per step.
    None,
    /// Prompt lookup and the session's own history.
    Ngram,
}

/// How speculation runs in process (`sibyl generate`).
#[derive(Debug, Clone, Args)]
pub struct SpeculationArgs {
    /// Drafter to speculate with.
    #[arg(long, env = "SIBYL_DRAFT", value_enum, default_value_t = DraftKind::Ngram)]
    pub draft: DraftKind,

    #[command(flatten)]
    pub tree: TreeArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,
}

/// What the verifier checks per step.
#[derive(Debug, Clone, Args)]
pub struct TreeArgs {
    /// Most draft tokens verified per step (tree nodes).
    #[arg(long, env = "SIBYL_DRAFT_BUDGET", default_value_t = 16)]
    pub draft_budget: usize,

    /// Most draft tokens on one branch.
    #[arg(long, env = "SIBYL_DRAFT_DEPTH", default_value_t = 10)]
    pub draft_depth: usize,

    /// Leave out draft tokens whose estimated chance of acceptance is below this, in [0, 1]:
    /// every verified token costs time, accepted or not.
    #[arg(long, env = "SIBYL_DRAFT_MIN_VALUE", default_value_t = 0.15)]
    pub draft_min_value: f64,

    /// The most likely draft tokens verified whatever their estimated chance (at least 1):
    /// a few extra tokens cost little in a forward pass.
    #[arg(long, env = "SIBYL_DRAFT_EXEMPT", default_value_t = 1)]
    pub draft_exempt: usize,
}

impl TreeArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(0.0..=1.0).contains(&self.draft_min_value) {
            anyhow::bail!("--draft-min-value must be in [0, 1]");
        }
        Ok(())
    }
}

/// The n-gram drafter.
#[derive(Debug, Clone, Args)]
pub struct NgramArgs {
    /// Longest suffix the n-gram drafter looks up.
    #[arg(long, env = "SIBYL_NGRAM_MAX", default_value_t = 8)]
    pub ngram_max: usize,

    /// Most branches the n-gram drafter proposes per step.
    #[arg(long, env = "SIBYL_NGRAM_BRANCHES", default_value_t = 3)]
    pub ngram_branches: usize,
}

impl NgramArgs {
    pub fn config(&self) -> anyhow::Result<sibyl_ngram::NgramConfig> {
        if self.ngram_max == 0 {
            anyhow::bail!("--ngram-max must be at least 1");
        }
        Ok(sibyl_ngram::NgramConfig {
            max_ngram: self.ngram_max,
            max_branches: self.ngram_branches,
            ..sibyl_ngram::NgramConfig::default()
        })
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,

    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,

    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Seed of the sampling (default: random, printed in the summary).
    #[arg(long)]
    pub seed: Option<u64>,
}
