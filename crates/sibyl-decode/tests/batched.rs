//! Sessions run together by the scheduler (one forward pass per step, prompts in chunks,
//! speculation sized for the batch) produce exactly what each produces alone.

use proptest::prelude::*;
use sibyl_decode::{
    generate, Client, FinishReason, GenerationConfig, Learned, Scheduler, SchedulerConfig, Session,
    SharedLearning,
};
use sibyl_engine::testkit::{tiny_model, TinyModelConfig};
use sibyl_engine::Model;
use sibyl_ngram::{NgramConfig, NgramDrafter};
use sibyl_spec::{Drafter, DrafterId, Proposal, SamplingConfig, StepCosts, TokenId};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

const VOCAB: u32 = 48;

fn model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        tiny_model(&TinyModelConfig {
            vocab_size: VOCAB as usize,
            seed: 21,
            ..TinyModelConfig::default()
        })
        .unwrap()
    })
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

    fn deliver(&mut self, _: &Session, tokens: &[TokenId]) -> ControlFlow<()> {
        self.delivered.extend_from_slice(tokens);
        ControlFlow::Continue(())
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
}

fn request() -> impl Strategy<Value = Request> {
    (
        proptest::collection::vec(0..VOCAB, 1..60),
        1usize..30,
        prop_oneof![Just(0u64), 1u64..1000],
        any::<bool>(),
        any::<bool>(),
        0usize..6,
        prop_oneof![Just(0usize), 1usize..4],
    )
        .prop_map(
            |(prompt, max_tokens, seed, speculate, adaptive, joins_at_step, not_ready_for)| {
                Request {
                    prompt,
                    max_tokens,
                    seed,
                    speculate,
                    adaptive,
                    joins_at_step,
                    not_ready_for,
                }
            },
        )
}

fn config(request: &Request, learning: &SharedLearning) -> GenerationConfig {
    let sampling = match request.seed {
        0 => SamplingConfig::greedy(),
        seed => SamplingConfig {
            temperature: 0.9,
            top_k: None,
            top_p: Some(0.95),
            seed,
        },
    };
    GenerationConfig {
        max_tokens: request.max_tokens,
        sampling,
        draft_budget: if request.speculate { 12 } else { 0 },
        max_draft_depth: 5,
        min_draft_value: 0.0,
        exempt_draft_nodes: 1,
        learning: request.adaptive.then(|| learning.clone()),
        stop_tokens: vec![VOCAB - 1],
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

/// The request alone, without drafts: what it must produce in any batch.
fn alone(request: &Request) -> Vec<TokenId> {
    let mut plain = config(request, &cpu_like_costs());
    plain.draft_budget = 0;
    plain.learning = None;
    generate(model(), &request.prompt, &plain, &mut [], |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
    .tokens
}

/// Runs `requests` through one scheduler, each joining at its step; returns each one's
/// delivered tokens and finish reason, and the largest batch seen.
fn batched(
    requests: &[Request],
    scheduler_config: SchedulerConfig,
) -> (Vec<(Vec<TokenId>, FinishReason)>, usize) {
    let learning = cpu_like_costs();
    let mut scheduler = Scheduler::new(scheduler_config);
    let mut results: Vec<Option<(Vec<TokenId>, FinishReason)>> = vec![None; requests.len()];
    let mut widest = 0;
    let mut step = 0;
    while results.iter().any(Option::is_none) {
        for (i, request) in requests.iter().enumerate() {
            if request.joins_at_step == step {
                let session = Session::new(
                    model(),
                    &request.prompt,
                    config(request, &learning),
                    drafters(request)
                        .iter()
                        .map(|d| d.kind().to_string())
                        .collect(),
                )
                .unwrap();
                let client = TestClient {
                    id: i,
                    drafters: drafters(request),
                    delivered: Vec::new(),
                    not_ready_for: request.not_ready_for,
                    cancel_after_tokens: None,
                };
                scheduler.add(session, client);
            }
        }
        let (finished, stats) = scheduler.step(model());
        widest = widest.max(stats.sessions);
        for done in finished {
            let report = done.outcome.unwrap();
            assert_eq!(report.tokens, done.client.delivered, "delivered = reported");
            results[done.client.id] = Some((report.tokens, report.finish_reason));
        }
        step += 1;
        assert!(step < 10_000, "the scheduler made no progress");
    }
    (results.into_iter().map(Option::unwrap).collect(), widest)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn every_session_of_a_batch_produces_what_it_produces_alone(
        requests in proptest::collection::vec(request(), 1..6),
        prompt_tokens_per_step in 1usize..40,
    ) {
        let config = SchedulerConfig {
            prompt_tokens_per_step,
            ..SchedulerConfig::default()
        };
        let (results, _) = batched(&requests, config);
        for (request, (tokens, _)) in requests.iter().zip(&results) {
            prop_assert_eq!(tokens, &alone(request), "{:?}", request);
        }
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
        })
        .collect();
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    for (i, request) in requests.iter().enumerate() {
        let drafters = drafters(request);
        let kinds = drafters.iter().map(|d| d.kind().to_string()).collect();
        let session =
            Session::new(model(), &request.prompt, config(request, &learning), kinds).unwrap();
        let client = TestClient {
            id: i,
            drafters,
            delivered: Vec::new(),
            not_ready_for: 0,
            cancel_after_tokens: (i == 1).then_some(3),
        };
        scheduler.add(session, client);
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
        assert_eq!(report.tokens, alone(&requests[done.client.id]));
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
    };
    let long = Request {
        prompt: (0..400).map(|t| (t * 5 + 1) % (VOCAB - 1)).collect(),
        ..short.clone()
    };
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    for request in [&short, &long] {
        let mut config = config(request, &learning);
        config.stop_tokens.clear();
        let session = Session::new(model(), &request.prompt, config, vec![]).unwrap();
        scheduler.add(
            session,
            TestClient {
                id: 0,
                drafters: Vec::new(),
                delivered: Vec::new(),
                not_ready_for: 0,
                cancel_after_tokens: None,
            },
        );
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
    config.draft_budget = 4;
    config.max_draft_depth = 2;
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
