//! In-process drafters: which kinds a command runs and what they are made from.

use crate::args::{DraftKind, LmArgs, NgramArgs, RetrievalArgs, SpeculationArgs, NEEDS_DATASTORE};
use anyhow::bail;
use sibyl_decode::SharedLearning;
use sibyl_engine::{LoadedModel, Model, TextTokenizer};
use sibyl_lm::{LmConfig, LmDrafter};
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_retrieval::{
    Datastore, RetrievalConfig, RetrievalDrafter, SuffixDrafter, SuffixIndex, TokenizerId,
};
use sibyl_spec::Drafter;
use std::sync::Arc;

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
