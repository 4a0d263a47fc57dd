//! What keeps a server's suffix index: its snapshot file (restored at start, written at an
//! interval and at shutdown), its metrics, and, in a drafter role, its peers.

use clap::Args;
use sibyl_drafter::Peers;
use sibyl_retrieval::{SuffixDrafter, SuffixIndex, TokenizerId};
use sibyl_spec::{Drafter, Proposal, TokenId};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often the index's metrics are brought up to date.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// A replica that starts empty asks its peers this many times for their index...
const CATCH_UP_ATTEMPTS: usize = 5;
/// ...this long apart.
const CATCH_UP_RETRY: Duration = Duration::from_secs(3);

/// The suffix index's snapshot.
#[derive(Debug, Clone, Default, Args)]
pub struct SuffixStateArgs {
    /// File the suffix drafter's index is restored from at start and saved to (at
    /// --suffix-snapshot-interval when it changed, and at shutdown). A damaged snapshot,
    /// or one of another tokenizer, is refused with a warning and the index starts empty.
    #[arg(long, env = "SIBYL_SUFFIX_SNAPSHOT")]
    pub suffix_snapshot: Option<PathBuf>,

    /// Seconds between snapshot writes.
    #[arg(long, env = "SIBYL_SUFFIX_SNAPSHOT_INTERVAL", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub suffix_snapshot_interval: u64,
}

/// A role's suffix index and what keeps it.
#[derive(Debug, Clone)]
pub struct SuffixState {
    pub index: Arc<SuffixIndex>,
    snapshot: Option<PathBuf>,
    interval: Duration,
    /// Set by the role's loader, once the model's tokenizer is known.
    tokenizer: Arc<OnceLock<TokenizerId>>,
    /// The index's count of added documents at the last snapshot (or restore).
    saved: Arc<AtomicU64>,
    /// Documents restored from the snapshot at start (set once loaded).
    restored: Arc<OnceLock<usize>>,
}

impl SuffixState {
    pub fn new(index: Arc<SuffixIndex>, args: &SuffixStateArgs) -> Self {
        Self {
            index,
            snapshot: args.suffix_snapshot.clone(),
            interval: Duration::from_secs(args.suffix_snapshot_interval),
            tokenizer: Arc::default(),
            saved: Arc::default(),
            restored: Arc::default(),
        }
    }

    /// A session's drafter, its lookups timed into the metrics.
    pub fn drafter(&self) -> Box<dyn Drafter> {
        Box::new(Timed(SuffixDrafter::new(self.index.clone())))
    }

    /// Called by the loader once the tokenizer is known: restores the snapshot, if there is
    /// one (once; a loader that runs again changes nothing). A snapshot that cannot be used
    /// is reported, and the index starts empty.
    pub fn loaded(&self, tokenizer: TokenizerId) {
        if self.tokenizer.set(tokenizer).is_err() {
            return;
        }
        let restored = self.restore(tokenizer);
        let _ = self.restored.set(restored);
    }

    /// Restores the snapshot, if any; says how many documents it held.
    fn restore(&self, tokenizer: TokenizerId) -> usize {
        let Some(path) = &self.snapshot else {
            return 0;
        };
        if !path.exists() {
            tracing::info!(snapshot = %path.display(), "no suffix index snapshot yet; starting empty");
            return 0;
        }
        let started = Instant::now();
        match self.index.restore(path, tokenizer) {
            Ok(documents) => {
                let stats = self.index.stats();
                self.saved.store(stats.added, Ordering::Relaxed);
                tracing::info!(
                    snapshot = %path.display(),
                    documents,
                    tokens = stats.tokens,
                    ms = started.elapsed().as_millis() as u64,
                    "suffix index restored"
                );
                documents
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    "suffix index snapshot refused; starting with an empty index (the next \
                     snapshot replaces it)"
                );
                0
            }
        }
    }

    /// Writes the snapshot if the index changed since the last one (blocking).
    pub fn save(&self) {
        let (Some(path), Some(&tokenizer)) = (&self.snapshot, self.tokenizer.get()) else {
            return;
        };
        if self.index.stats().added == self.saved.load(Ordering::Relaxed) {
            return;
        }
        let snapshots = &sibyl_telemetry::metrics::drafter().suffix_snapshots;
        let started = Instant::now();
        match self.index.save(path, tokenizer) {
            Ok(saved) => {
                self.saved.store(saved.added, Ordering::Relaxed);
                snapshots.with_label_values(&["saved"]).inc();
                tracing::debug!(
                    snapshot = %path.display(),
                    documents = saved.documents,
                    tokens = saved.tokens,
                    ms = started.elapsed().as_millis() as u64,
                    "suffix index saved"
                );
            }
            Err(error) => {
                snapshots.with_label_values(&["failed"]).inc();
                tracing::warn!(%error, "suffix index snapshot not written");
            }
        }
    }

    /// Once the role has loaded, if no snapshot gave it documents (a new replica): fills
    /// the index from the first of `peers` that sends what it holds, retrying a few times
    /// while none can (they may be starting too).
    pub fn spawn_catch_up(&self, service: sibyl_drafter::DraftService, peers: Peers) {
        let state = self.clone();
        tokio::spawn(async move {
            let restored = loop {
                match state.restored.get() {
                    Some(&restored) => break restored,
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            if restored > 0 {
                return;
            }
            for attempt in 0..CATCH_UP_ATTEMPTS {
                match service.catch_up(&peers).await {
                    Ok((peer, documents)) => {
                        tracing::info!(%peer, documents, "suffix index caught up from a peer");
                        return;
                    }
                    Err(reason) if attempt + 1 == CATCH_UP_ATTEMPTS => {
                        tracing::info!(%reason, "suffix index not caught up from a peer; it fills as generations finish");
                    }
                    Err(_) => tokio::time::sleep(CATCH_UP_RETRY).await,
                }
            }
        });
    }

    /// Keeps the metrics up to date and writes the snapshot at its interval, on the
    /// current runtime, until it ends.
    pub fn spawn_upkeep(&self) {
        let state = self.clone();
        tokio::spawn(async move {
            let metrics = sibyl_telemetry::metrics::drafter();
            let mut evicted = 0;
            let mut last_save = Instant::now();
            let mut tick = tokio::time::interval(METRICS_INTERVAL.min(state.interval));
            loop {
                tick.tick().await;
                let stats = state.index.stats();
                metrics.suffix_tokens.set(stats.tokens as i64);
                metrics.suffix_documents.set(stats.documents as i64);
                metrics.suffix_evictions.inc_by(stats.evicted - evicted);
                evicted = stats.evicted;
                if last_save.elapsed() >= state.interval {
                    last_save = Instant::now();
                    let saving = state.clone();
                    let _ = tokio::task::spawn_blocking(move || saving.save()).await;
                }
            }
        });
    }
}

/// A suffix drafter whose lookups are timed.
struct Timed(SuffixDrafter);

impl Drafter for Timed {
    fn kind(&self) -> &str {
        self.0.kind()
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let started = Instant::now();
        let proposals = self.0.propose(context, max_tokens);
        sibyl_telemetry::metrics::drafter()
            .suffix_lookup_duration
            .observe(started.elapsed().as_secs_f64());
        proposals
    }

    fn catch_up(&mut self, context: &[TokenId]) -> usize {
        self.0.catch_up(context)
    }

    fn finish(&mut self, context: &[TokenId]) {
        self.0.finish(context);
    }
}
