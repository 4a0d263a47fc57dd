//! Drafters that keep an index of finished generations (the suffix drafter) share it: each
//! sends what it indexes to every address of its peers' Service (`Share`), and adds what its
//! peers send, so that every replica drafts from all the cluster has generated, whichever
//! replica a session went to. A replica that starts with nothing restored fetches what a
//! peer holds (`Fetch`) first.
//!
//! Sending never holds up drafting: documents wait in a bounded queue (past it they are
//! dropped and counted), go out in batches, and a peer that does not answer is skipped
//! until it does.

use crate::service::DraftService;
use sibyl_proto::auth::InternalToken;
use sibyl_proto::client::{Balancer, ServiceAddress};
use sibyl_proto::tls::ClientTls;
use sibyl_proto::v1::{self as pb, drafter_client::DrafterClient};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tonic::Status;

/// Most documents one `Share` call carries.
pub(crate) const MAX_DOCUMENTS: usize = 64;
/// Most tokens one `Share` call carries (under 1 MiB on the wire; a longer document keeps
/// its newest tokens, as an index full of it would).
pub(crate) const MAX_TOKENS: usize = 1 << 18;
/// Documents waiting to be sent before new ones are dropped...
const QUEUE: usize = 1024;
/// ...and their tokens (16 MiB).
const QUEUE_TOKENS: usize = 1 << 22;
/// Longest a peer may take to answer one call.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Adds a document a peer sent to this drafter's index; says whether it was kept.
pub type AcceptShared = Arc<dyn Fn(&[u32]) -> bool + Send + Sync>;

/// The documents this drafter's index holds, oldest first (a copy).
pub type HeldDocuments = Arc<dyn Fn() -> Vec<Vec<u32>> + Send + Sync>;

/// What a drafter that keeps an index does with what its peers share, and what it gives a
/// peer that catches up.
#[derive(Clone)]
pub struct ShareInbox {
    /// This process's random id: requests carrying it are its own.
    pub origin: u64,
    pub accept: AcceptShared,
    pub held: HeldDocuments,
}

/// Where a drafter sends what it indexes.
#[derive(Debug, Clone)]
pub struct Peers {
    /// Names that resolve to the replicas (a headless Service resolves to every one);
    /// this drafter among them is found out and skipped.
    pub services: Vec<ServiceAddress>,
    pub tls: Option<Arc<ClientTls>>,
    pub token: Option<InternalToken>,
    /// This process's random id, as in its [`ShareInbox`].
    pub origin: u64,
}

impl DraftService {
    /// Starts sending documents to `peers` on the current runtime; returns what queues one
    /// (for the index's listener: it never blocks).
    pub fn share_with(&self, peers: Peers) -> impl Fn(&[u32]) + Send + Sync + 'static {
        let (queue, documents) = mpsc::channel::<Vec<u32>>(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let waiting = Queue {
            documents,
            tokens: queued.clone(),
        };
        tokio::spawn(forward(waiting, peers, self.fingerprint_cell()));
        move |document: &[u32]| {
            // The newest tokens of a longer one: all one call carries.
            let document = &document[document.len().saturating_sub(MAX_TOKENS)..];
            let len = document.len();
            let room = queued
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n + len <= QUEUE_TOKENS).then_some(n + len)
                })
                .is_ok();
            if !room || queue.try_send(document.to_vec()).is_err() {
                if room {
                    queued.fetch_sub(len, Ordering::Relaxed);
                }
                outcome("dropped", 1);
            }
        }
    }

    /// Answers a peer's `Share`.
    pub(crate) async fn receive(
        &self,
        request: pb::ShareRequest,
    ) -> Result<pb::ShareReply, Status> {
        let inbox = self.inbox().ok_or_else(|| {
            Status::unimplemented("this drafter keeps no index of finished generations")
        })?;
        self.check_tokenizer(&request.tokenizer_fingerprint)?;
        if request.origin == inbox.origin {
            return Ok(pb::ShareReply {
                added: 0,
                own: true,
            });
        }
        let added = index(inbox, request.documents).await?;
        outcome("received", added);
        Ok(pb::ShareReply {
            added: added as u32,
            own: false,
        })
    }

    /// Answers a peer's `Fetch`: everything the index holds, in messages of `Share`'s size.
    pub(crate) async fn send_held(
        &self,
        request: pb::FetchRequest,
    ) -> Result<mpsc::Receiver<Result<pb::ShareRequest, Status>>, Status> {
        let inbox = self.inbox().ok_or_else(|| {
            Status::unimplemented("this drafter keeps no index of finished generations")
        })?;
        self.check_tokenizer(&request.tokenizer_fingerprint)?;
        let fingerprint = request.tokenizer_fingerprint;
        let (origin, held) = (inbox.origin, inbox.held.clone());
        // Copying takes the index's read lock: off the async workers.
        let documents = tokio::task::spawn_blocking(move || held())
            .await
            .map_err(|_| Status::internal("reading the index failed"))?;
        let (send, receive) = mpsc::channel(2);
        tokio::spawn(async move {
            for batch in batches(documents) {
                let message = pb::ShareRequest {
                    tokenizer_fingerprint: fingerprint.clone(),
                    origin,
                    documents: batch
                        .into_iter()
                        .map(|tokens| pb::SharedDocument { tokens })
                        .collect(),
                };
                if send.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(receive)
    }

    /// Fills this drafter's index from the first of `peers` (other than itself) that sends
    /// what it holds: how a replica that starts empty catches up. Says from where, and how
    /// many documents it added; an error when no peer could.
    pub async fn catch_up(&self, peers: &Peers) -> Result<(SocketAddr, usize), String> {
        let inbox = self
            .inbox()
            .ok_or("this drafter keeps no index of finished generations")?;
        let ours = *self
            .fingerprint_cell()
            .get()
            .ok_or("the tokenizer is not loaded yet")?;
        let balancer = Balancer::new(peers.tls.clone());
        let mut reasons = Vec::new();
        for service in &peers.services {
            let targets = match balancer.all(service).await {
                Ok(targets) => targets,
                Err(reason) => {
                    reasons.push(reason);
                    continue;
                }
            };
            for (addr, channel) in targets {
                let mut call = tonic::Request::new(pb::FetchRequest {
                    tokenizer_fingerprint: sibyl_proto::fingerprint(ours),
                });
                sibyl_proto::auth::attach(peers.token.as_ref(), call.metadata_mut());
                let fetched = fetch_from(DrafterClient::new(channel), call, peers.origin, inbox);
                match tokio::time::timeout(FETCH_TIMEOUT, fetched).await {
                    Ok(Ok(Some(added))) => {
                        outcome("fetched", added);
                        return Ok((addr, added));
                    }
                    // Itself.
                    Ok(Ok(None)) => {}
                    Ok(Err(reason)) => reasons.push(format!("{addr}: {reason}")),
                    Err(_) => reasons.push(format!("{addr}: not done within {FETCH_TIMEOUT:?}")),
                }
            }
        }
        if reasons.is_empty() {
            reasons.push("no peer but this drafter".into());
        }
        Err(reasons.join("; "))
    }
}

/// Longest a catch-up from one peer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads one peer's `Fetch` into `inbox`; `None` when the peer is this drafter.
async fn fetch_from(
    mut client: DrafterClient<tonic::transport::Channel>,
    call: tonic::Request<pb::FetchRequest>,
    origin: u64,
    inbox: &ShareInbox,
) -> Result<Option<usize>, String> {
    let mut stream = client
        .fetch(call)
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    let mut added = 0;
    while let Some(message) = stream.message().await.map_err(|s| s.to_string())? {
        if message.origin == origin {
            return Ok(None);
        }
        added += index(inbox, message.documents)
            .await
            .map_err(|s| s.message().to_string())?;
    }
    Ok(Some(added))
}

/// Adds `documents` (one `Share` call's or `Fetch` message's: refused past their limits) to
/// `inbox`'s index, off the async workers (indexing takes the index's write lock); says how
/// many were kept.
async fn index(inbox: &ShareInbox, documents: Vec<pb::SharedDocument>) -> Result<usize, Status> {
    let tokens: usize = documents.iter().map(|d| d.tokens.len()).sum();
    if documents.len() > MAX_DOCUMENTS || tokens > MAX_TOKENS {
        return Err(Status::invalid_argument(format!(
            "{} documents of {tokens} tokens; one message carries at most {MAX_DOCUMENTS} \
             documents and {MAX_TOKENS} tokens",
            documents.len()
        )));
    }
    let accept = inbox.accept.clone();
    tokio::task::spawn_blocking(move || documents.iter().filter(|d| accept(&d.tokens)).count())
        .await
        .map_err(|_| Status::internal("indexing the documents failed"))
}

/// `documents` in messages within one call's limits, in order (a longer document keeps
/// its newest tokens).
fn batches(documents: Vec<Vec<u32>>) -> Vec<Vec<Vec<u32>>> {
    let mut batches: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut tokens = 0;
    for mut document in documents {
        if document.len() > MAX_TOKENS {
            document.drain(..document.len() - MAX_TOKENS);
        }
        let full = batches
            .last()
            .is_none_or(|b| b.len() == MAX_DOCUMENTS || tokens + document.len() > MAX_TOKENS);
        if full {
            batches.push(Vec::new());
            tokens = 0;
        }
        tokens += document.len();
        batches.last_mut().expect("just made").push(document);
    }
    batches
}

fn outcome(outcome: &str, documents: usize) {
    sibyl_telemetry::metrics::drafter()
        .shared_documents
        .with_label_values(&[outcome])
        .inc_by(documents as u64);
}

/// Documents waiting to be sent, and a count of their tokens.
struct Queue {
    documents: mpsc::Receiver<Vec<u32>>,
    tokens: Arc<AtomicUsize>,
}

impl Queue {
    async fn recv(&mut self) -> Option<Vec<u32>> {
        let document = self.documents.recv().await?;
        self.tokens.fetch_sub(document.len(), Ordering::Relaxed);
        Some(document)
    }

    fn try_recv(&mut self) -> Option<Vec<u32>> {
        let document = self.documents.try_recv().ok()?;
        self.tokens.fetch_sub(document.len(), Ordering::Relaxed);
        Some(document)
    }
}

/// Sends what arrives on `documents`, in batches, to every peer but this drafter, until the
/// queue's sender is dropped.
async fn forward(mut documents: Queue, peers: Peers, fingerprint: Arc<OnceLock<u64>>) {
    let balancer = Balancer::new(peers.tls.clone());
    // Addresses found to be this drafter itself.
    let mut own: HashSet<SocketAddr> = HashSet::new();
    // Addresses that did not take the last batch (told once, and again when they do).
    let mut failing: HashSet<SocketAddr> = HashSet::new();
    // Peer names that did not resolve last time (told once, and again when they do).
    let mut unresolved: HashSet<ServiceAddress> = HashSet::new();
    let mut next: Option<Vec<u32>> = None;
    loop {
        let first = match next.take() {
            Some(document) => document,
            None => match documents.recv().await {
                Some(document) => document,
                None => return,
            },
        };
        let batch = gather(first, &mut documents, &mut next);
        let Some(&ours) = fingerprint.get() else {
            // Nothing is indexed before the tokenizer is known.
            continue;
        };
        let mut targets = Vec::new();
        for service in &peers.services {
            match balancer.all(service).await {
                Ok(found) => {
                    unresolved.remove(service);
                    targets.extend(found);
                }
                Err(reason) => {
                    if unresolved.insert(service.clone()) {
                        tracing::warn!(peers = %service, %reason, "cannot find the peers to share finished generations with");
                    }
                }
            }
        }
        targets.sort_by_key(|(addr, _)| *addr);
        targets.dedup_by_key(|(addr, _)| *addr);
        let request = pb::ShareRequest {
            tokenizer_fingerprint: sibyl_proto::fingerprint(ours),
            origin: peers.origin,
            documents: batch
                .iter()
                .map(|tokens| pb::SharedDocument {
                    tokens: tokens.clone(),
                })
                .collect(),
        };
        let mut calls = tokio::task::JoinSet::new();
        for (addr, channel) in targets {
            if own.contains(&addr) {
                continue;
            }
            let mut call = tonic::Request::new(request.clone());
            sibyl_proto::auth::attach(peers.token.as_ref(), call.metadata_mut());
            calls.spawn(async move {
                let mut client = DrafterClient::new(channel);
                let answer = tokio::time::timeout(TIMEOUT, client.share(call)).await;
                let answer = match answer {
                    Ok(Ok(reply)) => Ok(reply.into_inner()),
                    Ok(Err(status)) => Err(status.to_string()),
                    Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
                };
                (addr, answer)
            });
        }
        while let Some(Ok((addr, answer))) = calls.join_next().await {
            match answer {
                Ok(reply) if reply.own => {
                    own.insert(addr);
                }
                Ok(_) => {
                    if failing.remove(&addr) {
                        tracing::info!(peer = %addr, "peer takes finished generations again");
                    }
                    outcome("sent", batch.len());
                }
                Err(reason) => {
                    if failing.insert(addr) {
                        tracing::warn!(peer = %addr, %reason, "peer does not take finished generations; skipping it until it does");
                    }
                    outcome("failed", batch.len());
                }
            }
        }
    }
}

/// `first` and what else is queued, up to one call's limits (each document holds at most
/// [`MAX_TOKENS`]); a document that would pass them waits in `next`.
fn gather(first: Vec<u32>, documents: &mut Queue, next: &mut Option<Vec<u32>>) -> Vec<Vec<u32>> {
    let mut tokens = first.len();
    let mut batch = vec![first];
    while batch.len() < MAX_DOCUMENTS {
        let Some(document) = documents.try_recv() else {
            break;
        };
        if tokens + document.len() > MAX_TOKENS {
            *next = Some(document);
            break;
        }
        tokens += document.len();
        batch.push(document);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_within_one_calls_limits_and_lose_nothing() {
        let (queue, documents) = mpsc::channel(QUEUE);
        let tokens = Arc::new(AtomicUsize::new(0));
        let sizes = [10, MAX_TOKENS - 20, 30, MAX_TOKENS, 1, 2];
        let documents_sent = sizes.iter().chain(&[4; 100]);
        for (i, &size) in documents_sent.enumerate() {
            queue.try_send(vec![i as u32; size]).unwrap();
            tokens.fetch_add(size, Ordering::Relaxed);
        }
        drop(queue);
        let mut documents = Queue {
            documents,
            tokens: tokens.clone(),
        };
        let mut next = None;
        let mut batches = Vec::new();
        while let Some(first) = next.take().or_else(|| documents.try_recv()) {
            batches.push(gather(first, &mut documents, &mut next));
        }
        for batch in &batches {
            assert!(batch.len() <= MAX_DOCUMENTS);
            assert!(batch.iter().map(Vec::len).sum::<usize>() <= MAX_TOKENS);
        }
        let all: Vec<&Vec<u32>> = batches.iter().flatten().collect();
        assert_eq!(all.len(), sizes.len() + 100);
        assert!(
            all.iter().enumerate().all(|(i, d)| d[0] == i as u32),
            "in order"
        );
        assert_eq!(
            tokens.load(Ordering::Relaxed),
            0,
            "the queue's count is back to 0"
        );
    }

    #[test]
    fn what_a_peer_fetches_comes_in_messages_within_one_calls_limits() {
        let sizes = [10, MAX_TOKENS - 20, 30, MAX_TOKENS + 3, 1, 2];
        let held: Vec<Vec<u32>> = sizes
            .iter()
            .chain(&[4; 100])
            .enumerate()
            .map(|(i, &n)| vec![i as u32; n])
            .collect();
        let messages = batches(held.clone());
        for message in &messages {
            assert!(message.len() <= MAX_DOCUMENTS);
            assert!(message.iter().map(Vec::len).sum::<usize>() <= MAX_TOKENS);
        }
        let mut want = held;
        want[3].truncate(MAX_TOKENS);
        assert_eq!(messages.concat(), want, "every document, in order");
    }

    #[tokio::test]
    async fn a_full_queue_drops_documents_and_never_grows_past_its_bound() {
        let make = || -> Box<dyn sibyl_spec::Drafter> { unreachable!("no session is opened") };
        let service = DraftService::new(Arc::new(make));
        // A current-thread runtime: the forwarder takes nothing from the queue until this
        // test yields, which it does not.
        let queue = service.share_with(Peers {
            services: vec!["http://127.0.0.1:9".parse().unwrap()],
            tls: None,
            token: None,
            origin: 1,
        });
        let dropped = || {
            sibyl_telemetry::metrics::drafter()
                .shared_documents
                .with_label_values(&["dropped"])
                .get()
        };
        let before = dropped();
        // QUEUE_TOKENS / MAX_TOKENS documents of MAX_TOKENS fill the queue; 4 more are
        // dropped, and a longer one is cut to MAX_TOKENS first.
        let long = vec![5; MAX_TOKENS + 7];
        for _ in 0..QUEUE_TOKENS / MAX_TOKENS + 4 {
            queue(&long);
        }
        assert_eq!(dropped() - before, 4);
    }
}
