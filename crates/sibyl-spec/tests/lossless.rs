//! Lossless verification on a toy target whose probabilities can be computed exactly.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sibyl_spec::stats::chi_square;
use sibyl_spec::{
    verify, DrafterId, Penalties, Proposal, SamplingConfig, SparseDist, TargetDistribution,
    TokenConstraint, TokenHistory, TokenId, TreeBuilder,
};

/// A toy language model: logits depend on the last three tokens through a hash.
struct ToyModel {
    vocab: usize,
    sharpness: f32,
}

impl ToyModel {
    fn logits(&self, context: &[TokenId]) -> Vec<f32> {
        let tail = &context[context.len().saturating_sub(3)..];
        let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
        for &t in tail {
            h = splitmix(h ^ u64::from(t));
        }
        (0..self.vocab)
            .map(|v| {
                let x = splitmix(h ^ (v as u64).wrapping_mul(0xA24B_AED4_963E_E407));
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * self.sharpness
            })
            .collect()
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// How each step's drafts are made.
#[derive(Clone, Copy, Debug)]
enum Drafts {
    None,
    /// Random point-mass branches (some out of the vocabulary), often wrong.
    PointMass,
    /// One branch sampled from a random draft distribution that is sent along.
    Sampled,
    /// Several drafters whose guesses often coincide: the target's own most likely tokens
    /// (point masses) and two branches sampled from random distributions sent along.
    Mixed,
}

/// A branch of up to four tokens, each sampled from a random distribution sent along.
fn sampled_proposal(vocab: usize, draft_rng: &mut ChaCha8Rng) -> Proposal {
    let len = draft_rng.random_range(1..5);
    let mut tokens = Vec::new();
    let mut probs = Vec::new();
    for _ in 0..len {
        let weights: Vec<f32> = (0..vocab)
            .map(|_| draft_rng.random::<f32>() + 0.05)
            .collect();
        let total: f32 = weights.iter().sum();
        let entries: Vec<(TokenId, f32)> = weights
            .iter()
            .enumerate()
            .map(|(t, w)| (t as TokenId, w / total))
            .collect();
        let mut u = draft_rng.random::<f32>();
        let mut token = entries.last().unwrap().0;
        for &(t, p) in &entries {
            if u < p {
                token = t;
                break;
            }
            u -= p;
        }
        tokens.push(token);
        probs.push(SparseDist::new(entries).unwrap());
    }
    Proposal {
        tokens,
        probs: Some(probs),
        evidence: 0,
    }
}

/// Generates `count` tokens speculatively, every one held to `constraint` if there is one;
/// returns them and the number of verify steps.
#[allow(clippy::too_many_arguments)] // a test driver: every setting of a run
fn generate(
    model: &ToyModel,
    prompt: &[TokenId],
    count: usize,
    config: &SamplingConfig,
    drafts: Drafts,
    draft_rng: &mut ChaCha8Rng,
    budget: usize,
    mut constraint: Option<&mut dyn TokenConstraint>,
) -> (Vec<TokenId>, usize) {
    let mut context = prompt.to_vec();
    let mut history = TokenHistory::new(prompt, &config.penalties);
    let mut steps = 0;
    while context.len() < prompt.len() + count {
        let root = *context.last().unwrap();
        let mut builder = TreeBuilder::new(root, model.vocab, budget, 6);
        match drafts {
            Drafts::None => {}
            Drafts::PointMass => {
                for b in 0..draft_rng.random_range(0..4) {
                    let len = draft_rng.random_range(0..6);
                    let tokens = (0..len)
                        .map(|_| draft_rng.random_range(0..model.vocab as u32 + 2))
                        .collect();
                    builder.add(DrafterId(b), draft_rng.random(), Proposal::greedy(tokens));
                }
            }
            Drafts::Sampled => {
                builder.add(DrafterId(0), 0.7, sampled_proposal(model.vocab, draft_rng));
            }
            Drafts::Mixed => {
                let mut ctx = context.clone();
                let mut guesses = Vec::new();
                for _ in 0..2 {
                    let token = sibyl_spec::argmax(&model.logits(&ctx));
                    guesses.push(token);
                    ctx.push(token);
                }
                builder.add(DrafterId(0), 0.9, Proposal::greedy(guesses));
                builder.add(DrafterId(1), 0.7, sampled_proposal(model.vocab, draft_rng));
                builder.add(DrafterId(2), 0.6, sampled_proposal(model.vocab, draft_rng));
            }
        }
        let tree = builder.build();
        let mut logits = Vec::with_capacity(tree.len() * model.vocab);
        for i in 0..tree.len() {
            let mut path = Vec::new();
            let mut node = Some(i);
            while let Some(n) = node.filter(|&n| n != 0) {
                path.push(tree.nodes()[n].token);
                node = tree.nodes()[n].parent;
            }
            path.reverse();
            let mut ctx = context.clone();
            ctx.extend(path);
            logits.extend(model.logits(&ctx));
        }
        let outcome = verify(
            &tree,
            &logits,
            model.vocab,
            config,
            context.len() - 1,
            &history,
            constraint.as_deref_mut(),
        )
        .unwrap();
        let emitted = outcome.emitted(&tree);
        if let Some(constraint) = constraint.as_deref_mut() {
            constraint.record(&emitted).unwrap();
        }
        history.extend(&emitted);
        context.extend(emitted);
        steps += 1;
    }
    context.truncate(prompt.len() + count);
    (context[prompt.len()..].to_vec(), steps)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn greedy_speculation_equals_plain_greedy(
        vocab in 2usize..40,
        prompt in proptest::collection::vec(0u32..40, 1..8),
        seed in any::<u64>(),
        budget in 0usize..20,
    ) {
        let model = ToyModel { vocab, sharpness: 6.0 };
        let prompt: Vec<TokenId> = prompt.into_iter().map(|t| t % vocab as u32).collect();
        let config = SamplingConfig::greedy();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (plain, plain_steps) =
            generate(&model, &prompt, 24, &config, Drafts::None, &mut rng, budget, None);
        prop_assert_eq!(plain_steps, 24);
        let (spec, _) = generate(&model, &prompt, 24, &config, Drafts::PointMass, &mut rng, budget, None);
        prop_assert_eq!(&spec, &plain);
    }

    #[test]
    fn seeded_sampling_with_point_mass_drafts_reproduces_plain_sampling(
        prompt in proptest::collection::vec(0u32..8, 1..6),
        seed in any::<u64>(),
        filters_first in any::<bool>(),
    ) {
        let model = ToyModel { vocab: 8, sharpness: 3.0 };
        let config = SamplingConfig {
            temperature: 0.8,
            top_k: Some(6),
            top_p: Some(0.95),
            min_p: Some(0.1),
            seed,
            penalties: Penalties::default(),
            // vLLM's order or llama.cpp's.
            filters_first,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 1);
        let (plain, _) = generate(&model, &prompt, 16, &config, Drafts::None, &mut rng, 8, None);
        let (spec, _) = generate(&model, &prompt, 16, &config, Drafts::PointMass, &mut rng, 8, None);
        prop_assert_eq!(spec, plain);
    }

    #[test]
    fn with_penalties_speculation_equals_plain_decoding_greedy_and_seeded(
        vocab in 2usize..40,
        prompt in proptest::collection::vec(0u32..40, 1..8),
        seed in any::<u64>(),
        presence in -2.0f32..2.0,
        frequency in -2.0f32..2.0,
        repetition in 0.5f32..2.0,
        sampled in any::<bool>(),
    ) {
        let model = ToyModel { vocab, sharpness: 6.0 };
        let prompt: Vec<TokenId> = prompt.into_iter().map(|t| t % vocab as u32).collect();
        let config = SamplingConfig {
            temperature: if sampled { 0.8 } else { 0.0 },
            seed,
            penalties: Penalties {
                presence,
                frequency,
                repetition,
                logit_bias: vec![(seed as u32 % vocab as u32, 1.5)],
            },
            ..SamplingConfig::greedy()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 3);
        let (plain, _) = generate(&model, &prompt, 24, &config, Drafts::None, &mut rng, 12, None);
        let (spec, _) = generate(&model, &prompt, 24, &config, Drafts::PointMass, &mut rng, 12, None);
        prop_assert_eq!(spec, plain);
    }

    #[test]
    fn under_a_constraint_speculation_equals_plain_decoding_greedy_and_seeded(
        vocab in 4usize..40,
        prompt in proptest::collection::vec(0u32..40, 1..8),
        seed in any::<u64>(),
        sampled in any::<bool>(),
        frequency in 0.0f32..2.0,
    ) {
        let model = ToyModel { vocab, sharpness: 6.0 };
        let prompt: Vec<TokenId> = prompt.into_iter().map(|t| t % vocab as u32).collect();
        let config = SamplingConfig {
            temperature: if sampled { 0.8 } else { 0.0 },
            seed,
            penalties: Penalties { frequency, ..Penalties::default() },
            ..SamplingConfig::greedy()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 5);
        let run = |drafts, rng: &mut ChaCha8Rng| {
            let mut grammar = Parity::default();
            generate(&model, &prompt, 20, &config, drafts, rng, 12, Some(&mut grammar)).0
        };
        let plain = run(Drafts::None, &mut rng);
        let spec = run(Drafts::PointMass, &mut rng);
        prop_assert!(
            plain.iter().enumerate().all(|(i, &t)| Parity::allows(i, t)),
            "{:?}", plain
        );
        prop_assert_eq!(spec, plain);
    }
}

/// A toy grammar: the n-th generated token has the parity of n, and token 1 never comes.
/// Recording a token that breaks it is an error, so a run that chose outside the mask
/// fails.
#[derive(Default)]
struct Parity {
    recorded: usize,
}

impl Parity {
    fn allows(position: usize, token: TokenId) -> bool {
        token != 1 && token as usize % 2 == position % 2
    }
}

impl TokenConstraint for Parity {
    fn mask(&mut self, path: &[TokenId], row: &mut [f32]) -> Result<(), String> {
        let position = self.recorded + path.len();
        if let Some(&bad) = path
            .iter()
            .enumerate()
            .find(|&(i, &t)| !Self::allows(self.recorded + i, t))
            .map(|(_, t)| t)
        {
            return Err(format!("path token {bad} breaks the grammar"));
        }
        for (token, logit) in row.iter_mut().enumerate() {
            if !Self::allows(position, token as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    fn record(&mut self, tokens: &[TokenId]) -> Result<(), String> {
        for &token in tokens {
            if !Self::allows(self.recorded, token) {
                return Err(format!("token {token} breaks the grammar"));
            }
            self.recorded += 1;
        }
        Ok(())
    }
}

/// Exact joint distribution of the first `count` sampled tokens of `model` after `prompt`.
fn exact_joint(
    model: &ToyModel,
    prompt: &[TokenId],
    count: usize,
    config: &SamplingConfig,
) -> Vec<f64> {
    let outcomes = model.vocab.pow(count as u32);
    (0..outcomes)
        .map(|code| {
            let mut ctx = prompt.to_vec();
            let mut history = TokenHistory::new(prompt, &config.penalties);
            let mut prob = 1.0;
            let mut rest = code;
            for _ in 0..count {
                let token = (rest % model.vocab) as TokenId;
                rest /= model.vocab;
                let mut row = model.logits(&ctx);
                history.adjust(&config.penalties, &mut row, &[]);
                prob *= TargetDistribution::new(&row, config).prob(token);
                history.extend(&[token]);
                ctx.push(token);
            }
            prob
        })
        .collect()
}

fn chi_square_of(drafts: Drafts) -> (f64, f64) {
    chi_square_with(drafts, Penalties::default(), &Penalties::default())
}

/// The chi-square statistic of runs sampled with `penalties` against the exact joint
/// distribution under `expected_under`, and its critical value.
fn chi_square_with(drafts: Drafts, penalties: Penalties, expected_under: &Penalties) -> (f64, f64) {
    const RUNS: usize = 20_000;
    const COUNT: usize = 3;
    let model = ToyModel {
        vocab: 5,
        sharpness: 2.5,
    };
    let prompt = [1, 3];
    let base = SamplingConfig {
        temperature: 0.9,
        top_k: None,
        top_p: None,
        min_p: None,
        seed: 0,
        penalties,
        filters_first: false,
    };
    let expected_config = SamplingConfig {
        penalties: expected_under.clone(),
        ..base.clone()
    };
    let expected = exact_joint(&model, &prompt, COUNT, &expected_config);
    let mut observed = vec![0usize; expected.len()];
    let mut draft_rng = ChaCha8Rng::seed_from_u64(0xD8AF7);
    for run in 0..RUNS {
        let config = SamplingConfig {
            seed: 1_000_003 * run as u64 + 17,
            ..base.clone()
        };
        let (tokens, _) = generate(
            &model,
            &prompt,
            COUNT,
            &config,
            drafts,
            &mut draft_rng,
            8,
            None,
        );
        let code = tokens
            .iter()
            .rev()
            .fold(0usize, |acc, &t| acc * model.vocab + t as usize);
        observed[code] += 1;
    }
    chi_square(&expected, &observed)
}

#[test]
fn plain_sampling_follows_the_target_distribution() {
    let (stat, critical) = chi_square_of(Drafts::None);
    assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
}

#[test]
fn sampling_with_point_mass_drafts_follows_the_target_distribution() {
    let (stat, critical) = chi_square_of(Drafts::PointMass);
    assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
}

#[test]
fn sampling_with_probabilistic_drafts_follows_the_target_distribution() {
    let (stat, critical) = chi_square_of(Drafts::Sampled);
    assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
}

#[test]
fn sampling_with_coinciding_drafts_of_several_drafters_follows_the_target_distribution() {
    let (stat, critical) = chi_square_of(Drafts::Mixed);
    assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
}

fn strong_penalties() -> Penalties {
    Penalties {
        presence: 0.8,
        frequency: 0.6,
        repetition: 1.5,
        logit_bias: vec![(2, 1.0)],
    }
}

#[test]
fn sampling_with_penalties_and_drafts_follows_the_penalised_distribution() {
    for drafts in [Drafts::None, Drafts::Mixed] {
        let (stat, critical) = chi_square_with(drafts, strong_penalties(), &strong_penalties());
        assert!(stat < critical, "chi-square {stat:.1} >= {critical:.1}");
    }
    // And the check can fail: the unpenalised distribution is told apart.
    let (stat, critical) =
        chi_square_with(Drafts::Mixed, strong_penalties(), &Penalties::default());
    assert!(stat > critical, "chi-square {stat:.1} <= {critical:.1}");
}

#[test]
fn a_biased_sampler_is_caught_by_the_chi_square_bound() {
    // The check must be able to fail: sampling at the wrong temperature is detected.
    let model = ToyModel {
        vocab: 5,
        sharpness: 2.5,
    };
    let prompt = [1, 3];
    let right = SamplingConfig {
        temperature: 0.9,
        top_k: None,
        top_p: None,
        min_p: None,
        seed: 0,
        penalties: Penalties::default(),
        filters_first: false,
    };
    let expected = exact_joint(&model, &prompt, 3, &right);
    let mut observed = vec![0usize; expected.len()];
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for run in 0..20_000u64 {
        let wrong = SamplingConfig {
            temperature: 1.3,
            seed: run,
            ..right.clone()
        };
        let (tokens, _) = generate(&model, &prompt, 3, &wrong, Drafts::None, &mut rng, 0, None);
        let code = tokens
            .iter()
            .rev()
            .fold(0usize, |acc, &t| acc * 5 + t as usize);
        observed[code] += 1;
    }
    let (stat, critical) = chi_square(&expected, &observed);
    assert!(stat > critical, "chi-square {stat:.1} <= {critical:.1}");
}
