//! `sibyl bench --concurrency`: each config's prompts c at a time through one step
//! scheduler (continuous batching), in process or through a gateway, measured as each
//! request's client sees it, with a gate that every request's output equals its output at
//! concurrency 1.

use super::backend::{self, Backend, BenchConfig, InProcess, Remote};
use super::dataset::{Format, Item};
use super::results::Results;
use anyhow::Context;
use indicatif::ProgressBar;
use serde::Serialize;
use sibyl_decode::{Client, FinishReason, Scheduler, SchedulerConfig, Session};
use sibyl_engine::ChatMessage;
use sibyl_gateway::PromptInput;
use sibyl_spec::{Drafter, DrafterId, Proposal, TokenId};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// One `--concurrency` value: a positive integer.
pub fn parse_level(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("concurrency must be at least 1".into()),
        Ok(level) => Ok(level),
        Err(_) => Err(format!(
            "`{text}` is not a positive integer (a list is comma-separated, as in 1,2,4,8)"
        )),
    }
}

/// The levels to run, ascending, 1 first (the identity gate's reference) even if not asked
/// for; none when only 1 is asked for (the sequential run alone, as without the flag).
pub fn levels(asked: &[usize]) -> Vec<usize> {
    if asked.iter().all(|&level| level == 1) {
        return Vec::new();
    }
    let mut levels = asked.to_vec();
    levels.push(1);
    levels.sort_unstable();
    levels.dedup();
    levels
}

/// One concurrent run: which prompts, under which config, how many in flight.
pub struct ConcurrentRun<'a> {
    pub items: &'a [Item],
    pub config: &'a BenchConfig,
    pub concurrency: usize,
    pub interrupted: &'a AtomicBool,
    /// Advanced by one per request finished.
    pub progress: &'a ProgressBar,
}

/// One request (one turn of an item) as its client saw it.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The item's index among the items run.
    pub item: usize,
    /// The turn, from 0.
    pub turn: usize,
    /// When it joined the scheduler.
    pub arrived: Instant,
    /// Each delivery of tokens: when, and how many.
    pub deliveries: Vec<(Instant, usize)>,
    /// When the scheduler reported it finished.
    pub ended: Instant,
    /// Its output (stop tokens excluded).
    pub tokens: Vec<TokenId>,
}

/// What a concurrent run recorded.
#[derive(Debug, Clone, Default)]
pub struct Traces {
    pub requests: Vec<Trace>,
    /// The scheduler's steps, where the run sees them (in process).
    pub passes: Option<Passes>,
}

/// What the scheduler's steps computed, all steps together.
#[derive(Debug, Clone, Copy, Default)]
pub struct Passes {
    /// Forward passes, and the sessions they carried.
    pub steps: usize,
    pub step_sessions: usize,
    /// Tokens given by the steps in which every one of the run's sessions decoded (no prompt
    /// tokens, none missing), and those steps' time (drafting included): the decoding rate
    /// of a full batch, prompt processing and the run's tail left out.
    pub decode_tokens: usize,
    pub decode_s: f64,
}

/// A session's client in a concurrent run: its own drafters, and what it was given when.
struct Request<'a> {
    conversation: Conversation,
    drafters: Vec<Box<dyn Drafter>>,
    arrived: Instant,
    deliveries: Vec<(Instant, usize)>,
    interrupted: &'a AtomicBool,
}

impl Client for Request<'_> {
    fn cancelled(&mut self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    fn drafts(&mut self, session: &mut Session, _: Instant) -> Vec<(DrafterId, Vec<Proposal>)> {
        session.draft_in_process(&mut self.drafters)
    }

    fn deliver(&mut self, _: &Session, tokens: &[TokenId]) -> ControlFlow<()> {
        self.deliveries.push((Instant::now(), tokens.len()));
        ControlFlow::Continue(())
    }

    fn ended(&mut self, session: &Session) {
        session.finish_in_process(&mut self.drafters);
    }
}

/// An item's turns: the next one runs when the one before has ended, after the model's own
/// answer (as in the sequential run).
struct Conversation {
    item: usize,
    turn: usize,
    messages: Vec<ChatMessage>,
}

/// Runs `run` in process: one scheduler, `run.concurrency` sessions in flight while prompts
/// remain; a session joins as soon as one ends. `None` once interrupted.
pub fn run_in_process(
    backend: &InProcess,
    run: &ConcurrentRun<'_>,
) -> anyhow::Result<Option<Traces>> {
    let model = &backend.loaded.model;
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let mut waiting = 0..run.items.len();
    let mut traces = Traces::default();
    let mut passes = Passes::default();
    for item in waiting.by_ref().take(run.concurrency) {
        join(backend, run, &mut scheduler, Conversation::new(item))?;
    }
    while !scheduler.is_empty() {
        let began = Instant::now();
        let (finished, stats) = scheduler.step(model);
        let ended = Instant::now();
        if stats.sessions > 0 {
            passes.steps += 1;
            passes.step_sessions += stats.sessions;
            if stats.prompt_tokens == 0 && stats.sessions == run.concurrency {
                passes.decode_tokens += stats.tokens;
                passes.decode_s += ended.duration_since(began).as_secs_f64();
            }
        }
        for done in finished {
            let request = done.client;
            let mut conversation = request.conversation;
            let item = &run.items[conversation.item];
            let report = done.outcome.with_context(|| conversation.name(run))?;
            if report.finish_reason == FinishReason::Cancelled {
                return Ok(None);
            }
            run.progress.inc(1);
            if item.format == Format::Chat {
                conversation.answered(&backend.answer(&report.tokens)?);
            }
            traces.requests.push(Trace {
                item: conversation.item,
                turn: conversation.turn,
                arrived: request.arrived,
                deliveries: request.deliveries,
                ended,
                tokens: report.tokens,
            });
            if let Some(next) = conversation.next(item, &mut waiting) {
                join(backend, run, &mut scheduler, next)?;
            }
        }
    }
    traces.passes = Some(passes);
    Ok(Some(traces))
}

/// A request through the gateway: its conversation, when it was sent, what came back.
type Flight = (Conversation, Instant, anyhow::Result<backend::Streamed>);

/// Runs `run` through the gateway of `backend`: `run.concurrency` streams open while prompts
/// remain, a request sent as soon as one ends. `None` once interrupted.
pub fn run_through_gateway(
    backend: &Remote,
    run: &ConcurrentRun<'_>,
) -> anyhow::Result<Option<Traces>> {
    backend.runtime.block_on(async {
        let mut flights: JoinSet<Flight> = JoinSet::new();
        let mut waiting = 0..run.items.len();
        let mut traces = Traces::default();
        for item in waiting.by_ref().take(run.concurrency) {
            send(backend, run, &mut flights, Conversation::new(item))?;
        }
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        while !flights.is_empty() {
            let landed = tokio::select! {
                landed = flights.join_next() => landed,
                _ = poll.tick() => {
                    if run.interrupted.load(Ordering::Relaxed) {
                        flights.abort_all();
                        return Ok(None);
                    }
                    continue;
                }
            };
            let Some(landed) = landed else { break };
            let ended = Instant::now();
            let (mut conversation, arrived, streamed) = landed?;
            let item = &run.items[conversation.item];
            let context = || conversation.name(run);
            let streamed = streamed.with_context(context)?;
            if !run.config.is_plain() {
                backend::check_drafters(&streamed.summary).with_context(context)?;
            }
            let report = backend::report(streamed.summary).with_context(context)?;
            run.progress.inc(1);
            if item.format == Format::Chat {
                conversation.answered(&streamed.text);
            }
            traces.requests.push(Trace {
                item: conversation.item,
                turn: conversation.turn,
                arrived,
                deliveries: streamed.deliveries,
                ended,
                tokens: report.tokens,
            });
            if let Some(next) = conversation.next(item, &mut waiting) {
                send(backend, run, &mut flights, next)?;
            }
        }
        Ok(Some(traces))
    })
}

/// Sends `conversation`'s next turn through the gateway of `backend`.
fn send(
    backend: &Remote,
    run: &ConcurrentRun<'_>,
    flights: &mut JoinSet<Flight>,
    mut conversation: Conversation,
) -> anyhow::Result<()> {
    let prompt = conversation.prompt(&run.items[conversation.item])?;
    let request = backend.request(&prompt, run.config);
    let client = backend.client.clone();
    flights.spawn(async move {
        let arrived = Instant::now();
        let streamed = backend::stream(client, request).await;
        (conversation, arrived, streamed)
    });
    Ok(())
}

impl Conversation {
    fn new(item: usize) -> Self {
        Self {
            item,
            turn: 0,
            messages: Vec::new(),
        }
    }

    /// The prompt of the next turn of `item` (this conversation's item).
    fn prompt(&mut self, item: &Item) -> anyhow::Result<PromptInput> {
        item.prompt(self.turn, &mut self.messages)
            .with_context(|| format!("{} has no turn {}", item.id, self.turn + 1))
    }

    /// What runs after this conversation's turn ended: its next turn, or the first turn of
    /// the next item `waiting`.
    fn next(mut self, item: &Item, waiting: &mut std::ops::Range<usize>) -> Option<Self> {
        self.turn += 1;
        if self.turn < item.turns.len() {
            Some(self)
        } else {
            waiting.next().map(Conversation::new)
        }
    }

    /// Its turn in `run`, for errors: `id turn 2 (ngram) at concurrency 4`.
    fn name(&self, run: &ConcurrentRun<'_>) -> String {
        format!(
            "{} turn {} ({}) at concurrency {}",
            run.items[self.item].id,
            self.turn + 1,
            run.config.name,
            run.concurrency
        )
    }

    /// Adds the model's answer to the turn just run.
    fn answered(&mut self, answer: &str) {
        self.messages.push(ChatMessage::new("assistant", answer));
    }
}

/// Starts `conversation`'s next turn in `scheduler`, with fresh drafters.
fn join<'a>(
    backend: &InProcess,
    run: &ConcurrentRun<'a>,
    scheduler: &mut Scheduler<Request<'a>>,
    mut conversation: Conversation,
) -> anyhow::Result<()> {
    let item = &run.items[conversation.item];
    let prompt = conversation.prompt(item)?;
    let context = || format!("{} turn {}", item.id, conversation.turn + 1);
    let tokens = backend.tokenize(&prompt).with_context(context)?;
    let (generation, drafters) = backend.prepare(run.config)?;
    let kinds = drafters.iter().map(|d| d.kind().to_string()).collect();
    let arrived = Instant::now();
    let session =
        Session::new(&backend.loaded.model, &tokens, generation, kinds).with_context(context)?;
    scheduler.add(
        session,
        Request {
            conversation,
            drafters,
            arrived,
            deliveries: Vec::new(),
            interrupted: run.interrupted,
        },
    );
    Ok(())
}

/// A request whose output differs from its output at concurrency 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Differing {
    pub id: String,
    /// The turn, from 1.
    pub turn: usize,
    /// The first differing generated token, from 0.
    pub position: usize,
}

/// A config's figures at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub concurrency: usize,
    /// Requests run (each turn of each prompt is one).
    pub requests: usize,
    /// Completion tokens of every request (stop tokens excluded).
    pub tokens: usize,
    /// From the first request's arrival to the last one's end, prompt processing included.
    pub wall_s: f64,
    /// `tokens` over `wall_s`.
    pub aggregate_tokens_per_s: f64,
    /// Median over requests of the tokens after the first over the time from the first
    /// token to the request's end.
    pub request_tokens_per_s_p50: f64,
    /// Time to first token, from the request's arrival in the scheduler.
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Inter-token latency: each delivery's gap from the one before, over its tokens, as
    /// the gap of each of them.
    pub itl_p50_ms: f64,
    pub itl_p99_ms: f64,
    /// Tokens over the time of the steps in which all `concurrency` sessions decoded (in
    /// process only; absent when no step had them all).
    pub decode_tokens_per_s: Option<f64>,
    /// Forward passes, and the mean sessions each carried (in process only).
    pub steps: Option<usize>,
    pub mean_batch: Option<f64>,
    /// Whether every request's output equals its output at concurrency 1.
    pub identical: bool,
    /// Requests whose output differs.
    pub mismatches: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub differing: Vec<Differing>,
    /// With `--repeat N`: the aggregate and the decoding tokens/s of each of the N runs at
    /// this level, in run order (the other figures are those of the run of median
    /// aggregate).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub aggregate_by_run: Vec<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub decode_by_run: Vec<Option<f64>>,
}

impl Figures {
    /// The figures of `traces`, run at `concurrency`, compared with `reference` (the same
    /// requests at concurrency 1).
    pub fn of(concurrency: usize, traces: &Traces, reference: &Traces, items: &[Item]) -> Self {
        let requests = &traces.requests;
        let tokens: usize = requests.iter().map(|r| r.tokens.len()).sum();
        let first = requests.iter().map(|r| r.arrived).min();
        let last = requests.iter().map(|r| r.ended).max();
        let wall_s = match (first, last) {
            (Some(first), Some(last)) => last.duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        let mut rates = Vec::new();
        let mut ttfts = Vec::new();
        let mut gaps = Vec::new();
        for request in requests {
            let Some(&(first_token, _)) = request.deliveries.first() else {
                continue;
            };
            ttfts.push(first_token.duration_since(request.arrived).as_secs_f64());
            let decode_s = request.ended.duration_since(first_token).as_secs_f64();
            if request.tokens.len() > 1 && decode_s > 0.0 {
                rates.push((request.tokens.len() - 1) as f64 / decode_s);
            }
            for pair in request.deliveries.windows(2) {
                let (before, _) = pair[0];
                let (at, count) = pair[1];
                let gap = at.duration_since(before).as_secs_f64() / count.max(1) as f64;
                gaps.extend(std::iter::repeat_n(gap, count));
            }
        }
        let alone: HashMap<(usize, usize), &[TokenId]> = reference
            .requests
            .iter()
            .map(|r| ((r.item, r.turn), r.tokens.as_slice()))
            .collect();
        let mut differing: Vec<Differing> = requests
            .iter()
            .filter_map(|r| {
                let theirs = alone.get(&(r.item, r.turn)).copied().unwrap_or_default();
                let position = first_difference(&r.tokens, theirs)?;
                Some(Differing {
                    id: items.get(r.item).map(|i| i.id.clone()).unwrap_or_default(),
                    turn: r.turn + 1,
                    position,
                })
            })
            .collect();
        differing.sort_by(|a, b| (&a.id, a.turn).cmp(&(&b.id, b.turn)));
        Self {
            concurrency,
            requests: requests.len(),
            tokens,
            wall_s,
            aggregate_tokens_per_s: if wall_s > 0.0 {
                tokens as f64 / wall_s
            } else {
                0.0
            },
            request_tokens_per_s_p50: percentile(&mut rates, 0.5),
            ttft_p50_ms: percentile(&mut ttfts, 0.5) * 1e3,
            ttft_p99_ms: percentile(&mut ttfts, 0.99) * 1e3,
            itl_p50_ms: percentile(&mut gaps, 0.5) * 1e3,
            itl_p99_ms: percentile(&mut gaps, 0.99) * 1e3,
            decode_tokens_per_s: traces
                .passes
                .filter(|p| p.decode_s > 0.0)
                .map(|p| p.decode_tokens as f64 / p.decode_s),
            steps: traces.passes.map(|p| p.steps),
            mean_batch: traces
                .passes
                .filter(|p| p.steps > 0)
                .map(|p| p.step_sessions as f64 / p.steps as f64),
            identical: differing.is_empty(),
            mismatches: differing.len(),
            differing,
            aggregate_by_run: Vec::new(),
            decode_by_run: Vec::new(),
        }
    }

    /// One level's runs as one row: the figures of the run of median aggregate tokens/s,
    /// each run's aggregate and decoding rates, and every output that differed in any run
    /// (the first difference found for each request). `runs` holds at least one.
    pub fn kept(runs: &[Figures]) -> Self {
        let mut order: Vec<&Figures> = runs.iter().collect();
        order.sort_by(|a, b| {
            a.aggregate_tokens_per_s
                .total_cmp(&b.aggregate_tokens_per_s)
        });
        let mut kept = order[(order.len() - 1) / 2].clone();
        if runs.len() < 2 {
            return kept;
        }
        let mut differing: Vec<Differing> = Vec::new();
        for d in runs.iter().flat_map(|f| &f.differing) {
            if !differing.iter().any(|k| (&k.id, k.turn) == (&d.id, d.turn)) {
                differing.push(d.clone());
            }
        }
        differing.sort_by(|a, b| (&a.id, a.turn).cmp(&(&b.id, b.turn)));
        kept.identical = differing.is_empty();
        kept.mismatches = differing.len();
        kept.differing = differing;
        kept.aggregate_by_run = runs.iter().map(|f| f.aggregate_tokens_per_s).collect();
        kept.decode_by_run = runs.iter().map(|f| f.decode_tokens_per_s).collect();
        kept
    }

    /// `ngram at concurrency 4: 41.30 tok/s aggregate (52.10 decoding), 12.10 tok/s per
    /// request, TTFT p50 210 ms, ITL p50 60.2 ms, 3.85 sessions per step, identical`.
    pub fn line(&self, config: &str) -> String {
        let decoding = self
            .decode_tokens_per_s
            .map(|r| format!(" ({r:.2} decoding)"))
            .unwrap_or_default();
        let batch = self
            .mean_batch
            .map(|b| format!("{b:.2} sessions per step, "))
            .unwrap_or_default();
        format!(
            "{config} at concurrency {}: {:.2} tok/s aggregate{decoding}, {:.2} tok/s per \
             request, TTFT p50 {:.0} ms, ITL p50 {:.1} ms, {batch}{}",
            self.concurrency,
            self.aggregate_tokens_per_s,
            self.request_tokens_per_s_p50,
            self.ttft_p50_ms,
            self.itl_p50_ms,
            if self.identical {
                "identical".to_string()
            } else {
                format!("{} DIFFER", self.mismatches)
            }
        )
    }
}

/// Where `ours` first differs from `theirs` (a length difference counts at the shorter's end).
fn first_difference(ours: &[TokenId], theirs: &[TokenId]) -> Option<usize> {
    ours.iter()
        .zip(theirs)
        .position(|(a, b)| a != b)
        .or_else(|| (ours.len() != theirs.len()).then(|| ours.len().min(theirs.len())))
}

/// The `q` quantile by nearest rank (the smallest value with at least that share of values
/// at or below it); 0 for no values.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

/// Runs every config at every level, after the sequential run: level by level, every
/// config at a level before the next level.
pub struct Sweep<'a> {
    /// Ascending, 1 first (see [`levels`]).
    pub levels: &'a [usize],
    /// Runs per config and level (`--repeat`): the levels in ascending order, then in
    /// descending order, and so on, so that a machine whose speed drifts during the sweep
    /// weighs on every level alike.
    pub rounds: usize,
    pub configs: &'a [BenchConfig],
    /// Where the results are written after each run.
    pub out: &'a Path,
    pub interrupted: &'a AtomicBool,
}

impl Sweep<'_> {
    /// Runs the prompts of `items` that every config finished in the sequential run, adding
    /// each config's figures per level to `results`; sets `results.interrupted` when
    /// interrupted.
    pub fn run(
        &self,
        backend: &mut dyn Backend,
        items: &[Item],
        results: &mut Results,
    ) -> anyhow::Result<()> {
        let items: Vec<Item> = items
            .iter()
            .filter(|i| results.items.iter().any(|r| r.id == i.id))
            .cloned()
            .collect();
        let turns: usize = items.iter().map(|i| i.turns.len()).sum();
        let rounds = self.rounds.max(1);
        let runs = turns * self.configs.len() * self.levels.len() * rounds;
        let progress = super::progress_bar(runs as u64);
        let n = self.levels.len();
        // Per config: its outputs at concurrency 1 in the first round (the identity gate's
        // reference), and its figures per level, one per round.
        let mut references: Vec<Option<Traces>> = vec![None; self.configs.len()];
        let mut measured: Vec<Vec<Vec<Figures>>> = vec![vec![Vec::new(); n]; self.configs.len()];
        let plan = (0..rounds).flat_map(|round| {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..n).collect()
            } else {
                (0..n).rev().collect()
            };
            order.into_iter().map(move |level| (round, level))
        });
        for (turn, (round, level)) in plan.enumerate() {
            let concurrency = self.levels[level];
            // The configs one after the other at each level, in alternating order, so that
            // they are compared in neighbouring runs.
            let mut order: Vec<usize> = (0..self.configs.len()).collect();
            if turn % 2 == 1 {
                order.reverse();
            }
            for c in order {
                let config = &self.configs[c];
                let name = if rounds > 1 {
                    format!("{} (run {} of {rounds})", config.name, round + 1)
                } else {
                    config.name.clone()
                };
                progress.set_message(format!("{name} at concurrency {concurrency}"));
                let run = ConcurrentRun {
                    items: &items,
                    config,
                    concurrency,
                    interrupted: self.interrupted,
                    progress: &progress,
                };
                backend.forget_drafter_state();
                let traces = backend
                    .generate_concurrently(&run)
                    .with_context(|| format!("{} at concurrency {concurrency}", config.name))?;
                let Some(traces) = traces else {
                    progress.finish_and_clear();
                    results.interrupted = true;
                    return results.write(self.out);
                };
                let figures = Figures::of(
                    concurrency,
                    &traces,
                    references[c].as_ref().unwrap_or(&traces),
                    &items,
                );
                super::print_line(&progress, figures.line(&name));
                measured[c][level].push(figures);
                if let Some(result) = results.configs.get_mut(&config.name) {
                    result.concurrency = measured[c]
                        .iter()
                        .filter(|runs| !runs.is_empty())
                        .map(|runs| Figures::kept(runs))
                        .collect();
                }
                results.write(self.out)?;
                if references[c].is_none() {
                    references[c] = Some(traces);
                }
            }
        }
        progress.finish_and_clear();
        Ok(())
    }
}

/// Requests under concurrency whose output differs from the same request's at
/// concurrency 1, all configs and levels.
pub fn mismatches(results: &Results) -> usize {
    results
        .configs
        .values()
        .flat_map(|r| &r.concurrency)
        .map(|f| f.mismatches)
        .sum()
}

/// The report's section on concurrency; empty when no config ran at more than one.
pub fn markdown(results: &Results) -> String {
    let runs: Vec<(&String, &Figures)> = results
        .config_names
        .iter()
        .filter_map(|name| results.configs.get(name).map(|r| (name, &r.concurrency)))
        .flat_map(|(name, figures)| figures.iter().map(move |f| (name, f)))
        .collect();
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "\n## Throughput against concurrency\n\nEach config's prompts (every turn a request) \
         c at a time through one step scheduler, a request joining as soon as one ends. \
         Aggregate: all tokens over the wall time, prompt processing included; decoding: the \
         tokens of the steps in which all c sessions decoded (no prompt tokens) over those \
         steps' time (in process only); per request: median of tokens after the first over the time from the first \
         token to the end; TTFT from the request's arrival; ITL: each delivery's gap over its \
         tokens; identical: every output equals the same request's at concurrency 1.\n\n\
         | config | concurrency | aggregate tok/s | decoding tok/s | per-request tok/s \
         | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | sessions per step | identical |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let or_dash = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for (name, f) in &runs {
        out.push_str(&format!(
            "| {name} | {} | {:.2} | {} | {:.2} | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms \
             | {} | {} |\n",
            f.concurrency,
            f.aggregate_tokens_per_s,
            or_dash(f.decode_tokens_per_s),
            f.request_tokens_per_s_p50,
            f.ttft_p50_ms,
            f.ttft_p99_ms,
            f.itl_p50_ms,
            f.itl_p99_ms,
            or_dash(f.mean_batch),
            if f.identical {
                "yes".to_string()
            } else {
                format!("**no: {} differ**", f.mismatches)
            }
        ));
    }
    let repeated: Vec<String> = runs
        .iter()
        .filter(|(_, f)| !f.aggregate_by_run.is_empty())
        .map(|(name, f)| {
            let aggregate: Vec<String> = f
                .aggregate_by_run
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect();
            let decoding: Vec<String> = f.decode_by_run.iter().map(|&r| or_dash(r)).collect();
            let (aggregate, decoding) = (aggregate.join(", "), decoding.join(", "));
            format!(
                "- {name} at concurrency {}: aggregate {aggregate}; decoding {decoding}\n",
                f.concurrency
            )
        })
        .collect();
    if !repeated.is_empty() {
        out.push_str(
            "\nEach level ran several times, the levels ascending then descending in turn; a \
             row above is the run of median aggregate tok/s. Tokens/s of every run, in run \
             order:\n\n",
        );
        out.extend(repeated);
    }
    let differing: Vec<String> = runs
        .iter()
        .flat_map(|(name, f)| {
            f.differing.iter().map(move |d| {
                format!(
                    "- `{}`, config {name} at concurrency {}: turn {}, first differing token at \
                     position {}\n",
                    d.id.replace('`', "'"),
                    f.concurrency,
                    d.turn,
                    d.position
                )
            })
        })
        .collect();
    if !differing.is_empty() {
        out.push_str(&format!(
            "\n**{} outputs differ from the same request at concurrency 1:**\n\n",
            differing.len()
        ));
        out.extend(differing);
    }
    out.push_str("\n![aggregate tokens/s against concurrency](concurrency.svg)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn item(id: &str) -> Item {
        Item {
            id: id.into(),
            category: "c".into(),
            format: Format::Completion,
            turns: vec!["p".into()],
            system: None,
            suffix: None,
        }
    }

    /// A request of `item` arriving at `arrived` ms after `t0`, with deliveries of `(ms,
    /// tokens)`, ending at `ended` ms.
    fn trace(t0: Instant, item: usize, deliveries: &[(u64, usize)], ended: u64) -> Trace {
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let count: usize = deliveries.iter().map(|&(_, n)| n).sum();
        Trace {
            item,
            turn: 0,
            arrived: t0,
            deliveries: deliveries.iter().map(|&(ms, n)| (at(ms), n)).collect(),
            ended: at(ended),
            tokens: (0..count as u32).collect(),
        }
    }

    #[test]
    fn levels_run_one_first_and_only_when_more_is_asked() {
        assert_eq!(levels(&[1]), Vec::<usize>::new());
        assert_eq!(levels(&[]), Vec::<usize>::new());
        assert_eq!(levels(&[4, 2, 4]), [1, 2, 4]);
        assert_eq!(levels(&[1, 8, 2]), [1, 2, 8]);
        assert!(parse_level("0").unwrap_err().contains("at least 1"));
        assert!(parse_level("")
            .unwrap_err()
            .contains("not a positive integer"));
        assert!(parse_level("two")
            .unwrap_err()
            .contains("not a positive integer"));
        assert_eq!(parse_level(" 3"), Ok(3));
    }

    #[test]
    fn figures_follow_each_request_as_its_client_saw_it() {
        let t0 = Instant::now();
        // Request 0: first token at 100 ms, then 3 tokens at 130 ms and 1 at 140 ms, ends
        // at 150 ms. Request 1: first token at 200 ms, 1 at 260 ms, ends at 400 ms.
        let traces = Traces {
            requests: vec![
                trace(t0, 0, &[(100, 1), (130, 3), (140, 1)], 150),
                trace(t0, 1, &[(200, 1), (260, 1)], 400),
            ],
            passes: Some(Passes {
                steps: 8,
                step_sessions: 12,
                decode_tokens: 5,
                decode_s: 0.5,
            }),
        };
        let items = [item("a"), item("b")];
        let figures = Figures::of(2, &traces, &traces, &items);
        assert_eq!((figures.requests, figures.tokens), (2, 7));
        assert!((figures.wall_s - 0.4).abs() < 1e-9);
        assert!((figures.aggregate_tokens_per_s - 17.5).abs() < 1e-6);
        // 4 tokens in 50 ms and 1 in 200 ms: 80 and 5 tokens/s; nearest rank median 5.
        assert!((figures.request_tokens_per_s_p50 - 5.0).abs() < 1e-6);
        assert!((figures.ttft_p50_ms - 100.0).abs() < 1e-6);
        assert!((figures.ttft_p99_ms - 200.0).abs() < 1e-6);
        // Gaps: 10, 10, 10 (30 ms over 3 tokens), 10, 60 ms.
        assert!((figures.itl_p50_ms - 10.0).abs() < 1e-6);
        assert!((figures.itl_p99_ms - 60.0).abs() < 1e-6);
        assert_eq!(figures.mean_batch, Some(1.5));
        assert_eq!(figures.decode_tokens_per_s, Some(10.0));
        assert!(figures.identical);
        assert_eq!(figures.mismatches, 0);
    }

    #[test]
    fn repeated_runs_keep_the_median_and_every_difference() {
        let t0 = Instant::now();
        let alone = Traces {
            requests: vec![trace(t0, 0, &[(10, 4)], 100)],
            ..Traces::default()
        };
        let run = |ended: u64, changed: bool| {
            let mut traces = alone.clone();
            traces.requests[0].ended = t0 + Duration::from_millis(ended);
            if changed {
                traces.requests[0].tokens[1] = 99;
            }
            Figures::of(2, &traces, &alone, &[item("a")])
        };
        // Four tokens over 0.1, 0.4 and 0.2 s: 40, 10 and 20 tokens/s; the second run's
        // output differs from the one alone.
        let runs = [run(100, false), run(400, true), run(200, false)];
        let kept = Figures::kept(&runs);
        assert!((kept.aggregate_tokens_per_s - 20.0).abs() < 1e-6);
        let rates: Vec<f64> = kept.aggregate_by_run.iter().map(|r| r.round()).collect();
        assert_eq!(rates, [40.0, 10.0, 20.0]);
        assert_eq!(kept.decode_by_run, [None, None, None]);
        assert!(!kept.identical, "a difference in any run counts");
        assert_eq!(kept.mismatches, 1);
        assert_eq!(kept.differing[0].position, 1);
        // One run is kept as it is.
        let one = Figures::kept(&runs[..1]);
        assert!(one.identical && one.aggregate_by_run.is_empty());
    }

    #[test]
    fn an_output_that_differs_from_the_one_alone_is_caught() {
        let t0 = Instant::now();
        let alone = Traces {
            requests: vec![
                trace(t0, 0, &[(1, 1), (2, 3)], 3),
                trace(t0, 1, &[(1, 2)], 3),
            ],
            ..Traces::default()
        };
        let mut batched = alone.clone();
        batched.requests.reverse();
        batched.requests[1].tokens[2] = 99;
        let figures = Figures::of(2, &batched, &alone, &[item("a"), item("b")]);
        assert!(!figures.identical);
        assert_eq!(figures.mismatches, 1);
        let expected = Differing {
            id: "a".into(),
            turn: 1,
            position: 2,
        };
        assert_eq!(figures.differing, [expected]);
        assert_eq!(first_difference(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(first_difference(&[1, 2], &[1, 2]), None);
    }
}
