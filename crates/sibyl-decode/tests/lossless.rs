//! Speculative decoding on tiny random-weight models equals plain decoding, token for token.

use proptest::prelude::*;
use sibyl_decode::{generate, FinishReason, GenerateError, GenerationConfig};
use sibyl_engine::testkit::{tensor_test_device, tiny_model, tiny_model_on, TinyModelConfig};
use sibyl_engine::{Architecture, GgmlDType, Model};
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_retrieval::{SuffixConfig, SuffixDrafter, SuffixIndex};
use sibyl_spec::{Drafter, Proposal, SamplingConfig, TokenId, TreeLimits};
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};

/// The suffix index the property test's sessions share: each case drafts from the
/// generations of the cases before it.
fn shared_suffixes() -> Arc<SuffixIndex> {
    static SHARED: OnceLock<Arc<SuffixIndex>> = OnceLock::new();
    SHARED
        .get_or_init(|| Arc::new(SuffixIndex::new(SuffixConfig::default())))
        .clone()
}

/// Three tiny models on the CPU engine, then the same three on the tensor engine.
fn models() -> &'static [Model] {
    static MODELS: OnceLock<Vec<Model>> = OnceLock::new();
    MODELS.get_or_init(|| {
        // Qwen3's heads here are wider than hidden / heads, as in the real models.
        let configs: Vec<TinyModelConfig> = [
            (Architecture::Qwen2, GgmlDType::Q8_0, 11, None),
            (Architecture::Llama, GgmlDType::Q4_0, 12, None),
            (Architecture::Qwen3, GgmlDType::Q8_0, 13, Some(24)),
        ]
        .into_iter()
        .map(|(architecture, dtype, seed, head_dim)| TinyModelConfig {
            architecture,
            dtype,
            seed,
            head_dim,
            vocab_size: 48,
            ..TinyModelConfig::default()
        })
        .collect();
        let device = tensor_test_device();
        let cpu = configs.iter().map(|c| tiny_model(c).unwrap());
        let tensor = configs.iter().map(|c| tiny_model_on(c, &device).unwrap());
        cpu.chain(tensor).collect()
    })
}

/// A drafter that sends whatever a script says: wrong tokens, ids outside the vocabulary,
/// overlong blocks, copies of the truth.
struct Adversary {
    state: u64,
    vocab: u32,
}

impl Drafter for Adversary {
    fn kind(&self) -> &str {
        "adversary"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let mut next = || {
            self.state = self
                .state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (self.state >> 33) as u32
        };
        let branches = next() % 4;
        (0..branches)
            .map(|_| {
                let len = (next() as usize % (max_tokens + 30)).max(1);
                let tokens = (0..len)
                    .map(|i| match next() % 8 {
                        0 => u32::MAX - i as u32,
                        1 => self.vocab + next() % 5,
                        2 | 3 => context[context.len().saturating_sub(3 + i % 3)],
                        _ => next() % self.vocab,
                    })
                    .collect();
                Proposal::greedy(tokens)
            })
            .collect()
    }
}

fn config(max_tokens: usize, budget: usize, depth: usize) -> GenerationConfig {
    GenerationConfig {
        max_tokens,
        sampling: SamplingConfig::greedy(),
        tree: TreeLimits {
            budget,
            max_depth: depth,
            min_value: 0.0,
            exempt_nodes: 1,
        },
        learning: None,
        stop_tokens: Vec::new(),
        prefix_cache: true,
        logprobs: None,
    }
}

fn run(
    model: &Model,
    prompt: &[u32],
    config: &GenerationConfig,
    drafters: &mut [Box<dyn Drafter>],
) -> Vec<u32> {
    let mut streamed = Vec::new();
    let report = generate(model, prompt, config, drafters, |tokens| {
        streamed.extend_from_slice(tokens);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(streamed, report.tokens, "streamed tokens equal the report");
    report.tokens
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn greedy_speculation_equals_plain_greedy_on_tiny_models(
        which in 0usize..6,
        prompt in proptest::collection::vec(0u32..48, 1..24),
        budget in 0usize..24,
        depth in 1usize..10,
        seed in any::<u64>(),
    ) {
        let model = &models()[which];
        let plain = run(model, &prompt, &config(40, 0, 0), &mut []);
        let mut drafters: Vec<Box<dyn Drafter>> = vec![
            Box::new(NgramDrafter::new(NgramConfig { max_ngram: 3, ..NgramConfig::default() })),
            Box::new(Adversary { state: seed, vocab: 48 }),
            Box::new(SuffixDrafter::new(shared_suffixes())),
        ];
        let spec = run(model, &prompt, &config(40, budget, depth), &mut drafters);
        prop_assert_eq!(spec, plain);
    }
}

#[test]
fn repetitive_output_is_drafted_and_accepted() {
    // A prompt that repeats makes the tiny model's output repeat; the n-gram drafter must then
    // get tokens accepted, and fewer steps than tokens are needed.
    let model = &models()[0];
    let prompt: Vec<u32> = (0..60).map(|i| [5, 9, 14, 3][i % 4]).collect();
    let plain = run(model, &prompt, &config(64, 0, 0), &mut []);
    let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(NgramDrafter::default())];
    let report = generate(model, &prompt, &config(64, 16, 8), &mut drafters, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(report.tokens, plain);
    assert!(report.drafters[0].accepted > 0, "{:?}", report.drafters);
    assert!(report.steps < report.tokens.len());
}

#[test]
fn a_suffix_drafter_drafts_what_an_earlier_session_generated() {
    let model = &models()[1];
    let shared = Arc::new(SuffixIndex::new(SuffixConfig::default()));
    let first: Vec<u32> = vec![3, 17, 5, 40, 2, 9];
    let mut reports = Vec::new();
    for prompt in [first.clone(), vec![11, 12, 13, 14], first.clone()] {
        let plain = run(model, &prompt, &config(48, 0, 0), &mut []);
        let mut drafters: Vec<Box<dyn Drafter>> =
            vec![Box::new(SuffixDrafter::new(shared.clone()))];
        let report = generate(model, &prompt, &config(48, 16, 8), &mut drafters, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        // The session ends: its prompt and output join the index.
        drop(drafters);
        assert_eq!(report.tokens, plain);
        reports.push(report);
    }
    assert_eq!(shared.documents(), 3);
    // The repeated prompt's output was in the index: most of it came in drafts.
    let again = &reports[2];
    assert!(
        again.drafters[0].accepted * 2 > again.tokens.len() as u64,
        "{:?}",
        again.drafters
    );
    assert!(again.steps * 2 < again.tokens.len());
}

#[test]
fn stop_tokens_end_generation_and_are_not_emitted() {
    let model = &models()[0];
    let prompt = [1, 2, 3];
    let plain = run(model, &prompt, &config(30, 0, 0), &mut []);
    let stop = plain[5];
    let first = plain.iter().position(|&t| t == stop).unwrap();
    let mut cfg = config(30, 8, 4);
    cfg.stop_tokens = vec![stop];
    let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(NgramDrafter::default())];
    let report = generate(model, &prompt, &cfg, &mut drafters, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(report.tokens, plain[..first]);
    assert_eq!(report.finish_reason, FinishReason::Stop);
}

#[test]
fn max_tokens_is_exact_even_when_a_step_accepts_more() {
    let model = &models()[0];
    let prompt: Vec<u32> = (0..40).map(|i| [7, 8][i % 2]).collect();
    for max in [1, 2, 5, 13] {
        let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(NgramDrafter::default())];
        let report = generate(model, &prompt, &config(max, 16, 8), &mut drafters, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(report.tokens.len(), max);
        assert_eq!(report.finish_reason, FinishReason::Length);
    }
}

#[test]
fn a_caller_can_stop_the_stream() {
    let model = &models()[0];
    let mut calls = 0;
    let report = generate(model, &[1, 2], &config(50, 0, 0), &mut [], |_| {
        calls += 1;
        if calls == 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(report.finish_reason, FinishReason::Cancelled);
    assert_eq!(report.tokens.len(), 3);
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    let model = &models()[0];
    let limit = model.config().context_length;
    let long = vec![1u32; limit];
    let cases: Vec<(Vec<u32>, GenerationConfig, &str)> = vec![
        (vec![], config(5, 0, 0), "empty"),
        (vec![1], config(0, 0, 0), "at least 1"),
        (long, config(5, 0, 0), "context window"),
        (vec![1, 4000], config(5, 0, 0), "outside the vocabulary"),
        (
            vec![1],
            GenerationConfig {
                sampling: SamplingConfig {
                    temperature: -1.0,
                    ..SamplingConfig::greedy()
                },
                ..config(5, 0, 0)
            },
            "temperature",
        ),
        (
            vec![1],
            GenerationConfig {
                logprobs: Some(21),
                ..config(5, 0, 0)
            },
            "most likely tokens",
        ),
    ];
    for (prompt, cfg, expected) in cases {
        let error: GenerateError =
            generate(model, &prompt, &cfg, &mut [], |_| ControlFlow::Continue(())).unwrap_err();
        assert!(error.to_string().contains(expected), "{error}");
    }
}

#[test]
fn generation_stops_at_the_context_window() {
    let model = &models()[0];
    let limit = model.config().context_length;
    let prompt = vec![3u32; limit - 5];
    let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(NgramDrafter::default())];
    let report = generate(model, &prompt, &config(100, 16, 8), &mut drafters, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(report.finish_reason, FinishReason::Length);
    assert!(report.tokens.len() <= 5);
}

#[test]
fn a_cancelled_generation_stops_before_its_next_step() {
    let model = &models()[0];
    let prompt: Vec<u32> = (0..40).map(|i| [7, 8][i % 2]).collect();
    let mut asked = 0;
    let report = sibyl_decode::generate_cancellable(
        model,
        &prompt,
        &config(50, 0, 0),
        &mut [],
        &mut || {
            asked += 1;
            asked > 4
        },
        |_| ControlFlow::Continue(()),
        None,
    )
    .unwrap();
    assert_eq!(report.finish_reason, FinishReason::Cancelled);
    // One prompt chunk, then the first token and three steps.
    assert_eq!(report.tokens.len(), 4);
    let mut always = || true;
    let report = sibyl_decode::generate_cancellable(
        model,
        &prompt,
        &config(50, 0, 0),
        &mut [],
        &mut always,
        |_| ControlFlow::Continue(()),
        None,
    )
    .unwrap();
    assert_eq!(report.finish_reason, FinishReason::Cancelled);
    assert!(report.tokens.is_empty());
}
