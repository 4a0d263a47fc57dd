//! The gateway role: the public API. `sibyl.v1.Gateway` over gRPC and an OpenAI-compatible
//! HTTP API on the same process, both through one code path ([`Gateway::generate`]): render
//! the chat template, tokenize, check limits, run the request on a verifier, stream the
//! detokenized text back.

mod generation;
mod grpc;
mod llamacpp;
mod openai;
mod params;
mod reasoning;
mod stop;
mod wire;

pub use generation::{Api, Gateway, GatewayError, Generation, Output, PromptInput, Summary};
pub use grpc::GatewayService;
pub use params::{
    DrafterState, DrafterStats, FinishReason, Sampling, Speculation, MAX_TEMPERATURE,
};
pub use reasoning::ReasoningParser;
pub use sibyl_engine::SamplingDefaults;
pub use stop::StopStrings;

use sibyl_engine::TextModel;
use sibyl_proto::auth::{ApiKeys, InternalToken, RequireKey};
use sibyl_proto::client::ServiceAddress;
use sibyl_proto::server::Listener;
use sibyl_proto::server::{run_role, Health, OnLoadError, ServeError, ShutdownSwitch};
use sibyl_proto::tls::{ClientTls, ServerTls};
use sibyl_proto::v1::gateway_server::{GatewayServer, SERVICE_NAME};
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::Router;

/// Everything the gateway needs besides the model's text side.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Name the model is served under (what requests put in `model`).
    pub model_name: String,
    /// The verifiers: requests are spread over every address they resolve to (a name with
    /// several addresses, or several names).
    pub verifiers: Vec<ServiceAddress>,
    /// Most tokens one request may generate.
    pub max_tokens_limit: usize,
    /// Interval of the SSE comments a stream sends while no token is ready.
    pub sse_keep_alive: Duration,
    /// The API keys requests must carry; `None`: the API is open to anyone who reaches it.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// The token shown to the verifier (`--internal-token-file`).
    pub internal_token: Option<InternalToken>,
    /// How long open streams may go on once shutdown begins; then each ends with an error
    /// that says the gateway is shutting down.
    pub drain_timeout: Duration,
    /// The certificate authorities an `https://` verifier is checked against (`--tls-ca`).
    pub verifier_tls: Option<Arc<ClientTls>>,
    /// TLS on both listeners (HTTPS and gRPC over TLS); `None`: plain text.
    pub tls: Option<Arc<ServerTls>>,
    /// Serve `/metrics` on the HTTP API's port (behind the keys, when there are keys);
    /// `false` where the role serves it on a port of its own.
    pub metrics_on_http: bool,
    /// Split reasoning models' thinking into chat responses' `reasoning_content`
    /// (`--reasoning-parser`); `None`: the answer's text is all content.
    pub reasoning_parser: Option<ReasoningParser>,
    /// Sampling for HTTP requests that set none, over what the model file recommends
    /// (`--override-generation-config`).
    pub sampling_override: SamplingDefaults,
}

/// The default [`GatewayConfig::sse_keep_alive`]: well under the idle timeouts of common
/// proxies and load balancers (60 s for nginx and AWS ALB).
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Serves the gRPC API on `grpc` and the HTTP API on `http` until `shutdown` completes.
/// `load` (on a blocking thread: it may fetch the model file) reads the tokenizer and chat
/// template; until it has, gRPC health says NOT_SERVING, the gRPC API answers UNAVAILABLE and
/// the HTTP API is not listening. A failed load ends the server or is retried, as `on_error`
/// says. Once loaded, health follows the verifier: SERVING while it answers (checked every
/// [`VERIFIER_CHECK_INTERVAL`]). With API keys, every request but `/health` and gRPC health
/// needs one. With TLS in the config both listeners speak only TLS. The HTTP API also
/// serves `/metrics` unless the config says not to.
pub async fn serve<E>(
    grpc: TcpListener,
    http: TcpListener,
    config: GatewayConfig,
    load: impl FnMut() -> Result<TextModel, E> + Send + 'static,
    on_error: OnLoadError,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    sibyl_telemetry::metrics::gateway();
    match &config.api_keys {
        Some(keys) => tracing::info!(keys = keys.len(), "requests need an API key"),
        None => tracing::warn!(
            "no API keys (--api-key-file): anyone who can reach this gateway can use it"
        ),
    }
    let authorize = RequireKey(config.api_keys.clone());
    let switch = ShutdownSwitch::default();
    let (grpc_stopped, http_stopped) = (switch.stopped(), switch.stopped());
    let service = GatewayService::default();
    let drain_timeout = config.drain_timeout;
    let draining = service.clone();
    tokio::spawn(async move {
        shutdown.await;
        switch.trigger();
        tokio::time::sleep(drain_timeout).await;
        if let Some(gateway) = draining.ready() {
            gateway.end_streams();
        }
    });
    let add = |router: Router| {
        router.add_service(GatewayServer::with_interceptor(service.clone(), authorize))
    };
    let grpc = Listener {
        tcp: grpc,
        tls: config.tls.clone(),
    };
    let tls = config.tls.clone();
    let mut http_server = None;
    let ready = |text, health| {
        let metrics = config.metrics_on_http;
        let gateway = Arc::new(Gateway::new(config, text));
        service.set_ready(gateway.clone());
        // Health is the verifier's to decide from here on.
        tokio::spawn(follow_verifier(gateway.clone(), health));
        let router = openai::router(gateway, metrics);
        http_server = Some(match tls {
            None => {
                let server = axum::serve(http, router).with_graceful_shutdown(http_stopped);
                tokio::spawn(server.into_future())
            }
            Some(tls) => tokio::spawn(serve_https(http, router, tls, http_stopped)),
        });
        false
    };
    run_role(grpc, SERVICE_NAME, add, load, ready, on_error, grpc_stopped).await?;
    if let Some(server) = http_server {
        server.await?.map_err(ServeError::Http)?;
    }
    Ok(())
}

/// Serves `router` over HTTPS on `listener` until `stopped`, then lets open requests end.
async fn serve_https(
    listener: TcpListener,
    router: axum::Router,
    tls: Arc<ServerTls>,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let stopping = handle.clone();
    tokio::spawn(async move {
        stopped.await;
        stopping.graceful_shutdown(None);
    });
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls.rustls());
    axum_server::from_tcp_rustls(listener.into_std()?, config)
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

/// How often the gateway checks that its verifier answers (while it does; four times as
/// often while it does not, so that the gateway is back soon after the verifier).
pub const VERIFIER_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Keeps the gateway's health and `sibyl_gateway_verifier_up` in step with the verifier's
/// answers; logs once when it stops answering and once when it is back.
async fn follow_verifier(gateway: Arc<Gateway>, health: Health) {
    let up = &sibyl_telemetry::metrics::gateway().verifier_up;
    let mut last: Option<bool> = None;
    let mut failures = 0u32;
    loop {
        let status = gateway.verifier_status().await;
        failures = if status.is_ok() { 0 } else { failures + 1 };
        // One missed answer from a verifier that answered before is not enough to leave
        // the load balancer (a busy machine can miss a deadline).
        let now = status.is_ok() || (last == Some(true) && failures < 2);
        match (&status, last) {
            // At start-up the verifier is often still loading its model.
            (Err(error), None) => tracing::warn!(
                %error,
                "waiting for the verifier; health says NOT_SERVING until it answers"
            ),
            (Err(error), Some(true)) if !now => tracing::error!(
                %error,
                "the verifier does not answer; health says NOT_SERVING until it does"
            ),
            (Ok(_), Some(false)) => tracing::info!("the verifier answers again"),
            _ => {}
        }
        last = Some(now);
        up.set(i64::from(now));
        health.set_serving(now).await;
        let interval = if now {
            VERIFIER_CHECK_INTERVAL
        } else {
            VERIFIER_CHECK_INTERVAL / 4
        };
        tokio::time::sleep(interval).await;
    }
}
