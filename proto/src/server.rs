//! What every sibyl gRPC server serves beside its own service: `grpc.health.v1` and
//! reflection (v1 and v1alpha, so both current and older grpcurl and grpcui work).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Interval of HTTP/2 pings and TCP keepalive probes to clients.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// A client that has not answered a ping within this is gone.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Where a server listens: a bound socket, and the TLS it serves there, if any.
pub struct Listener {
    pub tcp: tokio::net::TcpListener,
    pub tls: Option<Arc<crate::tls::ServerTls>>,
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(tcp: tokio::net::TcpListener) -> Self {
        Self { tcp, tls: None }
    }
}

/// What a role does when loading its model fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLoadError {
    /// Stop the server and return the error (`sibyl serve`, tests).
    Fail,
    /// Stay up with health NOT_SERVING, log the error once, and try again after this long,
    /// until it works or the server is shut down (roles in containers: a model volume that
    /// is filled late, a file being replaced).
    Retry(std::time::Duration),
}

/// The health of a running role's server, for roles whose readiness depends on more than
/// their own model (the gateway follows its verifier).
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: String,
    /// Set once shutdown has begun: the server stays NOT_SERVING from then on.
    draining: Arc<AtomicBool>,
}

impl Health {
    /// Marks the whole server and the role's service SERVING or NOT_SERVING (never SERVING
    /// again once the server is draining for shutdown).
    pub async fn set_serving(&self, serving: bool) {
        if serving && !self.draining.load(Ordering::SeqCst) {
            set_serving(&self.reporter, &self.service).await;
        } else {
            set_not_serving(&self.reporter, &self.service).await;
        }
    }

    /// Sets the status of another named entry (a dependency's, say).
    pub async fn set_entry(&self, name: &str, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status(name, status).await;
    }
}

/// An error and its sources, on one line.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Runs a role: serves health, reflection and what `add_service` adds on `listener` (health
/// NOT_SERVING) while `load` runs on a blocking thread, hands its result to `ready`, then
/// marks `service` SERVING if `ready` says so (a role whose readiness depends on more sets
/// its health itself through the [`Health`] it is given), until `shutdown` completes. A
/// failed load either stops the server and returns the error, or is retried, as `on_error`
/// says.
pub async fn run_role<T, E, L>(
    listener: impl Into<Listener>,
    service: &str,
    add_service: impl FnOnce(Router) -> Router,
    mut load: L,
    ready: impl FnOnce(T, Health) -> bool,
    on_error: OnLoadError,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    T: Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    L: FnMut() -> Result<T, E> + Send + 'static,
{
    // HTTP/2 pings find clients that vanished without closing their connections (a
    // verifier cut off the network): their streams end instead of holding a session, and a
    // drain, open forever.
    let Listener { tcp: listener, tls } = listener.into();
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.tonic())?;
    }
    let (router, reporter) = base_router(&mut builder, service).await?;
    // On shutdown: NOT_SERVING at once, so balancers stop sending new work while the
    // server finishes the streams it has (tonic's graceful shutdown waits for them).
    let draining_flag = Arc::new(AtomicBool::new(false));
    let draining = {
        let reporter = reporter.clone();
        let service = service.to_string();
        let flag = draining_flag.clone();
        async move {
            shutdown.await;
            flag.store(true, Ordering::SeqCst);
            set_not_serving(&reporter, &service).await;
            tracing::info!(service, "draining: finishing open streams");
        }
    };
    let mut server = spawn(add_service(router), listener, draining);
    let mut reported: Option<String> = None;
    let loaded = loop {
        let (returned, result) = tokio::task::spawn_blocking(move || {
            let result = load();
            (load, result)
        })
        .await?;
        load = returned;
        let error: Box<dyn std::error::Error + Send + Sync> = match result {
            Ok(loaded) => break loaded,
            Err(error) => error.into(),
        };
        let OnLoadError::Retry(every) = on_error else {
            server.abort();
            return Err(ServeError::Load(error));
        };
        let message = error_chain(error.as_ref());
        if reported.as_deref() != Some(message.as_str()) {
            tracing::error!(
                service,
                error = %message,
                "cannot load; health says NOT_SERVING; trying again every {every:?}"
            );
            reported = Some(message);
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            ended = &mut server => {
                ended??;
                return Ok(());
            }
        }
    };
    let health = Health {
        reporter,
        service: service.to_string(),
        draining: draining_flag,
    };
    if ready(loaded, health.clone()) {
        health.set_serving(true).await;
    }
    tracing::info!(service, "loaded");
    server.await??;
    Ok(())
}

/// One switch that stops several servers: each takes a [`ShutdownSwitch::stopped`] future.
/// Clones are the same switch.
#[derive(Debug, Clone)]
pub struct ShutdownSwitch(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for ShutdownSwitch {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::channel(false).0))
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
