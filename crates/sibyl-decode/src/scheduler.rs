//! The step scheduler: many sessions, one forward pass per step (continuous batching).
//!
//! Each step gathers every ready session's drafts and plans its tree, chooses how many draft
//! nodes the whole batch verifies from the measured cost of a pass of n rows, adds chunks of
//! prompts still being processed (within a token budget, so that decoding sessions keep
//! going while a long prompt is processed), runs one [`Model::forward_batch`] and commits
//! each session. Sessions join and leave between steps. A position's logits do not depend on
//! the other rows of the pass, so every session's output is the one it would have alone.

use crate::session::{
    lock, FinishReason, GenerateError, GenerationConfig, GenerationReport, PlannedStep,
    PromptChunk, Session, PROMPT_CHUNK,
};
use sibyl_engine::{LogitRows, Model, Sequence, TreeInput};
use sibyl_spec::{
    choose_batch_draft_nodes, BatchDrafts, Drafter, DrafterId, Proposal, StepCosts, TokenId,
};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the scheduler fills a step.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most prompt tokens in one forward pass.
    pub prompt_tokens_per_step: usize,
    /// While sessions are decoding, prompt tokens join a step only as far as the step is
    /// expected to cost at most this many times the decoding rows alone (by the measured
    /// step costs), and at least one token does, so a long prompt never stalls the streams
    /// that are decoding. Where more prompts wait than sessions decode, the prompts get
    /// that much more (each waiting prompt as much of the step as a decoding session).
    pub prefill_stall: f64,
    /// Longest a step waits for the drafts of its sessions (all of them together).
    pub draft_wait: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            prompt_tokens_per_step: PROMPT_CHUNK,
            prefill_stall: 2.0,
            draft_wait: Duration::ZERO,
        }
    }
}

/// Where a session's drafts come from and its tokens go: in-process drafters and a
/// callback ([`generate`]), or remote drafters and a client's stream (the verifier).
pub trait Client {
    /// Whether whoever asked for the generation has gone (the session ends, cancelled).
    fn cancelled(&mut self) -> bool {
        false
    }

    /// Whether the session can take part in the next step; a session whose reader has not
    /// taken its last tokens yet waits, without holding the others up.
    fn ready(&mut self) -> bool {
        true
    }

    /// The drafts for `session`'s next step, gathered by `deadline` at the latest.
    fn drafts(
        &mut self,
        session: &mut Session,
        deadline: Instant,
    ) -> Vec<(DrafterId, Vec<Proposal>)>;

    /// Takes the tokens a step accepted (never empty); `Break` cancels the session.
    fn deliver(&mut self, session: &Session, tokens: &[TokenId]) -> ControlFlow<()>;
}

/// A session that ended, with its client.
pub struct Finished<C> {
    pub client: C,
    pub outcome: Result<GenerationReport, GenerateError>,
}

/// What one step computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// Sessions with rows in the pass.
    pub sessions: usize,
    /// Rows of the forward pass.
    pub rows: usize,
    pub prompt_tokens: usize,
    /// Draft nodes verified.
    pub draft_tokens: usize,
    /// Time of the pass and the sessions' commits (drafting comes before).
    pub elapsed: Duration,
}

struct Entry<C> {
    session: Session,
    client: C,
}

enum Work {
    Prompt(PromptChunk),
    Verify(PlannedStep),
}

/// Runs the steps of many sessions together: see the module doc.
pub struct Scheduler<C> {
    config: SchedulerConfig,
    entries: Vec<Entry<C>>,
}

impl<C: Client> Scheduler<C> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            entries: Vec::new(),
        }
    }

    /// Adds a session; it takes part from the next step on, after those added before it
    /// (prompts are processed first come, first served).
    pub fn add(&mut self, session: Session, client: C) {
        self.entries.push(Entry { session, client });
    }

    /// Sessions running.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sessions still processing their prompt.
    pub fn prefilling(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.session.prefilling())
            .count()
    }

    /// KV-cache bytes held by the sessions.
    pub fn cache_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.session.cache_bytes()).sum()
    }

    /// Ends every session as cancelled (the server is going away).
    pub fn cancel_all(&mut self) -> Vec<Finished<C>> {
        self.entries
            .drain(..)
            .map(|e| Finished {
                client: e.client,
                outcome: Ok(e.session.finish(FinishReason::Cancelled)),
            })
            .collect()
    }

    /// Runs one step over every session that has work and returns those that ended, with
    /// what the step computed (no rows: no session could take part).
    pub fn step(&mut self, model: &Model) -> (Vec<Finished<C>>, StepStats) {
        let mut ended: Vec<(usize, Result<FinishReason, GenerateError>)> = Vec::new();
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if entry.client.cancelled() {
                ended.push((i, Ok(FinishReason::Cancelled)));
            }
        }
        let mut works: Vec<Option<Work>> = (0..self.entries.len()).map(|_| None).collect();
        let deadline = Instant::now() + self.config.draft_wait;
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if ended.iter().any(|(e, _)| *e == i)
                || entry.session.prefilling()
                || !entry.client.ready()
            {
                continue;
            }
            let drafts = entry.client.drafts(&mut entry.session, deadline);
            match entry.session.plan(drafts) {
                Some(plan) => works[i] = Some(Work::Verify(plan)),
                None => ended.push((i, Ok(FinishReason::Length))),
            }
        }
        let started = Instant::now();
        let costs = self.costs();
        let context = works
            .iter()
            .flatten()
            .map(|w| match w {
                Work::Verify(plan) => plan.context(),
                Work::Prompt(_) => 0,
            })
            .max()
            .unwrap_or(0);
        size_speculation(&mut works, |n| costs.estimate(n, context));
        let decode_rows: usize = works
            .iter()
            .flatten()
            .map(|w| match w {
                Work::Verify(plan) => plan.rows(),
                Work::Prompt(_) => 0,
            })
            .sum();
        let decoding = works.iter().flatten().count();
        let waiting = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| e.session.prefilling() && !ended.iter().any(|(j, _)| j == i))
            .count();
        let stall = self.stall(decoding, waiting);
        let mut budget = self.prompt_budget(&costs, decode_rows, stall, context);
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if works[i].is_some() || ended.iter().any(|(e, _)| *e == i) {
                continue;
            }
            if let Some(chunk) = entry.session.prompt_chunk(budget) {
                budget -= chunk.input.tokens.len();
                works[i] = Some(Work::Prompt(chunk));
            }
        }
        let mut stats = StepStats::default();
        let inputs: Vec<Option<(TreeInput, LogitRows)>> = works
            .iter()
            .map(|work| {
                work.as_ref().map(|work| match work {
                    Work::Prompt(chunk) => {
                        stats.prompt_tokens += chunk.input.tokens.len();
                        (chunk.input.clone(), chunk.rows)
                    }
                    Work::Verify(plan) => {
                        stats.draft_tokens += plan.rows() - 1;
                        (plan.input(), LogitRows::All)
                    }
                })
            })
            .collect();
        stats.sessions = inputs.iter().flatten().count();
        stats.rows = inputs.iter().flatten().map(|(i, _)| i.tokens.len()).sum();
        if stats.sessions > 0 {
            let mut batch: Vec<Sequence<'_>> = self
                .entries
                .iter_mut()
                .zip(&inputs)
                .filter_map(|(entry, input)| {
                    input.as_ref().map(|(input, rows)| Sequence {
                        cache: entry.session.cache_mut(),
                        input,
                        rows: *rows,
                    })
                })
                .collect();
            let result = model.forward_batch(&mut batch);
            drop(batch);
            match result {
                Ok(logits) => {
                    let mut logits = logits.into_iter();
                    for (i, work) in works.into_iter().enumerate() {
                        let Some(work) = work else { continue };
                        let rows = logits.next().unwrap_or_default();
                        if let Some(end) = self.commit(i, work, &rows, started) {
                            ended.push((i, end));
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%error, sessions = stats.sessions, "batched step failed");
                    let error = Arc::new(error);
                    for (i, _) in works.iter().enumerate().filter(|(_, w)| w.is_some()) {
                        ended.push((i, Err(GenerateError::Batch(error.clone()))));
                    }
                }
            }
            stats.elapsed = started.elapsed();
            if let Some(learning) = self.learning() {
                lock(&learning)
                    .costs
                    .record(stats.rows, context, stats.elapsed.as_secs_f64());
            }
        }
        (self.remove(ended), stats)
    }

    /// Commits session `i`'s share of the pass and delivers its tokens; says how it ended,
    /// if it did.
    fn commit(
        &mut self,
        i: usize,
        work: Work,
        logits: &[f32],
        started: Instant,
    ) -> Option<Result<FinishReason, GenerateError>> {
        let entry = &mut self.entries[i];
        let step = match work {
            Work::Prompt(chunk) => entry.session.commit_prompt(&chunk, logits),
            Work::Verify(plan) => entry
                .session
                .commit(plan, logits, started.elapsed())
                .map(Some),
        };
        let step = match step {
            Ok(Some(step)) => step,
            Ok(None) => return None,
            Err(error) => return Some(Err(error)),
        };
        if !step.tokens.is_empty()
            && entry
                .client
                .deliver(&entry.session, &step.tokens)
                .is_break()
        {
            return Some(Ok(FinishReason::Cancelled));
        }
        step.finish.map(Ok)
    }

    /// Takes the sessions that ended out, reporting each (the first reason given counts).
    fn remove(
        &mut self,
        mut ended: Vec<(usize, Result<FinishReason, GenerateError>)>,
    ) -> Vec<Finished<C>> {
        ended.sort_by_key(|(i, _)| *i);
        ended.dedup_by_key(|(i, _)| *i);
        let mut finished = Vec::with_capacity(ended.len());
        for (i, end) in ended.into_iter().rev() {
            let entry = self.entries.remove(i);
            let outcome = end.map(|reason| entry.session.finish(reason));
            finished.push(Finished {
                client: entry.client,
                outcome,
            });
        }
        finished.reverse();
        finished
    }

    /// What the sessions learn together, if they learn (adaptive sizing).
    fn learning(&self) -> Option<crate::SharedLearning> {
        self.entries
            .iter()
            .find_map(|e| e.session.learning().cloned())
    }

    /// Measured step costs, or the prior where the sessions do not learn.
    fn costs(&self) -> StepCosts {
        self.learning()
            .map(|l| lock(&l).costs.clone())
            .unwrap_or_default()
    }

    /// How many times the cost of its decoding rows a step may take with prompt tokens:
    /// [`SchedulerConfig::prefill_stall`] while prompts are no more than the decoding
    /// sessions, and each session's fair share when more prompts wait (`waiting` prompts
    /// against `decoding` sessions each get as much of the step as one of them), so that
    /// prompts queued behind busy streams are not starved.
    fn stall(&self, decoding: usize, waiting: usize) -> f64 {
        let share = (waiting as f64 / decoding.max(1) as f64).max(1.0);
        1.0 + (self.config.prefill_stall - 1.0) * share
    }

    /// Prompt tokens the step can carry besides `decode_rows` decoding rows, so that it
    /// costs at most `stall` times those rows alone.
    fn prompt_budget(
        &self,
        costs: &StepCosts,
        decode_rows: usize,
        stall: f64,
        context: usize,
    ) -> usize {
        let most = self.config.prompt_tokens_per_step;
        if decode_rows == 0 {
            return most;
        }
        let limit = stall * costs.estimate(decode_rows, context);
        (1..=most)
            .rev()
            .find(|&p| costs.estimate(decode_rows + p, context) <= limit)
            .unwrap_or(1.min(most))
    }
}

/// Cuts each adaptive session's tree to the draft nodes that pay for the whole batch
/// ([`choose_batch_draft_nodes`]); the other sessions keep every node.
fn size_speculation(works: &mut [Option<Work>], cost: impl Fn(usize) -> f64) {
    let mut fixed_rows = 0;
    let mut adaptive = Vec::new();
    for (i, work) in works.iter().enumerate() {
        if let Some(Work::Verify(plan)) = work {
            if plan.adaptive() {
                fixed_rows += 1;
                adaptive.push(i);
            } else {
                fixed_rows += plan.rows();
            }
        }
    }
    if adaptive.is_empty() {
        return;
    }
    let chosen = {
        let drafts: Vec<BatchDrafts<'_>> = adaptive
            .iter()
            .filter_map(|&i| match &works[i] {
                Some(Work::Verify(plan)) => Some(BatchDrafts {
                    values: plan.draft_values(),
                    explore: plan.explore(),
                }),
                _ => None,
            })
            .collect();
        choose_batch_draft_nodes(&drafts, fixed_rows, cost)
    };
    for (&i, nodes) in adaptive.iter().zip(chosen) {
        if let Some(Work::Verify(plan)) = &mut works[i] {
            plan.keep_drafts(nodes);
        }
    }
}

/// A session of this process: in-process drafters, a callback for its tokens, and a
/// question whether to stop.
struct InProcess<'a, F> {
    drafters: &'a mut [Box<dyn Drafter>],
    cancelled: &'a mut dyn FnMut() -> bool,
    on_tokens: F,
}

impl<F: FnMut(&[TokenId]) -> ControlFlow<()>> Client for InProcess<'_, F> {
    fn cancelled(&mut self) -> bool {
        (self.cancelled)()
    }

    fn drafts(&mut self, session: &mut Session, _: Instant) -> Vec<(DrafterId, Vec<Proposal>)> {
        session.draft_in_process(self.drafters)
    }

    fn deliver(&mut self, _: &Session, tokens: &[TokenId]) -> ControlFlow<()> {
        (self.on_tokens)(tokens)
    }
}

/// Generates from `prompt` with `model`, speculating with `drafters` (none: plain decoding).
/// `on_tokens` receives the tokens of each step as soon as they are accepted and may stop
/// the generation by returning `ControlFlow::Break`.
pub fn generate(
    model: &Model,
    prompt: &[TokenId],
    config: &GenerationConfig,
    drafters: &mut [Box<dyn Drafter>],
    on_tokens: impl FnMut(&[TokenId]) -> ControlFlow<()>,
) -> Result<GenerationReport, GenerateError> {
    generate_cancellable(model, prompt, config, drafters, &mut || false, on_tokens)
}

/// [`generate`], also asking `cancelled` between prompt chunks and before each step: a
/// long prompt can be stopped before its first token. This is the [`Scheduler`] with one
/// session.
pub fn generate_cancellable(
    model: &Model,
    prompt: &[TokenId],
    config: &GenerationConfig,
    drafters: &mut [Box<dyn Drafter>],
    cancelled: &mut dyn FnMut() -> bool,
    on_tokens: impl FnMut(&[TokenId]) -> ControlFlow<()>,
) -> Result<GenerationReport, GenerateError> {
    let kinds = drafters.iter().map(|d| d.kind().to_string()).collect();
    let session = Session::new(model, prompt, config.clone(), kinds)?;
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    scheduler.add(
        session,
        InProcess {
            drafters,
            cancelled,
            on_tokens,
        },
    );
    loop {
        let (mut finished, _) = scheduler.step(model);
        if let Some(done) = finished.pop() {
            return done.outcome;
        }
    }
}
