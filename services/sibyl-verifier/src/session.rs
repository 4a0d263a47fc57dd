//! One generation on a blocking thread: prompt, then gather drafts, verify, emit, repeat.

use crate::shared::{LinkStatus, Shared};
use sibyl_decode::{
    FinishReason, GenerateError, GenerationConfig, GenerationReport, Session, SharedLearning,
};
use sibyl_engine::LoadedModel;
use sibyl_proto::v1::{self as pb, verify_event::Event};
use sibyl_spec::{InboxLimits, TokenId};
use sibyl_telemetry::metrics::{self, GaugeShare};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::Status;

/// The loaded model and the lock that makes sessions take turns on the compute threads.
pub(crate) struct Engine {
    pub(crate) loaded: LoadedModel,
    pub(crate) compute: Mutex<()>,
    /// What steps of this model cost, learned from every session (adaptive tree size).
    pub(crate) learning: SharedLearning,
}

/// A checked request, ready to run.
pub(crate) struct Plan {
    pub(crate) prompt: Vec<TokenId>,
    pub(crate) config: GenerationConfig,
    /// Kind of each drafter, by link index.
    pub(crate) drafter_kinds: Vec<String>,
    pub(crate) step_wait: Duration,
    /// What each drafter's blocks are held to.
    pub(crate) inbox: InboxLimits,
    /// Whether the summary lists each step's duration.
    pub(crate) step_times: bool,
}

pub(crate) type Events = mpsc::Sender<Result<pb::VerifyEvent, Status>>;

/// Runs the session to its end; errors go to the client as the stream's status.
pub(crate) fn run(
    engine: &Engine,
    plan: Plan,
    shared: &Shared,
    accepted_len: watch::Sender<usize>,
    events: &Events,
) {
    let step_times = plan.step_times;
    let outcome = steps(engine, plan, shared, &accepted_len, events);
    drop(accepted_len);
    let sessions = &metrics::verifier().sessions;
    let message = match outcome {
        Ok((report, waits)) => {
            let outcome = match report.finish_reason {
                FinishReason::Cancelled => "cancelled",
                FinishReason::Stop | FinishReason::Length => "completed",
            };
            sessions.with_label_values(&[outcome]).inc();
            Ok(pb::VerifyEvent {
                event: Some(Event::Summary(summary(&report, &waits, shared, step_times))),
            })
        }
        // The request was checked before the session started: what fails now is ours.
        Err(error) => {
            sessions.with_label_values(&["failed"]).inc();
            tracing::error!(%error, "session failed");
            Err(Status::internal(format!("the generation failed: {error}")))
        }
    };
    let _ = events.blocking_send(message);
}

fn steps(
    engine: &Engine,
    plan: Plan,
    shared: &Shared,
    accepted_len: &watch::Sender<usize>,
    events: &Events,
) -> Result<(GenerationReport, Vec<Duration>), GenerateError> {
    let model = &engine.loaded.model;
    // Whether steps gather drafts at all (no drafters, or a zero budget: plain decoding).
    let gathers = plan.config.draft_budget > 0 && !plan.drafter_kinds.is_empty();
    let mut recorder = StepRecorder::new(&plan.drafter_kinds);
    let mut session = Session::new(model, &plan.prompt, plan.config, plan.drafter_kinds)?;
    let mut step = {
        let _span = tracing::info_span!("prefill", prompt_tokens = plan.prompt.len()).entered();
        let _turn = engine.compute.lock().unwrap_or_else(|e| e.into_inner());
        session.prefill(&mut || events.is_closed())?
    };
    metrics::verifier()
        .prompt_tokens
        .inc_by(plan.prompt.len() as u64);
    recorder.record(&session, &step.tokens);
    let mut waits = Vec::new();
    loop {
        if !step.tokens.is_empty() {
            shared.extend(&step.tokens);
            accepted_len.send_replace(session.context().len());
            let event = pb::VerifyEvent {
                event: Some(Event::Tokens(pb::AcceptedTokens {
                    tokens: step.tokens.clone(),
                })),
            };
            if events.blocking_send(Ok(event)).is_err() {
                return Ok((session.finish(FinishReason::Cancelled), waits));
            }
        }
        if let Some(reason) = step.finish {
            return Ok((session.finish(reason), waits));
        }
        if events.is_closed() {
            return Ok((session.finish(FinishReason::Cancelled), waits));
        }
        let proposals = if gathers && session.draft_depth() > 0 {
            let (proposals, waited) = shared.gather(plan.step_wait);
            waits.push(waited);
            proposals
        } else {
            Vec::new()
        };
        let span = tracing::info_span!(
            "verify_step",
            proposals = proposals.len(),
            accepted = tracing::field::Empty,
        );
        let _entered = span.enter();
        let _turn = engine.compute.lock().unwrap_or_else(|e| e.into_inner());
        step = session.step(proposals)?;
        span.record("accepted", step.tokens.len());
        recorder.record(&session, &step.tokens);
    }
}

/// Feeds each step into the verifier's metrics: step count and duration, tokens, draft
/// tokens per drafter kind (as the increase since the last step), KV-cache bytes.
struct StepRecorder {
    kinds: Vec<String>,
    counted: Vec<(u64, u64)>,
    cache: GaugeShare,
}

impl StepRecorder {
    fn new(kinds: &[String]) -> Self {
        Self {
            kinds: kinds.to_vec(),
            counted: vec![(0, 0); kinds.len()],
            cache: GaugeShare::new(&metrics::verifier().kv_cache_bytes),
        }
    }

    fn record(&mut self, session: &Session<'_>, tokens: &[TokenId]) {
        let m = metrics::verifier();
        m.steps.inc();
        m.generated_tokens.inc_by(tokens.len() as u64);
        m.accepted_tokens_per_step.observe(tokens.len() as f64);
        if let Some(time) = session.last_step_time() {
            m.step_duration.observe(time.as_secs_f64());
        }
        for ((kind, counted), now) in self
            .kinds
            .iter()
            .zip(&mut self.counted)
            .zip(session.drafter_counts())
        {
            m.draft_tokens_proposed
                .with_label_values(&[kind.as_str()])
                .inc_by(now.0 - counted.0);
            m.draft_tokens_accepted
                .with_label_values(&[kind.as_str()])
                .inc_by(now.1 - counted.1);
            *counted = now;
        }
        self.cache
            .set(i64::try_from(session.cache_bytes()).unwrap_or(i64::MAX));
    }
}

fn summary(
    report: &GenerationReport,
    waits: &[Duration],
    shared: &Shared,
    step_times: bool,
) -> pb::VerifySummary {
    let state = shared.lock();
    let drafters = report
        .drafters
        .iter()
        .zip(&state.links)
        .map(|(drafter, link)| pb::DrafterStats {
            kind: drafter.kind.clone(),
            endpoint: link.endpoint.clone(),
            proposed_tokens: drafter.proposed,
            accepted_tokens: drafter.accepted,
            blocks_received: link.inbox.received() + link.malformed,
            blocks_dropped: link.inbox.dropped() + link.malformed,
            state: match link.status {
                LinkStatus::Connected => pb::DrafterState::Connected,
                LinkStatus::Refused => pb::DrafterState::Refused,
                LinkStatus::Connecting => pb::DrafterState::Connecting,
                LinkStatus::Failed => pb::DrafterState::Failed,
            } as i32,
            error: link.error.clone(),
        })
        .collect();
    let mut sorted = waits.to_vec();
    sorted.sort();
    let percentile = |q: f64| {
        if sorted.is_empty() {
            Duration::ZERO
        } else {
            sorted[((sorted.len() - 1) as f64 * q).round() as usize]
        }
    };
    pb::VerifySummary {
        finish_reason: finish_reason(report.finish_reason) as i32,
        prompt_tokens: count(report.prompt_tokens),
        completion_tokens: count(report.tokens.len()),
        steps: count(report.steps),
        drafters,
        seed: report.seed,
        prompt_time: Some(sibyl_proto::duration(report.prompt_time)),
        decode_time: Some(sibyl_proto::duration(report.decode_time)),
        draft_wait_p50: Some(sibyl_proto::duration(percentile(0.5))),
        draft_wait_p99: Some(sibyl_proto::duration(percentile(0.99))),
        step_micros: if step_times {
            report.step_times.iter().map(|t| micros(*t)).collect()
        } else {
            Vec::new()
        },
    }
}

fn micros(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub(crate) fn finish_reason(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}
