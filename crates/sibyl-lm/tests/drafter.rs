//! The LM drafter on tiny random-weight models: rebasing gives the drafts of a fresh
//! drafter, speculation with it prints what plain decoding prints, and block lengths follow
//! acceptance.

use sibyl_decode::{generate, GenerationConfig};
use sibyl_engine::testkit::{tiny_model, TinyModelConfig};
use sibyl_engine::{Architecture, GgmlDType, Model};
use sibyl_lm::{LmConfig, LmDrafter};
use sibyl_spec::{Drafter, SamplingConfig, TokenId};
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
}

#[test]
fn speculation_with_the_lm_drafter_prints_what_plain_decoding_prints() {
    let target = model(41);
    let prompt: Vec<TokenId> = vec![1, 2, 3, 4, 5, 6, 7];
    let config = GenerationConfig {
        max_tokens: 60,
        sampling: SamplingConfig::greedy(),
        draft_budget: 16,
        max_draft_depth: 8,
        min_draft_value: 0.0,
        exempt_draft_nodes: 1,
        learning: None,
        stop_tokens: Vec::new(),
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
