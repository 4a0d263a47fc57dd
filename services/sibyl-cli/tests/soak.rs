//! A fault soak. The roles run as `sibyl` processes on loopback: an n-gram drafter, two
//! verifiers that draft with it and with a hostile drafter (this test's, sending oversized,
//! out-of-vocabulary and stale blocks all along), and a gateway that spreads requests over
//! both verifiers. Clients send concurrent streaming (gRPC) and non-streaming (HTTP) greedy
//! requests whose answers are known, while the n-gram drafter is killed and restarted, a
//! client stalls and another disconnects mid-stream, and one verifier is sent SIGTERM while
//! the other serves.
//!
//! It asserts: every completed response is its known answer; every failure is an explicit
//! status (gRPC UNAVAILABLE or RESOURCE_EXHAUSTED, HTTP 429 or 503) within
//! [`REQUEST_LIMIT`], never a hang; requests still complete after the verifier is gone; no
//! role logs a panic; each role's resident memory at the end is within [`memory_margin`] of
//! its memory after warm-up; and every process it started exits on SIGTERM within its drain.
//! `SIBYL_SOAK_SECS` sets how long the load runs (default 40).

use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_tests::{free_port, generate_text, http, serve_drafter, Garbage};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Longest any one request may take; past it, it counts as hung.
const REQUEST_LIMIT: Duration = Duration::from_secs(60);
/// Concurrent clients.
const CLIENTS: usize = 3;
const MAX_TOKENS: u32 = 40;
/// The verifiers' drain: a verifier sent SIGTERM must have exited within this and a margin.
const DRAIN_MS: u64 = 8000;
const PROMPTS: [&str; 4] = [
    "def add(items):\n    total = 0\n    for item in items:\n        total += item\n    return total\n\n\ndef add_all(items):\n",
    "One, two, three, four, five, six, seven, eight, nine, ten, one, two, three,",
    "<|im_start|>user\nList the days of the week, one per line.<|im_end|>\n<|im_start|>assistant\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
];

/// What a role may grow by between warm-up and the end: half again, plus 64 MiB (allocator
/// arenas and caches filling on more threads).
fn memory_margin(warm: u64) -> u64 {
    warm + warm / 2 + (64 << 20)
}

/// A `sibyl` process, its stderr in a log file.
struct Role {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Every role started; whatever is still running when this is dropped is killed.
#[derive(Default)]
struct Roles(Vec<Role>);

impl Roles {
    fn spawn(&mut self, dir: &Path, name: &str, args: &[String]) -> usize {
        let log = dir.join(format!("{name}-{}.log", self.0.len()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sibyl"))
            .args(args)
            .env("SIBYL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("sibyl starts");
        self.0.push(Role {
            name: name.to_string(),
            child,
            log,
        });
        self.0.len() - 1
    }

    fn pid(&self, role: usize) -> u32 {
        self.0[role].child.id()
    }

    /// Sends SIGTERM to `role` and waits (at most `limit`) for it to exit; its exit status.
    fn terminate(&mut self, role: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid(role).to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.0[role].child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The lines of every log that mention a panic.
    fn panics(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|role| {
                let text = std::fs::read_to_string(&role.log).unwrap_or_default();
                text.lines()
                    .filter(|l| l.contains("panicked"))
                    .map(|l| format!("{}: {l}", role.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        for role in &mut self.0 {
            let _ = role.child.kill();
            let _ = role.child.wait();
        }
    }
}

/// Resident memory of a process, in bytes.
fn resident(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn request(prompt: &str, speculation: pb::SpeculationMode, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: speculation as i32,
            drafters: Vec::new(),
        }),
        ..pb::GenerateRequest::default()
    }
}

/// How one request of the load ended.
#[derive(Debug)]
enum Outcome {
    Right,
    Wrong(String),
    /// An explicit refusal: UNAVAILABLE, RESOURCE_EXHAUSTED, 429 or 503.
    Refused(String),
    /// Any other failure.
    Unexpected(String),
    Hung,
}

impl Outcome {
    /// What went wrong, unless the outcome is allowed (right, or an explicit refusal).
    fn problem(&self) -> Option<String> {
        match self {
            Outcome::Right | Outcome::Refused(_) => None,
            Outcome::Wrong(what) => Some(format!("wrong answer: {what}")),
            Outcome::Unexpected(what) => Some(format!("unexpected failure: {what}")),
            Outcome::Hung => Some(format!("no answer within {REQUEST_LIMIT:?}")),
        }
    }
}

async fn streamed(mut gateway: GatewayClient<Channel>, prompt: &str, known: &str) -> Outcome {
    let call = generate_text(
        &mut gateway,
        request(prompt, pb::SpeculationMode::On, MAX_TOKENS),
        |_| {},
    );
    match tokio::time::timeout(REQUEST_LIMIT, call).await {
        Err(_) => Outcome::Hung,
        Ok(Ok((text, _))) if text == known => Outcome::Right,
        Ok(Ok((text, _))) => Outcome::Wrong(format!("streamed {text:?}, known {known:?}")),
        Ok(Err(status)) => match status.code() {
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => {
                Outcome::Refused(format!("{status:?}"))
            }
            _ => Outcome::Unexpected(format!("{status:?}")),
        },
    }
}

async fn whole(addr: SocketAddr, prompt: &str, known: &str) -> Outcome {
    let body = serde_json::json!({
        "model": "soak",
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    })
    .to_string();
    let headers = [("content-type", "application/json")];
    let call = http(addr, "POST", "/v1/completions", &headers, Some(&body));
    match tokio::time::timeout(REQUEST_LIMIT, call).await {
        Err(_) => Outcome::Hung,
        Ok(Err(error)) => Outcome::Unexpected(format!("{error:#}")),
        Ok(Ok(response)) => match response.status {
            200 => {
                let text = response.json()["choices"][0]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if text == known {
                    Outcome::Right
                } else {
                    Outcome::Wrong(format!("HTTP {text:?}, known {known:?}"))
                }
            }
            429 | 503 => Outcome::Refused(format!("HTTP {}", response.status)),
            status => Outcome::Unexpected(format!("HTTP {status}: {}", response.body)),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_weights_fault_soak_every_answer_is_right_or_an_explicit_refusal() {
    let soak = Duration::from_secs(
        std::env::var("SIBYL_SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(40),
    );
    let model = sibyl_tests::test_model_path().expect("test model");
    let model = model.to_string_lossy().into_owned();
    let dir = tempfile::tempdir().unwrap();
    let mut roles = Roles::default();

    let hostile = serve_drafter(Garbage { vocab: 49152 }).await;
    let (drafter, drafter_metrics) = (free_port().unwrap(), free_port().unwrap());
    let drafter_args = strings(&[
        "drafter",
        "--kind",
        "ngram",
        "--model",
        &model,
        "--grpc-addr",
        &drafter.to_string(),
        "--metrics-addr",
        &drafter_metrics.to_string(),
    ]);
    let mut ngram = roles.spawn(dir.path(), "drafter-ngram", &drafter_args);
    let verifiers = [free_port().unwrap(), free_port().unwrap()];
    let mut verifier_roles = Vec::new();
    for (i, addr) in verifiers.iter().enumerate() {
        let args = strings(&[
            "verifier",
            "--model",
            &model,
            "--served-model-name",
            "soak",
            "--grpc-addr",
            &addr.to_string(),
            "--metrics-addr",
            &free_port().unwrap().to_string(),
            "--drafter",
            &format!("ngram=http://{drafter}"),
            "--drafter",
            &format!("hostile={hostile}"),
            "--idle-timeout-ms",
            "3000",
            "--drain-timeout-ms",
            &DRAIN_MS.to_string(),
            "--prefix-cache-bytes",
            "67108864",
            "--threads",
            "1",
        ]);
        verifier_roles.push(roles.spawn(dir.path(), &format!("verifier-{i}"), &args));
    }
    let (grpc, http_addr) = (free_port().unwrap(), free_port().unwrap());
    let gateway_args = strings(&[
        "gateway",
        "--model",
        &model,
        "--served-model-name",
        "soak",
        "--verifier",
        &format!("http://{},http://{}", verifiers[0], verifiers[1]),
        "--grpc-addr",
        &grpc.to_string(),
        "--http-addr",
        &http_addr.to_string(),
        "--drain-timeout-ms",
        "5000",
    ]);
    let gateway_role = roles.spawn(dir.path(), "gateway", &gateway_args);
    for addr in [drafter, verifiers[0], verifiers[1], grpc] {
        assert!(
            sibyl_proto::client::wait_until_serving(addr, Duration::from_secs(120)).await,
            "{addr} did not become SERVING"
        );
    }
    let gateway = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();

    // The known answers: plain greedy decoding.
    let mut known = Vec::new();
    for prompt in PROMPTS {
        let mut client = gateway.clone();
        let plain = request(prompt, pb::SpeculationMode::Off, MAX_TOKENS);
        let (text, _) = generate_text(&mut client, plain, |_| {}).await.unwrap();
        assert!(!text.is_empty());
        known.push(text);
    }
    // Warm-up: every prompt once through each path, then each role's memory.
    for (prompt, answer) in PROMPTS.iter().zip(&known) {
        let outcome = streamed(gateway.clone(), prompt, answer).await;
        assert!(matches!(outcome, Outcome::Right), "warm-up: {outcome:?}");
        let outcome = whole(http_addr, prompt, answer).await;
        assert!(matches!(outcome, Outcome::Right), "warm-up: {outcome:?}");
    }
    let watched = [ngram, verifier_roles[1], gateway_role];
    let warm: Vec<u64> = watched.iter().map(|&r| resident(roles.pid(r))).collect();

    // The load.
    let start = Instant::now();
    let known = Arc::new(known);
    let outcomes: Arc<Mutex<Vec<(Duration, Outcome)>>> = Arc::default();
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (gateway, known, outcomes) = (gateway.clone(), known.clone(), outcomes.clone());
        clients.push(tokio::spawn(async move {
            let mut i = client;
            while start.elapsed() < soak {
                let (prompt, answer) = (PROMPTS[i % PROMPTS.len()], &known[i % PROMPTS.len()]);
                let outcome = if i % 2 == 0 {
                    streamed(gateway.clone(), prompt, answer).await
                } else {
                    whole(http_addr, prompt, answer).await
                };
                outcomes.lock().unwrap().push((start.elapsed(), outcome));
                i += 1;
            }
        }));
    }

    // The faults, at fractions of the soak.
    let at = |fraction: f64| start + soak.mul_f64(fraction);
    tokio::time::sleep_until(at(0.15).into()).await;
    roles.0[ngram].child.kill().unwrap();
    roles.0[ngram].child.wait().unwrap();
    tokio::time::sleep_until(at(0.3).into()).await;
    ngram = roles.spawn(dir.path(), "drafter-ngram", &drafter_args);
    // A client that stops reading its stream, and one that goes away mid-stream.
    let mut stalled = gateway.clone();
    let mut stalled_stream = stalled
        .generate(request(PROMPTS[3], pb::SpeculationMode::On, 400))
        .await
        .unwrap()
        .into_inner();
    stalled_stream.message().await.unwrap();
    let mut leaving = gateway.clone();
    let mut leaving_stream = leaving
        .generate(request(PROMPTS[1], pb::SpeculationMode::On, 400))
        .await
        .unwrap()
        .into_inner();
    leaving_stream.message().await.unwrap();
    leaving_stream.message().await.unwrap();
    drop(leaving_stream);
    tokio::time::sleep_until(at(0.5).into()).await;
    // One verifier drains and exits while the other serves.
    let drain_limit = Duration::from_millis(DRAIN_MS) + Duration::from_secs(10);
    let exit = tokio::task::block_in_place(|| roles.terminate(verifier_roles[0], drain_limit));
    assert!(
        exit.is_some_and(|s| s.success()),
        "verifier-0 after SIGTERM: {exit:?}"
    );
    let gone = Instant::now();
    drop(stalled_stream);
    for client in clients {
        client.await.unwrap();
    }
    let ended = Instant::now();

    let end: Vec<u64> = [ngram, verifier_roles[1], gateway_role]
        .iter()
        .map(|&r| resident(roles.pid(r)))
        .collect();
    let outcomes = outcomes.lock().unwrap();
    let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|(_, o)| f(o)).count();
    let right = count(|o| matches!(o, Outcome::Right));
    let refused: Vec<&str> = outcomes
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Refused(why) => Some(why.as_str()),
            _ => None,
        })
        .collect();
    let late = outcomes
        .iter()
        .filter(|(t, o)| start + *t > gone && matches!(o, Outcome::Right))
        .count();
    eprintln!(
        "soak: {} requests in {:.0} s: {right} right, {} refused, {late} right after \
         verifier-0 was gone; resident MiB after warm-up {:?}, at the end {:?} \
         (drafter, verifier-1, gateway); refusals {refused:?}",
        outcomes.len(),
        (ended - start).as_secs_f64(),
        refused.len(),
        warm.iter().map(|b| b >> 20).collect::<Vec<_>>(),
        end.iter().map(|b| b >> 20).collect::<Vec<_>>(),
    );
    let bad: Vec<String> = outcomes
        .iter()
        .filter_map(|(t, o)| Some(format!("at {t:?}: {}", o.problem()?)))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert!(
        right >= outcomes.len() / 2,
        "{right} of {} right",
        outcomes.len()
    );
    assert!(late > 0, "no request completed after verifier-0 was gone");
    for ((name, warm), end) in ["drafter", "verifier-1", "gateway"]
        .iter()
        .zip(&warm)
        .zip(&end)
    {
        assert!(
            *end <= memory_margin(*warm),
            "{name}: {end} bytes resident at the end, {warm} after warm-up"
        );
    }

    // Every role left exits on SIGTERM within its drain, and none logged a panic.
    for role in [gateway_role, verifier_roles[1], ngram] {
        let exit = tokio::task::block_in_place(|| roles.terminate(role, drain_limit));
        let name = roles.0[role].name.clone();
        assert!(exit.is_some(), "{name} still running after SIGTERM");
    }
    let panics = roles.panics();
    assert!(panics.is_empty(), "{panics:#?}");
}
