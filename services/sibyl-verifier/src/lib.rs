//! The verifier role: a `sibyl.v1.Verifier` gRPC service that owns the target model and one
//! KV cache per session, drafts with remote drafters and streams back only the tokens the
//! target model itself would have produced.
//!
//! Each session runs the step loop of `sibyl-decode` on a blocking thread. Its drafter links
//! (async tasks, one per configured drafter) keep blocks in bounded inboxes; a step waits for
//! them at most [`SpeculationConfig::step_wait`], then merges, verifies and emits, and the
//! links send the accepted tokens back to the drafters.

mod config;
mod link;
mod probe;
mod service;
mod session;
mod shared;

pub use config::{DrafterEndpoint, EndpointError, SpeculationConfig, VerifierConfig};
pub use probe::DRAFTERS_HEALTH;
pub use service::VerifierService;

use sibyl_decode::{generate, GenerationConfig, SharedLearning};
use sibyl_engine::LoadedModel;
use sibyl_proto::server::{run_role, OnLoadError, ServeError};
use sibyl_proto::v1::verifier_server::{VerifierServer, SERVICE_NAME};
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tonic::transport::server::Router;

/// Serves `service` on `listener` until `shutdown` completes. Health says SERVING once
/// `load` (run on a blocking thread: it may fetch a model file) has returned the model and a
/// warm-up generation has run; a failed load ends the server or is retried, as `on_error`
/// says. The configured drafters are then watched (see [`DRAFTERS_HEALTH`]).
pub async fn serve<E>(
    listener: TcpListener,
    service: VerifierService,
    mut load: impl FnMut() -> Result<LoadedModel, E> + Send + 'static,
    on_error: OnLoadError,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let metrics = sibyl_telemetry::metrics::verifier();
    metrics.model_loaded.set(0);
    let add = |router: Router| router.add_service(VerifierServer::new(service.clone()));
    let load = move || load().map_err(Into::into).and_then(warm_up);
    let ready = |engine, health| {
        service.set_ready(Arc::new(engine));
        metrics.model_loaded.set(1);
        probe::spawn(service.drafters().to_vec(), health);
        true
    };
    run_role(listener, SERVICE_NAME, add, load, ready, on_error, shutdown).await
}

/// Runs a short generation so the first request does not pay for thread-pool start-up and
/// first-touch page faults.
fn warm_up(
    loaded: LoadedModel,
) -> Result<session::Engine, Box<dyn std::error::Error + Send + Sync>> {
    let config = GenerationConfig::plain(2, Vec::new());
    let prompt: Vec<u32> = (0..8).collect();
    generate(&loaded.model, &prompt, &config, &mut [], |_| {
        ControlFlow::Continue(())
    })?;
    Ok(session::Engine {
        loaded,
        compute: Mutex::new(()),
        learning: SharedLearning::default(),
    })
}
