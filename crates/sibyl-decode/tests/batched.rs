//! Sessions run together by the scheduler (one forward pass per step, prompts in chunks,
//! speculation sized for the batch) produce exactly what each produces alone.

use proptest::prelude::*;
use sibyl_decode::{
    generate, Client, FinishReason, GenerationConfig, Learned, Scheduler, SchedulerConfig, Session,
    SharedLearning,
};
use sibyl_engine::testkit::{tensor_test_device, tiny_model, tiny_model_on, TinyModelConfig};
use sibyl_engine::Model;
use sibyl_grammar::GrammarCompiler;
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_spec::{
    Drafter, DrafterId, MinTokens, Penalties, Proposal, SamplingConfig, StepCosts, TokenId,
    TokenLogprobs, TreeLimits,
};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

const VOCAB: u32 = 48;

thread_local! {
    /// Whether this test's sessions run on the tensor engine rather than the CPU engine.
    static ON_TENSOR_ENGINE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn model() -> &'static Model {
    static MODELS: OnceLock<[Model; 2]> = OnceLock::new();
    let [cpu, tensor] = MODELS.get_or_init(|| {
        let config = TinyModelConfig {
            vocab_size: VOCAB as usize,
            seed: 21,
            ..TinyModelConfig::default()
        };
        [
            tiny_model(&config).unwrap(),
            tiny_model_on(&config, &tensor_test_device()).unwrap(),
        ]
    });
    if ON_TENSOR_ENGINE.get() {
        tensor
    } else {
        cpu
    }
}

/// Step costs like a CPU's: each row costs a fifth of a one-row pass, frozen so that no
/// test depends on this machine's speed.
fn cpu_like_costs() -> SharedLearning {
    let mut costs = StepCosts::default();
    for n in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
        for context in [10, 600, 1100] {
            costs.record(n, context, 0.1 * (1.0 + 0.2 * (n - 1) as f64));
        }
    }
    Arc::new(Mutex::new(Learned {
        costs: costs.frozen(),
        ..Learned::default()
    }))
}

/// A drafter that repeats the context's last tokens, often wrongly.
struct Echo;

impl Drafter for Echo {
    fn kind(&self) -> &str {
        "echo"
    }

    fn propose(&mut self, context: &[TokenId], max_tokens: usize) -> Vec<Proposal> {
        let tail = &context[context.len().saturating_sub(max_tokens)..];
        vec![Proposal::greedy(tail.to_vec())]
    }
}

/// A session's client in these tests: its own drafters, what it was given, and a number of
/// steps it is not ready for (a reader that is slow to start).
struct TestClient {
    /// Which request it serves.
    id: usize,
    drafters: Vec<Box<dyn Drafter>>,
    delivered: Vec<TokenId>,
    /// The delivered tokens' log-probabilities.
    logprobs: Vec<TokenLogprobs>,
    /// The prompt's, when the session ended.
    prompt_logprobs: Vec<TokenLogprobs>,
    not_ready_for: usize,
    cancel_after_tokens: Option<usize>,
}

impl Client for TestClient {
    fn cancelled(&mut self) -> bool {
        self.cancel_after_tokens
            .is_some_and(|n| self.delivered.len() >= n)
    }

    fn ready(&mut self) -> bool {
        if self.not_ready_for > 0 {
            self.not_ready_for -= 1;
            return false;
        }
        true
    }

    fn drafts(&mut self, session: &mut Session, _: Instant) -> Vec<(DrafterId, Vec<Proposal>)> {
        session.draft_in_process(&mut self.drafters)
    }

    fn deliver(&mut self, session: &Session, tokens: &[TokenId]) -> ControlFlow<()> {
        self.delivered.extend_from_slice(tokens);
        let logprobs = session.step_logprobs();
        assert_eq!(logprobs.len(), tokens.len(), "one entry per token");
        assert!(logprobs.iter().zip(tokens).all(|(p, &t)| p.token == t));
        self.logprobs.extend_from_slice(logprobs);
        ControlFlow::Continue(())
    }

    fn ended(&mut self, session: &Session) {
        self.prompt_logprobs = session.prompt_logprobs().to_vec();
    }
}

#[derive(Debug, Clone)]
struct Request {
    prompt: Vec<TokenId>,
    max_tokens: usize,
    /// 0: greedy; else the seed of a sampled request.
    seed: u64,
    speculate: bool,
    adaptive: bool,
    joins_at_step: usize,
    not_ready_for: usize,
    /// 0: none; 1: presence and frequency penalties; 2: repetition penalty and a bias.
    penalties: u8,
    /// Held to JSON ([`json_grammar`]).
    constrained: bool,
}

/// The test model's vocabulary as text, for a JSON grammar: JSON's punctuation, literals
/// and some letters and digits, in turn; the last token is the stop token.
const PIECES: [&str; 36] = [
    "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "a", "b", "x", "0", "1", "7", "-", ".", "e",
    "true", "false", "null", "{\"", "\":", "\",", "\"}", "ab", "12", "\\", "]}", "[1", "y", "z",
    "3", "9", " \"", "\": ",
];

fn piece(token: TokenId) -> &'static str {
    PIECES[token as usize % PIECES.len()]
}

/// A JSON grammar over the test model's vocabulary.
fn json_grammar() -> &'static GrammarCompiler {
    static COMPILER: OnceLock<GrammarCompiler> = OnceLock::new();
    COMPILER.get_or_init(|| {
        let tokens = (0..VOCAB).map(|id| match id {
            stop if stop == VOCAB - 1 => (b"<|end|>".to_vec(), true),
            id => (piece(id).as_bytes().to_vec(), false),
        });
        GrammarCompiler::new(tokens, &[VOCAB - 1]).unwrap()
    })
}

fn request() -> impl Strategy<Value = Request> {
    let shape = (
        proptest::collection::vec(0..VOCAB, 1..60),
        1usize..30,
        prop_oneof![Just(0u64), 1u64..1000],
        any::<bool>(),
        any::<bool>(),
    );
    let settings = (
        0usize..6,
        prop_oneof![Just(0usize), 1usize..4],
        0u8..3,
        any::<bool>(),
    );
    (shape, settings).prop_map(
        |(
            (prompt, max_tokens, seed, speculate, adaptive),
            (joins_at_step, not_ready_for, penalties, constrained),
        )| Request {
            prompt,
            max_tokens,
            seed,
            speculate,
            adaptive,
            joins_at_step,
            not_ready_for,
            penalties,
            constrained,
        },
    )
}

fn config(request: &Request, learning: &SharedLearning) -> GenerationConfig {
    let penalties = match request.penalties {
        0 => Penalties::default(),
        1 => Penalties {
            presence: 0.7,
            frequency: 0.9,
            ..Penalties::default()
        },
        _ => Penalties {
            repetition: 1.4,
            logit_bias: vec![(3, 1.5), (VOCAB - 2, -2.0)],
            ..Penalties::default()
        },
    };
    let sampling = match request.seed {
        0 => SamplingConfig {
            penalties,
            ..SamplingConfig::greedy()
        },
        seed => SamplingConfig {
            temperature: 0.9,
            top_k: None,
            top_p: Some(0.95),
            min_p: (request.penalties == 2).then_some(0.05),
            seed,
            penalties,
            filters_first: false,
        },
    };
    GenerationConfig {
        max_tokens: request.max_tokens,
        sampling,
        tree: TreeLimits {
            budget: if request.speculate { 12 } else { 0 },
            max_depth: 5,
            min_value: 0.0,
            exempt_nodes: 1,
        },
        learning: request.adaptive.then(|| learning.clone()),
        stop_tokens: vec![VOCAB - 1],
        prefix_cache: true,
        logprobs: Some(3),
    }
}

fn drafters(request: &Request) -> Vec<Box<dyn Drafter>> {
    if !request.speculate {
        return Vec::new();
    }
    vec![
        Box::new(NgramDrafter::new(NgramConfig {
            max_ngram: 3,
            ..NgramConfig::default()
        })),
        Box::new(Echo),
    ]
}

/// Adds `request` to `scheduler` as session `id` under `config`, with its own drafters.
fn add(
    scheduler: &mut Scheduler<TestClient>,
    id: usize,
    request: &Request,
    config: GenerationConfig,
    cancel_after_tokens: Option<usize>,
) {
    let drafters = drafters(request);
    let kinds = drafters.iter().map(|d| d.kind().to_string()).collect();
    let mut session = Session::new(model(), &request.prompt, config, kinds).unwrap();
    if request.constrained {
        let json = json_grammar().json_schema(r#"{"type": "object"}"#).unwrap();
        session = session
            .with_constraint(Box::new(json))
            .with_constraint(Box::new(MinTokens::new(4, vec![VOCAB - 1])));
    }
    let client = TestClient {
        id,
        drafters,
        delivered: Vec::new(),
        logprobs: Vec::new(),
        prompt_logprobs: Vec::new(),
        not_ready_for: request.not_ready_for,
        cancel_after_tokens,
    };
    scheduler.add(session, client);
}

/// Runs `request` under `config` alone in `scheduler` (which keeps its prefix cache).
fn run_in(
    scheduler: &mut Scheduler<TestClient>,
    request: &Request,
    config: GenerationConfig,
) -> sibyl_decode::GenerationReport {
    add(scheduler, 0, request, config, None);
    loop {
        let (mut finished, _) = scheduler.step(model());
        if let Some(done) = finished.pop() {
            break done.outcome.unwrap();
        }
    }
}

/// The request alone, without drafts: the tokens it must produce in any batch, and their
/// log-probabilities.
fn alone(request: &Request) -> (Vec<TokenId>, Vec<TokenLogprobs>) {
    let mut plain = config(request, &cpu_like_costs());
    plain.tree.budget = 0;
    plain.learning = None;
    // `generate` takes no constraint: a constrained request is checked against the
    // scheduler's plain run alone.
    let unconstrained = (!request.constrained).then(|| {
        generate(model(), &request.prompt, &plain, &mut [], |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens
    });
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let plain_request = Request {
        speculate: false,
        not_ready_for: 0,
        ..request.clone()
    };
    add(&mut scheduler, 0, &plain_request, plain, None);
    loop {
        let (mut finished, _) = scheduler.step(model());
        if let Some(done) = finished.pop() {
            let tokens = done.outcome.unwrap().tokens;
            if let Some(unconstrained) = unconstrained {
                assert_eq!(tokens, unconstrained);
            } else {
                let text: String = tokens.iter().map(|&t| piece(t)).collect();
                assert!(
                    text.trim_start().starts_with('{'),
                    "not an object: {text:?}"
                );
            }
            break (tokens, done.client.logprobs);
        }
    }
}

/// What one request of a batch gave: its tokens, their log-probabilities, its finish.
type Delivered = (Vec<TokenId>, Vec<TokenLogprobs>, FinishReason);

/// Runs `requests` through one scheduler, each joining at its step; returns what each one
/// was delivered, and the largest batch seen.
fn batched(requests: &[Request], scheduler_config: SchedulerConfig) -> (Vec<Delivered>, usize) {
    let learning = cpu_like_costs();
    let mut scheduler = Scheduler::new(scheduler_config);
    let mut results: Vec<Option<Delivered>> = vec![None; requests.len()];
    let mut widest = 0;
    let mut step = 0;
    while results.iter().any(Option::is_none) {
        for (i, request) in requests.iter().enumerate() {
            if request.joins_at_step == step {
                add(&mut scheduler, i, request, config(request, &learning), None);
            }
        }
        let (finished, stats) = scheduler.step(model());
        widest = widest.max(stats.sessions);
        for done in finished {
            let report = done.outcome.unwrap();
            assert_eq!(report.tokens, done.client.delivered, "delivered = reported");
            results[done.client.id] =
                Some((report.tokens, done.client.logprobs, report.finish_reason));
        }
        step += 1;
        assert!(step < 10_000, "the scheduler made no progress");
    }
    (results.into_iter().map(Option::unwrap).collect(), widest)
}

/// Every request of a batch produces what it produces alone, with the same
/// log-probabilities to the bit.
fn batch_matches_alone(
    requests: &[Request],
    prompt_tokens_per_step: usize,
) -> Result<(), TestCaseError> {
    let config = SchedulerConfig {
        prompt_tokens_per_step,
        ..SchedulerConfig::default()
    };
    let (results, _) = batched(requests, config);
    for (request, (tokens, logprobs, _)) in requests.iter().zip(&results) {
        let (alone_tokens, alone_logprobs) = alone(request);
        prop_assert_eq!(tokens, &alone_tokens, "{:?}", request);
        prop_assert_eq!(logprobs, &alone_logprobs, "{:?}", request);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_session_of_a_batch_produces_what_it_produces_alone(
        requests in proptest::collection::vec(request(), 1..6),
        prompt_tokens_per_step in 1usize..40,
    ) {
        batch_matches_alone(&requests, prompt_tokens_per_step)?;
    }

    #[test]
    fn every_session_of_a_batch_on_the_tensor_engine_produces_what_it_produces_alone(
        requests in proptest::collection::vec(request(), 1..6),
        prompt_tokens_per_step in 1usize..40,
    ) {
        ON_TENSOR_ENGINE.set(true);
        batch_matches_alone(&requests, prompt_tokens_per_step)?;
    }
}

#[test]
fn sessions_share_steps_and_a_cancelled_one_leaves_the_others_alone() {
    let learning = cpu_like_costs();
    let requests: Vec<Request> = (0..4)
        .map(|i| Request {
            prompt: (0..20).map(|t| (t * 7 + i * 3) % VOCAB).collect(),
            max_tokens: 24,
            seed: 0,
            speculate: i % 2 == 0,
            adaptive: true,
            joins_at_step: 0,
            not_ready_for: 0,
            penalties: 0,
            constrained: false,
        })
        .collect();
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    for (i, request) in requests.iter().enumerate() {
        let cancel_after = (i == 1).then_some(3);
        add(
            &mut scheduler,
            i,
            request,
            config(request, &learning),
            cancel_after,
        );
    }
    let mut finished = Vec::new();
    let mut widest = 0;
    while !scheduler.is_empty() {
        let (done, stats) = scheduler.step(model());
        widest = widest.max(stats.sessions);
        finished.extend(done);
    }
    assert_eq!(widest, 4, "all four sessions were in one pass");
    let cancelled: Vec<_> = finished
        .iter()
        .filter(|f| f.outcome.as_ref().unwrap().finish_reason == FinishReason::Cancelled)
        .collect();
    assert_eq!(cancelled.len(), 1);
    assert!(cancelled[0].client.delivered.len() >= 3);
    for done in &finished {
        let report = done.outcome.as_ref().unwrap();
        if report.finish_reason == FinishReason::Cancelled {
            continue;
        }
        assert_eq!(report.tokens, alone(&requests[done.client.id]).0);
    }
}

#[test]
fn a_long_prompt_is_processed_in_chunks_while_another_session_decodes() {
    let learning = cpu_like_costs();
    let short = Request {
        prompt: vec![1, 2, 3],
        max_tokens: 100,
        seed: 0,
        speculate: false,
        adaptive: true,
        joins_at_step: 0,
        not_ready_for: 0,
        penalties: 0,
        constrained: false,
    };
    let long = Request {
        prompt: (0..400).map(|t| (t * 5 + 1) % (VOCAB - 1)).collect(),
        ..short.clone()
    };
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    for request in [&short, &long] {
        let mut config = config(request, &learning);
        config.stop_tokens.clear();
        add(&mut scheduler, 0, request, config, None);
    }
    // The short prompt is done in the first step; from then on, every step that carries
    // prompt tokens of the long one also decodes the short one, and carries few enough that
    // the step costs at most twice the decoding row by the (frozen) costs.
    let (_, first) = scheduler.step(model());
    assert_eq!(first.prompt_tokens, 256, "{first:?}");
    let mut steps_with_both = 0;
    while scheduler.prefilling() > 0 {
        let (_, stats) = scheduler.step(model());
        assert_eq!(stats.sessions, 2, "{stats:?}");
        assert!((1..=5).contains(&stats.prompt_tokens), "{stats:?}");
        steps_with_both += 1;
    }
    assert!(steps_with_both >= 144 / 5, "{steps_with_both}");
}

/// A client that records the deadline it was given for its drafts.
struct DeadlineClient {
    seen: Arc<Mutex<Vec<(usize, Instant)>>>,
    id: usize,
}

impl Client for DeadlineClient {
    fn drafts(&mut self, _: &mut Session, deadline: Instant) -> Vec<(DrafterId, Vec<Proposal>)> {
        self.seen.lock().unwrap().push((self.id, deadline));
        Vec::new()
    }

    fn deliver(&mut self, _: &Session, _: &[TokenId]) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

#[test]
fn the_sessions_of_a_step_share_one_deadline_for_their_drafts() {
    let wait = std::time::Duration::from_millis(5);
    let mut scheduler = Scheduler::new(SchedulerConfig {
        draft_wait: wait,
        ..SchedulerConfig::default()
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut config = GenerationConfig::plain(6, Vec::new());
    config.tree.budget = 4;
    config.tree.max_depth = 2;
    for id in 0..3 {
        let session = Session::new(model(), &[1, 2, id], config.clone(), vec![]).unwrap();
        let client = DeadlineClient {
            seen: seen.clone(),
            id: id as usize,
        };
        scheduler.add(session, client);
    }
    while !scheduler.is_empty() {
        let before = Instant::now();
        let _ = scheduler.step(model());
        let step: Vec<(usize, Instant)> = seen.lock().unwrap().drain(..).collect();
        if step.is_empty() {
            continue;
        }
        // One deadline for every session of the step, at most the wait after it began: a
        // drafter that is slow for one session cannot make the others wait longer.
        assert_eq!(step.len(), 3);
        assert!(step.iter().all(|(_, d)| *d == step[0].1));
        assert!(step[0].1 >= before + wait);
        assert!(step[0].1 <= Instant::now() + wait);
    }
}

fn shared(a: &[TokenId], b: &[TokenId]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Prompts that share prefixes of every length with what ran before (its prompts, or a
    /// prompt and its answer, as a chat's next turn) start from the longest one computed and
    /// give exactly what they give alone.
    #[test]
    fn a_prompt_starts_from_the_longest_computed_prefix_and_gives_what_it_gives_alone(
        base in request(),
        follow_ups in proptest::collection::vec(
            (0usize..3, 0usize..80, proptest::collection::vec(0..VOCAB, 0..8), request()),
            1..6,
        ),
    ) {
        let mut scheduler = Scheduler::new(SchedulerConfig {
            prompt_tokens_per_step: 7,
            prefix_cache_bytes: usize::MAX,
            ..SchedulerConfig::default()
        });
        let learning = cpu_like_costs();
        let first = run_in(&mut scheduler, &base, config(&base, &learning));
        let mut sequences = vec![[base.prompt.clone(), first.tokens].concat()];
        for (source, cut, tail, settings) in follow_ups {
            // A prefix of an earlier sequence (which may be a whole prompt, or cut inside
            // the answer), then tokens of its own.
            let earlier = &sequences[source % sequences.len()];
            let mut prompt = earlier[..cut.min(earlier.len())].to_vec();
            prompt.extend(tail);
            if prompt.is_empty() {
                prompt.push(3);
            }
            let request = Request { prompt: prompt.clone(), ..settings };
            let report = run_in(&mut scheduler, &request, config(&request, &learning));
            prop_assert_eq!(&report.tokens, &alone(&request).0, "{:?}", request);
            // Every earlier sequence is held but its last token (whose keys and values were
            // never computed when it ended at the token limit); the prompt's own last token
            // is always computed.
            let most = prompt.len() - 1;
            let lower = sequences.iter().map(|s| shared(&s[..s.len() - 1], &prompt)).max().unwrap_or(0);
            let upper = sequences.iter().map(|s| shared(s, &prompt)).max().unwrap_or(0);
            prop_assert!(
                (lower.min(most)..=upper.min(most)).contains(&report.cached_tokens),
                "{} cached, expected {}..={}", report.cached_tokens, lower.min(most), upper.min(most)
            );
            sequences.push([prompt, report.tokens].concat());
        }
    }
}

#[test]
fn sessions_that_share_a_prompt_compute_it_once() {
    let system: Vec<TokenId> = (0..300).map(|t| (t * 7 + 2) % (VOCAB - 1)).collect();
    let requests: Vec<Request> = (0..3)
        .map(|i| Request {
            prompt: [system.clone(), vec![i, i + 1, 5, 7, 9]].concat(),
            max_tokens: 12,
            seed: if i == 2 { 77 } else { 0 },
            speculate: i == 1,
            adaptive: true,
            joins_at_step: 0,
            not_ready_for: 0,
            penalties: 0,
            constrained: false,
        })
        .collect();
    let learning = cpu_like_costs();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        prefix_cache_bytes: usize::MAX,
        ..SchedulerConfig::default()
    });
    for (i, request) in requests.iter().enumerate() {
        add(&mut scheduler, i, request, config(request, &learning), None);
    }
    let (mut computed, mut copied) = (0, 0);
    let mut reports = vec![None, None, None];
    while !scheduler.is_empty() {
        let (finished, stats) = scheduler.step(model());
        computed += stats.prompt_tokens;
        copied += stats.cached_tokens;
        for done in finished {
            reports[done.client.id] = done.outcome.ok();
        }
    }
    // The first computes its 305 tokens; the others copy the 300 shared ones and compute
    // their own 5.
    assert_eq!(computed, 305 + 5 + 5);
    assert_eq!(copied, 600);
    for (i, (request, report)) in requests.iter().zip(reports).enumerate() {
        let report = report.unwrap();
        assert_eq!(report.tokens, alone(request).0);
        assert_eq!(report.cached_tokens, if i == 0 { 0 } else { 300 });
    }
}

#[test]
fn a_long_cached_prompt_is_copied_a_bounded_share_per_step_beside_a_decoding_stream() {
    let long: Vec<TokenId> = (0..300).map(|t| (t * 5 + 1) % (VOCAB - 1)).collect();
    let plain = |prompt: Vec<TokenId>, max_tokens| Request {
        prompt,
        max_tokens,
        seed: 0,
        speculate: false,
        adaptive: true,
        joins_at_step: 0,
        not_ready_for: 0,
        penalties: 0,
        constrained: false,
    };
    let learning = cpu_like_costs();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        prefix_cache_bytes: usize::MAX,
        copy_tokens_per_step: 64,
        ..SchedulerConfig::default()
    });
    let first = plain(long.clone(), 4);
    run_in(&mut scheduler, &first, config(&first, &learning));
    // A stream that decodes, then the same long prompt with a new end.
    let stream = plain(vec![3, 1, 4, 1, 5], 40);
    add(&mut scheduler, 1, &stream, config(&stream, &learning), None);
    while scheduler.prefilling() > 0 {
        scheduler.step(model());
    }
    let again = plain([long, vec![9, 9, 2]].concat(), 6);
    add(&mut scheduler, 2, &again, config(&again, &learning), None);
    let mut copies = Vec::new();
    let mut reports = [None, None, None];
    while !scheduler.is_empty() {
        let (finished, stats) = scheduler.step(model());
        if stats.cached_tokens > 0 {
            copies.push(stats.cached_tokens);
            // Nothing of that prompt is computed while some of it is left to copy.
            if copies.iter().sum::<usize>() < 300 {
                assert_eq!(stats.prompt_tokens, 0, "copies {copies:?}");
            }
        }
        for done in finished {
            reports[done.client.id] = done.outcome.ok();
        }
    }
    // The 300 shared positions, 64 a step (the first answer's positions are not shared).
    assert_eq!(copies, [64, 64, 64, 64, 44], "positions copied per step");
    for (i, request) in [(1, &stream), (2, &again)] {
        let report = reports[i].take().unwrap();
        assert_eq!(report.tokens, alone(request).0, "request {i}");
    }
}

#[test]
fn the_prefix_cache_stays_within_its_budget_and_an_opted_out_request_neither_takes_nor_leaves() {
    let per_token = model().new_cache().bytes_per_token();
    let budget = 220 * per_token;
    let mut scheduler = Scheduler::new(SchedulerConfig {
        prefix_cache_bytes: budget,
        ..SchedulerConfig::default()
    });
    // Prompts of 60 tokens from 2 shared beginnings of 40: each leaves about 70 positions,
    // so three sequences fit and the rest are evicted, least recently used first.
    let requests: Vec<Request> = (0..12u32)
        .map(|i| Request {
            prompt: (0..60)
                .map(|t| {
                    if t < 40 {
                        (t * 3 + i % 2) % 40
                    } else {
                        (t + i) % 40
                    }
                })
                .collect(),
            max_tokens: 10,
            seed: u64::from(i % 3),
            speculate: i % 2 == 0,
            adaptive: true,
            joins_at_step: 0,
            not_ready_for: 0,
            penalties: 0,
            constrained: false,
        })
        .collect();
    let learning = cpu_like_costs();
    let mut hits = 0;
    for request in &requests {
        let report = run_in(&mut scheduler, request, config(request, &learning));
        assert_eq!(report.tokens, alone(request).0);
        assert!(scheduler.prefix_cache().bytes() <= budget);
        hits += usize::from(report.cached_tokens > 0);
    }
    assert!(hits >= 8, "{hits}");
    assert!(scheduler.prefix_cache().evictions() > 0);
    // Off for one request: it computes its whole prompt and leaves nothing.
    let before = (
        scheduler.prefix_cache().len(),
        scheduler.prefix_cache().bytes(),
    );
    let request = &requests[11];
    let mut opted_out = config(request, &learning);
    opted_out.prefix_cache = false;
    let report = run_in(&mut scheduler, request, opted_out);
    assert_eq!(report.cached_tokens, 0);
    assert_eq!(report.tokens, alone(request).0);
    let after = (
        scheduler.prefix_cache().len(),
        scheduler.prefix_cache().bytes(),
    );
    assert_eq!(before, after);
}

#[test]
fn a_prompts_log_probabilities_are_the_ones_decoding_gives_its_tokens() {
    // A greedy output and its tokens' log-probabilities, decoded after `start`.
    let start: Vec<TokenId> = (0..40).map(|t| (t * 5 + 3) % (VOCAB - 1)).collect();
    let decoded = Request {
        prompt: start.clone(),
        max_tokens: 30,
        seed: 0,
        speculate: false,
        adaptive: false,
        joins_at_step: 0,
        not_ready_for: 0,
        penalties: 0,
        constrained: false,
    };
    let (output, output_logprobs) = alone(&decoded);
    assert!(output.len() > 10, "{output:?}");
    // The same tokens as a prompt, with its log-probabilities asked for: computed in chunks
    // of a few tokens beside another session decoding, with the prompt's start in the
    // prefix cache (which this session must not take: its rows are needed).
    let learning = cpu_like_costs();
    let mut scheduler = Scheduler::new(SchedulerConfig {
        prompt_tokens_per_step: 7,
        prefix_cache_bytes: usize::MAX,
        ..SchedulerConfig::default()
    });
    run_in(&mut scheduler, &decoded, config(&decoded, &learning));
    let scored = Request {
        prompt: [start.clone(), output.clone()].concat(),
        max_tokens: 1,
        ..decoded.clone()
    };
    let other = Request {
        prompt: vec![1, 2, 3],
        max_tokens: 60,
        speculate: true,
        ..decoded.clone()
    };
    add(&mut scheduler, 1, &other, config(&other, &learning), None);
    let session = Session::new(
        model(),
        &scored.prompt,
        config(&scored, &learning),
        Vec::new(),
    )
    .unwrap()
    .with_prompt_logprobs(3)
    .unwrap();
    scheduler.add(
        session,
        TestClient {
            id: 0,
            drafters: Vec::new(),
            delivered: Vec::new(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            not_ready_for: 0,
            cancel_after_tokens: None,
        },
    );
    let prompt_logprobs = loop {
        let (finished, _) = scheduler.step(model());
        if let Some(done) = finished.into_iter().find(|d| d.client.id == 0) {
            let report = done.outcome.unwrap();
            assert_eq!(
                report.cached_tokens, 0,
                "the prompt was computed, not copied"
            );
            break done.client.prompt_logprobs;
        }
    };
    // One entry per prompt token after the first; those of the output are, to the bit,
    // what decoding gave.
    assert_eq!(prompt_logprobs.len(), scored.prompt.len() - 1);
    assert!(prompt_logprobs
        .iter()
        .zip(&scored.prompt[1..])
        .all(|(p, &t)| p.token == t && p.top.len() == 3));
    assert_eq!(&prompt_logprobs[start.len() - 1..], &output_logprobs[..]);
    assert!(
        Session::new(model(), &[1, 2], config(&scored, &learning), Vec::new())
            .unwrap()
            .with_prompt_logprobs(10_000)
            .is_err()
    );
}
