//! The roles as separate `sibyl` processes on loopback: the output through the gateway does
//! not change when a drafter process is killed mid-generation, and `sibyl serve` says where
//! it listens and answers there, with a chat template given at start.

use sibyl_proto::v1::{self as pb, gateway_client::GatewayClient};
use sibyl_tests::{generate_text, http, serve_banner, Processes, RoleProcesses};
use std::process::{Child, Command, Stdio};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sibyl"))
        .args(args)
        .env("SIBYL_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("sibyl starts")
}

/// `sibyl serve` of the test model on free ports, with `extra` arguments.
fn spawn_serve(extra: &[&str]) -> Child {
    let model = model_path();
    let mut args = vec!["serve", "--model", &model];
    args.extend(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"]);
    args.extend(extra);
    spawn(&args)
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
    let mut serve = spawn_serve(&[]);
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

/// The HTTP address `sibyl serve`'s banner gives (`  OpenAI HTTP API  http://ADDR/v1`).
fn http_addr(banner: &[String]) -> std::net::SocketAddr {
    banner
        .iter()
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("http://")))
        .and_then(|w| w.strip_suffix("/v1"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in {banner:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_given_at_start_renders_chats_in_place_of_the_file_s() {
    let model = model_path();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("template.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}[assistant] {% endif %}",
    )
    .unwrap();
    let inline = "{{ messages[0].content | upper }} =>";
    let file = file.to_string_lossy().into_owned();
    let messages = serde_json::json!({"messages": [{"role": "user", "content": "hello there"}]});
    for (template, expected) in [
        (file.as_str(), "[user] hello there\n[assistant] "),
        (inline, "HELLO THERE =>"),
    ] {
        let mut serve = spawn_serve(&["--chat-template", template]);
        let banner = serve_banner(&mut serve, 4).await;
        let _processes = Processes(vec![serve]);
        let addr = http_addr(&banner.unwrap().0);
        let post = |path: &'static str, body: serde_json::Value| async move {
            let response = http(addr, "POST", path, &[], Some(&body.to_string()))
                .await
                .unwrap();
            assert_eq!(response.status, 200, "{path}: {}", response.body);
            response.json()
        };
        let tokens = post("/tokenize", messages.clone()).await["tokens"].clone();
        let text = post("/detokenize", serde_json::json!({ "tokens": tokens })).await;
        assert_eq!(text["prompt"], expected, "{template}");
    }
    // A template that does not compile, or a file that is not there, stops the server at
    // start with a message naming the flag.
    for bad in ["{% for m in messages %}", "no-such-template.jinja"] {
        let mut serve = Command::new(env!("CARGO_BIN_EXE_sibyl"))
            .args(["serve", "--model", &model, "--chat-template", bad])
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(status) = serve.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                serve.kill().unwrap();
                panic!("{bad}: serve did not stop");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "{bad}: {stderr}");
        assert!(stderr.contains("--chat-template"), "{bad}: {stderr}");
    }
}
