use crate::ahead::{AheadLimits, DraftAhead};
use crate::share::ShareInbox;
use sibyl_proto::v1::{self as pb, draft_request::Message};
use sibyl_spec::Drafter;
use sibyl_telemetry::metrics::{self, GaugeGuard};
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

/// Most tokens a session's sequence may hold (above the context windows in use; it bounds
/// the drafter's work per block, which runs on the async workers).
const MAX_CONTEXT: usize = 1 << 17;
/// Most tokens per branch a verifier may ask for.
const MAX_BLOCK_TOKENS: usize = 256;
/// Most branches per block a verifier may ask for.
const MAX_BRANCHES: usize = 16;
/// Blocks queued for the network before drafting pauses.
const QUEUE: usize = 4;

/// Makes a fresh drafter for each session.
pub type MakeDrafter = Arc<dyn Fn() -> Box<dyn Drafter> + Send + Sync>;

/// The `sibyl.v1.Drafter` service: one [`DraftAhead`] per stream.
#[derive(Clone)]
pub struct DraftService {
    make: MakeDrafter,
    /// The tokenizer fingerprint, set once the model file has been read.
    fingerprint: Arc<OnceLock<u64>>,
    /// The token calls must carry (`--internal-token-file`).
    token: Option<sibyl_proto::auth::InternalToken>,
    /// Where documents peers share go, for a drafter that keeps an index of them.
    inbox: Option<ShareInbox>,
}

impl DraftService {
    /// A service that answers UNAVAILABLE until [`DraftService::set_ready`] is called.
    pub fn new(make: MakeDrafter) -> Self {
        Self {
            make,
            fingerprint: Arc::new(OnceLock::new()),
            token: None,
            inbox: None,
        }
    }

    /// Takes the documents peers share (`Share` calls) into `inbox`.
    pub fn accepting_shared(mut self, inbox: ShareInbox) -> Self {
        self.inbox = Some(inbox);
        self
    }

    pub(crate) fn inbox(&self) -> Option<&ShareInbox> {
        self.inbox.as_ref()
    }

    /// The tokenizer fingerprint, set once loaded.
    pub(crate) fn fingerprint_cell(&self) -> Arc<OnceLock<u64>> {
        self.fingerprint.clone()
    }

    /// The tokenizer fingerprint; UNAVAILABLE before it is loaded.
    fn tokenizer(&self) -> Result<u64, Status> {
        self.fingerprint
            .get()
            .copied()
            .ok_or_else(|| Status::unavailable("the drafter is still loading its tokenizer"))
    }

    /// Refuses a caller whose tokenizer fingerprint (`theirs`, as on the wire) differs from
    /// this drafter's, and any caller before the tokenizer is loaded.
    pub(crate) fn check_tokenizer(&self, theirs: &str) -> Result<(), Status> {
        let ours = self.tokenizer()?;
        if theirs != sibyl_proto::fingerprint(ours) {
            return Err(Status::failed_precondition(format!(
                "tokenizer mismatch: the caller's is {theirs}, this drafter's is {}; start \
                 every role with the same model",
                sibyl_proto::fingerprint(ours)
            )));
        }
        Ok(())
    }

    /// Accepts only calls that carry `token`.
    pub fn requiring(mut self, token: Option<sibyl_proto::auth::InternalToken>) -> Self {
        self.token = token;
        self
    }

    /// The interceptor for the service's token.
    pub(crate) fn require(&self) -> sibyl_proto::auth::RequireKey {
        sibyl_proto::auth::require(self.token.as_ref())
    }

    /// Accepts sessions whose tokenizer has `fingerprint`.
    pub fn set_ready(&self, fingerprint: u64) {
        let _ = self.fingerprint.set(fingerprint);
    }

    fn limits(open: &pb::DraftOpen) -> Result<AheadLimits, Status> {
        let max_block_tokens = open.max_block_tokens as usize;
        let max_branches = open.max_branches as usize;
        if !(1..=MAX_BLOCK_TOKENS).contains(&max_block_tokens) {
            return Err(Status::invalid_argument(format!(
                "max_block_tokens must be in 1..={MAX_BLOCK_TOKENS}, got {max_block_tokens}"
            )));
        }
        if !(1..=MAX_BRANCHES).contains(&max_branches) {
            return Err(Status::invalid_argument(format!(
                "max_branches must be in 1..={MAX_BRANCHES}, got {max_branches}"
            )));
        }
        if open.context_tokens.len() > MAX_CONTEXT {
            return Err(Status::invalid_argument(format!(
                "the context has {} tokens, over the limit of {MAX_CONTEXT}",
                open.context_tokens.len()
            )));
        }
        Ok(AheadLimits {
            max_block_tokens,
            max_branches,
            max_tokens_ahead: (open.max_tokens_ahead as usize).clamp(1, 4 * MAX_BLOCK_TOKENS),
            max_context: MAX_CONTEXT,
        })
    }
}

#[tonic::async_trait]
impl pb::drafter_server::Drafter for DraftService {
    type DraftStream = ReceiverStream<Result<pb::DraftBlock, Status>>;

    async fn draft(
        &self,
        request: Request<Streaming<pb::DraftRequest>>,
    ) -> Result<Response<Self::DraftStream>, Status> {
        let span = tracing::info_span!(
            "draft_session",
            request_id = %sibyl_telemetry::trace::request_id(request.metadata()),
        );
        sibyl_telemetry::trace::set_remote_parent(&span, request.metadata());
        let opened = self.open(request).instrument(span.clone()).await;
        if opened.is_err() {
            metrics::drafter()
                .sessions
                .with_label_values(&["refused"])
                .inc();
        }
        let (ahead, inbound) = opened?;
        let (blocks, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(pump(ahead, inbound, blocks).instrument(span));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn share(
        &self,
        request: Request<pb::ShareRequest>,
    ) -> Result<Response<pb::ShareReply>, Status> {
        self.receive(request.into_inner()).await.map(Response::new)
    }

    type FetchStream = ReceiverStream<Result<pb::ShareRequest, Status>>;

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let held = self.send_held(request.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(held)))
    }
}

impl DraftService {
    /// Checks a stream's opening and makes its drafter.
    async fn open(
        &self,
        request: Request<Streaming<pb::DraftRequest>>,
    ) -> Result<(DraftAhead, Streaming<pb::DraftRequest>), Status> {
        // Before reading the stream: a drafter still loading answers at once.
        self.tokenizer()?;
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::DraftRequest {
                message: Some(Message::Open(open)),
            }) => open,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a draft stream must be `open`",
                ))
            }
        };
        self.check_tokenizer(&open.tokenizer_fingerprint)?;
        let limits = Self::limits(&open)?;
        let ahead = DraftAhead::new((self.make)(), open.context_tokens, limits);
        Ok((ahead, inbound))
    }
}

/// Drafts ahead while the network takes blocks, and takes advances as they come.
async fn pump(
    ahead: DraftAhead,
    inbound: Streaming<pb::DraftRequest>,
    blocks: mpsc::Sender<Result<pb::DraftBlock, Status>>,
) {
    let metrics = metrics::drafter();
    let _active = GaugeGuard::new(&metrics.active_sessions);
    let outcome = stream(ahead, inbound, blocks).await;
    metrics.sessions.with_label_values(&[outcome]).inc();
    if outcome == "failed" {
        metrics.stream_errors.inc();
    }
}

/// The stream's loop; says how it ended (`completed` or `failed`).
async fn stream(
    mut ahead: DraftAhead,
    mut inbound: Streaming<pb::DraftRequest>,
    blocks: mpsc::Sender<Result<pb::DraftBlock, Status>>,
) -> &'static str {
    let metrics = metrics::drafter();
    loop {
        tokio::select! {
            biased;
            message = inbound.message() => {
                let advance = match message {
                    Ok(Some(pb::DraftRequest { message: Some(Message::Advance(advance)) })) => advance,
                    Ok(Some(_)) => {
                        let status = Status::invalid_argument("after `open`, only `advance` messages may follow");
                        let _ = blocks.send(Err(status)).await;
                        return "failed";
                    }
                    // The verifier ended the session.
                    Ok(None) => return "completed",
                    Err(status) => {
                        tracing::debug!(%status, "draft stream ended with an error");
                        return "failed";
                    }
                };
                if let Err(error) = ahead.advance(advance.position, &advance.tokens) {
                    let _ = blocks.send(Err(Status::invalid_argument(error.to_string()))).await;
                    return "failed";
                }
            }
            permit = blocks.reserve(), if ahead.can_draft() => {
                // The verifier stopped reading: the session is over.
                let Ok(permit) = permit else { return "completed" };
                let started = Instant::now();
                // Off the async workers: a model drafter computes for a while.
                let drafted = tokio::task::spawn_blocking(move || {
                    let block = pb::DraftBlock::from(&ahead.next_block());
                    (ahead, block)
                })
                .await;
                let Ok((back, block)) = drafted else { return "failed" };
                ahead = back;
                metrics.draft_duration.observe(started.elapsed().as_secs_f64());
                metrics.blocks_sent.inc();
                let tokens: usize = block.branches.iter().map(|b| b.tokens.len()).sum();
                metrics.draft_tokens_sent.inc_by(tokens as u64);
                permit.send(Ok(block));
            }
        }
    }
}
