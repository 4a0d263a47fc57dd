//! Where the benchmark's generations run: in this process on a loaded model, or through a
//! running gateway (the distributed path).

use super::concurrency::{self, ConcurrentRun, Traces};
use anyhow::{bail, Context};
use clap::ValueEnum;
use sibyl_decode::{DrafterReport, FinishReason, GenerationConfig, GenerationReport, PrefixCache};
use sibyl_engine::{Detokenizer, LoadedModel};
use sibyl_gateway::PromptInput;
use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_retrieval::{SuffixDrafter, SuffixIndex};
use sibyl_setup::args::{value_name, DraftKind};
use sibyl_setup::DrafterSources;
use sibyl_spec::{Drafter, TreeLimits};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The unmeasured generation before the first prompt.
const WARM_UP_PROMPT: &str = "def hello():\n";
const WARM_UP_TOKENS: usize = 8;

/// The drafters of a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drafters {
    /// Plain decoding.
    Off,
    /// Every drafter kind there is (in process) or the verifier has (through a gateway).
    All,
    /// These kinds.
    Kinds(Vec<String>),
}

/// A named set of drafters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchConfig {
    pub name: String,
    pub drafters: Drafters,
}

impl BenchConfig {
    pub fn plain() -> Self {
        Self {
            name: "plain".into(),
            drafters: Drafters::Off,
        }
    }

    pub fn is_plain(&self) -> bool {
        self.drafters == Drafters::Off
    }

    /// Whether this config drafts with `kind` (`all` uses every kind).
    pub fn uses(&self, kind: &str) -> bool {
        match &self.drafters {
            Drafters::Off => false,
            Drafters::All => true,
            Drafters::Kinds(kinds) => kinds.iter().any(|k| k == kind),
        }
    }

    /// `plain`, `all`, a drafter kind (`ngram`), or kinds joined by `+`. With `local`, kinds
    /// must be ones this binary can run; otherwise the verifier behind the gateway judges.
    pub fn parse(name: &str, local: bool) -> anyhow::Result<Self> {
        let drafters = match name {
            "plain" => Drafters::Off,
            "all" => Drafters::All,
            _ => {
                let mut kinds: Vec<String> = Vec::new();
                for part in name.split('+') {
                    if local && local_kind(part).is_none() {
                        let names: Vec<_> = local_kinds().into_iter().map(value_name).collect();
                        bail!(
                            "unknown config `{name}`: use plain, all, or drafter kinds joined by \
                             + ({})",
                            names.join(", ")
                        );
                    }
                    if part.is_empty() || kinds.iter().any(|k| k == part) {
                        bail!("config `{name}`: each drafter kind once, joined by +");
                    }
                    kinds.push(part.to_string());
                }
                Drafters::Kinds(kinds)
            }
        };
        Ok(Self {
            name: name.to_string(),
            drafters,
        })
    }
}

/// The drafter kinds this binary runs in process.
fn local_kinds() -> Vec<DraftKind> {
    DraftKind::value_variants()
        .iter()
        .copied()
        .filter(|k| *k != DraftKind::None)
        .collect()
}

fn local_kind(name: &str) -> Option<DraftKind> {
    local_kinds().into_iter().find(|k| value_name(*k) == name)
}

/// One generation's output and figures. `None` from [`Backend::generate`] means it was
/// interrupted.
pub type Generated = Option<(GenerationReport, String)>;

pub trait Backend {
    /// The name of the model that generates.
    fn model(&self) -> &str;

    /// One short plain generation, not measured: first-touch costs (pages of the model
    /// file, thread pools, connections) stay out of the first prompt's figures.
    fn warm_up(&mut self) -> anyhow::Result<()>;

    /// Checks, before any measurement, that `prompt` (an item's first turn) can run.
    fn check(&self, _prompt: &PromptInput) -> anyhow::Result<()> {
        Ok(())
    }

    /// Generates from `prompt` with the drafters of `config`; stops early, returning `None`,
    /// once `interrupted` is set.
    fn generate(
        &mut self,
        prompt: &PromptInput,
        config: &BenchConfig,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<Generated>;

    /// Runs every turn of `run.items` under `run.config`, `run.concurrency` requests in
    /// flight at a time, and records what each request's client saw; `None` once
    /// `run.interrupted` is set.
    fn generate_concurrently(&mut self, run: &ConcurrentRun<'_>) -> anyhow::Result<Option<Traces>>;

    /// Whether the requests from now on reuse the prompt work of the ones before (the prefix
    /// cache: in process, one that starts empty now; through a gateway, the verifier's).
    fn set_prefix_cache(&mut self, on: bool);

    /// Starts the drafter state kept across prompts (`--keep-drafter-state`) empty again, so
    /// that a pass over the prompts does not draft from the same prompts' earlier pass.
    /// Nothing to do where no state is kept (through a gateway: the drafters' own).
    fn forget_drafter_state(&mut self) {}
}

/// Generations in this process: `sibyl generate`'s code path, model loaded once.
pub struct InProcess {
    pub name: String,
    pub loaded: LoadedModel,
    /// Everything but the drafters; `plain` runs it with a zero draft budget.
    pub generation: GenerationConfig,
    pub sources: DrafterSources,
    /// The prefix cache the generations share, while it is on.
    pub prefixes: Option<PrefixCache>,
    /// With `--keep-drafter-state`, each config's suffix index, kept from one generation to
    /// the next; without, every generation's suffix drafter starts empty.
    pub suffix_indexes: Option<Mutex<HashMap<String, Arc<SuffixIndex>>>>,
}

/// Bytes the in-process prefix cache keeps: the verifier's default.
const PREFIX_CACHE_BYTES: usize = 1 << 30;

impl InProcess {
    /// The prompt's tokens: chats rendered with the model's template, as the gateway does.
    pub(super) fn tokenize(&self, prompt: &PromptInput) -> anyhow::Result<Vec<u32>> {
        let tokenizer = &self.loaded.tokenizer;
        Ok(match prompt {
            PromptInput::Text(text) => tokenizer.encode(text)?,
            PromptInput::Tokens(ids) => ids.clone(),
            PromptInput::Infill { prefix, suffix } => tokenizer
                .encode_infill_at_most(prefix, suffix, usize::MAX)?
                .unwrap_or_default(),
            PromptInput::Chat { messages, .. } => self
                .loaded
                .chat_template
                .as_ref()
                .context("this model file has no chat template, so it cannot run chat items")?
                .encode(tokenizer, messages)?,
        })
    }

    /// The settings and fresh drafters of one generation under `config` (every generation
    /// shares the backend's `learning`).
    pub(super) fn prepare(
        &self,
        config: &BenchConfig,
    ) -> anyhow::Result<(GenerationConfig, Vec<Box<dyn Drafter>>)> {
        let kinds = match &config.drafters {
            Drafters::Off => Vec::new(),
            Drafters::All => self.sources.available(),
            Drafters::Kinds(kinds) => kinds
                .iter()
                .map(|k| local_kind(k).with_context(|| format!("unknown drafter kind `{k}`")))
                .collect::<anyhow::Result<_>>()?,
        };
        let drafters = kinds
            .into_iter()
            .map(|kind| match kind {
                DraftKind::Suffix => {
                    Ok(Box::new(SuffixDrafter::new(self.suffix_index(config))) as Box<dyn Drafter>)
                }
                kind => self.sources.drafter(kind),
            })
            .collect::<anyhow::Result<Vec<Box<dyn Drafter>>>>()?;
        let mut generation = self.generation.clone();
        if config.is_plain() {
            generation.tree.budget = 0;
        }
        Ok((generation, drafters))
    }

    /// The suffix index a generation under `config` drafts from and adds to: the config's
    /// own with `--keep-drafter-state` (no config learns from another's runs of the same
    /// prompt), a new one without.
    pub(super) fn suffix_index(&self, config: &BenchConfig) -> Arc<SuffixIndex> {
        let Some(indexes) = &self.suffix_indexes else {
            return self.sources.new_suffix_index();
        };
        let mut indexes = indexes.lock().unwrap_or_else(|e| e.into_inner());
        indexes
            .entry(config.name.clone())
            .or_insert_with(|| self.sources.new_suffix_index())
            .clone()
    }

    /// The text of generated tokens, as a client streaming them would put it together.
    pub(super) fn answer(&self, tokens: &[u32]) -> anyhow::Result<String> {
        let mut detokenizer = Detokenizer::new(&self.loaded.tokenizer);
        let mut answer = String::new();
        for &token in tokens {
            answer.push_str(&detokenizer.push(token)?.unwrap_or_default());
        }
        answer.push_str(&detokenizer.finish()?.unwrap_or_default());
        Ok(answer)
    }
}

impl Backend for InProcess {
    fn model(&self) -> &str {
        &self.name
    }

    fn warm_up(&mut self) -> anyhow::Result<()> {
        let config = GenerationConfig {
            max_tokens: WARM_UP_TOKENS,
            tree: TreeLimits::NONE,
            ..self.generation.clone()
        };
        let prompt = self.loaded.tokenizer.encode(WARM_UP_PROMPT)?;
        sibyl_decode::generate(&self.loaded.model, &prompt, &config, &mut [], |_| {
            ControlFlow::Continue(())
        })?;
        Ok(())
    }

    fn check(&self, prompt: &PromptInput) -> anyhow::Result<()> {
        let tokens = self.tokenize(prompt)?;
        sibyl_decode::check_request(&self.loaded.model, &tokens, &self.generation)?;
        Ok(())
    }

    fn generate(
        &mut self,
        prompt: &PromptInput,
        config: &BenchConfig,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<Generated> {
        let tokens = self.tokenize(prompt)?;
        let (generation, mut drafters) = self.prepare(config)?;
        let report = sibyl_decode::generate_cancellable(
            &self.loaded.model,
            &tokens,
            &generation,
            &mut drafters,
            &mut || interrupted.load(Ordering::Relaxed),
            |_| ControlFlow::Continue(()),
            self.prefixes.as_mut(),
        )?;
        if report.finish_reason == FinishReason::Cancelled {
            return Ok(None);
        }
        let answer = self.answer(&report.tokens)?;
        Ok(Some((report, answer)))
    }

    fn generate_concurrently(&mut self, run: &ConcurrentRun<'_>) -> anyhow::Result<Option<Traces>> {
        concurrency::run_in_process(self, run)
    }

    fn set_prefix_cache(&mut self, on: bool) {
        self.generation.prefix_cache = on;
        self.prefixes = on.then(|| PrefixCache::new(PREFIX_CACHE_BYTES));
    }

    fn forget_drafter_state(&mut self) {
        if let Some(indexes) = &self.suffix_indexes {
            indexes.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

/// Generations through a gateway's gRPC API; figures come from the verifier's summary.
pub struct Remote {
    pub(super) runtime: tokio::runtime::Runtime,
    pub(super) client: GatewayClient<Channel>,
    model: String,
    max_tokens: u32,
    sampling: pb::SamplingParams,
    prefix_cache: bool,
}

impl Remote {
    /// Connects to the gateway at `url` and asks which model it serves.
    pub fn connect(
        url: &str,
        max_tokens: usize,
        sampling: pb::SamplingParams,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .with_context(|| format!("--gateway {url}: not a URL (http://HOST:PORT)"))?
            .connect_timeout(Duration::from_secs(10));
        let (client, model) = runtime.block_on(async {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("cannot reach the gateway at {url}"))?;
            let mut client = GatewayClient::new(channel);
            let models = tokio::time::timeout(
                Duration::from_secs(30),
                client.list_models(pb::ListModelsRequest {}),
            )
            .await
            .map_err(|_| anyhow::anyhow!("the gateway at {url} did not answer within 30 s"))?
            .with_context(|| {
                format!(
                    "the gateway at {url} did not list its models (bench takes the gateway's \
                     gRPC address, its --grpc-addr, not its HTTP one)"
                )
            })?
            .into_inner();
            let model = models
                .models
                .first()
                .map(|m| m.id.clone())
                .with_context(|| format!("the gateway at {url} serves no model"))?;
            anyhow::Ok((client, model))
        })?;
        Ok(Self {
            runtime,
            client,
            model,
            max_tokens: u32::try_from(max_tokens).context("--max-tokens is too large")?,
            sampling,
            prefix_cache: false,
        })
    }
}

impl Backend for Remote {
    fn model(&self) -> &str {
        &self.model
    }

    fn warm_up(&mut self) -> anyhow::Result<()> {
        let request = pb::GenerateRequest {
            model: self.model.clone(),
            input: Some(pb::generate_request::Input::Prompt(WARM_UP_PROMPT.into())),
            max_tokens: WARM_UP_TOKENS as u32,
            sampling: Some(self.sampling.clone()),
            ..pb::GenerateRequest::default()
        };
        self.stream(request, &AtomicBool::new(false))?;
        Ok(())
    }

    fn generate(
        &mut self,
        prompt: &PromptInput,
        config: &BenchConfig,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<Generated> {
        let request = self.request(prompt, config);
        let Some(streamed) = self.stream(request, interrupted)? else {
            return Ok(None);
        };
        if !config.is_plain() {
            check_drafters(&streamed.summary)?;
        }
        Ok(Some((report(streamed.summary)?, streamed.text)))
    }

    fn generate_concurrently(&mut self, run: &ConcurrentRun<'_>) -> anyhow::Result<Option<Traces>> {
        concurrency::run_through_gateway(self, run)
    }

    fn set_prefix_cache(&mut self, on: bool) {
        self.prefix_cache = on;
    }
}

impl Remote {
    /// The request for `prompt` under `config`, with the token ids in its summary.
    pub(super) fn request(
        &self,
        prompt: &PromptInput,
        config: &BenchConfig,
    ) -> pb::GenerateRequest {
        let input = match prompt {
            PromptInput::Text(text) => pb::generate_request::Input::Prompt(text.clone()),
            PromptInput::Tokens(ids) => {
                pb::generate_request::Input::Tokens(pb::PromptTokens { ids: ids.clone() })
            }
            PromptInput::Infill { prefix, suffix } => {
                pb::generate_request::Input::Infill(pb::Infill {
                    prefix: prefix.clone(),
                    suffix: suffix.clone(),
                })
            }
            PromptInput::Chat { messages, .. } => {
                pb::generate_request::Input::Chat(pb::ChatConversation {
                    messages: messages
                        .iter()
                        .map(|m| pb::ChatMessage {
                            role: m.role.clone(),
                            content: m.content.clone(),
                        })
                        .collect(),
                    ..Default::default()
                })
            }
        };
        let (mode, drafters) = match &config.drafters {
            Drafters::Off => (pb::SpeculationMode::Off, Vec::new()),
            Drafters::All => (pb::SpeculationMode::On, Vec::new()),
            Drafters::Kinds(kinds) => (pb::SpeculationMode::On, kinds.clone()),
        };
        let speculation = pb::Speculation {
            mode: mode as i32,
            drafters,
        };
        pb::GenerateRequest {
            model: self.model.clone(),
            input: Some(input),
            max_tokens: self.max_tokens,
            sampling: Some(self.sampling.clone()),
            speculation: Some(speculation),
            stop: Vec::new(),
            details: true,
            prefix_cache: Some(self.prefix_cache),
            logprobs: None,
            ..Default::default()
        }
    }

    /// Streams `request` to its end; `None` once `interrupted` is set (dropping the stream
    /// cancels the generation).
    fn stream(
        &mut self,
        request: pb::GenerateRequest,
        interrupted: &AtomicBool,
    ) -> anyhow::Result<Option<Streamed>> {
        let streamed = stream(self.client.clone(), request);
        self.runtime.block_on(async move {
            tokio::pin!(streamed);
            let mut poll = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    streamed = &mut streamed => return streamed.map(Some),
                    _ = poll.tick() => {
                        if interrupted.load(Ordering::Relaxed) {
                            return Ok(None);
                        }
                    }
                }
            }
        })
    }
}

/// One streamed generation as its client saw it.
pub(super) struct Streamed {
    pub text: String,
    pub summary: pb::GenerateSummary,
    /// Each text delta: when it came, and the tokens it said it carried.
    pub deliveries: Vec<(Instant, usize)>,
}

/// Sends `request` through `client` and collects the stream to its summary.
pub(super) async fn stream(
    mut client: GatewayClient<Channel>,
    request: pb::GenerateRequest,
) -> anyhow::Result<Streamed> {
    let gateway = |s: tonic::Status| anyhow::anyhow!("gateway: {}", s.message());
    let mut stream = client
        .generate(request)
        .await
        .map_err(gateway)?
        .into_inner();
    let mut text = String::new();
    let mut deliveries = Vec::new();
    loop {
        match stream
            .message()
            .await
            .map_err(gateway)?
            .and_then(|m| m.event)
        {
            Some(pb::generate_response::Event::Delta(delta)) => {
                deliveries.push((Instant::now(), delta.tokens as usize));
                text.push_str(&delta.text);
            }
            Some(pb::generate_response::Event::Summary(summary)) => {
                return Ok(Streamed {
                    text,
                    summary,
                    deliveries,
                })
            }
            None => bail!("the gateway ended the stream without a summary"),
        }
    }
}

/// A speculative generation whose drafters failed or were refused measured plain decoding
/// under another name: an error, not a figure. (A stream still opening when a short
/// generation ended is not a fault.)
pub(super) fn check_drafters(summary: &pb::GenerateSummary) -> anyhow::Result<()> {
    let usable = [pb::DrafterState::Connected, pb::DrafterState::Connecting].map(|s| s as i32);
    if summary.drafters.iter().any(|d| usable.contains(&d.state)) {
        return Ok(());
    }
    let states: Vec<String> = summary
        .drafters
        .iter()
        .map(|d| {
            let state = pb::DrafterState::try_from(d.state).unwrap_or_default();
            format!("{} at {}: {state:?} {}", d.kind, d.endpoint, d.error)
        })
        .collect();
    bail!(
        "no drafter of this config could draft for the verifier ({})",
        if states.is_empty() {
            "it has none".to_string()
        } else {
            states.join("; ")
        }
    )
}

/// The verifier's figures as the gateway relays them, in the in-process report's terms.
pub(super) fn report(summary: pb::GenerateSummary) -> anyhow::Result<GenerationReport> {
    let finish_reason = match summary.finish_reason() {
        pb::FinishReason::Stop => FinishReason::Stop,
        pb::FinishReason::Length => FinishReason::Length,
        other => bail!("the generation ended with {other:?}"),
    };
    let usage = summary.usage.unwrap_or_default();
    if summary.token_ids.len() != usage.completion_tokens as usize {
        bail!(
            "the gateway returned {} token ids for {} tokens: is it older than this sibyl?",
            summary.token_ids.len(),
            usage.completion_tokens
        );
    }
    // Several drafters of one kind (replicas) count as that kind.
    let mut drafters: Vec<DrafterReport> = Vec::new();
    for stats in &summary.drafters {
        match drafters.iter_mut().find(|d| d.kind == stats.kind) {
            Some(d) => {
                d.proposed += stats.proposed_tokens;
                d.accepted += stats.accepted_tokens;
            }
            None => drafters.push(DrafterReport {
                kind: stats.kind.clone(),
                proposed: stats.proposed_tokens,
                accepted: stats.accepted_tokens,
                // The gateway's summary does not say which steps had which drafter.
                asked: 0,
                drafting_time: Duration::ZERO,
            }),
        }
    }
    Ok(GenerationReport {
        tokens: summary.token_ids,
        prompt_tokens: usage.prompt_tokens as usize,
        cached_tokens: usage.cached_tokens as usize,
        finish_reason,
        steps: summary.steps as usize,
        prompt_time: sibyl_proto::std_duration(summary.prompt_time.as_ref()),
        decode_time: sibyl_proto::std_duration(summary.decode_time.as_ref()),
        step_times: summary
            .step_micros
            .iter()
            .map(|&us| Duration::from_micros(u64::from(us)))
            .collect(),
        drafters,
        seed: summary.seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        assert_eq!(
            BenchConfig::parse("plain", true).unwrap(),
            BenchConfig::plain()
        );
        let ngram = BenchConfig::parse("ngram", true).unwrap();
        assert_eq!(ngram.drafters, Drafters::Kinds(vec!["ngram".into()]));
        assert!(!ngram.is_plain());
        assert_eq!(
            BenchConfig::parse("all", true).unwrap().drafters,
            Drafters::All
        );
        let error = BenchConfig::parse("ngram+oracle", true)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown config `ngram+oracle`"), "{error}");
        assert!(BenchConfig::parse("none", true).is_err());
        let error = BenchConfig::parse("ngram+ngram", true)
            .unwrap_err()
            .to_string();
        assert!(error.contains("each drafter kind once"), "{error}");
        // Through a gateway the verifier judges the kinds.
        let remote = BenchConfig::parse("ngram+retrieval", false).unwrap();
        assert_eq!(
            remote.drafters,
            Drafters::Kinds(vec!["ngram".into(), "retrieval".into()])
        );
    }

    #[test]
    fn a_speculative_run_without_working_drafters_is_an_error() {
        let summary = |states: &[pb::DrafterState]| pb::GenerateSummary {
            drafters: states
                .iter()
                .map(|&state| pb::DrafterStats {
                    kind: "ngram".into(),
                    endpoint: "http://drafter:50061".into(),
                    state: state as i32,
                    error: "connection refused".into(),
                    ..pb::DrafterStats::default()
                })
                .collect(),
            ..pb::GenerateSummary::default()
        };
        use pb::DrafterState::{Connected, Connecting, Failed, Refused};
        assert!(check_drafters(&summary(&[Failed, Connected])).is_ok());
        assert!(check_drafters(&summary(&[Connecting])).is_ok());
        let error = check_drafters(&summary(&[Failed, Refused]))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("ngram at http://drafter:50061: Failed"),
            "{error}"
        );
        let error = check_drafters(&summary(&[])).unwrap_err().to_string();
        assert!(error.contains("it has none"), "{error}");
    }
}
