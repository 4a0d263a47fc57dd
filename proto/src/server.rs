//! What every sibyl gRPC server serves beside its own service: `grpc.health.v1` and
//! reflection (v1 and v1alpha, so both current and older grpcurl and grpcui work).

use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// A server builder with health and reflection added. Health starts NOT_SERVING for the
/// whole server and for `service`; the role calls [`set_serving`] once it is loaded and
/// warmed up.
async fn base_router(
    builder: &mut Server,
    service: &str,
) -> Result<(Router, HealthReporter), tonic_reflection::server::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    set_not_serving(&reporter, service).await;
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let router = builder
        .add_service(health)
        .add_service(descriptors().build_v1()?)
        .add_service(descriptors().build_v1alpha()?);
    Ok((router, reporter))
}

/// Marks the whole server and the named service SERVING.
async fn set_serving(reporter: &HealthReporter, service: &str) {
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(service, ServingStatus::Serving)
        .await;
}

/// Marks the named service and the whole server NOT_SERVING (shutting down).
async fn set_not_serving(reporter: &HealthReporter, service: &str) {
    reporter
        .set_service_status(service, ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// A failure to start or run a role's server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
    #[error("HTTP server")]
    Http(#[source] std::io::Error),
    #[error("loading failed")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("a server task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs `router` on `listener` (TCP_NODELAY: draft blocks are small and latency-bound) until
/// `shutdown` completes.
fn spawn(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
}

/// Runs a role: serves health, reflection and what `add_service` adds on `listener` (health
/// NOT_SERVING) while `load` runs on a blocking thread, hands its result to `ready`, then
/// marks `service` SERVING, until `shutdown` completes. A failed load stops the server and
/// returns the error.
pub async fn run_role<T, E>(
    listener: tokio::net::TcpListener,
    service: &str,
    add_service: impl FnOnce(Router) -> Router,
    load: impl FnOnce() -> Result<T, E> + Send + 'static,
    ready: impl FnOnce(T),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    T: Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let mut builder = Server::builder();
    let (router, health) = base_router(&mut builder, service).await?;
    let server = spawn(add_service(router), listener, shutdown);
    match load_blocking(load).await {
        Ok(loaded) => ready(loaded),
        Err(error) => {
            server.abort();
            return Err(error);
        }
    }
    set_serving(&health, service).await;
    tracing::info!(service, "ready");
    server.await??;
    Ok(())
}

/// Runs `load` on a blocking thread (it may read or fetch a model file).
async fn load_blocking<T, E>(
    load: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ServeError>
where
    T: Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    tokio::task::spawn_blocking(load)
        .await?
        .map_err(|e| ServeError::Load(e.into()))
}

/// One switch that stops several servers: each takes a [`ShutdownSwitch::stopped`] future.
#[derive(Debug)]
pub struct ShutdownSwitch(tokio::sync::watch::Sender<bool>);

impl Default for ShutdownSwitch {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

impl ShutdownSwitch {
    /// Completes once [`ShutdownSwitch::trigger`] has been called (at once if it already was).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.0.subscribe();
        async move {
            let _ = receiver.wait_for(|&stopped| stopped).await;
        }
    }

    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}
