//! One session's side of the verifier's scheduler: where its drafts come from (its drafter
//! links), where its tokens go (the client's stream), and its report at the end.

use crate::shared::{LinkStatus, Shared};
use sibyl_decode::{
    Client, FinishReason, GenerateError, GenerationConfig, GenerationReport, Session,
};
use sibyl_ngram::PredictionDrafter;
use sibyl_proto::v1::{self as pb, verify_event::Event};
use sibyl_spec::{DrafterId, InboxLimits, Proposal, TokenConstraint, TokenId};
use sibyl_telemetry::metrics::{self, GaugeShare};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Status;

/// A checked request, ready to run.
pub(crate) struct Plan {
    pub(crate) prompt: Vec<TokenId>,
    pub(crate) config: GenerationConfig,
    /// Kind of each drafter, by link index.
    pub(crate) drafter_kinds: Vec<String>,
    /// What each drafter's blocks are held to.
    pub(crate) inbox: InboxLimits,
    /// Whether the summary lists each step's duration.
    pub(crate) step_times: bool,
    /// What the output is held to (a JSON grammar, a least length), in order.
    pub(crate) constraints: Vec<Box<dyn TokenConstraint + Sync>>,
    /// The prompt's log-probabilities, with this many most likely tokens each.
    pub(crate) prompt_logprobs: Option<usize>,
    /// The session's own drafter of the client's predicted output, if it sent one (its id
    /// follows the links').
    pub(crate) prediction: Option<PredictionDrafter>,
}

pub(crate) type Events = mpsc::Sender<Result<pb::VerifyEvent, Status>>;

/// What a session holds while it runs and gives back when it ends (a session slot, its
/// KV-cache reservation, gauges).
pub(crate) type Held = Box<dyn std::any::Any + Send>;

/// What a session has outside the scheduler: its drafter links, the stream to its caller,
/// and what admission reserved for it.
pub(crate) struct Remote {
    pub(crate) shared: Arc<Shared>,
    pub(crate) accepted_len: watch::Sender<usize>,
    pub(crate) events: Events,
    /// Whether steps gather drafts at all (no drafters, or a zero budget: plain decoding).
    pub(crate) gathers: bool,
    pub(crate) idle_timeout: Duration,
    pub(crate) step_times: bool,
    pub(crate) links: Vec<JoinHandle<()>>,
    /// Drafts of the client's predicted output, made here each step (after the links').
    pub(crate) prediction: Option<PredictionDrafter>,
    pub(crate) span: tracing::Span,
    pub(crate) held: Held,
}

/// A session's client in the scheduler: its [`Remote`] side, and what the stream could not
/// take yet.
pub(crate) struct RemoteClient {
    remote: Remote,
    /// Events the stream had no room for yet, oldest first.
    pending: VecDeque<pb::VerifyEvent>,
    /// Since when the stream has had no room.
    stalled_since: Option<Instant>,
    timed_out: bool,
    waits: Vec<Duration>,
    recorder: StepRecorder,
    /// The `verify_step` span of the step under way, a child of the session's span so that
    /// it stays in the generation's trace (the batched pass has a `batch_step` span).
    step: Option<tracing::Span>,
    /// Whether the prompt's log-probabilities went out (with the first tokens), and those
    /// that must go in the summary instead (no tokens went out).
    prompt_logprobs_sent: bool,
    unsent_prompt_logprobs: Vec<pb::TokenLogprobs>,
}

impl RemoteClient {
    pub(crate) fn new(remote: Remote, kinds: &[String]) -> Self {
        Self {
            remote,
            pending: VecDeque::new(),
            stalled_since: None,
            timed_out: false,
            waits: Vec::new(),
            recorder: StepRecorder::new(kinds),
            step: None,
            prompt_logprobs_sent: false,
            unsent_prompt_logprobs: Vec::new(),
        }
    }

    /// Stops the session's drafter links (a session that never ran).
    pub(crate) fn abort_links(&self) {
        for link in &self.remote.links {
            link.abort();
        }
    }

    /// Sends what the stream has room for.
    fn flush(&mut self) {
        while let Some(event) = self.pending.pop_front() {
            match self.remote.events.try_send(Ok(event)) {
                Ok(()) => {}
                Err(TrySendError::Full(Ok(event))) => {
                    self.pending.push_front(event);
                    self.stalled_since.get_or_insert_with(Instant::now);
                    return;
                }
                Err(_) => return,
            }
        }
        self.stalled_since = None;
    }
}

impl Client for RemoteClient {
    fn cancelled(&mut self) -> bool {
        if self.remote.events.is_closed() {
            return true;
        }
        self.flush();
        let idle = self
            .stalled_since
            .is_some_and(|since| since.elapsed() >= self.remote.idle_timeout);
        if idle && !self.timed_out {
            self.timed_out = true;
            metrics::verifier().idle_timeouts.inc();
            let _entered = self.remote.span.enter();
            tracing::warn!(
                idle_timeout_ms = self.remote.idle_timeout.as_millis() as u64,
                "the client did not read its stream; its session is ended"
            );
        }
        self.timed_out
    }

    fn ready(&mut self) -> bool {
        self.flush();
        self.pending.is_empty()
    }

    fn drafts(
        &mut self,
        session: &mut Session,
        deadline: Instant,
    ) -> Vec<(DrafterId, Vec<Proposal>)> {
        self.step = Some(tracing::info_span!(
            parent: &self.remote.span,
            "verify_step",
            accepted = tracing::field::Empty,
        ));
        if !self.remote.gathers || session.draft_depth() == 0 {
            return Vec::new();
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        let (mut proposals, waited) = self.remote.shared.gather(wait);
        self.waits.push(waited);
        if let Some(prediction) = &mut self.remote.prediction {
            let branches = prediction.lookup(session.context(), session.draft_depth());
            if !branches.is_empty() {
                proposals.push((DrafterId(self.remote.links.len()), branches));
            }
        }
        proposals
    }

    fn deliver(&mut self, session: &Session, tokens: &[TokenId]) -> ControlFlow<()> {
        if let Some(step) = self.step.take() {
            step.record("accepted", tokens.len());
        }
        self.remote.shared.extend(tokens);
        self.remote
            .accepted_len
            .send_replace(session.context().len());
        self.recorder.record(session, tokens);
        let prompt_logprobs = match self.prompt_logprobs_sent {
            true => Vec::new(),
            false => session.prompt_logprobs().iter().map(Into::into).collect(),
        };
        self.prompt_logprobs_sent = true;
        self.pending.push_back(pb::VerifyEvent {
            event: Some(Event::Tokens(pb::AcceptedTokens {
                tokens: tokens.to_vec(),
                logprobs: session.step_logprobs().iter().map(Into::into).collect(),
                prompt_logprobs,
            })),
        });
        self.flush();
        if self.remote.events.is_closed() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn ended(&mut self, session: &Session) {
        if !self.prompt_logprobs_sent {
            self.unsent_prompt_logprobs =
                session.prompt_logprobs().iter().map(Into::into).collect();
        }
    }
}

/// Ends a session: stops its drafter links, gives back what it held and hands its last
/// events (the summary, or the error) to a task that delivers them, so that a slow reader
/// never holds up the scheduler.
pub(crate) fn finish(
    mut client: RemoteClient,
    outcome: Result<GenerationReport, GenerateError>,
    runtime: &tokio::runtime::Handle,
) {
    for link in client.remote.links.drain(..) {
        link.abort();
    }
    drop(client.remote.accepted_len);
    let sessions = &metrics::verifier().sessions;
    let last = match outcome {
        Ok(_) if client.timed_out => {
            sessions.with_label_values(&["cancelled"]).inc();
            Err(Status::deadline_exceeded(format!(
                "the client did not read its stream for {} ms; the session was ended",
                client.remote.idle_timeout.as_millis()
            )))
        }
        Ok(report) => {
            let outcome = match report.finish_reason {
                FinishReason::Cancelled => "cancelled",
                FinishReason::Stop | FinishReason::Length => "completed",
            };
            sessions.with_label_values(&[outcome]).inc();
            let summary = pb::VerifySummary {
                prompt_logprobs: std::mem::take(&mut client.unsent_prompt_logprobs),
                ..summary(
                    &report,
                    &client.waits,
                    &client.remote.shared,
                    client.remote.step_times,
                )
            };
            Ok(pb::VerifyEvent {
                event: Some(Event::Summary(summary)),
            })
        }
        // The request was checked before the session started: what fails now is ours.
        Err(error) => {
            sessions.with_label_values(&["failed"]).inc();
            let _entered = client.remote.span.enter();
            tracing::error!(%error, "session failed");
            Err(Status::internal(format!("the generation failed: {error}")))
        }
    };
    // Its KV-cache bytes leave the gauge before the slot is given back.
    drop(client.recorder);
    drop(client.remote.held);
    let mut pending: Vec<Result<pb::VerifyEvent, Status>> =
        client.pending.into_iter().map(Ok).collect();
    pending.push(last);
    let events = client.remote.events;
    let timeout = client.remote.idle_timeout;
    runtime.spawn(async move {
        for event in pending {
            match tokio::time::timeout(timeout, events.send(event)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    });
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

    fn record(&mut self, session: &Session, tokens: &[TokenId]) {
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
    // The links' drafters, then the session's own (the predicted output), in process.
    let drafters = report
        .drafters
        .iter()
        .enumerate()
        .map(|(i, drafter)| {
            let mut stats = pb::DrafterStats {
                kind: drafter.kind.clone(),
                proposed_tokens: drafter.proposed,
                accepted_tokens: drafter.accepted,
                state: pb::DrafterState::Connected as i32,
                ..Default::default()
            };
            if let Some(link) = state.links.get(i) {
                stats.endpoint = link.endpoint.clone();
                stats.blocks_received = link.inbox.received() + link.malformed;
                stats.blocks_dropped = link.inbox.dropped() + link.malformed;
                stats.state = match link.status {
                    LinkStatus::Connected => pb::DrafterState::Connected,
                    LinkStatus::Refused => pb::DrafterState::Refused,
                    LinkStatus::Connecting => pb::DrafterState::Connecting,
                    LinkStatus::Failed => pb::DrafterState::Failed,
                } as i32;
                stats.error = link.error.clone();
            }
            stats
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
        cached_tokens: count(report.cached_tokens),
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
        // Set by `finish` where no tokens event carried them.
        prompt_logprobs: Vec::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn client(events: Events, idle_timeout: Duration) -> RemoteClient {
        let limits = InboxLimits {
            vocab_size: 16,
            max_branch_tokens: 4,
            max_branches: 1,
            capacity: 1,
        };
        RemoteClient::new(
            Remote {
                shared: Arc::new(Shared::new(vec![1], 0, limits)),
                accepted_len: watch::channel(1).0,
                events,
                gathers: false,
                prediction: None,
                idle_timeout,
                step_times: false,
                links: Vec::new(),
                span: tracing::Span::none(),
                held: Box::new(()),
            },
            &[],
        )
    }

    fn session() -> Session {
        let model = sibyl_engine::testkit::tiny_model(&Default::default()).unwrap();
        Session::new(
            &model,
            &[1],
            GenerationConfig::plain(8, Vec::new()),
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_reader_that_falls_behind_holds_only_its_own_session_then_loses_it() {
        let (events, mut receiver) = mpsc::channel(1);
        let mut client = client(events, Duration::from_millis(30));
        let session = session();
        let before = metrics::verifier().idle_timeouts.get();
        // The stream takes one event; the second waits, and the session is not ready.
        assert!(client.deliver(&session, &[3]).is_continue());
        assert!(client.deliver(&session, &[4]).is_continue());
        assert!(!client.ready());
        assert!(!client.cancelled());
        // Once the reader takes an event, the one that waited goes out and the session runs.
        assert!(receiver.try_recv().is_ok());
        assert!(client.ready());
        // A reader that stops for the idle timeout loses the session, counted once.
        assert!(client.deliver(&session, &[5]).is_continue());
        std::thread::sleep(Duration::from_millis(40));
        assert!(client.cancelled());
        assert!(client.cancelled());
        assert_eq!(metrics::verifier().idle_timeouts.get(), before + 1);
    }

    #[test]
    fn a_reader_that_left_cancels_the_session() {
        let (events, receiver) = mpsc::channel(4);
        let mut client = client(events, Duration::from_secs(60));
        assert!(!client.cancelled());
        drop(receiver);
        assert!(client.cancelled());
        assert!(client.deliver(&session(), &[3]).is_break());
    }
}
