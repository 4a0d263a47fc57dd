//! Every `sibyl.v1` message a peer sends, mutated byte by byte from valid ones: whatever
//! decodes is sent to the role that reads it, which answers with tokens or a status, never
//! panics, hangs or stops serving.

use prost::Message;
use sibyl_proto::v1 as pb;
use sibyl_tests::{verify, Cluster, ClusterOptions};
use std::time::Duration;
use tokio_stream::StreamExt;

/// Cases per message kind.
const CASES: usize = 150;
/// Longest a mutated request may take before it is dropped (cancelled).
const PER_CASE: Duration = Duration::from_secs(5);

/// A small deterministic generator (xorshift), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `valid`'s encoding with a few bytes flipped, cut or made huge.
fn mutate(valid: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for _ in 0..1 + usize::from(rng.below(3) == 0) {
        match rng.below(4) {
            0 if !bytes.is_empty() => {
                let at = rng.below(bytes.len());
                bytes[at] ^= 1 + rng.below(255) as u8;
            }
            1 => bytes.truncate(rng.below(bytes.len() + 1)),
            2 if !bytes.is_empty() => {
                // A varint of ten 0xff-ish bytes: a huge length, count or id.
                let at = rng.below(bytes.len());
                let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
                bytes.splice(at..at, huge);
            }
            _ => {
                let at = rng.below(bytes.len() + 1);
                bytes.insert(at, rng.next() as u8);
            }
        }
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_messages_get_answers_or_statuses_and_the_roles_keep_serving() {
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster");
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let prompt = cluster.tokenize("def add(a, b):\n    return");
    let fingerprint = sibyl_proto::fingerprint(cluster.text.tokenizer.fingerprint());

    // Gateway: GenerateRequest.
    let valid = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Prompt("def add(a, b):".into())),
        max_tokens: 4,
        stop: vec!["\n\n".into()],
        sampling: Some(pb::SamplingParams {
            temperature: 0.7,
            top_k: 20,
            top_p: 0.9,
            seed: Some(7),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let gateway = cluster.gateway_client().await.unwrap();
    let mut decoded = 0;
    for _ in 0..CASES {
        let Ok(mut request) = pb::GenerateRequest::decode(&mutate(&valid, &mut rng)[..]) else {
            continue;
        };
        decoded += 1;
        request.max_tokens = request.max_tokens.min(8);
        let mut client = gateway.clone();
        let _ = tokio::time::timeout(PER_CASE, async move {
            let mut stream = client.generate(request).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(())
        })
        .await;
    }
    assert!(
        decoded > CASES / 8,
        "only {decoded} mutated requests decoded"
    );

    // Verifier: VerifyRequest.
    let valid = pb::VerifyRequest {
        prompt_tokens: prompt.clone(),
        max_tokens: 4,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: pb::SpeculationMode::On as i32,
            drafters: vec!["ngram".into()],
        }),
        tokenizer_fingerprint: fingerprint.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut verifier = cluster.verifier_client().await.unwrap();
    for _ in 0..CASES {
        let Ok(mut request) = pb::VerifyRequest::decode(&mutate(&valid, &mut rng)[..]) else {
            continue;
        };
        request.max_tokens = request.max_tokens.min(8);
        let mut client = verifier.clone();
        let _ = tokio::time::timeout(PER_CASE, verify(&mut client, request)).await;
    }

    // Drafter: a stream of DraftRequests, each mutated.
    let open = pb::DraftRequest {
        message: Some(pb::draft_request::Message::Open(pb::DraftOpen {
            context_tokens: prompt.clone(),
            tokenizer_fingerprint: fingerprint.clone(),
            vocab_size: cluster.text.config.vocab_size as u32,
            max_block_tokens: 8,
            max_branches: 4,
            max_tokens_ahead: 8,
        })),
    }
    .encode_to_vec();
    let advance = pb::DraftRequest {
        message: Some(pb::draft_request::Message::Advance(pb::DraftAdvance {
            position: prompt.len() as u64,
            tokens: vec![prompt[0], prompt[1]],
        })),
    }
    .encode_to_vec();
    let drafter = format!("http://{}", cluster.drafters[0]);
    for _ in 0..CASES / 3 {
        let messages: Vec<pb::DraftRequest> = [&open, &advance, &advance]
            .iter()
            .filter_map(|valid| pb::DraftRequest::decode(&mutate(valid, &mut rng)[..]).ok())
            .collect();
        let mut client = pb::drafter_client::DrafterClient::connect(drafter.clone())
            .await
            .unwrap();
        let _ = tokio::time::timeout(PER_CASE, async move {
            let requests = tokio_stream::iter(messages);
            let mut blocks = client.draft(requests).await?.into_inner();
            while blocks.next().await.transpose()?.is_some() {}
            Ok::<_, tonic::Status>(())
        })
        .await;
    }

    // Every role still serves, and still gives the right answer.
    for addr in [cluster.verifier, cluster.drafters[0], cluster.gateway_grpc] {
        assert!(
            sibyl_proto::client::wait_until_serving(addr, Duration::from_secs(5)).await,
            "{addr} stopped serving"
        );
    }
    let plain = |mode: pb::SpeculationMode| pb::VerifyRequest {
        prompt_tokens: prompt.clone(),
        max_tokens: 12,
        sampling: Some(pb::SamplingParams::default()),
        speculation: Some(pb::Speculation {
            mode: mode as i32,
            drafters: Vec::new(),
        }),
        tokenizer_fingerprint: fingerprint.clone(),
        ..Default::default()
    };
    let (off, _) = verify(&mut verifier, plain(pb::SpeculationMode::Off))
        .await
        .unwrap();
    let (on, _) = verify(&mut verifier, plain(pb::SpeculationMode::On))
        .await
        .unwrap();
    assert_eq!(off, on);
    // Sessions of requests dropped at their time limit are freed.
    let mut active = u32::MAX;
    for _ in 0..100 {
        let status = verifier.get_status(pb::GetStatusRequest {}).await.unwrap();
        active = status.into_inner().active_sessions;
        if active == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(active, 0);
    drop(gateway);
    cluster.stop().await;
}
