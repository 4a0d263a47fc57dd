//! The verifier's step scheduler on a thread of its own: it owns the model's compute and
//! every running session (with its KV cache); sessions join through a channel and leave
//! when they end, between steps. Each step is one forward pass over all of them.

use crate::session::{self, RemoteClient};
use sibyl_decode::{Scheduler, SchedulerConfig, Session};
use sibyl_engine::LoadedModel;
use sibyl_telemetry::metrics;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

/// How long the scheduler sleeps when no session could take part in a step (every reader
/// is behind) before it looks again.
const IDLE_POLL: Duration = Duration::from_millis(2);

/// A session ready to join.
pub(crate) struct Join {
    pub(crate) session: Session,
    pub(crate) client: RemoteClient,
}

/// The handle the service sends sessions to.
pub(crate) struct SchedulerHandle {
    joins: Sender<Join>,
}

impl SchedulerHandle {
    /// Starts the scheduler thread for `loaded`; it runs until the handle is dropped and
    /// its last session has ended.
    pub(crate) fn spawn(
        loaded: Arc<LoadedModel>,
        config: SchedulerConfig,
        runtime: tokio::runtime::Handle,
    ) -> std::io::Result<Self> {
        let (joins, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("sibyl-scheduler".into())
            .spawn(move || run(&loaded, config, &receiver, &runtime))?;
        Ok(Self { joins })
    }

    /// Hands a session to the scheduler; gives it back if the scheduler has stopped.
    pub(crate) fn join(&self, join: Join) -> Result<(), Box<Join>> {
        self.joins.send(join).map_err(|e| Box::new(e.0))
    }
}

fn run(
    loaded: &LoadedModel,
    config: SchedulerConfig,
    joins: &Receiver<Join>,
    runtime: &tokio::runtime::Handle,
) {
    let mut scheduler: Scheduler<RemoteClient> = Scheduler::new(config);
    let m = metrics::verifier();
    let mut evicted = 0;
    loop {
        if scheduler.is_empty() {
            match joins.recv() {
                Ok(join) => scheduler.add(join.session, join.client),
                Err(_) => return,
            }
        }
        while let Ok(join) = joins.try_recv() {
            scheduler.add(join.session, join.client);
        }
        let span = tracing::info_span!(
            "batch_step",
            batch_size = tracing::field::Empty,
            rows = tracing::field::Empty,
            prompt_tokens = tracing::field::Empty,
        );
        let (finished, stats) = span.in_scope(|| scheduler.step(&loaded.model));
        if stats.sessions > 0 {
            span.record("batch_size", stats.sessions);
            span.record("rows", stats.rows);
            span.record("prompt_tokens", stats.prompt_tokens);
            m.batch_sessions.observe(stats.sessions as f64);
            m.batch_rows.observe(stats.rows as f64);
            m.batch_prompt_tokens.observe(stats.prompt_tokens as f64);
            m.batch_draft_tokens.observe(stats.draft_tokens as f64);
            m.prompt_tokens.inc_by(stats.prompt_tokens as u64);
        }
        m.prefix_cache_tokens.inc_by(stats.cached_tokens as u64);
        let prefixes = scheduler.prefix_cache();
        m.prefix_cache_bytes.set(prefixes.bytes() as i64);
        m.prefix_cache_evictions
            .inc_by(prefixes.evictions() - evicted);
        evicted = prefixes.evictions();
        for done in finished {
            session::finish(done.client, done.outcome, runtime);
        }
        if stats.sessions == 0 && !scheduler.is_empty() {
            match joins.recv_timeout(IDLE_POLL) {
                Ok(join) => scheduler.add(join.session, join.client),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    for done in scheduler.cancel_all() {
                        session::finish(done.client, done.outcome, runtime);
                    }
                    return;
                }
            }
        }
    }
}
