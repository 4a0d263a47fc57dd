//! Choosing among drafters every step: with step costs like a CPU's (each extra node costs
//! 15% of a step), a drafter that is always right gets the verify budget, one that is always
//! wrong gets none, and when every drafter is wrong the steps become plain decoding. The
//! output stays what plain decoding gives.

use sibyl_decode::{
    generate, measure_drafter, GenerationConfig, Learned, Session, SharedLearning, Step,
};
use sibyl_engine::testkit::{tiny_model, TinyModelConfig};
use sibyl_engine::{Architecture, GgmlDType, Model};
use sibyl_spec::{
    DraftCosts, Drafter, DrafterId, Proposal, SamplingConfig, StepCosts, TokenId, TreeLimits,
};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VOCAB: u32 = 48;

fn model() -> Model {
    tiny_model(&TinyModelConfig {
        architecture: Architecture::Qwen2,
        dtype: GgmlDType::Q8_0,
        seed: 21,
        vocab_size: VOCAB as usize,
        ..TinyModelConfig::default()
    })
    .unwrap()
}

/// Costs of a step over n nodes of 1 + 0.15 (n - 1) plain steps, fixed.
fn cpu_like_costs() -> SharedLearning {
    let mut costs = StepCosts::default();
    for nodes in [1, 2, 4, 8, 16, 32, 64] {
        costs.record(nodes, 0, 0.1 * (1.0 + 0.15 * (nodes - 1) as f64));
    }
    Arc::new(Mutex::new(Learned {
        costs: costs.frozen(),
        drafting: DraftCosts::default(),
        acceptance: Default::default(),
    }))
}

/// [`cpu_like_costs`], with drafters whose drafting takes the verifier's time: per drafter
/// kind, seconds per drafted token (a plain step is 0.1 s), fixed.
fn costs_with_drafting(per_token: &[(&str, f64)]) -> SharedLearning {
    let learning = cpu_like_costs();
    let mut drafting = DraftCosts::default();
    for &(kind, seconds) in per_token {
        // The first token comes with catching up (a forward pass of one token, or two).
        drafting.record_catch_up(kind, seconds, 1);
        drafting.record_catch_up(kind, seconds, 2);
        drafting.record_drafting(kind, seconds, 1);
    }
    learning.lock().unwrap().drafting = drafting.frozen();
    learning
}

fn config(max_tokens: usize, learning: Option<SharedLearning>) -> GenerationConfig {
    GenerationConfig {
        max_tokens,
        sampling: SamplingConfig::greedy(),
        tree: TreeLimits {
            budget: 16,
            max_depth: 4,
            min_value: 0.0,
            exempt_nodes: 1,
        },
        learning,
        stop_tokens: Vec::new(),
        prefix_cache: true,
        logprobs: None,
    }
}

/// Plain greedy decoding of `prompt`: what every run must print.
fn plain(model: &Model, prompt: &[TokenId], max_tokens: usize) -> Vec<TokenId> {
    generate(model, prompt, &config(max_tokens, None), &mut [], |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
    .tokens
}

/// A scripted drafter: the truth's next `depth` tokens, or a wrong first token (shifted by
/// `shift`) followed by the truth.
fn draft(truth: &[TokenId], at: usize, depth: usize, shift: Option<u32>) -> Proposal {
    let mut tokens: Vec<TokenId> = truth[at.min(truth.len())..]
        .iter()
        .take(depth)
        .copied()
        .collect();
    if let (Some(shift), Some(first)) = (shift, tokens.first_mut()) {
        *first = (*first + shift) % VOCAB;
    }
    Proposal::greedy(tokens)
}

/// Runs a session with drafters 0 and 1 given by `shifts` (None: always right). Returns the
/// output, and per drafter the draft tokens it had verified from step `from` on, and the
/// number of steps from then on.
fn run_scripted(
    model: &Model,
    prompt: &[TokenId],
    truth: &[TokenId],
    shifts: [Option<u32>; 2],
    from: usize,
) -> (Vec<TokenId>, [u64; 2], usize) {
    let config = config(truth.len(), Some(cpu_like_costs()));
    let kinds = vec!["first".to_string(), "second".to_string()];
    let mut session = Session::new(model, prompt, config, kinds).unwrap();
    let mut step: Step = session.prefill(model, &mut || false).unwrap();
    let mut output = Vec::new();
    let mut steps = 0;
    let mut at_start = None;
    loop {
        output.extend_from_slice(&step.tokens);
        if step.finish.is_some() {
            break;
        }
        steps += 1;
        if steps == from {
            at_start = Some(session.drafter_counts());
        }
        let at = session.context().len() - prompt.len();
        let depth = session.draft_depth();
        let proposals = (0..2)
            .map(|d| (DrafterId(d), vec![draft(truth, at, depth, shifts[d])]))
            .collect();
        step = session.step(model, proposals).unwrap();
    }
    let start = at_start.expect("the session ran past the measuring start");
    let end = session.drafter_counts();
    let verified = [end[0].0 - start[0].0, end[1].0 - start[1].0];
    (output, verified, steps - from)
}

#[test]
fn the_budget_goes_to_the_drafter_that_is_right() {
    let model = model();
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
    let truth = plain(&model, &prompt, 160);
    for shifts in [[None, Some(1)], [Some(5), None]] {
        let (output, verified, steps) = run_scripted(&model, &prompt, &truth, shifts, 20);
        assert_eq!(output, truth, "lossless");
        let right = usize::from(shifts[0].is_some());
        let share = verified[right] as f64 / (verified[0] + verified[1]).max(1) as f64;
        assert!(
            share >= 0.9,
            "{shifts:?}: the right drafter had {share:.2} of the verified nodes ({verified:?})"
        );
        // Four right tokens per step pay for themselves at these costs.
        assert!(
            verified[right] as usize >= 3 * steps,
            "{verified:?} in {steps} steps"
        );
    }
}

#[test]
fn when_every_drafter_is_wrong_the_steps_are_plain() {
    let model = model();
    let prompt = [2, 7, 1, 8, 2, 8];
    let truth = plain(&model, &prompt, 120);
    let (output, verified, steps) = run_scripted(&model, &prompt, &truth, [Some(1), Some(2)], 20);
    assert_eq!(output, truth, "lossless");
    assert!(steps >= 90, "{steps}");
    // Only the exploring steps (one node after 16 plain steps) verify a draft.
    let exploring = (steps / 17 + 1) as u64;
    assert!(
        verified[0] + verified[1] <= exploring,
        "{verified:?} draft nodes verified in {steps} steps"
    );
}

/// Draft tokens verified in the first step of a session with one drafter that is always
/// wrong.
fn verified_in_first_step(model: &Model, learning: &SharedLearning) -> u64 {
    let prompt = [2, 7, 1, 8, 2, 8];
    let truth = plain(model, &prompt, 40);
    let config = config(truth.len(), Some(learning.clone()));
    let kinds = vec!["wrong".to_string()];
    let mut session = Session::new(model, &prompt, config, kinds).unwrap();
    let mut step = session.prefill(model, &mut || false).unwrap();
    let mut first = None;
    while step.finish.is_none() {
        let at = session.context().len() - prompt.len();
        let proposal = draft(&truth, at, session.draft_depth(), Some(1));
        step = session
            .step(model, vec![(DrafterId(0), vec![proposal])])
            .unwrap();
        first.get_or_insert(session.drafter_counts()[0].0);
    }
    session.finish(sibyl_decode::FinishReason::Length);
    first.unwrap_or(0)
}

#[test]
fn a_new_session_starts_from_what_earlier_ones_learned_of_a_drafter_kind() {
    let model = model();
    let learning = cpu_like_costs();
    // A fresh process trusts the drafter at first; a session starts where the one before
    // left the kind's estimates, so after sessions of wrong drafts the next one starts
    // without verifying them.
    assert!(verified_in_first_step(&model, &learning) > 0);
    for _ in 0..3 {
        verified_in_first_step(&model, &learning);
    }
    let learned = learning.lock().unwrap().acceptance["wrong"].rate();
    assert!(learned < 0.2, "{learned}");
    assert_eq!(verified_in_first_step(&model, &learning), 0);
}

#[test]
fn without_adaptive_sizing_the_budget_is_always_used() {
    let model = model();
    let prompt = [2, 7, 1, 8, 2, 8];
    let truth = plain(&model, &prompt, 40);
    let config = config(truth.len(), None);
    let kinds = vec!["wrong".to_string()];
    let mut session = Session::new(&model, &prompt, config, kinds).unwrap();
    let mut step = session.prefill(&model, &mut || false).unwrap();
    let mut steps = 0u64;
    while step.finish.is_none() {
        let at = session.context().len() - prompt.len();
        let proposal = draft(&truth, at, session.draft_depth(), Some(1));
        step = session
            .step(&model, vec![(DrafterId(0), vec![proposal])])
            .unwrap();
        steps += 1;
    }
    // Every step verified at least the wrong drafter's first token.
    assert!(session.drafter_counts()[0].0 >= steps);
}

#[test]
fn a_drafter_is_trusted_where_its_evidence_has_been_right() {
    // One drafter whose strong guesses (evidence 8) are always right and whose weak ones
    // (evidence 1) are always wrong, alternating: its acceptance overall is about one half,
    // but what it says of each guess tells them apart.
    let model = model();
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
    let truth = plain(&model, &prompt, 200);
    let config = config(truth.len(), Some(cpu_like_costs()));
    let mut session = Session::new(&model, &prompt, config, vec!["mixed".to_string()]).unwrap();
    let mut step = session.prefill(&model, &mut || false).unwrap();
    let mut output = step.tokens.clone();
    let (mut steps, mut strong, mut weak) = (0usize, Vec::new(), Vec::new());
    while step.finish.is_none() {
        steps += 1;
        let at = session.context().len() - prompt.len();
        let right = steps % 2 == 0;
        let proposal = if right {
            draft(&truth, at, session.draft_depth(), None).with_evidence(8)
        } else {
            draft(&truth, at, session.draft_depth(), Some(1)).with_evidence(1)
        };
        let before = session.drafter_counts()[0].0;
        step = session
            .step(&model, vec![(DrafterId(0), vec![proposal])])
            .unwrap();
        output.extend_from_slice(&step.tokens);
        if steps > 20 {
            let verified = session.drafter_counts()[0].0 - before;
            if right { &mut strong } else { &mut weak }.push(verified);
        }
    }
    assert_eq!(output, truth, "lossless");
    assert!(strong.len() >= 10 && weak.len() >= 10, "{steps} steps");
    // The strong guesses get their whole depth (but the last, which the end of the output
    // cuts short); the weak ones only the exploring steps.
    let (_, whole) = strong.split_last().unwrap();
    assert!(whole.iter().all(|&v| v >= 3), "strong: {strong:?}");
    let weak_total: u64 = weak.iter().sum();
    assert!(weak_total <= 2, "weak: {weak:?}");
}

/// A drafter in this process that drafts the truth (or a wrong first token, shifted by
/// `shift`), and writes down at which step (context length) it was asked for how many tokens.
struct Scripted {
    kind: &'static str,
    prompt_len: usize,
    truth: Vec<TokenId>,
    shift: Option<u32>,
    asked: Arc<Mutex<Vec<(usize, usize)>>>,
}

impl Drafter for Scripted {
    fn kind(&self) -> &str {
        self.kind
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.asked.lock().unwrap().push((context.len(), max_tokens));
        vec![draft(
            &self.truth,
            context.len() - self.prompt_len,
            max_tokens,
            self.shift,
        )]
    }
}

/// What `generate` printed and, per drafter, the lengths it was asked for after the first
/// `from` tokens, with the number of steps after them.
fn run_in_process(
    model: &Model,
    prompt: &[TokenId],
    truth: &[TokenId],
    drafters: &[(&'static str, Option<u32>)],
    learning: SharedLearning,
    from: usize,
) -> (Vec<TokenId>, Vec<Vec<usize>>, usize) {
    let logs: Vec<_> = drafters
        .iter()
        .map(|_| Arc::new(Mutex::new(Vec::new())))
        .collect();
    let mut boxed: Vec<Box<dyn Drafter>> = drafters
        .iter()
        .zip(&logs)
        .map(|(&(kind, shift), asked)| {
            Box::new(Scripted {
                kind,
                prompt_len: prompt.len(),
                truth: truth.to_vec(),
                shift,
                asked: asked.clone(),
            }) as Box<dyn Drafter>
        })
        .collect();
    let config = config(truth.len(), Some(learning));
    let mut contexts = Vec::new();
    let mut seen = prompt.len();
    let report = generate(model, prompt, &config, &mut boxed, |tokens| {
        seen += tokens.len();
        contexts.push(seen);
        ControlFlow::Continue(())
    })
    .unwrap();
    let start = prompt.len() + from;
    let steps = contexts
        .iter()
        .filter(|&&c| c >= start)
        .count()
        .saturating_sub(1);
    let asked = logs
        .iter()
        .map(|log| {
            log.lock()
                .unwrap()
                .iter()
                .filter(|&&(at, _)| at >= start)
                .map(|&(_, length)| length)
                .collect()
        })
        .collect();
    for (drafter, log) in report.drafters.iter().zip(&logs) {
        assert_eq!(
            drafter.asked as usize,
            log.lock().unwrap().len(),
            "{}",
            drafter.kind
        );
    }
    (report.tokens, asked, steps)
}

#[test]
fn a_drafter_that_costs_almost_a_step_per_token_is_only_probed() {
    let model = model();
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
    let truth = plain(&model, &prompt, 160);
    // Always right, but drafting a token costs 90% of decoding one: no block pays.
    let learning = costs_with_drafting(&[("costly", 0.09)]);
    let (output, asked, steps) =
        run_in_process(&model, &prompt, &truth, &[("costly", None)], learning, 0);
    assert_eq!(output, truth, "lossless");
    // Asked for one token after 32 steps without it, then 64, ..., to follow the session;
    // the rest is plain decoding.
    assert!(steps >= 140, "{steps}");
    assert!(asked[0].iter().all(|&length| length == 1), "{asked:?}");
    assert!(
        asked[0].len() <= steps / 32 + 1,
        "{} probes in {steps} steps",
        asked[0].len()
    );
    assert!(!asked[0].is_empty(), "never probed in {steps} steps");
}

#[test]
fn an_expensive_drafter_is_asked_where_the_cheap_ones_have_nothing() {
    let model = model();
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6];
    let truth = plain(&model, &prompt, 160);
    // A small model: always right, a fifth of a step per token. Beside it, prompt lookup
    // that costs nothing and is always wrong, or always right.
    for (cheap_shift, lm_share) in [(Some(1), 0.9..=1.0), (None, 0.0..=0.1)] {
        let learning = costs_with_drafting(&[("lookup", 0.0), ("small-model", 0.02)]);
        let drafters = [("lookup", cheap_shift), ("small-model", None)];
        let (output, asked, steps) =
            run_in_process(&model, &prompt, &truth, &drafters, learning, 20);
        assert_eq!(output, truth, "lossless");
        // Prompt lookup is asked at every step, for the whole depth, but the probes of the
        // small model (one step in 33 where it was not asked).
        assert!(
            asked[0].len() + steps / 32 + 1 >= steps,
            "{asked:?} in {steps} steps"
        );
        assert!(asked[0].iter().all(|&length| length == 4), "{asked:?}");
        let share = asked[1].len() as f64 / steps.max(1) as f64;
        assert!(
            lm_share.contains(&share),
            "lookup shifted by {cheap_shift:?}: the small model was asked at {share:.2} of \
             the steps ({asked:?} in {steps} steps)"
        );
    }
}

/// A drafter that works like a small model in this process: catching up costs `per_token`
/// (slept) for each context token it has not seen, and so does each drafted token after the
/// first; it drafts the truth, and writes down the context lengths it was asked at.
struct Catching {
    prompt_len: usize,
    truth: Vec<TokenId>,
    seen: usize,
    per_token: Duration,
    asked: Vec<usize>,
}

impl Drafter for Catching {
    fn kind(&self) -> &str {
        "small-model"
    }

    fn catch_up(&mut self, context: &[TokenId]) -> usize {
        let new = context.len().saturating_sub(self.seen);
        std::thread::sleep(self.per_token * new as u32);
        self.seen = context.len();
        new
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        self.catch_up(context);
        std::thread::sleep(self.per_token * max_tokens.saturating_sub(1) as u32);
        self.asked.push(context.len());
        match context.len().checked_sub(self.prompt_len) {
            Some(at) => vec![draft(&self.truth, at, max_tokens, None)],
            None => Vec::new(),
        }
    }
}

#[test]
fn a_small_model_timed_before_the_first_session_is_not_asked_to_catch_up_with_its_prompt() {
    let model = model();
    let prompt: Vec<TokenId> = (0..200).map(|i| (i * 7 + i / 9) % VOCAB).collect();
    let truth = plain(&model, &prompt, 12);
    // 5 ms a token, where a plain step takes 0.1 s: catching up with the prompt takes ten
    // steps' time, more than a block of 4 tokens can save.
    let catching = || Catching {
        prompt_len: prompt.len(),
        truth: truth.clone(),
        seen: 0,
        per_token: Duration::from_millis(5),
        asked: Vec::new(),
    };
    for measured in [false, true] {
        let learning = cpu_like_costs();
        if measured {
            let mut timed = catching();
            measure_drafter(&learning, &mut timed, 4);
            assert_eq!(timed.asked.len(), 1, "the measure drafts one block");
        }
        let mut drafters: Vec<Box<dyn Drafter>> = vec![Box::new(catching())];
        let config = config(truth.len(), Some(learning));
        let report = generate(&model, &prompt, &config, &mut drafters, |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(report.tokens, truth, "lossless");
        let asked = report.drafters[0].asked;
        if measured {
            // Weighed from its measured costs from the first step: never asked.
            assert_eq!(asked, 0, "asked {asked} times");
        } else {
            // Not measured yet: asked at the first step, whatever catching up takes.
            assert!(asked >= 1, "asked {asked} times");
        }
    }
}
