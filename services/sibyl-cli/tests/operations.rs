//! What operators rely on, with the roles as separate `sibyl` processes: Prometheus metrics
//! on every role, one trace per generation across gateway, verifier and drafter (received
//! by an OTLP receiver run here), JSON logs with the request id, and health that says
//! NOT_SERVING while a model file or the verifier is missing, then recovers.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sibyl_proto::client::{check_serving, wait_until_serving};
use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_tests::{free_port, generate_text, Processes, RoleProcesses};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn model_path() -> String {
    let path = sibyl_tests::test_model_path().expect("test model");
    path.to_string_lossy().into_owned()
}

fn sibyl(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sibyl"));
    command
        .args(args)
        .env("SIBYL_LOG", "info")
        .stdout(Stdio::null());
    command
}

/// `GET /metrics` at `addr`, as text.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"));
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// The value of the sample `series` (name with labels, as printed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `condition` every 200 ms until it holds or `timeout` passes.
async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    condition()
}

/// Scrapes `addr` until `ready` holds for its text or 10 s pass; returns the last text.
/// A role records a request once its last message is on the wire, so a client that has
/// read that message can scrape a moment too early.
async fn scrape_when(addr: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    eventually(Duration::from_secs(10), || {
        text = scrape(addr);
        ready(&text)
    })
    .await;
    text
}

async fn serving(addr: SocketAddr, service: &str) -> bool {
    check_serving(
        "127.0.0.1",
        addr.port(),
        service,
        None,
        Duration::from_secs(2),
    )
    .await
    .is_ok()
}

/// A span received: service name, span name, trace id, parent span id.
type SpanRecord = (String, String, Vec<u8>, Vec<u8>);

/// Spans received.
#[derive(Default, Clone)]
struct Receiver(Arc<Mutex<Vec<SpanRecord>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(name) => Some(name.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((
                        service.clone(),
                        span.name,
                        span.trace_id,
                        span.parent_span_id,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_metrics_and_one_generation_is_one_trace() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{otlp}");
    let model = model_path();
    let roles = RoleProcesses::spawn_with_env(
        env!("CARGO_BIN_EXE_sibyl").as_ref(),
        &model,
        1,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .unwrap();
    let mut client = roles.serving_gateway().await.unwrap();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(
            "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n".into(),
        )),
        max_tokens: 48,
        ..pb::GenerateRequest::default()
    };
    let (_, summary) = generate_text(&mut client, request, |_| {}).await.unwrap();
    let generated = f64::from(summary.usage.unwrap().completion_tokens);

    let (drafter, verifier) = (roles.metrics[0], roles.metrics[1]);
    let gateway_requests = "sibyl_gateway_requests_total{api=\"grpc\",outcome=\"ok\"}";
    let gateway_text =
        scrape_when(roles.http, |text| sample(text, gateway_requests).is_some()).await;
    assert_eq!(
        sample(&gateway_text, gateway_requests),
        Some(1.0),
        "{gateway_text}"
    );
    assert_eq!(
        sample(&gateway_text, "sibyl_gateway_generated_tokens_total"),
        Some(generated)
    );
    assert_eq!(
        sample(&gateway_text, "sibyl_gateway_verifier_up"),
        Some(1.0)
    );
    assert!(gateway_text.contains("sibyl_gateway_time_to_first_token_seconds_bucket"));

    // The session's thread records the session and lowers the gauge just after it has
    // sent the summary.
    let verifier_text = scrape_when(verifier, |text| {
        sample(text, "sibyl_verifier_active_sessions") == Some(0.0)
    })
    .await;
    let value = |series: &str| sample(&verifier_text, series).unwrap_or(-1.0);
    assert_eq!(value("sibyl_verifier_active_sessions"), 0.0);
    assert_eq!(value("sibyl_verifier_generated_tokens_total"), generated);
    assert_eq!(
        value("sibyl_verifier_sessions_total{outcome=\"completed\"}"),
        1.0
    );
    assert_eq!(value("sibyl_verifier_kv_cache_bytes"), 0.0);
    assert_eq!(value("sibyl_verifier_model_loaded"), 1.0);
    let steps = value("sibyl_verifier_steps_total");
    assert!(steps >= 1.0 && steps <= generated + 1.0, "{steps}");
    assert_eq!(value("sibyl_verifier_step_duration_seconds_count"), steps);
    assert_eq!(
        value("sibyl_verifier_accepted_tokens_per_step_count"),
        steps
    );
    let proposed = value("sibyl_verifier_draft_tokens_proposed_total{drafter=\"ngram\"}");
    let accepted = value("sibyl_verifier_draft_tokens_accepted_total{drafter=\"ngram\"}");
    assert!(
        accepted >= 0.0 && accepted <= proposed,
        "{accepted} of {proposed}"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            sample(
                &scrape(verifier),
                "sibyl_verifier_drafter_up{drafter=\"ngram\"}",
            ) == Some(1.0)
        })
        .await
    );
    assert!(verifier_text.contains("process_resident_memory_bytes"));

    let drafter_text = scrape_when(drafter, |text| {
        sample(text, "sibyl_drafter_blocks_sent_total").is_some()
    })
    .await;
    assert!(
        sample(&drafter_text, "sibyl_drafter_blocks_sent_total").unwrap_or(0.0) >= 1.0,
        "{drafter_text}"
    );
    assert!(sample(&drafter_text, "sibyl_drafter_draft_tokens_sent_total").is_some());

    // One trace: the gateway's generation, the verifier's session and its steps, and the
    // drafter's stream, all under the same trace id, each span from its own process.
    let complete = |spans: &[SpanRecord]| {
        let root = spans
            .iter()
            .find(|(service, name, ..)| service == "sibyl-gateway" && name == "generation")?;
        let trace = &root.2;
        let in_trace: HashSet<(&str, &str)> = spans
            .iter()
            .filter(|s| &s.2 == trace)
            .map(|s| (s.0.as_str(), s.1.as_str()))
            .collect();
        let wanted = [
            ("sibyl-verifier", "verify_session"),
            ("sibyl-verifier", "verify_step"),
            ("sibyl-drafter", "draft_session"),
        ];
        wanted.iter().all(|w| in_trace.contains(w)).then_some(())
    };
    let arrived = eventually(Duration::from_secs(30), || {
        complete(&receiver.0.lock().unwrap()).is_some()
    })
    .await;
    let spans = receiver.0.lock().unwrap().clone();
    let names: HashMap<(String, String), usize> =
        spans.iter().fold(HashMap::new(), |mut counts, s| {
            *counts.entry((s.0.clone(), s.1.clone())).or_default() += 1;
            counts
        });
    assert!(arrived, "spans received: {names:?}");
    assert!(
        spans.iter().all(|s| !s.2.is_empty()),
        "every span has a trace id"
    );
}

/// Reads `child`'s stderr on a thread into shared lines.
fn collect_stderr(child: &mut Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().expect("piped stderr");
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_bad_model_file_is_not_serving_until_it_is_fixed() {
    let dir = std::env::temp_dir().join(format!("sibyl-ops-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let _ = std::fs::remove_file(&path);
    let (grpc, metrics) = (free_port().unwrap(), free_port().unwrap());
    let mut verifier = sibyl(&[
        "verifier",
        "--model",
        path.to_str().unwrap(),
        "--grpc-addr",
        &grpc.to_string(),
        "--metrics-addr",
        &metrics.to_string(),
        "--load-retry-ms",
        "300",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let logs = collect_stderr(&mut verifier);
    let mut processes = Processes(vec![verifier]);
    let errors = |logs: &Arc<Mutex<Vec<String>>>| {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("ERROR") && l.contains("cannot load"))
            .cloned()
            .collect::<Vec<_>>()
    };
    // Missing: one error, however many attempts; the process stays up, NOT_SERVING.
    assert!(
        eventually(Duration::from_secs(30), || errors(&logs).len() == 1).await,
        "{:?} (exit: {:?})",
        logs.lock().unwrap(),
        processes.0[0].try_wait()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(errors(&logs).len(), 1, "{:?}", logs.lock().unwrap());
    assert!(
        processes.0[0].try_wait().unwrap().is_none(),
        "still running"
    );
    assert!(!serving(grpc, "").await);
    let text = tokio::task::spawn_blocking(move || scrape(metrics))
        .await
        .unwrap();
    assert_eq!(sample(&text, "sibyl_verifier_model_loaded"), Some(0.0));

    // A file that is not a model: a second, different error.
    write_atomically(&path, b"this is not a GGUF file");
    assert!(eventually(Duration::from_secs(30), || errors(&logs).len() == 2).await);
    assert!(!serving(grpc, "").await);

    // The right file: it loads and serves, without a restart.
    std::fs::copy(model_path(), dir.join("incoming")).unwrap();
    std::fs::rename(dir.join("incoming"), &path).unwrap();
    assert!(
        wait_until_serving(grpc, Duration::from_secs(60)).await,
        "{:?}",
        logs.lock().unwrap()
    );
    let text = tokio::task::spawn_blocking(move || scrape(metrics))
        .await
        .unwrap();
    assert_eq!(sample(&text, "sibyl_verifier_model_loaded"), Some(1.0));
    assert!(processes.0[0].try_wait().unwrap().is_none());
    // Dropping the list kills and reaps the verifier (clearing it would leave it running).
    drop(processes);
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_its_verifier_and_a_lost_drafter_is_reported() {
    let model = model_path();
    let (gateway_grpc, gateway_http, verifier_grpc) = (
        free_port().unwrap(),
        free_port().unwrap(),
        free_port().unwrap(),
    );
    let mut gateway = sibyl(&[
        "gateway",
        "--model",
        &model,
        "--verifier",
        &format!("http://{verifier_grpc}"),
        "--grpc-addr",
        &gateway_grpc.to_string(),
        "--http-addr",
        &gateway_http.to_string(),
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let gateway_logs = collect_stderr(&mut gateway);
    let mut processes = Processes(vec![gateway]);
    // No verifier: the gateway stays up and says NOT_SERVING, with one error in its log.
    let said_so = eventually(Duration::from_secs(30), || {
        gateway_logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("waiting for the verifier"))
    })
    .await;
    assert!(said_so, "{:?}", gateway_logs.lock().unwrap());
    assert!(!serving(gateway_grpc, "").await);
    assert!(processes.0[0].try_wait().unwrap().is_none());

    // A verifier whose only drafter's name does not resolve: it serves (plain decoding is
    // still exact), and its `sibyl.v1.Drafter` health entry and metric say the drafter is
    // missing.
    let verifier_metrics = free_port().unwrap();
    let mut verifier = sibyl(&[
        "verifier",
        "--model",
        &model,
        "--grpc-addr",
        &verifier_grpc.to_string(),
        "--metrics-addr",
        &verifier_metrics.to_string(),
        "--drafter",
        "ngram=http://no-such-drafter.invalid:50061",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let verifier_logs = collect_stderr(&mut verifier);
    processes.0.push(verifier);
    assert!(wait_until_serving(verifier_grpc, Duration::from_secs(60)).await);
    assert!(
        wait_until_serving(gateway_grpc, Duration::from_secs(30)).await,
        "the gateway serves once its verifier answers"
    );
    assert!(
        gateway_logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("the verifier answers again")),
        "{:?}",
        gateway_logs.lock().unwrap()
    );
    assert!(!serving(verifier_grpc, sibyl_verifier::DRAFTERS_HEALTH).await);
    let text = tokio::task::spawn_blocking(move || scrape(verifier_metrics))
        .await
        .unwrap();
    assert_eq!(
        sample(&text, "sibyl_verifier_drafter_up{drafter=\"ngram\"}"),
        Some(0.0)
    );
    // The drafter checks run every 2 s, apart from serving: under load the first one may
    // not have finished yet.
    let warnings = || -> Vec<String> {
        verifier_logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("drafter does not answer"))
            .cloned()
            .collect()
    };
    eventually(Duration::from_secs(30), || !warnings().is_empty()).await;
    let warned = warnings();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains("no-such-drafter.invalid"), "{warned:?}");

    let mut client = GatewayClient::connect(format!("http://{gateway_grpc}"))
        .await
        .unwrap();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("def add(a, b):".into())),
        max_tokens: 8,
        ..pb::GenerateRequest::default()
    };
    let (text, _) = generate_text(&mut client, request, |_| {}).await.unwrap();
    assert!(!text.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_request() {
    let model = model_path();
    let (http, grpc) = (free_port().unwrap(), free_port().unwrap());
    let mut serve = sibyl(&[
        "serve",
        "--model",
        &model,
        "--http-addr",
        &http.to_string(),
        "--grpc-addr",
        &grpc.to_string(),
        "--log-json",
    ])
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let logs = collect_stderr(&mut serve);
    let _processes = Processes(vec![serve]);
    assert!(wait_until_serving(grpc, Duration::from_secs(120)).await);
    let mut client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("def add(a, b):".into())),
        max_tokens: 8,
        ..pb::GenerateRequest::default()
    });
    request
        .metadata_mut()
        .insert("x-request-id", "test-request-42".parse().unwrap());
    let mut stream = client.generate(request).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    let finished = eventually(Duration::from_secs(10), || {
        logs.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("generation finished"))
    })
    .await;
    let lines = logs.lock().unwrap().clone();
    assert!(finished, "{lines:?}");
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
    }
    let line = lines
        .iter()
        .find(|l| l.contains("generation finished"))
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(value["span"]["request_id"], "test-request-42", "{line}");
    assert_eq!(value["level"], "INFO");
}
