//! The flags the commands share (model, device, drafters, tree, sampling) and the clap
//! value parsers that check numeric ones.

use clap::builder::TypedValueParser;
use clap::{Args, ValueEnum};
use sibyl_spec::{Penalties, TreeLimits};
use std::fmt::Display;
use std::str::FromStr;

/// A count flag's value: a whole number, at least 1 (a clap value parser).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(error) => Err(error.to_string()),
    }
}

/// A fraction flag's value: a number in [0, 1] (a clap value parser).
pub fn fraction<T>(text: &str) -> Result<T, String>
where
    T: FromStr + PartialOrd + From<u8>,
    T::Err: Display,
{
    let value: T = text.trim().parse().map_err(|e: T::Err| e.to_string())?;
    if value >= T::from(0) && value <= T::from(1) {
        Ok(value)
    } else {
        Err("must be in [0, 1]".into())
    }
}

/// A factor flag's value: a finite number, at least 1 (a clap value parser).
pub fn factor(text: &str) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|e| format!("{e}"))?;
    if value.is_finite() && value >= 1.0 {
        Ok(value)
    } else {
        Err("must be a number of at least 1".into())
    }
}

/// Which model to run.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A catalog name (qwen2.5-coder-1.5b, qwen2.5-coder-0.5b, smollm2-135m) or the path of a
    /// GGUF file. Catalog models missing from the cache are fetched and checked first.
    #[arg(long, env = "SIBYL_MODEL", default_value = sibyl_models::DEFAULT_MODEL)]
    pub model: String,

    /// Compute threads (default: `CANDLE_NUM_THREADS`, else all cores).
    #[arg(long, env = "SIBYL_THREADS", value_parser = at_least_one)]
    pub threads: Option<usize>,

    /// Keep Q4_1/Q5_0/Q5_1 tensors as they are instead of converting them to Q8_0 at load
    /// (slower: those types have no SIMD kernels).
    #[arg(long, env = "SIBYL_KEEP_SLOW_TYPES")]
    pub keep_slow_types: bool,
}

/// Where the target model computes.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// `cpu`, `cuda` (GPU 0) or `cuda:N`. A GPU needs a sibyl built with the `cuda` feature
    /// (docs/gpu.md).
    #[arg(long, env = "SIBYL_DEVICE", default_value = "cpu")]
    pub device: sibyl_engine::Device,
}

impl ModelArgs {
    /// The model file's path, fetching a catalog model into the user's cache first (with a
    /// progress bar).
    pub fn locate(&self) -> anyhow::Result<std::path::PathBuf> {
        Ok(sibyl_models::locate_in_user_cache(
            &self.model,
            &crate::progress::BarProgress::default(),
        )?)
    }
}

/// The name a flag value has on the command line (`ngram`, `retrieval`, ...).
pub fn value_name(value: impl ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// What the retrieval drafter is refused with when it has no datastore.
pub const NEEDS_DATASTORE: &str = "the retrieval drafter needs --datastore FILE: build one \
     with `sibyl index --input PATH --model MODEL --output FILE`";

/// The kinds of drafter, for every command that names one; `none` (plain decoding) only
/// where a generation may run without drafters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DraftKind {
    /// Plain decoding, one token per step.
    None,
    /// Prompt lookup and the session's own history.
    Ngram,
    /// Lookup in datastores built by `sibyl index` (`--datastore`).
    Retrieval,
    /// A small model of the target's tokenizer (`--draft-model`).
    Lm,
    /// Matches in the generations seen to finish (prompts and outputs) and in the
    /// session's own context (`--suffix-max-tokens`).
    Suffix,
}

/// A clap value parser for a drafter that runs: any [`DraftKind`] but `none`.
pub fn drafter_kind() -> impl TypedValueParser<Value = DraftKind> {
    let kinds = DraftKind::value_variants()
        .iter()
        .filter(|kind| **kind != DraftKind::None)
        .filter_map(|kind| kind.to_possible_value());
    clap::builder::PossibleValuesParser::new(kinds)
        .map(|name| <DraftKind as ValueEnum>::from_str(&name, true).unwrap_or(DraftKind::None))
}

/// How speculation runs in process (`sibyl generate`).
#[derive(Debug, Clone, Args)]
pub struct SpeculationArgs {
    /// Drafters to speculate with, comma-separated (`ngram,retrieval`); `none` for plain
    /// decoding.
    #[arg(
        long,
        env = "SIBYL_DRAFT",
        value_enum,
        value_delimiter = ',',
        default_value = "ngram"
    )]
    pub draft: Vec<DraftKind>,

    #[command(flatten)]
    pub tree: TreeArgs,

    #[command(flatten)]
    pub ngram: NgramArgs,

    #[command(flatten)]
    pub retrieval: RetrievalArgs,

    #[command(flatten)]
    pub lm: LmArgs,
}

/// The LM drafter.
#[derive(Debug, Clone, Args)]
pub struct LmArgs {
    /// The LM drafter's model: a catalog name or a GGUF path, with the target's tokenizer.
    #[arg(long, env = "SIBYL_DRAFT_MODEL", default_value = "qwen2.5-coder-0.5b")]
    pub draft_model: String,

    /// Longest block the LM drafter drafts (it adapts below this to recent acceptance).
    #[arg(long, env = "SIBYL_LM_MAX_TOKENS", default_value_t = 8, value_parser = at_least_one)]
    pub lm_max_tokens: usize,

    /// The LM drafter ends a block before a token it gives less than this probability.
    #[arg(long, env = "SIBYL_LM_MIN_CONFIDENCE", default_value_t = 0.3, value_parser = fraction::<f32>)]
    pub lm_min_confidence: f32,

    /// 0: the LM drafter drafts its most likely tokens. Above 0: it samples at this
    /// temperature from its `--lm-top-k` most likely tokens and sends that distribution, so
    /// that sampled requests accept its drafts by exact rejection sampling.
    #[arg(long, env = "SIBYL_LM_TEMPERATURE", default_value_t = 0.0)]
    pub lm_temperature: f32,

    /// Tokens in each distribution a sampling LM drafter sends.
    #[arg(long, env = "SIBYL_LM_TOP_K", default_value_t = 8, value_parser = at_least_one)]
    pub lm_top_k: usize,
}

impl Default for LmArgs {
    fn default() -> Self {
        Self {
            draft_model: "qwen2.5-coder-0.5b".into(),
            lm_max_tokens: 8,
            lm_min_confidence: 0.3,
            lm_temperature: 0.0,
            lm_top_k: 8,
        }
    }
}

impl LmArgs {
    pub fn config(&self) -> anyhow::Result<sibyl_lm::LmConfig> {
        if !(self.lm_temperature.is_finite() && self.lm_temperature >= 0.0) {
            anyhow::bail!("--lm-temperature must be a number at least 0");
        }
        Ok(sibyl_lm::LmConfig {
            max_tokens: self.lm_max_tokens,
            min_confidence: self.lm_min_confidence,
            temperature: self.lm_temperature,
            top_k: self.lm_top_k,
            ..sibyl_lm::LmConfig::default()
        })
    }

    /// Loads the draft model and checks that its tokenizer is `target`'s.
    pub fn load(
        &self,
        target: &sibyl_engine::TextTokenizer,
    ) -> anyhow::Result<std::sync::Arc<sibyl_engine::Model>> {
        let model = ModelArgs {
            model: self.draft_model.clone(),
            threads: None,
            keep_slow_types: false,
        };
        // A draft model is small: the CPU serves it beside any target device.
        let draft = crate::model::load_model(&model, sibyl_engine::Device::Cpu)?;
        if draft.tokenizer.fingerprint() != target.fingerprint() {
            anyhow::bail!(
                "--draft-model {}: its tokenizer ({:016x}) is not the target's ({:016x}); the LM \
                 drafter needs a model of the same family (qwen2.5-coder-0.5b drafts for \
                 qwen2.5-coder-1.5b)",
                self.draft_model,
                draft.tokenizer.fingerprint(),
                target.fingerprint()
            );
        }
        Ok(std::sync::Arc::new(draft.model))
    }
}

/// The retrieval drafter.
#[derive(Debug, Clone, Args)]
pub struct RetrievalArgs {
    /// A datastore built by `sibyl index` for this model's tokenizer (repeatable; a comma
    /// separates several in the environment variable).
    #[arg(long = "datastore", env = "SIBYL_DATASTORES", value_delimiter = ',')]
    pub datastores: Vec<std::path::PathBuf>,

    /// Most tokens the suffix drafter's index of finished generations holds; the oldest
    /// generations are dropped past it (about 24 bytes a token).
    #[arg(long, env = "SIBYL_SUFFIX_MAX_TOKENS", default_value_t = 4 << 20,
          value_parser = clap::value_parser!(u64).range(16..))]
    pub suffix_max_tokens: u64,
}

impl RetrievalArgs {
    /// The suffix drafter's settings.
    pub fn suffix(&self) -> sibyl_retrieval::SuffixConfig {
        sibyl_retrieval::SuffixConfig {
            max_tokens: usize::try_from(self.suffix_max_tokens).unwrap_or(usize::MAX),
            ..sibyl_retrieval::SuffixConfig::default()
        }
    }

    /// Maps and checks every datastore; one built for another tokenizer is refused.
    pub fn open(
        &self,
        tokenizer: sibyl_retrieval::TokenizerId,
    ) -> anyhow::Result<Vec<std::sync::Arc<sibyl_retrieval::Datastore>>> {
        self.datastores
            .iter()
            .map(|path| {
                Ok(std::sync::Arc::new(sibyl_retrieval::Datastore::open(
                    path,
                    Some(tokenizer),
                )?))
            })
            .collect()
    }
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
    #[arg(long, env = "SIBYL_DRAFT_MIN_VALUE", default_value_t = 0.15, value_parser = fraction::<f64>)]
    pub draft_min_value: f64,

    /// The most likely draft tokens verified whatever their estimated chance (at least 1):
    /// a few extra tokens cost little in a forward pass.
    #[arg(long, env = "SIBYL_DRAFT_EXEMPT", default_value_t = 1)]
    pub draft_exempt: usize,

    /// How many of the tree's nodes a step verifies.
    #[arg(long, env = "SIBYL_DRAFT_SIZING", value_enum, default_value_t = DraftSizing::Adaptive)]
    pub draft_sizing: DraftSizing,
}

/// How many draft nodes a step verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DraftSizing {
    /// As many as are expected to give the most tokens per second, by step costs measured
    /// while running; none (a plain step) when no draft is expected to pay for itself.
    Adaptive,
    /// Every node the drafts fill, up to the budget.
    Fixed,
}

impl DraftSizing {
    /// Step costs for a new model: learned from its steps when adaptive.
    pub fn learning(self) -> Option<sibyl_decode::SharedLearning> {
        (self == Self::Adaptive).then(Default::default)
    }
}

impl TreeArgs {
    /// The tree these flags allow.
    pub fn limits(&self) -> TreeLimits {
        TreeLimits {
            budget: self.draft_budget,
            max_depth: self.draft_depth,
            min_value: self.draft_min_value,
            exempt_nodes: self.draft_exempt,
        }
    }
}

/// The n-gram drafter.
#[derive(Debug, Clone, Args)]
pub struct NgramArgs {
    /// Longest suffix the n-gram drafter looks up.
    #[arg(long, env = "SIBYL_NGRAM_MAX", default_value_t = 8, value_parser = at_least_one)]
    pub ngram_max: usize,

    /// Most branches the n-gram drafter proposes per step.
    #[arg(long, env = "SIBYL_NGRAM_BRANCHES", default_value_t = 3)]
    pub ngram_branches: usize,
}

impl NgramArgs {
    pub fn config(&self) -> sibyl_ngram::NgramConfig {
        sibyl_ngram::NgramConfig {
            max_ngram: self.ngram_max,
            max_branches: self.ngram_branches,
            ..sibyl_ngram::NgramConfig::default()
        }
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, value_parser = at_least_one)]
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

    /// Keep only the tokens at least this many times as likely as the most likely one
    /// (after temperature), in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,

    /// Seed of the sampling (default: random, printed in the summary).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Subtracted from the logit of every token already generated, -2 to 2 (OpenAI's
    /// `presence_penalty`).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,

    /// Subtracted from a token's logit once per time it was generated, -2 to 2 (OpenAI's
    /// `frequency_penalty`).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,

    /// Divides the positive logits and multiplies the negative ones of tokens in the
    /// prompt or the output (llama.cpp's `--repeat-penalty`, vLLM's
    /// `repetition_penalty`); 1 is off.
    #[arg(long, alias = "repeat-penalty", default_value_t = 1.0)]
    pub repetition_penalty: f32,
}

impl SamplingArgs {
    /// The penalties these flags ask for (checked with the rest of the sampling).
    pub fn penalties(&self) -> Penalties {
        Penalties {
            presence: self.presence_penalty,
            frequency: self.frequency_penalty,
            repetition: self.repetition_penalty,
            logit_bias: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Role {
        #[arg(long, value_parser = drafter_kind())]
        kind: DraftKind,
    }

    #[test]
    fn factors_are_finite_and_at_least_one() {
        assert_eq!(factor("1"), Ok(1.0));
        assert_eq!(factor(" 2.5 "), Ok(2.5));
        for text in ["0.99", "inf", "NaN", "-3", "x"] {
            assert!(factor(text).is_err(), "{text}");
        }
    }

    #[test]
    fn a_drafter_that_runs_is_any_kind_but_none() {
        for (name, kind) in [("ngram", DraftKind::Ngram), ("suffix", DraftKind::Suffix)] {
            let role = Role::try_parse_from(["role", "--kind", name]).unwrap();
            assert_eq!(role.kind, kind);
        }
        let error = Role::try_parse_from(["role", "--kind", "none"]).unwrap_err();
        assert!(error
            .to_string()
            .contains("possible values: ngram, retrieval, lm, suffix"));
    }
}
