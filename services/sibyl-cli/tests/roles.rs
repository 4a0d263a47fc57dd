//! The roles as separate `sibyl` processes on loopback: the output through the gateway does
//! not change when a drafter process is killed mid-generation, and `sibyl serve` says where
//! it listens and answers there.

use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_tests::{generate_text, serve_banner, Processes, RoleProcesses};
use std::process::{Child, Command, Stdio};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .args(args)
        .env("SIBYL_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("sibyl starts")
}

fn model_path() -> String {
    let path = sibyl_tests::test_model_path().expect("test model");
    path.to_string_lossy().into_owned()
}

fn request(prompt: &str, speculation: pb::SpeculationMode) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens: 160,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: speculation as i32,
            drafters: Vec::new(),
        }),
        ..pb::GenerateRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_drafter_process_mid_generation_leaves_the_output_unchanged() {
    let model = model_path();
    let mut roles = RoleProcesses::spawn(env!("CARGO_BIN_EXE_sibyl").as_ref(), &model, 2).unwrap();
    let mut client = roles.serving_gateway().await.unwrap();
    let prompt =
        "def bubble_sort(items):\n    \"\"\"Sort items in place.\"\"\"\n    n = len(items)\n";
    let (plain, _) = generate_text(
        &mut client,
        request(prompt, pb::SpeculationMode::Off),
        |_| {},
    )
    .await
    .unwrap();
    let (both, summary) = generate_text(
        &mut client,
        request(prompt, pb::SpeculationMode::On),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(both, plain);
    assert!(summary
        .drafters
        .iter()
        .all(|d| d.state() == pb::DrafterState::Connected));

    let first_drafter = &mut roles.processes.0[0];
    let kill = |delta| {
        if delta == 1 {
            first_drafter.kill().expect("kill the drafter");
        }
    };
    let (after_kill, summary) =
        generate_text(&mut client, request(prompt, pb::SpeculationMode::On), kill)
            .await
            .unwrap();
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
    let banner = serve_banner(&mut serve, 4).await;
    let _processes = Processes(vec![serve]);
    let (_, grpc) = banner.unwrap();
    let mut client = GatewayClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let models = client
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models.len(), 1);
    let request = request("def add(a, b):", pb::SpeculationMode::Unspecified);
    let (text, summary) = generate_text(&mut client, request, |_| {}).await.unwrap();
    assert!(!text.is_empty());
    assert!(summary.usage.unwrap().completion_tokens > 0);
}
