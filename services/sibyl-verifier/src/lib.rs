//! The verifier role: a `sibyl.v1.Verifier` gRPC service that owns the target model and one
//! KV cache per session, drafts with remote drafters and streams back only the tokens the
//! target model itself would have produced.
//!
//! One scheduler thread owns the model and runs every session together, one forward pass
//! per step (`sibyl-decode`'s [`Scheduler`](sibyl_decode::Scheduler)); requests wait for a
//! session slot and KV-cache room in a bounded queue. Each session's drafter links (async
//! tasks, one per configured drafter) keep blocks in bounded inboxes; a step waits for them
//! at most [`SpeculationConfig::step_wait`] (all sessions together), then merges, verifies
//! and emits, and the links send the accepted tokens back to the drafters.

mod config;
mod drafter_health;
mod link;
mod scheduler;
mod service;
mod session;
mod shared;

pub use config::{DrafterEndpoint, EndpointError, SpeculationConfig, VerifierConfig};
pub use drafter_health::DRAFTERS_HEALTH;
pub use service::VerifierService;

use scheduler::SchedulerHandle;
use sibyl_decode::{generate, GenerationConfig, SchedulerConfig, SharedLearning};
use sibyl_engine::LoadedModel;
use sibyl_proto::server::{run_role, Listener, OnLoadError, ServeError};
use sibyl_proto::v1::verifier_server::{VerifierServer, SERVICE_NAME};
use std::future::Future;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use tonic::transport::server::Router;

/// Serves `service` on `listener` until `shutdown` completes. Health says SERVING once
/// `load` (run on a blocking thread: it may fetch a model file) has returned the model and a
/// warm-up generation has run; a failed load ends the server or is retried, as `on_error`
/// says. The configured drafters are then watched (see [`DRAFTERS_HEALTH`]).
pub async fn serve<E>(
    listener: impl Into<Listener>,
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
    let require = sibyl_proto::auth::require(service.internal_token());
    let add = |router: Router| {
        router.add_service(VerifierServer::with_interceptor(service.clone(), require))
    };
    let mut scheduler = service.scheduler_config();
    scheduler.draft_wait = service.step_wait();
    let runtime = tokio::runtime::Handle::current();
    let load = move || {
        load()
            .map_err(Into::into)
            .and_then(|loaded| warm_up(loaded, scheduler.clone(), runtime.clone()))
    };
    let ready = |engine, health| {
        service.set_ready(Arc::new(engine));
        metrics.model_loaded.set(1);
        drafter_health::spawn(service.drafters().to_vec(), service.drafter_tls(), health);
        true
    };
    run_role(listener, SERVICE_NAME, add, load, ready, on_error, shutdown).await
}

/// Runs a short generation so the first request does not pay for thread-pool start-up and
/// first-touch page faults, then starts the step scheduler.
fn warm_up(
    loaded: LoadedModel,
    scheduler: SchedulerConfig,
    runtime: tokio::runtime::Handle,
) -> Result<service::Engine, Box<dyn std::error::Error + Send + Sync>> {
    let config = GenerationConfig::plain(2, Vec::new());
    let prompt: Vec<u32> = (0..8).collect();
    generate(&loaded.model, &prompt, &config, &mut [], |_| {
        ControlFlow::Continue(())
    })?;
    tracing::info!(
        device = %loaded.model.device(),
        weights_bytes = loaded.model.weights_size_in_bytes(),
        "model loaded and warmed up"
    );
    let loaded = Arc::new(loaded);
    Ok(service::Engine {
        scheduler: SchedulerHandle::spawn(loaded.clone(), scheduler, runtime)?,
        loaded,
        learning: SharedLearning::default(),
        grammar: OnceLock::new(),
    })
}
