//! Off-the-shelf clients against the services: the official `openai` and `anthropic` Python
//! packages against the gateway's HTTP API, and grpcurl (reflection and health) against every role.

use sibyl_tests::{Cluster, ClusterOptions, PythonTools, TEST_MODEL};
use std::process::Command;

/// Runs `tests/python/SCRIPT BASE_URL MODEL` against a cluster serving `model`, and fails
/// with its output when it does.
async fn client_script(script: &str, model: &'static str) {
    let tools = tokio::task::spawn_blocking(PythonTools::ensure)
        .await
        .unwrap()
        .expect("python tools");
    let cluster = Cluster::start(ClusterOptions {
        model,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let base_url = format!("http://{}/v1", cluster.gateway_http);
    let path = sibyl_tests::python_dir().join(script);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(tools.python())
            .arg(path)
            .arg(base_url)
            .arg(model)
            .output()
    })
    .await
    .unwrap()
    .expect("python runs");
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_streams_the_same_text_as_it_gets_without_streaming() {
    client_script("openai_client.py", TEST_MODEL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_makes_and_streams_tool_calls_and_sends_their_results() {
    // A model whose chat template takes tools.
    client_script("openai_tools.py", "qwen2.5-coder-0.5b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_package_gets_the_chat_completion_s_text_and_makes_tool_calls() {
    // A model whose chat template takes tools.
    client_script("anthropic_client.py", "qwen2.5-coder-0.5b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_every_role_through_reflection_and_each_is_serving() {
    let tools = tokio::task::spawn_blocking(PythonTools::ensure)
        .await
        .unwrap()
        .expect("python tools");
    let grpcurl = tools.grpcurl().expect("grpcurl");
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let roles = [
        (cluster.gateway_grpc, "sibyl.v1.Gateway"),
        (cluster.verifier, "sibyl.v1.Verifier"),
        (cluster.drafters[0], "sibyl.v1.Drafter"),
    ];
    for (addr, service) in roles {
        let grpcurl = grpcurl.clone();
        let run = move |args: Vec<String>| {
            let output = Command::new(&grpcurl)
                .arg("-plaintext")
                .args(&args)
                .output()
                .expect("grpcurl runs");
            assert!(
                output.status.success(),
                "grpcurl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let (listed, health, described) = tokio::task::spawn_blocking(move || {
            let listed = run(vec![addr.to_string(), "list".into()]);
            let health = run(vec![
                "-d".into(),
                format!("{{\"service\": \"{service}\"}}"),
                addr.to_string(),
                "grpc.health.v1.Health/Check".into(),
            ]);
            let described = run(vec![addr.to_string(), "describe".into(), service.into()]);
            (listed, health, described)
        })
        .await
        .unwrap();
        assert!(
            listed.lines().any(|l| l.trim() == service),
            "{service} not listed:\n{listed}"
        );
        assert!(listed.contains("grpc.health.v1.Health"), "{listed}");
        assert!(
            health.contains("SERVING") && !health.contains("NOT_SERVING"),
            "{service}: {health}"
        );
        assert!(described.contains("rpc "), "{described}");
    }
    cluster.stop().await;
}
