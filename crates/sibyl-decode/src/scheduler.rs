//! The step scheduler: many sessions, one forward pass per step (continuous batching).
//!
//! Each step gathers every ready session's drafts and plans its tree, chooses how many draft
//! nodes the whole batch verifies from the measured cost of a pass of n rows, adds chunks of
//! prompts still being processed (within a token budget, so that decoding sessions keep
//! going while a long prompt is processed), runs one [`Model::forward_batch`] and commits
//! each session. Sessions join and leave between steps. A position's logits do not depend on
//! the other rows of the pass, so every session's output is the one it would have alone.
//!
//! A prompt's work is done once: a session still processing its prompt first copies the
//! longest prefix of it that another session has computed, or that the [`PrefixCache`] keeps
//! from sessions that ended, and waits a step rather than compute tokens another session is
//! computing in this one.

use crate::prefix::{common_prefix, PrefixCache};
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

/// A session waits a step for prompt tokens another session computes in this one, rather
/// than compute them too, only for at least this many (a chat template's shared first
/// tokens are not worth a step's wait).
const SHARED_WAIT_MIN: usize = 32;

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
    /// Bytes of keys and values kept from ended sessions for later prompts that start the
    /// same way (the [`PrefixCache`]); 0 keeps none.
    pub prefix_cache_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            prompt_tokens_per_step: PROMPT_CHUNK,
            prefill_stall: 2.0,
            draft_wait: Duration::ZERO,
            prefix_cache_bytes: 0,
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
    /// Prompt tokens copied from computed prefixes instead of computed.
    pub cached_tokens: usize,
    /// Tokens the step gave its sessions (accepted tokens, first tokens of prompts done).
    pub tokens: usize,
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
    prefixes: PrefixCache,
}

impl<C: Client> Scheduler<C> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            prefixes: PrefixCache::new(config.prefix_cache_bytes),
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

    /// What ended sessions left for later prompts.
    pub fn prefix_cache(&self) -> &PrefixCache {
        &self.prefixes
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
        let mut stats = StepStats::default();
        let reusing = |entry: &Entry<C>| entry.session.prefilling() && entry.session.prefix_cache();
        // Copying costs no rows: every prompt takes what is there before the budget is shared.
        for i in 0..self.entries.len() {
            if reusing(&self.entries[i]) && !ended.iter().any(|(e, _)| *e == i) {
                stats.cached_tokens += self.reuse(i);
            }
        }
        for i in 0..self.entries.len() {
            if budget == 0 {
                break;
            }
            if works[i].is_some() || ended.iter().any(|(e, _)| *e == i) {
                continue;
            }
            if reusing(&self.entries[i]) && self.computing_for(i, &works) {
                continue;
            }
            if let Some(chunk) = self.entries[i].session.prompt_chunk(budget) {
                budget -= chunk.input.tokens.len();
                works[i] = Some(Work::Prompt(chunk));
            }
        }
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
                        if let Some(end) = self.commit(i, work, &rows, started, &mut stats) {
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
        stats: &mut StepStats,
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
        stats.tokens += step.tokens.len();
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

    /// Copies into session `i`, still processing its prompt, the longest prefix of it that
    /// another session or the prefix cache holds; returns the tokens copied.
    fn reuse(&mut self, i: usize) -> usize {
        let session = &self.entries[i].session;
        let prompt = session.context();
        let before = session.cached().0.len();
        let mut best: Option<(usize, usize)> = None;
        for (j, other) in self.entries.iter().enumerate() {
            if j == i || !other.session.prefix_cache() {
                continue;
            }
            let len = session.reusable(common_prefix(other.session.cached().0, prompt));
            if len > best.map_or(before, |(_, l)| l) {
                best = Some((j, len));
            }
        }
        let hit = self
            .prefixes
            .longest(prompt)
            .filter(|hit| session.reusable(hit.len) > best.map_or(before, |(_, l)| l));
        if let Some(hit) = hit {
            let entry = hit.entry;
            self.entries[i].session.reuse_prefix(hit.cache, hit.len);
            self.prefixes.used(entry);
        } else if let Some((j, len)) = best {
            let (source, target) = if j < i {
                let (head, tail) = self.entries.split_at_mut(i);
                (&head[j], &mut tail[0])
            } else {
                let (head, tail) = self.entries.split_at_mut(j);
                (&tail[0], &mut head[i])
            };
            target.session.reuse_prefix(source.session.cached().1, len);
        }
        self.entries[i].session.cached().0.len() - before
    }

    /// Whether a session before `i` in this step computes prompt tokens that session `i`
    /// needs next, at least [`SHARED_WAIT_MIN`] of them (`i` then copies them in the next
    /// step rather than compute them too).
    fn computing_for(&self, i: usize, works: &[Option<Work>]) -> bool {
        let session = &self.entries[i].session;
        let next = session.cached().0.len();
        works.iter().enumerate().any(|(j, work)| {
            let other = &self.entries[j].session;
            matches!(work, Some(Work::Prompt(_)))
                && other.prefix_cache()
                && session.reusable(common_prefix(other.context(), session.context()))
                    >= next + SHARED_WAIT_MIN
        })
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
            let mut entry = self.entries.remove(i);
            if end.is_ok() && entry.session.prefix_cache() && self.prefixes.keeps() {
                let (tokens, cache) = entry.session.take_cache();
                self.prefixes.insert(tokens, cache);
            }
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
    generate_cancellable(
        model,
        prompt,
        config,
        drafters,
        &mut || false,
        on_tokens,
        None,
    )
}

/// [`generate`], also asking `cancelled` between prompt chunks and before each step: a
/// long prompt can be stopped before its first token. With `prefixes` (filled by this
/// `model` only), the generation starts from the longest prefix of its prompt held there
/// and leaves its own work there (as [`GenerationConfig::prefix_cache`] says). This is the
/// [`Scheduler`] with one session.
pub fn generate_cancellable(
    model: &Model,
    prompt: &[TokenId],
    config: &GenerationConfig,
    drafters: &mut [Box<dyn Drafter>],
    cancelled: &mut dyn FnMut() -> bool,
    on_tokens: impl FnMut(&[TokenId]) -> ControlFlow<()>,
    mut prefixes: Option<&mut PrefixCache>,
) -> Result<GenerationReport, GenerateError> {
    let kinds = drafters.iter().map(|d| d.kind().to_string()).collect();
    let session = Session::new(model, prompt, config.clone(), kinds)?;
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    if let Some(prefixes) = prefixes.as_deref_mut() {
        std::mem::swap(prefixes, &mut scheduler.prefixes);
    }
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
            if let Some(prefixes) = prefixes {
                std::mem::swap(prefixes, &mut scheduler.prefixes);
            }
            return done.outcome;
        }
    }
}
