//! The LM drafter on tiny random-weight models: rebasing gives the drafts of a fresh
//! drafter, speculation with it prints what plain decoding prints, and block lengths follow
//! acceptance.

use sibyl_decode::{generate, GenerationConfig};
use sibyl_engine::testkit::{tiny_model, TinyModelConfig};
use sibyl_engine::{Architecture, GgmlDType, Model};
use sibyl_lm::{LmConfig, LmDrafter};
use sibyl_spec::{Drafter, SamplingConfig, TokenId, TreeLimits};
use std::ops::ControlFlow;
use std::sync::Arc;

fn model(seed: u64) -> Arc<Model> {
    Arc::new(
        tiny_model(&TinyModelConfig {
            architecture: Architecture::Qwen2,
            dtype: GgmlDType::Q8_0,
            seed,
            vocab_size: 48,
            ..TinyModelConfig::default()
        })
        .unwrap(),
    )
}

fn fixed_length() -> LmConfig {
    LmConfig {
        max_tokens: 6,
        min_confidence: 0.0,
        adapt_length: false,
        ..LmConfig::default()
    }
}

fn tokens(drafter: &mut LmDrafter, context: &[TokenId]) -> Vec<TokenId> {
    drafter
        .propose(context, 6)
        .into_iter()
        .next()
        .map(|p| p.tokens)
        .unwrap_or_default()
}

#[test]
fn drafting_ahead_then_rebasing_gives_the_drafts_of_a_fresh_drafter() {
    let model = model(31);
    let prompt: Vec<TokenId> = vec![5, 9, 2, 44, 17, 3, 3, 8];
    let mut drafter = LmDrafter::new(model.clone(), fixed_length());
    let first = tokens(&mut drafter, &prompt);
    assert_eq!(first.len(), 6);
    // The target accepts two draft tokens and then says something else: a rebase.
    let mut rejected = prompt.clone();
    rejected.extend_from_slice(&first[..2]);
    rejected.push((first[2] + 1) % 48);
    // Drafting ahead: the drafter assumed its block would be accepted.
    let mut ahead = prompt.clone();
    ahead.extend_from_slice(&first);
    for context in [&ahead, &rejected, &prompt, &ahead] {
        let rebased = tokens(&mut drafter, context);
        let fresh = tokens(&mut LmDrafter::new(model.clone(), fixed_length()), context);
        assert_eq!(rebased, fresh, "after {context:?}");
        assert!(drafter.cached_len() >= context.len());
    }
    // Catching up first (as the decode loop does, to time it apart from drafting) changes
    // nothing either, on the same context or after a rebase; nor does catching up with a
    // context that is then not drafted from.
    for context in [&rejected, &ahead, &prompt] {
        drafter.catch_up(&rejected);
        drafter.catch_up(context);
        let caught_up = tokens(&mut drafter, context);
        let fresh = tokens(&mut LmDrafter::new(model.clone(), fixed_length()), context);
        assert_eq!(caught_up, fresh, "after catching up with {context:?}");
    }
    drafter.catch_up(&ahead);
    let elsewhere = tokens(&mut drafter, &rejected);
    let fresh = tokens(
        &mut LmDrafter::new(model.clone(), fixed_length()),
        &rejected,
    );
    assert_eq!(
        elsewhere, fresh,
        "drafting after catching up with another context"
    );
}

#[test]
fn speculation_with_the_lm_drafter_prints_what_plain_decoding_prints() {
    let target = model(41);
    let prompt: Vec<TokenId> = vec![1, 2, 3, 4, 5, 6, 7];
    let config = GenerationConfig {
        max_tokens: 60,
        sampling: SamplingConfig::greedy(),
        tree: TreeLimits {
            budget: 16,
            max_depth: 8,
            min_value: 0.0,
            exempt_nodes: 1,
        },
        learning: None,
        stop_tokens: Vec::new(),
        prefix_cache: true,
        logprobs: None,
    };
    let run = |drafters: &mut [Box<dyn Drafter>]| {
        generate(&target, &prompt, &config, drafters, |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
    };
    let plain = run(&mut []);
    // The target drafting for itself: every draft token is accepted.
    let sure = LmConfig {
        min_confidence: 0.0,
        ..LmConfig::default()
    };
    let itself: Box<dyn Drafter> = Box::new(LmDrafter::new(target.clone(), sure));
    let same = run(&mut [itself]);
    assert_eq!(same.tokens, plain.tokens);
    assert_eq!(same.drafters[0].accepted, same.drafters[0].proposed);
    assert!(same.steps < plain.steps / 2, "{} steps", same.steps);
    // Another model drafting: mostly wrong, still lossless.
    let other: Box<dyn Drafter> = Box::new(LmDrafter::new(model(42), LmConfig::default()));
    let different = run(&mut [other]);
    assert_eq!(different.tokens, plain.tokens);
    assert!(different.drafters[0].proposed > 0);
}

#[test]
fn block_length_follows_acceptance() {
    let model = model(51);
    let mut drafter = LmDrafter::new(model, LmConfig::default());
    let start = drafter.block_length();
    let mut context: Vec<TokenId> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    // Every block is rejected at its first token.
    for _ in 0..12 {
        let block = tokens(&mut drafter, &context);
        assert!(!block.is_empty());
        context.push((block[0] + 1) % 48);
    }
    assert!(drafter.block_length() <= 2, "{}", drafter.block_length());
    // Every block is accepted whole.
    for _ in 0..12 {
        let block = tokens(&mut drafter, &context);
        context.extend_from_slice(&block);
        context.push(0);
    }
    assert!(
        drafter.block_length() > start.min(2),
        "{}",
        drafter.block_length()
    );
    // Tokens outside the vocabulary get no draft, and no panic.
    assert!(drafter.propose(&[1, 99], 4).is_empty());
}

/// Sampling with the three kinds of drafter competing every step (n-gram over the session,
/// retrieval over a datastore, and this drafter sampling from a model of its own with its
/// top-4 distributions) follows the target's distribution: a chi-square test of the first
/// three tokens over 20,000 seeded generations against the exact joint distribution,
/// computed from the target's logits (p > 0.001).
#[test]
fn sampling_with_all_three_drafters_competing_follows_the_target_distribution() {
    use sibyl_decode::GenerationConfig;
    use sibyl_ngram::{NgramConfig, NgramDrafter};
    use sibyl_retrieval::{Datastore, RetrievalConfig, RetrievalDrafter, TokenizerId};
    use sibyl_spec::TargetDistribution;

    const VOCAB: usize = 6;
    const RUNS: usize = 20_000;
    const COUNT: usize = 3;
    let tiny = |seed| {
        Arc::new(
            tiny_model(&TinyModelConfig {
                vocab_size: VOCAB,
                seed,
                dtype: GgmlDType::Q8_0,
                ..TinyModelConfig::default()
            })
            .unwrap(),
        )
    };
    let (target, small) = (tiny(5), tiny(6));
    let prompt: Vec<TokenId> = vec![1, 3, 2, 1, 3, 2, 1, 3];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.sibyl");
    let tokenizer = TokenizerId {
        fingerprint: 7,
        vocab_size: VOCAB as u32,
    };
    let corpus: Vec<TokenId> = (0..400)
        .map(|i| ((i * 7 + i / 5) % VOCAB) as TokenId)
        .collect();
    sibyl_retrieval::write(&path, tokenizer, &[corpus, prompt.clone()]).unwrap();
    let store = Arc::new(Datastore::open(&path, Some(tokenizer)).unwrap());

    let sampling = SamplingConfig {
        temperature: 0.9,
        ..SamplingConfig::greedy()
    };
    let outcomes = VOCAB.pow(COUNT as u32);
    let expected: Vec<f64> = (0..outcomes)
        .map(|code| {
            let (mut context, mut rest, mut p) = (prompt.clone(), code, 1.0);
            for _ in 0..COUNT {
                let token = (rest % VOCAB) as TokenId;
                rest /= VOCAB;
                let mut cache = target.new_cache();
                let logits = target
                    .forward(
                        &mut cache,
                        &sibyl_engine::TreeInput::chain(&context),
                        sibyl_engine::LogitRows::Last,
                    )
                    .unwrap();
                p *= TargetDistribution::new(&logits, &sampling).prob(token);
                context.push(token);
            }
            p
        })
        .collect();

    let mut observed = vec![0usize; outcomes];
    let mut accepted = std::collections::HashMap::<String, u64>::new();
    for run in 0..RUNS {
        let config = GenerationConfig {
            max_tokens: COUNT,
            sampling: SamplingConfig {
                seed: 1_000_003 * run as u64 + 17,
                ..sampling.clone()
            },
            tree: TreeLimits {
                budget: 8,
                max_depth: 4,
                min_value: 0.0,
                exempt_nodes: 8,
            },
            learning: None,
            stop_tokens: Vec::new(),
            prefix_cache: true,
            logprobs: None,
        };
        let lm = LmConfig {
            max_tokens: 3,
            min_confidence: 0.0,
            adapt_length: false,
            temperature: 1.0,
            top_k: 4,
            seed: run as u64,
            ..LmConfig::default()
        };
        let mut drafters: Vec<Box<dyn Drafter>> = vec![
            Box::new(NgramDrafter::new(NgramConfig::default())),
            Box::new(RetrievalDrafter::new(
                vec![store.clone()],
                RetrievalConfig::default(),
            )),
            Box::new(LmDrafter::new(small.clone(), lm)),
        ];
        let report = generate(&target, &prompt, &config, &mut drafters, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(report.tokens.len(), COUNT);
        let code = report
            .tokens
            .iter()
            .rev()
            .fold(0usize, |acc, &t| acc * VOCAB + t as usize);
        observed[code] += 1;
        for d in &report.drafters {
            *accepted.entry(d.kind.clone()).or_default() += d.accepted;
        }
    }
    // Every kind's drafts were verified and some accepted: the test exercised them.
    for kind in ["ngram", "retrieval", "lm"] {
        assert!(
            accepted.get(kind).copied().unwrap_or(0) > 100,
            "{kind}: {accepted:?}"
        );
    }
    let (stat, critical) = sibyl_spec::stats::chi_square(&expected, &observed);
    assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
}

/// Sampled drafts carry the distribution they were drawn from, top-k wide, and the same
/// seed and context give the same block.
#[test]
fn sampled_drafts_carry_their_distributions_and_are_reproducible() {
    let model = model(31);
    let config = LmConfig {
        temperature: 0.8,
        top_k: 5,
        ..fixed_length()
    };
    let prompt: Vec<TokenId> = vec![5, 9, 2, 44, 17, 3, 3, 8];
    let first = LmDrafter::new(model.clone(), config.clone()).propose(&prompt, 6);
    let again = LmDrafter::new(model.clone(), config).propose(&prompt, 6);
    assert_eq!(first, again);
    let proposal = &first[0];
    let dists = proposal
        .probs
        .as_ref()
        .expect("sampled drafts send distributions");
    assert_eq!(dists.len(), proposal.tokens.len());
    for (token, dist) in proposal.tokens.iter().zip(dists) {
        assert_eq!(dist.entries().len(), 5);
        assert!(dist.prob(*token) > 0.0);
        let total: f32 = dist.entries().iter().map(|&(_, p)| p).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
