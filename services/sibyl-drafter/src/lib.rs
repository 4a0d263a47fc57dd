//! The drafter role: a `sibyl.v1.Drafter` gRPC service that streams candidate token blocks
//! to verifiers, drafting ahead of their feedback.
//!
//! The service hosts any [`sibyl_spec::Drafter`] (n-gram, retrieval, suffix, a small LM); each
//! session gets a fresh one through [`MakeDrafter`].

mod ahead;
mod service;
mod share;

pub use ahead::{AdvanceError, AheadLimits, DraftAhead};
pub use service::{DraftService, MakeDrafter};
pub use share::{AcceptShared, HeldDocuments, Peers, ShareInbox};

use sibyl_proto::server::{run_role, Listener, OnLoadError, ServeError};
use sibyl_proto::v1::drafter_server::{DrafterServer, SERVICE_NAME};
use std::future::Future;
use tonic::transport::server::Router;

/// Serves `service` on `listener` until `shutdown` completes. Health says SERVING once
/// `load` (run on a blocking thread: it may fetch a model file) has returned the tokenizer
/// fingerprint; a failed load ends the server or is retried, as `on_error` says.
pub async fn serve<E>(
    listener: impl Into<Listener>,
    service: DraftService,
    load: impl FnMut() -> Result<u64, E> + Send + 'static,
    on_error: OnLoadError,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    sibyl_telemetry::metrics::drafter();
    let require = service.require();
    let add = |router: Router| {
        router.add_service(DrafterServer::with_interceptor(service.clone(), require))
    };
    let ready = |fingerprint, _| {
        service.set_ready(fingerprint);
        true
    };
    run_role(listener, SERVICE_NAME, add, load, ready, on_error, shutdown).await
}
