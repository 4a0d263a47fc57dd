//! What every sibyl role reports about itself: Prometheus metrics ([`metrics`], served by
//! [`serve_metrics`] or merged into an HTTP router with [`metrics_router`]), OpenTelemetry
//! traces exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, with W3C trace
//! context carried in gRPC metadata ([`trace`]), and logs as text or JSON lines.

pub mod metrics;
pub mod trace;

pub use trace::{init, init_command, Telemetry, REQUEST_ID_KEY};

use axum::routing::get;
use axum::Router;
use std::future::Future;
use tokio::net::TcpListener;

/// `GET /metrics`: the registry in the Prometheus text format.
pub fn metrics_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        "/metrics",
        get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                metrics::render(),
            )
        }),
    )
}

/// Serves `/metrics` on `listener` until `shutdown` completes (roles without an HTTP API).
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_router::<()>())
        .with_graceful_shutdown(shutdown)
        .await
}
