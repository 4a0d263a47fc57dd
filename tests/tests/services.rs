//! The services as a user deploys them: drafters, a verifier and a gateway, each a real gRPC
//! server on its own loopback port, driven by real clients.

use sibyl_drafter::DraftService;
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_proto::v1 as pb;
use sibyl_tests::{
    generate_text, serve_drafter, verify, BlockStream, Cluster, ClusterOptions, Garbage,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

/// Prompts whose answers repeat parts of themselves, so n-gram drafts get accepted.
const PROMPTS: [&str; 3] = [
    "<|im_start|>user\nRename the variable `count` to `total` in this code:\n\
     def add(items):\n    count = 0\n    for item in items:\n        count += item\n    return count\n<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList the numbers from one to twelve in words, separated by commas.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
];

fn request(prompt: &[u32], max_tokens: u32, speculation: pb::SpeculationMode) -> pb::VerifyRequest {
    pb::VerifyRequest {
        prompt_tokens: prompt.to_vec(),
        max_tokens,
        sampling: None,
        speculation: Some(pb::Speculation {
            mode: speculation as i32,
            drafters: Vec::new(),
        }),
        tokenizer_fingerprint: String::new(),
        step_times: false,
        prefix_cache: None,
        logprobs: None,
        ..Default::default()
    }
}

async fn gateway_text(
    cluster: &Cluster,
    prompt: &str,
    speculation: pb::SpeculationMode,
) -> (String, pb::GenerateSummary) {
    let mut client = cluster.gateway_client().await.expect("gateway client");
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        max_tokens: 48,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: speculation as i32,
            drafters: Vec::new(),
        }),
        ..pb::GenerateRequest::default()
    };
    generate_text(&mut client, request, |_| {})
        .await
        .expect("generate")
}

/// Runs `prompt` on the cluster's verifier without and with speculation, checks that the
/// tokens are the same, and returns the speculative run's summary.
async fn assert_speculation_changes_nothing(
    cluster: &Cluster,
    prompt: &str,
    max_tokens: u32,
) -> pb::VerifySummary {
    let mut verifier = cluster.verifier_client().await.unwrap();
    let tokens = cluster.tokenize(prompt);
    let plain = request(&tokens, max_tokens, pb::SpeculationMode::Off);
    let (plain, plain_summary) = verify(&mut verifier, plain).await.unwrap();
    let speculative = request(&tokens, max_tokens, pb::SpeculationMode::On);
    let (speculative, summary) = verify(&mut verifier, speculative).await.unwrap();
    assert_eq!(speculative, plain, "prompt {prompt:?}");
    assert_eq!(plain_summary.steps as usize, plain.len());
    summary
}

/// A cluster with `ngram` n-gram drafter servers and the drafters at `extra`
/// (`KIND=http://HOST:PORT`).
async fn cluster(ngram: usize, extra: &[String]) -> Cluster {
    Cluster::start(ClusterOptions {
        ngram_drafters: ngram,
        extra_drafters: extra.iter().map(|e| e.parse().unwrap()).collect(),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_output_through_the_gateway_with_two_drafters_equals_plain_decoding() {
    let cluster = Cluster::start(ClusterOptions {
        ngram_drafters: 2,
        ..ClusterOptions::speculating()
    })
    .await
    .expect("cluster");
    let mut accepted = 0;
    for prompt in PROMPTS {
        let summary = assert_speculation_changes_nothing(&cluster, prompt, 64).await;
        assert_eq!(summary.drafters.len(), 2);
        for drafter in &summary.drafters {
            assert_eq!(drafter.state(), pb::DrafterState::Connected, "{drafter:?}");
        }
        accepted += summary
            .drafters
            .iter()
            .map(|d| d.accepted_tokens)
            .sum::<u64>();

        let (plain_text, _) = gateway_text(&cluster, prompt, pb::SpeculationMode::Off).await;
        let (text, gateway_summary) =
            gateway_text(&cluster, prompt, pb::SpeculationMode::Unspecified).await;
        assert_eq!(text, plain_text, "prompt {prompt:?}");
        let usage = gateway_summary.usage.unwrap();
        assert_eq!(usage.prompt_tokens as usize, cluster.tokenize(prompt).len());
    }
    assert!(
        accepted > 0,
        "the drafters never had a draft accepted: the test did not speculate"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_sampling_gives_the_same_tokens_with_and_without_drafters() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut verifier = cluster.verifier_client().await.unwrap();
    let tokens = cluster.tokenize(PROMPTS[0]);
    let sampled = |mode| {
        let mut request = request(&tokens, 48, mode);
        request.sampling = Some(pb::SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: Some(11),
            ..Default::default()
        });
        request
    };
    let (plain, _) = verify(&mut verifier, sampled(pb::SpeculationMode::Off))
        .await
        .unwrap();
    let (speculative, summary) = verify(&mut verifier, sampled(pb::SpeculationMode::On))
        .await
        .unwrap();
    assert_eq!(speculative, plain);
    assert_eq!(summary.seed, 11);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafter_sending_garbage_changes_nothing_and_its_blocks_are_dropped() {
    let garbage = serve_drafter(Garbage { vocab: 49152 }).await;
    let cluster = cluster(1, &[format!("garbage={garbage}")]).await;
    let stream_errors = sibyl_telemetry::metrics::verifier()
        .drafter_stream_errors
        .with_label_values(&["garbage"]);
    let errors_before = stream_errors.get();
    for prompt in &PROMPTS[..2] {
        let summary = assert_speculation_changes_nothing(&cluster, prompt, 48).await;
        let stats = summary
            .drafters
            .iter()
            .find(|d| d.kind == "garbage")
            .unwrap();
        assert!(stats.blocks_received > 1000, "{stats:?}");
        assert!(
            stats.blocks_dropped > stats.blocks_received / 2,
            "{stats:?}"
        );
    }
    // The oversized message ended the stream at least once (once per prompt reaching the
    // fourth step).
    assert!(stream_errors.get() > errors_before);
    cluster.stop().await;
}

/// A real n-gram drafter that dies after a few blocks and cannot be reached again.
struct Dying {
    inner: DraftService,
    opens: AtomicUsize,
}

#[tonic::async_trait]
impl pb::drafter_server::Drafter for Dying {
    type DraftStream = BlockStream;

    async fn share(
        &self,
        _: Request<pb::ShareRequest>,
    ) -> Result<Response<pb::ShareReply>, Status> {
        Err(Status::unimplemented("keeps no index"))
    }

    type FetchStream = sibyl_tests::NoDocuments;

    async fn fetch(
        &self,
        _: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        Err(Status::unimplemented("keeps no index"))
    }

    async fn draft(
        &self,
        request: Request<Streaming<pb::DraftRequest>>,
    ) -> Result<Response<BlockStream>, Status> {
        if self.opens.fetch_add(1, Ordering::SeqCst) > 0 {
            return Err(Status::unavailable("this drafter is gone"));
        }
        let stream = pb::drafter_server::Drafter::draft(&self.inner, request)
            .await?
            .into_inner();
        let dying = stream
            .take(6)
            .chain(tokio_stream::once(Err(Status::unavailable(
                "the drafter died",
            ))));
        Ok(Response::new(Box::pin(dying)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafter_dying_mid_generation_leaves_the_output_unchanged() {
    let path = sibyl_tests::test_model_path().unwrap();
    let fingerprint = sibyl_engine::load_text(&path)
        .unwrap()
        .tokenizer
        .fingerprint();
    let inner = DraftService::new(Arc::new(|| {
        Box::new(NgramDrafter::new(NgramConfig::default()))
    }));
    inner.set_ready(fingerprint);
    let dying = serve_drafter(Dying {
        inner,
        opens: AtomicUsize::new(0),
    })
    .await;
    let cluster = cluster(0, &[format!("ngram={dying}")]).await;
    let summary = assert_speculation_changes_nothing(&cluster, PROMPTS[0], 64).await;
    let stats = &summary.drafters[0];
    assert_eq!(stats.state(), pb::DrafterState::Failed, "{stats:?}");
    assert!(
        stats.error.contains("gone") || stats.error.contains("died"),
        "{stats:?}"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafter_with_another_tokenizer_is_refused_and_the_session_goes_on() {
    let stranger = DraftService::new(Arc::new(|| {
        Box::new(NgramDrafter::new(NgramConfig::default()))
    }));
    stranger.set_ready(0x1234);
    let stranger = serve_drafter(stranger).await;
    let cluster = cluster(1, &[format!("stranger={stranger}")]).await;
    let summary = assert_speculation_changes_nothing(&cluster, PROMPTS[1], 32).await;
    let stranger = summary
        .drafters
        .iter()
        .find(|d| d.kind == "stranger")
        .unwrap();
    assert_eq!(stranger.state(), pb::DrafterState::Refused, "{stranger:?}");
    assert!(
        stranger.error.contains("tokenizer mismatch"),
        "{stranger:?}"
    );
    let ngram = summary.drafters.iter().find(|d| d.kind == "ngram").unwrap();
    assert_eq!(ngram.state(), pb::DrafterState::Connected);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_session_within_a_second() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut verifier = cluster.verifier_client().await.unwrap();
    let mut gateway = cluster.gateway_client().await.unwrap();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt(PROMPTS[2].into())),
        max_tokens: 400,
        sampling: Some(pb::SamplingParams {
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        }),
        ..pb::GenerateRequest::default()
    };
    let mut stream = gateway.generate(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap();
    assert!(first.is_some());
    let status = verifier
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_sessions, 1);
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let status = verifier
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.active_sessions == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session is still active a second after the client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses_and_leak_no_session() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut verifier = cluster.verifier_client().await.unwrap();
    let good = cluster.tokenize("Hello");
    let mut cases: Vec<(pb::VerifyRequest, Code, &str)> = vec![
        (
            request(&[], 8, pb::SpeculationMode::On),
            Code::InvalidArgument,
            "empty",
        ),
        (
            request(&[1, 49152 + 10], 8, pb::SpeculationMode::On),
            Code::InvalidArgument,
            "vocabulary",
        ),
        (
            request(&good, 0, pb::SpeculationMode::On),
            Code::InvalidArgument,
            "at least 1",
        ),
        (
            request(&vec![1; 9000], 8, pb::SpeculationMode::On),
            Code::InvalidArgument,
            "context window",
        ),
    ];
    let mut hot = request(&good, 8, pb::SpeculationMode::On);
    hot.sampling = Some(pb::SamplingParams {
        temperature: -1.0,
        ..Default::default()
    });
    cases.push((hot, Code::InvalidArgument, "temperature"));
    let mut unknown = request(&good, 8, pb::SpeculationMode::On);
    unknown.speculation = Some(pb::Speculation {
        mode: pb::SpeculationMode::On as i32,
        drafters: vec!["oracle".into()],
    });
    cases.push((unknown, Code::InvalidArgument, "oracle"));
    let mut stranger = request(&good, 8, pb::SpeculationMode::On);
    stranger.tokenizer_fingerprint = "0000000000000001".into();
    cases.push((stranger, Code::FailedPrecondition, "tokenizer"));
    for (request, code, words) in cases {
        let status = verify(&mut verifier, request).await.unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(words), "{status:?}");
    }

    let mut gateway = cluster.gateway_client().await.unwrap();
    let prompt = |text: &str| Some(pb::generate_request::Input::Prompt(text.into()));
    let gateway_cases = [
        (
            pb::GenerateRequest {
                model: "gpt-4".into(),
                input: prompt("hi"),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            pb::GenerateRequest {
                input: prompt("hi"),
                max_tokens: 100_000,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::GenerateRequest {
                input: prompt(&"word ".repeat(9000)),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::GenerateRequest {
                input: None,
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            pb::GenerateRequest {
                input: prompt("hi"),
                stop: vec![String::new()],
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
    ];
    for (request, code) in gateway_cases {
        let status = gateway.generate(request).await.expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert!(!status.message().is_empty());
    }
    let status = verifier
        .get_status(pb::GetStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.active_sessions, 0);
    cluster.stop().await;
}
