//! The gateway role: the public API. `sibyl.v1.Gateway` over gRPC and an OpenAI-compatible
//! HTTP API on the same process, both through one code path ([`Gateway::generate`]): render
//! the chat template, tokenize, check limits, run the request on a verifier, stream the
//! detokenized text back.

mod generation;
mod grpc;
mod openai;
mod stop;

pub use generation::{Gateway, GatewayError, Generation, Output, PromptInput, Summary};
pub use grpc::GatewayService;
pub use stop::StopStrings;

use sibyl_engine::TextModel;
use sibyl_proto::client::ServiceAddress;
use sibyl_proto::server::{load_blocking, ServeError};
use sibyl_proto::v1::gateway_server::{GatewayServer, SERVICE_NAME};
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Everything the gateway needs besides the model's text side.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Name the model is served under (what requests put in `model`).
    pub model_name: String,
    /// The verifier (a name that resolves to several addresses spreads requests over them).
    pub verifier: ServiceAddress,
    /// Most tokens one request may generate.
    pub max_tokens_limit: usize,
}

/// Serves the gRPC API on `grpc` and the HTTP API on `http` until `shutdown` completes.
/// `load` (on a blocking thread: it may fetch the model file) reads the tokenizer and chat
/// template; until it has, gRPC health says NOT_SERVING, the gRPC API answers UNAVAILABLE and
/// the HTTP API is not listening.
pub async fn serve<E>(
    grpc: TcpListener,
    http: TcpListener,
    config: GatewayConfig,
    load: impl FnOnce() -> Result<TextModel, E> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until = |mut stopped: watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|&s| s).await;
    };
    let mut builder = tonic::transport::Server::builder();
    let (router, health) = sibyl_proto::server::base_router(&mut builder, SERVICE_NAME).await?;
    let service = GatewayService::default();
    let router = router.add_service(GatewayServer::new(service.clone()));
    let grpc_server = sibyl_proto::server::spawn(router, grpc, until(stopped.clone()));
    let text = match load_blocking(load).await {
        Ok(text) => text,
        Err(error) => {
            grpc_server.abort();
            return Err(error);
        }
    };
    let gateway = Arc::new(Gateway::new(config, text));
    service.set_ready(gateway.clone());
    let http_server = tokio::spawn(
        axum::serve(http, openai::router(gateway))
            .with_graceful_shutdown(until(stopped))
            .into_future(),
    );
    sibyl_proto::server::set_serving(&health, SERVICE_NAME).await;
    tracing::info!("gateway ready");
    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    grpc_result??;
    http_result?.map_err(ServeError::Http)?;
    Ok(())
}
