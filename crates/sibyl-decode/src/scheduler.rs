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

/// [`SchedulerConfig::copy_tokens_per_step`] by default: about a decoding step's time of
/// copying for a 1.5B model on 2 cores (60 us a position).
const COPY_TOKENS_PER_STEP: usize = 512;

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
    /// Most positions of keys and values one prompt copies (from the prefix cache or a
    /// running session) in a step while other sessions decode, so that their steps wait
    /// for no long copy (a 4,661-token prompt's took 0.28 s on 2 cores); the rest is
    /// copied in the next steps. Without decoding sessions a prompt copies all at once.
    pub copy_tokens_per_step: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            prompt_tokens_per_step: PROMPT_CHUNK,
            prefill_stall: 2.0,
            draft_wait: Duration::ZERO,
            prefix_cache_bytes: 0,
            copy_tokens_per_step: COPY_TOKENS_PER_STEP,
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

    /// The session has ended (however it ended): its drafters may keep its sequence.
    fn ended(&mut self, _session: &Session) {}
}

/// A session that ended, with its client.
pub struct Finished<C> {
    pub client: C,
    pub outcome: Result<GenerationReport, GenerateError>,
}

/// What one step computed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
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
    /// Tokens the verify steps were expected to give when they were sized (compare
    /// `tokens`, less the prompts' first tokens).
    pub expected_tokens: f64,
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
        let mut roots = RowKeys::default();
        for work in works.iter().flatten() {
            if let Work::Verify(plan) = work {
                roots.verify(1, plan.context());
            }
        }
        size_speculation(&mut works, |n| costs.estimate(n, roots.context()));
        let is_ended = |i: usize| ended.iter().any(|(e, _)| *e == i);
        let mut rows = RowKeys::default();
        for work in works.iter().flatten() {
            if let Work::Verify(plan) = work {
                rows.verify(plan.rows(), plan.context());
            }
        }
        // What the step must not hold up: the decoding rows, and a row for each stream not
        // ready this time (it will be by the next step).
        let mut streams = rows;
        let mut decoding = 0;
        let mut waiting = 0;
        for (i, entry) in self.entries.iter().enumerate() {
            if is_ended(i) {
                continue;
            }
            if entry.session.prefilling() {
                waiting += 1;
            } else {
                decoding += 1;
                if works[i].is_none() {
                    streams.verify(1, entry.session.context().len());
                }
            }
        }
        let mut stats = StepStats::default();
        let reusing = |entry: &Entry<C>| entry.session.prefilling() && entry.session.prefix_cache();
        // Copying costs no rows: every prompt takes what is there before the budget is shared,
        // as much of it as a step copies while others decode (they wait for the copy too).
        let copy_limit = if decoding > 0 {
            self.config.copy_tokens_per_step.max(1)
        } else {
            usize::MAX
        };
        let copying = Instant::now();
        let copying_more: Vec<bool> = (0..self.entries.len())
            .map(|i| {
                if !reusing(&self.entries[i]) || is_ended(i) {
                    return false;
                }
                let (copied, more) = self.reuse(i, copy_limit);
                stats.cached_tokens += copied;
                more
            })
            .collect();
        let copy_time = copying.elapsed();
        // Prompts are budgeted as if all were as far along as the furthest one (their
        // rows attend to the most keys).
        let prompt_start = (0..self.entries.len())
            .filter(|&i| !is_ended(i) && self.entries[i].session.prefilling())
            .map(|i| self.entries[i].session.prefilled())
            .max()
            .unwrap_or(0);
        let stall = self.stall(decoding, waiting);
        let mut budget = self.prompt_budget(&costs, streams, prompt_start, stall);
        for i in 0..self.entries.len() {
            if budget == 0 {
                break;
            }
            if works[i].is_some() || is_ended(i) {
                continue;
            }
            // A prompt with more to copy copies it next step rather than compute it.
            if copying_more[i] || (reusing(&self.entries[i]) && self.computing_for(i, &works)) {
                continue;
            }
            let start = self.entries[i].session.prefilled();
            if let Some(chunk) = self.entries[i].session.prompt_chunk(budget) {
                budget -= chunk.input.tokens.len();
                rows.prompt(start, chunk.input.tokens.len());
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
                        stats.expected_tokens += plan.expected_tokens();
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
            tracing::trace!(
                sessions = stats.sessions,
                rows = stats.rows,
                keys_per_row = rows.context(),
                prompt_tokens = stats.prompt_tokens,
                draft_tokens = stats.draft_tokens,
                tokens = stats.tokens,
                expected_tokens = stats.expected_tokens,
                // The estimate the pass was planned with (in plain steps while none was
                // measured), evaluated only where the line is logged.
                estimated_ms = costs.estimate(stats.rows, rows.context()) * 1e3,
                elapsed_ms = stats.elapsed.as_secs_f64() * 1e3,
                "batched step"
            );
            if let Some(learning) = self.learning() {
                // The forward pass's cost, without the copies before it.
                lock(&learning).costs.record(
                    stats.rows,
                    rows.context(),
                    stats.elapsed.saturating_sub(copy_time).as_secs_f64(),
                );
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
    /// another session or the prefix cache holds, at most `limit` positions of it; returns
    /// the tokens copied, and whether more is left to copy at the next step.
    fn reuse(&mut self, i: usize, limit: usize) -> (usize, bool) {
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
        let until = before.saturating_add(limit);
        let mut more = false;
        if let Some(hit) = hit {
            let entry = hit.entry;
            let len = session.reusable(hit.len);
            more = len > until;
            let target = &mut self.entries[i].session;
            if more {
                target.cache_mut().reserve(len);
            }
            target.reuse_prefix(hit.cache, len.min(until));
            self.prefixes.used(entry);
        } else if let Some((j, len)) = best {
            more = len > until;
            if more {
                self.entries[i].session.cache_mut().reserve(len);
            }
            let len = len.min(until);
            let (source, target) = if j < i {
                let (head, tail) = self.entries.split_at_mut(i);
                (&head[j], &mut tail[0])
            } else {
                let (head, tail) = self.entries.split_at_mut(j);
                (&tail[0], &mut head[i])
            };
            target.session.reuse_prefix(source.session.cached().1, len);
        }
        let copied = self.entries[i].session.cached().0.len() - before;
        (copied, more && copied > 0)
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
            entry.client.ended(&entry.session);
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

    /// Prompt tokens the step can carry besides the rows of the decoding `streams`, so that
    /// it costs at most `stall` times those rows alone, the prompt tokens starting after
    /// `prompt_start` tokens. Where steps whose rows read as many keys were never measured
    /// (while others were), at most [`PROBE_PROMPT_TOKENS`] go in: their cost is a guess
    /// until then.
    fn prompt_budget(
        &self,
        costs: &StepCosts,
        streams: RowKeys,
        prompt_start: usize,
        stall: f64,
    ) -> usize {
        let most = self.config.prompt_tokens_per_step;
        if streams.rows == 0 {
            return most;
        }
        let limit = stall * costs.estimate(streams.rows, streams.context());
        // Without any measurement (sessions that do not learn), the prior it is.
        let learnt = costs.measured();
        (1..=most)
            .rev()
            .find(|&p| {
                let mut step = streams;
                step.prompt(prompt_start, p);
                (p <= PROBE_PROMPT_TOKENS || !learnt || costs.measured_at(step.context()))
                    && costs.estimate(step.rows, step.context()) <= limit
            })
            .unwrap_or(1.min(most))
    }
}

/// Prompt tokens a step beside decoding streams carries at most where no step that long
/// was measured yet.
const PROBE_PROMPT_TOKENS: usize = 4;

/// The rows of a step and the keys their attention reads, all rows together. A step's cost
/// is estimated and recorded at the mean of the keys per row: the matrix products grow with
/// the rows, attention with the keys, and a prompt chunk late in a long prompt reads many
/// more keys per row than the decoding rows beside it.
#[derive(Debug, Clone, Copy, Default)]
struct RowKeys {
    rows: usize,
    keys: usize,
}

impl RowKeys {
    /// A verify step's `rows` after `context` tokens.
    fn verify(&mut self, rows: usize, context: usize) {
        self.rows += rows;
        self.keys += rows * context;
    }

    /// `len` prompt tokens after the first `start`: the k-th reads `start + k` keys.
    fn prompt(&mut self, start: usize, len: usize) {
        self.rows += len;
        self.keys += len * start + len * (len + 1) / 2;
    }

    /// Keys per row.
    fn context(&self) -> usize {
        self.keys / self.rows.max(1)
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

    fn ended(&mut self, session: &Session) {
        session.finish_in_process(self.drafters);
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

#[cfg(test)]
mod tests {
    use super::*;

    type Budgeting = Scheduler<InProcess<'static, fn(&[TokenId]) -> ControlFlow<()>>>;

    /// A CPU's pass: a fixed part, and per row a part that grows with the keys it reads.
    fn seconds(rows: usize, keys_per_row: usize) -> f64 {
        0.08 + rows as f64 * 0.02 * (1.0 + keys_per_row as f64 / 1000.0)
    }

    fn measured(contexts: &[usize]) -> StepCosts {
        let mut costs = StepCosts::default();
        for &context in contexts {
            for rows in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
                costs.record(rows, context, seconds(rows, context));
            }
        }
        costs
    }

    #[test]
    fn prompt_tokens_beside_a_stream_keep_its_step_within_the_stall_however_far_the_prompt_is() {
        let scheduler = Budgeting::new(SchedulerConfig::default());
        let costs = measured(&[256, 768, 1280, 1792, 2560, 3584, 5120, 7000]);
        let mut stream = RowKeys::default();
        stream.verify(1, 200);
        let alone = seconds(1, 200);
        let stall = 3.0;
        let mut budgets = Vec::new();
        for start in [0, 800, 2500, 4000] {
            let budget = scheduler.prompt_budget(&costs, stream, start, stall);
            let mut step = stream;
            step.prompt(start, budget);
            // Within the stall, but for the estimates' buckets of context lengths.
            let cost = seconds(step.rows, step.context());
            assert!(
                cost <= 1.15 * stall * alone,
                "{start}: {budget} tokens, {cost} s"
            );
            // One token more would have been too much (by the estimates).
            step.prompt(start + budget, 1);
            let more = costs.estimate(step.rows, step.context());
            assert!(more > stall * costs.estimate(1, 200), "{start}");
            budgets.push(budget);
        }
        assert!(budgets.windows(2).all(|w| w[0] >= w[1]), "{budgets:?}");
        assert!(budgets[0] >= 3 * budgets[3], "{budgets:?}");
        // Without a stream to keep going, a whole chunk.
        let none = scheduler.prompt_budget(&costs, RowKeys::default(), 3500, 2.0);
        assert_eq!(none, PROMPT_CHUNK);
    }

    #[test]
    fn where_no_step_read_as_many_keys_the_prompt_probes_with_a_few_tokens() {
        let scheduler = Budgeting::new(SchedulerConfig::default());
        let mut stream = RowKeys::default();
        stream.verify(1, 200);
        // Only short contexts measured: a prompt 3,500 tokens along takes a few tokens.
        let short = measured(&[256]);
        let budget = scheduler.prompt_budget(&short, stream, 3500, 3.0);
        assert!((1..=PROBE_PROMPT_TOKENS).contains(&budget), "{budget}");
        // Early in the prompt its steps were measured, so it takes what they allow.
        let early = scheduler.prompt_budget(&short, stream, 0, 3.0);
        assert!(early > PROBE_PROMPT_TOKENS, "{early}");
        // Nothing measured at all (sessions that do not learn): the prior, as before.
        let prior = scheduler.prompt_budget(&StepCosts::default(), stream, 3500, 3.0);
        assert!(prior > PROBE_PROMPT_TOKENS, "{prior}");
    }
}
