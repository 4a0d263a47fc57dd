//! The roles as separate `sibyl` processes on loopback: the output through the gateway does
//! not change when a drafter process is killed mid-generation, and `sibyl serve` says where
//! it listens and answers there.

use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient, generate_response::Event};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MODEL: &str = "smollm2-135m";

/// Kills its processes when dropped, so a failed test leaves none behind.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .args(args)
        .env("SIBYL_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sibyl starts")
}

fn model_path() -> String {
    sibyl_models::locate(MODEL, &sibyl_models::cache_dir(), &sibyl_models::NoProgress)
        .expect("test model")
        .to_string_lossy()
        .into_owned()
}

async fn generate(
    client: &mut GatewayClient<tonic::transport::Channel>,
    prompt: &str,
    speculation: pb::SpeculationMode,
    mut on_first_delta: impl FnMut(),
) -> (String, pb::GenerateSummary) {
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens: 160,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: speculation as i32,
            drafters: Vec::new(),
        }),
        ..pb::GenerateRequest::default()
    };
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let mut text = String::new();
    let mut deltas = 0;
    while let Some(message) = stream.message().await.expect("stream") {
        match message.event {
            Some(Event::Delta(delta)) => {
                deltas += 1;
                if deltas == 1 {
                    on_first_delta();
                }
                text.push_str(&delta.text);
            }
            Some(Event::Summary(summary)) => return (text, summary),
            None => {}
        }
    }
    panic!("no summary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_drafter_process_mid_generation_leaves_the_output_unchanged() {
    let model = model_path();
    let (drafter_a, drafter_b, verifier, gateway, http) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let mut processes = Processes(Vec::new());
    for addr in [drafter_a, drafter_b] {
        processes.0.push(spawn(&[
            "drafter",
            "--kind",
            "ngram",
            "--model",
            &model,
            "--grpc-addr",
            &addr.to_string(),
        ]));
    }
    processes.0.push(spawn(&[
        "verifier",
        "--model",
        &model,
        "--grpc-addr",
        &verifier.to_string(),
        "--drafter",
        &format!("ngram=http://{drafter_a}"),
        "--drafter",
        &format!("ngram=http://{drafter_b}"),
    ]));
    processes.0.push(spawn(&[
        "gateway",
        "--model",
        &model,
        "--verifier",
        &format!("http://{verifier}"),
        "--grpc-addr",
        &gateway.to_string(),
        "--http-addr",
        &http.to_string(),
    ]));
    for addr in [drafter_a, drafter_b, verifier, gateway] {
        assert!(
            sibyl_proto::client::wait_until_serving(addr, Duration::from_secs(120)).await,
            "{addr} did not become SERVING"
        );
    }
    let mut client = GatewayClient::connect(format!("http://{gateway}"))
        .await
        .unwrap();
    let prompt =
        "def bubble_sort(items):\n    \"\"\"Sort items in place.\"\"\"\n    n = len(items)\n";
    let (plain, _) = generate(&mut client, prompt, pb::SpeculationMode::Off, || {}).await;
    let (both, summary) = generate(&mut client, prompt, pb::SpeculationMode::On, || {}).await;
    assert_eq!(both, plain);
    assert!(summary
        .drafters
        .iter()
        .all(|d| d.state() == pb::DrafterState::Connected));

    let first_drafter = &mut processes.0[0];
    let (after_kill, summary) = generate(&mut client, prompt, pb::SpeculationMode::On, || {
        first_drafter.kill().expect("kill the drafter");
    })
    .await;
    assert_eq!(after_kill, plain);
    let states: Vec<_> = summary.drafters.iter().map(|d| d.state()).collect();
    assert!(
        states.contains(&pb::DrafterState::Failed),
        "{:?}",
        summary.drafters
    );
    assert!(
        states.contains(&pb::DrafterState::Connected),
        "{:?}",
        summary.drafters
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_where_it_listens_and_answers_there() {
    let model = model_path();
    let mut serve = spawn(&[
        "serve",
        "--model",
        &model,
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
    ]);
    let stdout = serve.stdout.take().unwrap();
    let _processes = Processes(vec![serve]);
    let lines = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .take(3)
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .unwrap()
    .expect("serve prints");
    assert!(lines[0].contains("ready"), "{lines:?}");
    let grpc = lines
        .iter()
        .find(|l| l.contains("gRPC gateway"))
        .and_then(|l| l.split_whitespace().nth(2))
        .expect("gRPC address printed")
        .to_string();
    let mut client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);
    let (text, summary) = generate(
        &mut client,
        "def add(a, b):",
        pb::SpeculationMode::Unspecified,
        || {},
    )
    .await;
    assert!(!text.is_empty());
    assert!(summary.usage.unwrap().completion_tokens > 0);
}
