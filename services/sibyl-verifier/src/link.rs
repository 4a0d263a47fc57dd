//! One session's stream to one drafter: open it with the sequence so far, send every
//! accepted advance, put arriving blocks in the inbox; reopen with backoff when it fails.

use crate::config::DrafterEndpoint;
use crate::shared::{LinkStatus, Shared};
use sibyl_proto::client::Balancer;
use sibyl_proto::v1::{self as pb, draft_request::Message, drafter_client::DrafterClient};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Longest wait for a drafter to answer the opening of a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message a drafter may send (a block is a few hundred bytes).
const MAX_MESSAGE_BYTES: usize = 256 * 1024;

pub(crate) struct LinkParams {
    pub(crate) index: usize,
    pub(crate) endpoint: DrafterEndpoint,
    /// The open message without its context.
    pub(crate) open: pb::DraftOpen,
    /// Shown to the drafter, when the deployment has one.
    pub(crate) token: Option<sibyl_proto::auth::InternalToken>,
}

enum End {
    /// The session is over.
    SessionOver,
    Refused(String),
    Failed(String),
}

/// Runs the link until the session ends (its length watch closes).
pub(crate) async fn run(
    params: LinkParams,
    request_id: String,
    endpoints: Arc<Balancer>,
    shared: Arc<Shared>,
    mut accepted_len: watch::Receiver<usize>,
) {
    let mut backoff = FIRST_BACKOFF;
    let errors = sibyl_telemetry::metrics::verifier()
        .drafter_stream_errors
        .with_label_values(&[params.endpoint.kind.as_str()]);
    loop {
        let ended = connect(&params, &request_id, &endpoints, &shared, &mut accepted_len).await;
        let connected_before = match ended {
            (End::SessionOver, _) => return,
            (End::Refused(error), _) => {
                errors.inc();
                tracing::warn!(drafter = %params.endpoint.kind, %error, "drafter refused the session");
                shared.set_status(params.index, LinkStatus::Refused, Some(error));
                return;
            }
            (End::Failed(error), connected) => {
                errors.inc();
                tracing::debug!(drafter = %params.endpoint.kind, %error, "draft stream failed");
                shared.set_status(params.index, LinkStatus::Failed, Some(error));
                connected
            }
        };
        if connected_before {
            backoff = FIRST_BACKOFF;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            changed = accepted_len.changed() => if changed.is_err() { return },
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One stream, from opening to its end; says whether it got connected.
async fn connect(
    params: &LinkParams,
    request_id: &str,
    endpoints: &Balancer,
    shared: &Shared,
    accepted_len: &mut watch::Receiver<usize>,
) -> (End, bool) {
    let (addr, channel) = match endpoints
        .pick(std::slice::from_ref(&params.endpoint.address), &[])
        .await
    {
        Ok(picked) => picked,
        Err(error) => return (End::Failed(error), false),
    };
    shared.set_endpoint(params.index, addr.to_string());
    accepted_len.borrow_and_update();
    let context = shared.lock().context.clone();
    let mut sent = context.len();
    let (outbound, receiver) = mpsc::channel(8);
    let open = pb::DraftOpen {
        context_tokens: context,
        ..params.open.clone()
    };
    if outbound
        .try_send(pb::DraftRequest {
            message: Some(Message::Open(open)),
        })
        .is_err()
    {
        return (End::Failed("cannot queue the open message".into()), false);
    }
    let mut client = DrafterClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut request = tonic::Request::new(ReceiverStream::new(receiver));
    sibyl_telemetry::trace::inject(&tracing::Span::current(), request.metadata_mut());
    sibyl_telemetry::trace::set_request_id(request.metadata_mut(), request_id);
    sibyl_proto::auth::attach(params.token.as_ref(), request.metadata_mut());
    let opened = tokio::time::timeout(OPEN_TIMEOUT, client.draft(request)).await;
    let mut inbound = match opened {
        Err(_) => {
            return (
                End::Failed(format!("{addr} did not answer within {OPEN_TIMEOUT:?}")),
                false,
            )
        }
        Ok(Err(status)) if status.code() == Code::FailedPrecondition => {
            return (End::Refused(status.message().to_string()), false)
        }
        Ok(Err(status)) => return (End::Failed(format!("{addr}: {status}")), false),
        Ok(Ok(response)) => response.into_inner(),
    };
    shared.set_status(params.index, LinkStatus::Connected, None);
    loop {
        tokio::select! {
            changed = accepted_len.changed() => {
                if changed.is_err() {
                    return (End::SessionOver, true);
                }
                let advance = {
                    let state = shared.lock();
                    if state.context.len() <= sent {
                        continue;
                    }
                    let advance = pb::DraftAdvance {
                        position: sent as u64,
                        tokens: state.context[sent..].to_vec(),
                    };
                    sent = state.context.len();
                    advance
                };
                let request = pb::DraftRequest { message: Some(Message::Advance(advance)) };
                if outbound.send(request).await.is_err() {
                    return (End::Failed(format!("{addr}: the stream closed")), true);
                }
            }
            message = inbound.message() => match message {
                Ok(Some(block)) => shared.push(params.index, block),
                Ok(None) => return (End::Failed(format!("{addr} ended the stream")), true),
                Err(status) => return (End::Failed(format!("{addr}: {status}")), true),
            }
        }
    }
}
