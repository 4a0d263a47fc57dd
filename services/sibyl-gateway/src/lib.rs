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
use sibyl_proto::server::{run_role, ServeError, ShutdownSwitch};
use sibyl_proto::v1::gateway_server::{GatewayServer, SERVICE_NAME};
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::server::Router;

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
    let switch = ShutdownSwitch::default();
    let (grpc_stopped, http_stopped) = (switch.stopped(), switch.stopped());
    tokio::spawn(async move {
        shutdown.await;
        switch.trigger();
    });
    let service = GatewayService::default();
    let add = |router: Router| router.add_service(GatewayServer::new(service.clone()));
    let mut http_server = None;
    let ready = |text| {
        let gateway = Arc::new(Gateway::new(config, text));
        service.set_ready(gateway.clone());
        let server =
            axum::serve(http, openai::router(gateway)).with_graceful_shutdown(http_stopped);
        http_server = Some(tokio::spawn(server.into_future()));
    };
    run_role(grpc, SERVICE_NAME, add, load, ready, grpc_stopped).await?;
    if let Some(server) = http_server {
        server.await?.map_err(ServeError::Http)?;
    }
    Ok(())
}
