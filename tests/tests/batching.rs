//! The verifier's step scheduler as clients see it: sessions that run together give what
//! they give alone, and requests past the session slots wait in a bounded queue or are
//! refused with 429 and Retry-After, never left hanging.

use sibyl_proto::v1 as pb;
use sibyl_tests::{http, verify, Cluster, ClusterOptions};
use std::time::Duration;
use tonic::Code;

const PROMPTS: [&str; 4] = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nList the numbers from one to twelve in words.<|im_end|>\n<|im_start|>assistant\n",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):\n",
];

fn request(prompt: Vec<u32>, max_tokens: u32, seed: Option<u64>) -> pb::VerifyRequest {
    pb::VerifyRequest {
        prompt_tokens: prompt,
        max_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: if seed.is_some() { 0.8 } else { 0.0 },
            seed,
            ..Default::default()
        }),
        speculation: Some(pb::Speculation {
            mode: pb::SpeculationMode::On as i32,
            drafters: Vec::new(),
        }),
        tokenizer_fingerprint: String::new(),
        step_times: false,
        prefix_cache: None,
        logprobs: None,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_give_the_tokens_they_give_one_at_a_time() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let requests: Vec<pb::VerifyRequest> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let seed = (i % 2 == 1).then_some(40 + i as u64);
            request(cluster.tokenize(p), 40, seed)
        })
        .collect();
    let mut verifier = cluster.verifier_client().await.unwrap();
    let mut alone = Vec::new();
    for request in &requests {
        alone.push(verify(&mut verifier, request.clone()).await.unwrap().0);
    }
    let batches_before = sibyl_telemetry::metrics::verifier()
        .batch_sessions
        .get_sample_sum();
    let tasks: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            let mut client = verifier.clone();
            tokio::spawn(async move { verify(&mut client, request).await })
        })
        .collect();
    for (task, alone) in tasks.into_iter().zip(&alone) {
        let (together, summary) = task.await.unwrap().unwrap();
        assert_eq!(&together, alone);
        assert_eq!(summary.completion_tokens as usize, together.len());
    }
    // Some step carried more than one session: the sum of batch sizes grew by more than
    // the number of steps would alone.
    let metrics = sibyl_telemetry::metrics::verifier();
    assert!(metrics.batch_sessions.get_sample_sum() > batches_before);
    assert!(
        metrics.batch_sessions.get_sample_sum() > metrics.batch_sessions.get_sample_count() as f64
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_extends_an_earlier_one_starts_from_its_work_and_says_the_same() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut verifier = cluster.verifier_client().await.unwrap();
    let metrics = sibyl_telemetry::metrics::verifier();
    let first_prompt = cluster.tokenize(PROMPTS[1]);
    let (answer, summary) = verify(&mut verifier, request(first_prompt.clone(), 24, None))
        .await
        .unwrap();
    assert_eq!(summary.cached_tokens, 0);
    // The next turn of the chat: the first prompt, the answer and a new question.
    let mut next = [first_prompt.clone(), answer.clone()].concat();
    next.extend(cluster.tokenize(
        "<|im_end|>\n<|im_start|>user\nAnd backwards?<|im_end|>\n<|im_start|>assistant\n",
    ));
    for seed in [None, Some(9)] {
        let mut uncached = request(next.clone(), 24, seed);
        uncached.prefix_cache = Some(false);
        let (expected, summary) = verify(&mut verifier, uncached).await.unwrap();
        assert_eq!(summary.cached_tokens, 0);
        let copied_before = metrics.prefix_cache_tokens.get();
        let (tokens, summary) = verify(&mut verifier, request(next.clone(), 24, seed))
            .await
            .unwrap();
        assert_eq!(tokens, expected, "seed {seed:?}");
        // At least the first turn's prompt and all of its answer but the last token.
        let cached = summary.cached_tokens as usize;
        assert!(cached >= first_prompt.len() + answer.len() - 1, "{cached}");
        assert!(cached < next.len());
        assert!(metrics.prefix_cache_tokens.get() >= copied_before + cached as u64);
    }
    cluster.stop().await;
}

/// Sends an OpenAI completion request and returns the response's status line and headers.
async fn http_head(cluster: &Cluster, body: &str) -> String {
    let response = http(
        cluster.gateway_http,
        "POST",
        "/v1/completions",
        &[],
        Some(body),
    )
    .await
    .unwrap();
    response.head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_slots_requests_wait_in_a_bounded_queue_then_get_429_with_retry_after() {
    let cluster = Cluster::start(ClusterOptions {
        max_sessions: 1,
        max_queue: 1,
        queue_timeout: Duration::from_millis(300),
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster");
    let mut verifier = cluster.verifier_client().await.unwrap();
    // One long generation holds the only slot: counting, greedy, which goes on for well
    // over a thousand tokens (a sampled one may end at once on another CPU's rounding).
    let counting = cluster.tokenize("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,");
    let long = request(counting, 2000, None);
    let mut stream = verifier.generate(long).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    // The next request waits in the queue; while it does, one more is refused at once.
    let queued = {
        let mut client = verifier.clone();
        let request = request(cluster.tokenize(PROMPTS[2]), 4, None);
        tokio::spawn(async move { verify(&mut client, request).await })
    };
    let mut waiting = 0;
    while waiting == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiting = sibyl_telemetry::metrics::verifier().queued_requests.get();
    }
    let refused = verify(
        &mut verifier,
        request(cluster.tokenize(PROMPTS[3]), 4, None),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("--max-queue"), "{refused:?}");
    assert!(refused.metadata().get("retry-after").is_some());
    // The queued one gives up when its wait runs out, with the same status.
    let timed_out = queued.await.unwrap().unwrap_err();
    assert_eq!(timed_out.code(), Code::ResourceExhausted, "{timed_out:?}");
    assert!(timed_out.message().contains("--queue-timeout-ms"));
    // Through the OpenAI API: 429 with Retry-After.
    let head = http_head(
        &cluster,
        r#"{"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 4}"#,
    )
    .await;
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    drop(stream);
    // Once the slot is free, requests are served again.
    let mut served = None;
    for _ in 0..100 {
        match verify(
            &mut verifier,
            request(cluster.tokenize(PROMPTS[2]), 4, None),
        )
        .await
        {
            Ok(done) => {
                served = Some(done);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(served.expect("served after the slot came free").0.len(), 4);
    cluster.stop().await;
}
